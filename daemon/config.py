"""The daemon's rule file: strict YAML validation; every error names the file, the line and the key.

The YAML is read as nodes with positions (`yamlnodes`). Engine parameters are validated by
`StyleParams.from_mapping`, the one source of their names and defaults; this module holds only
the daemon's own settings and rule keys: their defaults, and for a rule's simple keys a table
(`RULE_FIELDS`) of how each is read and checked. What it builds is in `rules`.

Relative paths in the file are relative to the folder that holds the file (so a config and its
folders can move together, and the service does not depend on its working directory); ~ and
$VAR/${VAR} are expanded, and an unset variable is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from nst_core.errors import NSTError, ParamError
from nst_core.params import StyleParams

from .rules import Config, Rule, Settings, check_template, folder_under, output_suffix, save_formats
from .yamlnodes import BAD, ConfigError, NodeReader, Problem, access_problem, describe_node, show_value

# ---- the daemon's own keys, their defaults and meanings -----------------------------------------

SETTINGS_DEFAULTS: dict[str, Any] = {
    "device": "auto",            # str or list: the job service's workers (one per device)
    "cluster": None,             # None: the devices above; auto or HOST:PORT: a Ray cluster's GPUs (one worker each)
    "cluster_resource": "GPU",   # what a cluster worker takes on a node: a GPU, or a custom Ray resource
    "journal": None,             # None: $STATE_DIRECTORY/journal.sqlite or ~/.local/state/nst-daemon/
    "socket": "default",         # null: no job service socket; "default": see default_socket()
    "socket_group": None,        # a group name: the socket is 0660 for that group (else 0600)
    "log_level": "info",
    "scan_interval": 60.0,       # seconds between full scans (events only enqueue; scans catch the rest)
    "settle": 2.0,               # seconds a file's size and times must stay unchanged
    "poll_interval": 2.0,        # seconds between polls of folders on network file systems
    "reload_on_change": False,   # reload when the config file changes (SIGHUP always reloads)
    "max_attempts": 3,           # runs of one job the daemon may die in before it is failed
    "stop_timeout": 20.0,        # on SIGTERM: wait this long for the running job, then requeue it
    "stall_timeout": 600.0,      # no engine progress for this long: stop feeding systemd's watchdog
    "incomplete_timeout": 120.0,  # a file that cannot be decoded fails once unchanged (and closed) this long
}
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_INCLUDE = ("*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff", "*.webp", "*.bmp")
RULE_DEFAULTS: dict[str, Any] = {
    "include": DEFAULT_INCLUDE,
    "exclude": (),
    "recursive": False,
    "name": "{stem}_{rule}{ext}",
    "on_collision": "number",
    "keep_inputs": False,
    "processed": "processed",
    "failed": "failed",
    "poll": "auto",
    "create": False,
    "min_input_side": 16,  # smaller inputs fail: upscaling a 1×1 image would invent every pixel
    "params": {},
}
REQUIRED_RULE_KEYS = ("rule", "watch", "style", "output")
RULE_KEYS = ("rule", "watch", "include", "exclude", "recursive", "style", "params", "output", "name",
             "on_collision", "keep_inputs", "processed", "failed", "poll", "create", "min_input_side")
COLLISIONS = ("overwrite", "number", "skip")
TOP_KEYS = ("settings", "defaults", "rules")
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# ---- the optional keys of a rule: how each is read and checked ------------------------------------

@dataclass(frozen=True)
class _Field:
    """kind: str, bool, int, "strings" (a string or a list of strings) or object (any YAML value);
    check(value): why the value is wrong, or None; convert(loader, value, node, key): the value as
    kept (None: a problem it noted); empty: "strings" may be an empty list."""

    kind: Any
    check: Callable[[Any], str | None] | None = None
    convert: Callable[[Any, Any, Any, str], Any] | None = None
    empty: bool = False


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda x: None if x in choices else f"must be one of {', '.join(choices)}, got {x!r}"


def _between(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda x: None if lo <= x <= hi else f"must be between {lo} and {hi}, got {x}"


def _folder_name(x: str) -> str | None:
    return None if x.strip() and ".." not in Path(x).parts else \
        "must be a folder name (relative to each watched folder) or an absolute path"


def _poll(x) -> str | None:
    return None if x is True or x is False or x == "auto" else f"must be auto, true or false, got {show_value(x)}"


RULE_FIELDS: dict[str, _Field] = {  # read in this order; their defaults are RULE_DEFAULTS
    "include": _Field("strings"),
    "exclude": _Field("strings", empty=True),
    "recursive": _Field(bool),
    "keep_inputs": _Field(bool),
    "create": _Field(bool),
    "name": _Field(str, check_template),
    "on_collision": _Field(str, _one_of(COLLISIONS)),
    "processed": _Field(str, _folder_name, lambda loader, x, node, key: loader.expand(x, node, key)),
    "failed": _Field(str, _folder_name, lambda loader, x, node, key: loader.expand(x, node, key)),
    "min_input_side": _Field(int, _between(1, 16384)),
    "poll": _Field(object, _poll, lambda loader, x, node, key: {True: "always", False: "never"}.get(x, "auto")),
}


# ---- loading -------------------------------------------------------------------------------------


def load_config(path, *, check_styles: bool = True) -> Config:
    """Read and validate a rule file; raise `ConfigError` listing every problem."""
    path = Path(path).expanduser().absolute()
    return _Loader(path, check_styles).load()


class _Loader(NodeReader):
    def __init__(self, path: Path, check_styles: bool):
        super().__init__(path)
        self.check_styles = check_styles
        self.watch_nodes: dict = {}
        self.folder_nodes: dict = {}  # (rule name, "processed"/"failed") → value node

    def load(self) -> Config:
        try:
            return self._load()
        except (RecursionError, MemoryError) as e:  # the bounds should make these impossible; never a traceback
            raise ConfigError([Problem(str(self.path), None, None, "", f"too large or too deeply nested to read "
                                       f"({type(e).__name__})")]) from None

    def _load(self) -> Config:
        root = self.compose()
        top = self.mapping(root, "", TOP_KEYS)
        if top is None:
            raise ConfigError(self.problems)
        settings = self.settings(top.get("settings"))
        base_params, defaults = self.defaults(top.get("defaults"))
        rules = self.rules(top.get("rules"), root, base_params, settings)
        if self.problems:
            raise ConfigError(self.problems)
        return Config(self.path, settings, tuple(rules), defaults)

    # -- sections --
    def settings(self, entry) -> Settings:
        values = dict(SETTINGS_DEFAULTS)
        m = self.mapping(entry[1], "settings", SETTINGS_DEFAULTS) if entry else {}
        m = m or {}
        num = (int, float)

        def positive(v):
            return None if v > 0 else f"must be greater than 0, got {v}"

        def nonneg(v):
            return None if v >= 0 else f"must be at least 0, got {v}"

        def finite(v):
            return None if math.isfinite(v) else f"must be a number of seconds, got {v}"

        for name, e in m.items():
            key = f"settings.{name}"
            if name == "device":
                devs = self.str_list(e, key)
                if devs is not BAD:
                    for d in devs:
                        try:
                            StyleParams.from_mapping({"device": d})
                        except ParamError as err:
                            self.problem(e[1], key, err.message.partition(": ")[2])
                    if "auto" in devs and len(devs) > 1:
                        self.problem(e[1], key, "'auto' cannot be combined with other devices")
                    values[name] = devs
            elif name == "journal":
                v = self.scalar(e, key, str, allow_none=True)
                values[name] = None if v in (None, BAD) else self.resolve(v, e[1], key)
                if values[name] is not None:
                    why = journal_problem(values[name])
                    if why:
                        self.problem(e[1], key, why)
            elif name == "socket":
                v = self.scalar(e, key, str, allow_none=True)
                values[name] = None if v is None else ("default" if v in (BAD, "default")
                                                       else self.resolve(v, e[1], key) or "default")
            elif name == "socket_group":
                from nst_core.service.access import socket_group_problem

                v = self.scalar(e, key, str, socket_group_problem, allow_none=True)
                values[name] = None if v is BAD else v
            elif name == "log_level":
                v = self.scalar(e, key, str, lambda v: None if v in LOG_LEVELS else
                                f"must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
                values[name] = SETTINGS_DEFAULTS[name] if v is BAD else v
            elif name == "reload_on_change":
                v = self.scalar(e, key, bool)
                values[name] = False if v is BAD else v
            elif name in ("cluster", "cluster_resource"):
                from nst_core.service.cluster import check_address, check_resource

                v = self.scalar(e, key, str, check_address if name == "cluster" else check_resource,
                                allow_none=name == "cluster")
                values[name] = SETTINGS_DEFAULTS[name] if v is BAD else v
            elif name == "max_attempts":
                v = self.scalar(e, key, int, lambda v: None if v >= 1 else f"must be at least 1, got {v}")
                values[name] = SETTINGS_DEFAULTS[name] if v is BAD else v
            else:  # seconds
                v = self.scalar(e, key, num, lambda v, n=name: finite(v) or (nonneg if n in ("settle", "stop_timeout")
                                                                             else positive)(v))
                values[name] = SETTINGS_DEFAULTS[name] if v is BAD else float(v)
        devices = values.pop("device")
        return Settings(devices=(devices,) if isinstance(devices, str) else tuple(devices), **values)

    def defaults(self, entry) -> tuple[StyleParams, dict]:
        if not entry:
            return StyleParams(), {}
        m = self.mapping(entry[1], "defaults", None)
        if m is None:
            return StyleParams(), {}
        return self.params(m, "defaults", None, entry[1]), {k: self.value(v, k) for k, (_, v) in m.items()}

    def params(self, m: dict, key: str, base: StyleParams | None, node, fallback: dict | None = None) -> StyleParams:
        """Validate engine parameters with StyleParams.from_mapping, one key at a time, then together."""
        raw = {}
        bad = False
        for name, (knode, vnode) in m.items():
            v = self.value(vnode, f"{key}.{name}")
            if v is BAD:
                bad = True
                continue
            try:
                StyleParams.from_mapping({name: v}, base=base)
            except ParamError as e:
                bad = True
                unknown = "unknown parameter" in e.message
                self.problem(knode if unknown else vnode, f"{key}.{name}", e.message.partition(": ")[2] or e.message)
                continue
            raw[name] = v
        if bad:
            return base or StyleParams()
        try:
            return StyleParams.from_mapping(raw, base=base)
        except ParamError as e:
            root = e.field.split(".")[0]
            where = next((n for n in m if n.replace("-", "_") == root), None)
            if where is not None:
                self.problem(m[where][1], f"{key}.{where}", e.message.partition(": ")[2] or e.message)
            elif fallback and (d := next((n for n in fallback if n.replace("-", "_") == root), None)):
                self.problem(fallback[d][1], f"defaults.{d}", e.message.partition(": ")[2] or e.message)
            else:
                self.problem(node, f"{key}.{e.field}", e.message.partition(": ")[2] or e.message)
            return base or StyleParams()

    def rules(self, entry, root, base: StyleParams, settings: Settings) -> list[Rule]:
        if entry is None:
            self.problem(root, "rules", "missing: give at least one rule")
            return []
        knode, seq = entry
        if not isinstance(seq, yaml.SequenceNode) or not seq.value:
            self.problem(seq, "rules", f"must be a non-empty list of rules, got {describe_node(seq)}")
            return []
        defaults_map = None
        if isinstance(root, yaml.MappingNode):
            for k, v in root.value:
                if getattr(k, "value", None) == "defaults" and isinstance(v, yaml.MappingNode):
                    defaults_map = {kk.value: (kk, vv) for kk, vv in v.value if isinstance(kk, yaml.ScalarNode)}
        out, names = [], {}
        for i, node in enumerate(seq.value):
            rule = self.rule(node, i, base, settings, defaults_map)
            if rule is None:
                continue
            if rule.name in names:
                self.problem(node, f"rules[{i}].rule", f"duplicate rule name {rule.name!r} (also rules[{names[rule.name]}])")
                continue
            names[rule.name] = i
            out.append(rule)
        self.overlaps(out, seq)
        return out

    def rule(self, node, i: int, base: StyleParams, settings: Settings, defaults_map) -> Rule | None:
        """One rule: its name, the keys of RULE_FIELDS, its folders, styles and parameters, then the
        checks that take several keys together. None (with the problems noted) where it is invalid."""
        m, key, name = self.rule_name(node, i)
        if m is None:
            return None
        ok = name is not None
        for req in REQUIRED_RULE_KEYS[1:]:
            if req not in m:
                self.problem(node, f"{key}.{req}", "missing")
                ok = False
        v = dict(RULE_DEFAULTS)
        for k, spec in RULE_FIELDS.items():
            if k in m:
                r = self.field(spec, m[k], f"{key}.{k}")
                ok &= r is not BAD
                v[k] = r
                if k in ("processed", "failed"):
                    self.folder_nodes[(name, k)] = m[k][1]
        ok &= self.writable_include(v, m, node, key, ok)
        watch, watch_ok = self.rule_watch(m, key, name, v["create"] is True)
        styles, style_hashes, pictures = self.rule_styles(m, key)
        output = self.rule_output(m, key, watch)
        params = base
        if "params" in m:
            pm = self.mapping(m["params"][1], f"{key}.params", None)
            if pm is None:
                ok = False
            else:
                n_before = len(self.problems)
                params = self.params(pm, f"{key}.params", base, m["params"][1], defaults_map)
                ok &= len(self.problems) == n_before
        ok = ok and watch_ok and styles is not None and output is not None
        if not (ok and self.rule_agrees(m, node, key, params, settings, styles, pictures)):
            return None
        pixel_params = {k: val for k, val in params.to_mapping().items() if k != "device"}
        version = hashlib.sha256(json.dumps({"params": pixel_params, "styles": style_hashes},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Rule(
            name=name, watch=tuple(watch), include=tuple(v["include"]), exclude=tuple(v["exclude"]),
            recursive=v["recursive"], styles=tuple(styles), params=params, output=output,
            template=v["name"], on_collision=v["on_collision"], keep_inputs=v["keep_inputs"],
            processed=v["processed"], failed=v["failed"], poll=v["poll"], create=v["create"] is True,
            min_input_side=v["min_input_side"], version=version, line=node.start_mark.line + 1,
        )

    def rule_name(self, node, i: int) -> tuple[dict | None, str, str | None]:
        """(the rule's keys, its key for messages: rules.NAME or rules[i], its name or None)."""
        key = f"rules[{i}]"
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if getattr(k, "value", None) == "rule" and isinstance(v, yaml.ScalarNode) and _RULE_NAME.match(v.value):
                    key = f"rules.{v.value}"
        m = self.mapping(node, key, RULE_KEYS)
        key = f"rules[{i}]"
        if m is None:
            return None, key, None
        if "rule" not in m:
            self.problem(node, f"{key}.rule", "missing: every rule needs a name (rule: NAME)")
            return m, key, None
        name = self.scalar(m["rule"], f"{key}.rule", str, lambda v: None if _RULE_NAME.match(v) else
                           "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return (m, key, None) if name is BAD else (m, f"rules.{name}", name)

    def field(self, spec: "_Field", entry, key: str):
        """A value read as `spec` says (BAD, with the problem noted, where it cannot be)."""
        r = self.str_list(entry, key, nonempty=not spec.empty) if spec.kind == "strings" else \
            self.scalar(entry, key, spec.kind, spec.check)
        if r is BAD or spec.convert is None:
            return r
        r = spec.convert(self, r, entry[1], key)
        return BAD if r is None else r

    def writable_include(self, v: dict, m: dict, node, key: str, ok: bool) -> bool:
        """With {ext} in the name, the output takes the input's format: each format the rule takes must be writable."""
        if not ok or output_suffix(v["name"]) is not None:
            return True
        unwritable = [g for g in v["include"] if _literal_suffix(g) and _literal_suffix(g) not in save_formats()]
        if unwritable:
            self.problem((m.get("include") or m.get("name") or (None, node))[1], f"{key}.include",
                         f"takes {', '.join(unwritable)}, but the name {v['name']!r} keeps the input's extension "
                         f"and those cannot be written; end the name in one of "
                         f"{', '.join(sorted(save_formats()))} (for example {{stem}}_{{rule}}.png)")
        return not unwritable

    def rule_watch(self, m: dict, key: str, name: str | None, create: bool) -> tuple[list[Path], bool]:
        """(the watched folders, whether all of them are usable)."""
        if "watch" not in m:
            return [], True
        r = self.str_list(m["watch"], f"{key}.watch")
        if r is BAD:
            return [], False
        ok, watch = True, []
        for p in r:
            d = self.resolve(p, m["watch"][1], f"{key}.watch")
            if d is None:
                ok = False
                continue
            if not d.is_dir() and not (create and not d.exists()):
                what = "is not a folder" if d.exists() else "no such folder (create it, or set create: true)"
                self.problem(m["watch"][1], f"{key}.watch", f"{d}: {what}")
                ok = False
            watch.append(d)
        if name is not None:
            self.watch_nodes[name] = m["watch"][1]
        if len(set(watch)) != len(watch):
            self.problem(m["watch"][1], f"{key}.watch", "a folder is listed twice")
            ok = False
        return watch, ok

    def rule_styles(self, m: dict, key: str) -> tuple[list[Path] | None, list[str], list]:
        """(style image paths, their hashes, their decoded pictures where checked); None paths where one is bad."""
        styles: list[Path] = []
        hashes: list[str] = []
        pictures: list = []
        if "style" not in m:
            return styles, hashes, pictures
        r = self.str_list(m["style"], f"{key}.style")
        if r is BAD:
            return None, hashes, pictures
        ok = True
        for p in r:
            f = self.resolve(p, m["style"][1], f"{key}.style")
            if f is None:
                ok = False
                continue
            msg = self.check_style(f, pictures)
            if msg:
                self.problem(m["style"][1], f"{key}.style", msg)
                ok = False
            else:
                try:
                    hashes.append(file_hash(f))
                except OSError as e:
                    self.problem(m["style"][1], f"{key}.style", f"{f}: cannot read ({e.strerror or e})")
                    ok = False
            styles.append(f)
        return (styles if ok else None), hashes, pictures

    def rule_output(self, m: dict, key: str, watch: list[Path]) -> Path | None:
        if "output" not in m:
            return None
        r = self.scalar(m["output"], f"{key}.output", str)
        if r is BAD:
            return None
        output = self.resolve(r, m["output"][1], f"{key}.output")
        if output is None:
            return None
        if output.exists() and not output.is_dir():
            self.problem(m["output"][1], f"{key}.output", f"{output}: is not a folder")
            return None
        if output in watch:
            self.problem(m["output"][1], f"{key}.output", "must not be a watched folder (outputs would be taken as inputs)")
            return None
        return output

    def rule_agrees(self, m: dict, node, key: str, params: StyleParams, settings: Settings, styles: list[Path],
                    pictures: list) -> bool:
        """The checks across keys: the device is the daemon's, the styles fit the parameters."""
        def param_node(field: str):
            pm_ = self.mapping(m["params"][1], "", None) if "params" in m else None
            hit = next((e for n, e in (pm_ or {}).items() if n.replace("-", "_") == field), None)
            return hit[1] if hit else (m["params"][1] if "params" in m else node)

        if (params.device != "auto" and not settings.cluster and "auto" not in settings.devices
                and params.device not in settings.devices):
            self.problem(param_node("device"), f"{key}.params.device", f"{params.device!r} is not one of the daemon's devices "
                                                        f"({', '.join(settings.devices)}; settings.device)")
            return False
        if not styles and params.style_weight > 0:
            self.problem(m["style"][1], f"{key}.style", "give at least one style image")
            return False
        if params.style_blend is not None and len(params.style_blend) != len(styles):
            self.problem(param_node("style_blend"), f"{key}.params.style_blend",
                         f"has {len(params.style_blend)} weights for {len(styles)} style images")
            return False
        if pictures and params.style_weight > 0:
            from nst_core.engine import check_style_sizes

            try:
                check_style_sizes(params, pictures)
            except ParamError as e:
                self.problem(m["style"][1], f"{key}.style", e.message.partition(": ")[2])
                return False
        return True

    def check_style(self, f: Path, pictures: list) -> str | None:
        """Why the style image `f` cannot be used, or None (its decoded picture is added to `pictures`)."""
        if not f.exists():
            return f"{f}: no such style image"
        if not f.is_file():
            return f"{f}: is not a file"
        if not self.check_styles:
            return None
        from nst_core.images import load_image

        try:
            pictures.append(load_image(f))
        except NSTError as e:
            return e.message
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad style image
            return f"{f}: cannot read image ({e})"
        return None

    def overlaps(self, rules: list[Rule], seq) -> None:
        """Watched folders of different rules must not overlap (a file belongs to one rule)."""
        seen: list[tuple[Path, Rule]] = []
        for rule in rules:
            for d in rule.watch:
                for other_d, other in seen:
                    if d == other_d:
                        msg = f"{d} is also watched by rule {other.name!r}"
                    elif other.recursive and _inside(d, other_d):
                        msg = f"{d} is inside {other_d}, which rule {other.name!r} watches recursively"
                    elif rule.recursive and _inside(other_d, d):
                        msg = f"{other_d} (rule {other.name!r}) is inside {d}, which this rule watches recursively"
                    else:
                        continue
                    self.problem(self.watch_nodes.get(rule.name), f"rules.{rule.name}.watch", msg)
                seen.append((d, rule))
        # Inputs moved to processed/ or failed/ must leave every watched folder, or they are taken again
        # (processed: "." renamed p.png to p-1.png, p-1-1.png, ... forever).
        watched = {_real(d): (d, r) for r in rules for d in r.watch}
        for rule in rules:
            for k in ("processed", "failed"):
                for root in rule.watch:
                    dest = folder_under(root, getattr(rule, k))
                    hit = watched.get(_real(dest))
                    if hit is None and dest != root:
                        continue
                    d, other = hit or (root, rule)
                    whose = "this rule's" if other is rule else f"rule {other.name!r}'s"
                    self.problem(self.folder_nodes.get((rule.name, k), self.watch_nodes.get(rule.name)),
                                 f"rules.{rule.name}.{k}", f"{dest} is {whose} watched folder {d}: files moved there "
                                 "would be taken again, forever; use a folder inside it (the default, "
                                 f"{RULE_DEFAULTS[k]!r}) or one outside every watched folder")
                    break


# ---- helpers -------------------------------------------------------------------------------------

def file_hash(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _real(p: Path) -> str:
    return os.path.realpath(p)


def _literal_suffix(pattern: str) -> str | None:
    """The extension an include glob fixes (``*.gif`` → ``.gif``), or None where it is open (``*``, ``*.*``)."""
    suffix = Path(pattern.split("/")[-1]).suffix.lower()
    return suffix if suffix and not any(c in suffix for c in "*?[") else None


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return child != parent
    except ValueError:
        return False


def journal_problem(path: Path) -> str | None:
    """Why the journal cannot be at `path`, or None (the file and its folder may not exist yet)."""
    why = access_problem(path)
    if why:
        return why
    if path.is_dir():
        return f"{path}: is a folder; give the journal's file name (for example {path / 'journal.sqlite'})"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{path}: {parent} is not a folder"
            break
    return None
