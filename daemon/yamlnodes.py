"""A YAML file read as nodes that keep their positions, so that every problem names the file, the
line and the key; `NodeReader` reads values of the expected kinds and notes each problem found.

The file is bounded before anything is built from it (its size, nesting and alias expansion), so
that no file can exhaust the stack or the memory of a running daemon at reload. Relative paths are
relative to the file's folder; ~ and $VAR/${VAR} are expanded, and an unset variable is a problem.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from nst_core.errors import NSTError

# Bounds on the file itself, checked on the YAML event stream before anything is built from it,
# so that no file (a 900-deep list, a "billion laughs" alias bomb) can exhaust the stack or the
# memory of a running daemon at reload. A real rule file is a few kB, 5 levels deep.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000  # scalars and collections, counting each alias as everything it stands for

BAD = object()  # what a reader returns for a value it noted a problem with



@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None  # 1-based
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(NSTError):
    """The rule file is invalid; `problems` lists every error found (file, line, key, message)."""

    kind = "config"

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems

    def to_mapping(self) -> dict:
        return {**super().to_mapping(), "problems": [p.__dict__ for p in self.problems]}


class NodeReader:
    """Reads one file's nodes; `problems` collects what is wrong, in the order found."""

    def __init__(self, path: Path):
        self.path = path
        self.base = path.parent
        self.problems: list[Problem] = []

    def problem(self, node, key: str, message: str) -> None:
        mark = getattr(node, "start_mark", None)
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        self.problems.append(Problem(str(self.path), line, col, key, message))

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError([Problem(str(self.path), None, None, "", "no such file")]) from None
        except OSError as e:
            raise ConfigError([Problem(str(self.path), None, None, "", f"cannot read ({e.strerror or e})")]) from None
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError([Problem(str(self.path), None, None, "", f"larger than {MAX_FILE_BYTES // 1024} kB; "
                                       "a rule file is a few kB (is this the right file?)")])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ConfigError([Problem(str(self.path), line, None, "", f"not UTF-8 text ({e.reason})")]) from None

    def bounds(self, text: str) -> None:
        """Refuse, from the event stream alone, nesting deeper than MAX_DEPTH and aliases that
        expand to more than MAX_VALUES values (PyYAML's parser is iterative; its composer and
        constructor recurse, and anything that walks an alias bomb's structure is exponential)."""
        open_: list[list] = []  # per open collection: [values inside so far, its anchor]
        sizes: dict[str, int] = {}  # anchor → how many values it stands for
        total = 0

        def fail(event, message):
            mark = event.start_mark
            raise ConfigError([Problem(str(self.path), mark.line + 1, mark.column + 1, "", message)])

        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                if len(open_) >= MAX_DEPTH:
                    fail(event, f"nested more than {MAX_DEPTH} levels deep; a rule file needs about 5")
                open_.append([1, event.anchor])
                n = 1
            elif isinstance(event, yaml.CollectionEndEvent):
                size, anchor = open_.pop()
                if anchor is not None:
                    sizes[anchor] = size
                if open_:
                    open_[-1][0] += size
                continue
            elif isinstance(event, yaml.ScalarEvent):
                n = 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                if any(a == event.anchor for _, a in open_):
                    fail(event, f"the alias *{event.anchor} is inside the value it names (a recursive structure)")
                n = sizes.get(event.anchor, 1)  # an undefined alias is the composer's error
            else:
                continue
            total += n
            if total > MAX_VALUES:
                fail(event, f"holds more than {MAX_VALUES:,} values once its aliases are expanded"
                            + (f" (*{event.anchor} alone stands for {n:,})" if isinstance(event, yaml.AliasEvent) else ""))
            if open_ and not isinstance(event, yaml.CollectionStartEvent):
                open_[-1][0] += n

    def compose(self):
        """The file's one YAML document as a node tree (ConfigError where it cannot be read, is
        beyond the bounds, is not YAML, or holds no single document)."""
        text = self.read()
        try:
            self.bounds(text)
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            msg = " ".join(x for x in (e.context, e.problem) if x) or str(e)
            raise ConfigError([Problem(str(self.path), mark.line + 1 if mark else None,
                                       mark.column + 1 if mark else None, "", f"YAML syntax: {msg}")]) from None
        except yaml.YAMLError as e:
            raise ConfigError([Problem(str(self.path), None, None, "", f"YAML: {e}")]) from None
        if len(docs) != 1 or docs[0] is None:
            raise ConfigError([Problem(str(self.path), 1, 1, "", "must hold exactly one YAML document "
                                       "with 'rules' (and optionally 'settings' and 'defaults')")])
        return docs[0]

    def mapping(self, node, key: str, allowed: Iterable[str] | None) -> dict | None:
        """{name: (key_node, value_node)}; unknown and duplicate keys are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key or "(top level)", f"must be a mapping, got {describe_node(node)}")
            return None
        out = {}
        allowed = None if allowed is None else tuple(allowed)
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode) or knode.tag != "tag:yaml.org,2002:str":
                self.problem(knode, key or "(top level)", "keys must be plain names")
                continue
            name = knode.value
            full = f"{key}.{name}" if key else name
            if name in out:
                self.problem(knode, full, "duplicate key (the first one is on line "
                                          f"{out[name][0].start_mark.line + 1})")
                continue
            if allowed is not None and name not in allowed:
                self.problem(knode, full, f"unknown key (known: {', '.join(allowed)})")
                continue
            out[name] = (knode, vnode)
        return out

    def value(self, node, key: str) -> Any:
        try:
            return yaml.constructor.SafeConstructor().construct_document(node)
        except yaml.MarkedYAMLError as e:
            self.problem(node, key, f"cannot read value ({e.problem or e})")
            return BAD
        except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise ValueError (a 5000-digit number),
            # AttributeError (!!timestamp 2001-99), ... for values they cannot build
            self.problem(node, key, f"cannot read value ({e})")
            return BAD

    def scalar(self, entry, key: str, kind, check=None, allow_none=False):
        """The value of a (key_node, value_node) entry if it has the right type (and passes `check`)."""
        _, vnode = entry
        v = self.value(vnode, key)
        if v is BAD:
            return BAD
        if v is None and allow_none:
            return None
        ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
        if not ok:
            self.problem(vnode, key, f"must be {_kind_name(kind)}, got {show_value(v)}")
            return BAD
        if check is not None:
            msg = check(v)
            if msg:
                self.problem(vnode, key, msg)
                return BAD
        return v

    def str_list(self, entry, key: str, nonempty=True) -> tuple[str, ...] | Any:
        _, vnode = entry
        v = self.value(vnode, key)
        if v is BAD:
            return BAD
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) or (nonempty and not v):
            self.problem(vnode, key, f"must be a string or a list of strings, got {show_value(v)}")
            return BAD
        return tuple(v)

    def resolve(self, p: str, node=None, key: str = "") -> Path | None:
        """A path from the file: ~ and $VAR/${VAR} expanded, relative to the file's folder (None: a problem)."""
        q = self.expand(p, node, key)
        if q is None:
            return None
        q = Path(q)
        path = Path(os.path.normpath(q if q.is_absolute() else self.base / q))
        why = access_problem(path)
        if why:
            self.problem(node, key, why)
            return None
        return path

    def expand(self, p: str, node=None, key: str = "") -> str | None:
        """~ and $VAR/${VAR}; an unset variable is a problem (None), not a folder literally named "$VAR"."""
        missing = []

        def var(m):
            name = m.group(1) or m.group(2)
            if name not in os.environ:
                missing.append(name)
                return m.group(0)
            return os.environ[name]

        out = _VAR.sub(var, os.path.expanduser(p))
        if missing:
            self.problem(node, key, f"{p}: the environment variable {', '.join('$' + m for m in missing)} is not set"
                                    + (" (systemd gives a service only the variables its unit sets: Environment=)"
                                       if "INVOCATION_ID" in os.environ else ""))
            return None
        return out


_VAR = re.compile(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")


def access_problem(path: Path) -> str | None:
    """Why `path` cannot even be looked at (a name too long, a folder on the way this user may not
    enter), or None; a path that does not exist is no problem here."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"{path}: {e.strerror or e}" + (" (for this user)" if e.errno in (errno.EACCES, errno.EPERM) else "")
    return None


def describe_node(node) -> str:
    if node is None:
        return "nothing"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _clip(repr(node.value)) if node.value != "" else "an empty value"


def _kind_name(kind) -> str:
    names = {str: "a string", bool: "true or false", int: "a whole number", (int, float): "a number"}
    return names.get(kind, str(kind))


def show_value(v) -> str:
    if v is None:
        return "nothing"
    return _clip(repr(v))


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
