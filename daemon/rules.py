"""The daemon's validated configuration: its settings, its rules and what a rule takes, names and
does with a file (`Rule.accepts`, `Rule.output_name`). `config.load_config` builds one from a file.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nst_core.params import StyleParams

TEMPLATE_FIELDS = ("stem", "rule", "style", "ext", "date", "time")


# ---- the validated configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    devices: tuple[str, ...]
    journal: Path | None
    socket: Path | None | str  # a path, None (no socket) or "default"
    socket_group: str | None
    log_level: str
    scan_interval: float
    settle: float
    poll_interval: float
    reload_on_change: bool
    max_attempts: int
    stop_timeout: float
    stall_timeout: float
    incomplete_timeout: float
    cluster: str | None = None  # a Ray cluster's address (auto, HOST:PORT): its GPUs are the workers
    cluster_resource: str = "GPU"

    def journal_path(self, env=None) -> Path:
        """The journal file: as configured, else under systemd's StateDirectory, else XDG state."""
        env = os.environ if env is None else env
        if self.journal is not None:
            return self.journal
        if env.get("STATE_DIRECTORY"):
            return Path(env["STATE_DIRECTORY"].split(":")[0]) / "journal.sqlite"
        base = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "nst-daemon" / "journal.sqlite"

    def socket_path(self, env=None) -> Path | None:
        """The job service socket, or None when disabled."""
        env = os.environ if env is None else env
        if self.socket is None or isinstance(self.socket, Path):
            return self.socket
        if env.get("RUNTIME_DIRECTORY"):
            return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "nst.sock"
        from nst_core.service.client import user_socket_path

        return Path(user_socket_path())


@dataclass(frozen=True)
class Rule:
    name: str
    watch: tuple[Path, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    recursive: bool
    styles: tuple[Path, ...]
    params: StyleParams
    output: Path
    template: str
    on_collision: str
    keep_inputs: bool
    processed: str
    failed: str
    poll: str  # "auto", "always", "never"
    create: bool
    min_input_side: int
    version: str  # changes whenever anything that shapes the output pixels changes
    line: int | None = None

    def processed_dir(self, root: Path) -> Path:
        return folder_under(root, self.processed)

    def failed_dir(self, root: Path) -> Path:
        return folder_under(root, self.failed)

    def skipped_dirs(self, root: Path) -> set[Path]:
        return {self.processed_dir(root), self.failed_dir(root), self.output}

    def accepts(self, root: Path, path: Path) -> bool:
        """Whether a file at `path` (under the watched folder `root`) is one this rule takes."""
        try:
            rel = path.relative_to(root)
        except ValueError:
            return False
        parts = rel.parts
        if not parts or (len(parts) > 1 and not self.recursive):
            return False
        if any(is_ignored_name(p) for p in parts):
            return False
        if len(parts) > 1:
            skipped = self.skipped_dirs(root)
            d = root
            for p in parts[:-1]:
                d = d / p
                if d in skipped:
                    return False
        rel_s = "/".join(parts).lower()
        name = parts[-1].lower()

        def match(pattern: str) -> bool:
            pattern = pattern.lower()
            return fnmatch.fnmatchcase(rel_s if "/" in pattern else name, pattern)

        return any(match(p) for p in self.include) and not any(match(p) for p in self.exclude)

    def output_name(self, source: Path, when: _dt.datetime | None = None) -> str:
        return render_template(self.template, source, self.name, self.styles, when)

    def describe_params(self) -> str:
        p = self.params
        changed = {k: v for k, v in p.to_mapping().items() if v != StyleParams.default(k)}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in changed.items()) or "all engine defaults"
        return f"{shown}  (ratio alpha/beta={p.ratio:g}, {p.iterations} iterations at {f'{p.size}px' if p.size else 'the input size'})"


@dataclass(frozen=True)
class Config:
    path: Path
    settings: Settings
    rules: tuple[Rule, ...]
    defaults: dict = field(default_factory=dict)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def owner(self, path: Path) -> tuple[Rule, Path] | None:
        """The rule and watched folder that a file belongs to, if any (folders never overlap)."""
        for rule in self.rules:
            for root in rule.watch:
                if rule.accepts(root, path):
                    return rule, root
        return None


# ---- names ---------------------------------------------------------------------------------------

_IGNORED = (".*", "*.part", "*.crdownload", "*.tmp", "~$*")


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary names, which are left alone until renamed."""
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p) for p in _IGNORED)


class _When:
    """A date/time placeholder: ``{date}`` → 2024-05-31, ``{time}`` → 142501, ``{date:%Y%m}`` → strftime."""

    def __init__(self, when: _dt.datetime, default: str):
        self.when, self.default = when, default

    def __format__(self, spec: str) -> str:
        return self.when.strftime(spec or self.default)


def render_template(template: str, source: Path, rule: str, styles: Iterable[Path],
                    when: _dt.datetime | None = None) -> str:
    when = when or _dt.datetime.now()
    style = "+".join(Path(s).stem for s in styles) or "none"
    return template.format(
        stem=source.stem, ext=source.suffix, rule=rule, style=style,
        date=_When(when, "%Y-%m-%d"), time=_When(when, "%H%M%S"),
    )


def check_template(template: str) -> str | None:
    """None if the output name template is usable, else why not."""
    if not template.strip():
        return "must not be empty"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"bad template ({e}); placeholders are {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}"
    for _, fname, _, conv in parsed:
        if fname is None:
            continue
        if fname not in TEMPLATE_FIELDS:
            return (f"unknown placeholder {{{fname}}}; use "
                    f"{', '.join('{%s}' % f for f in TEMPLATE_FIELDS)} (date/time take strftime codes: {{date:%Y%m%d}})")
        if conv:
            return f"conversions such as !{conv} are not supported"
    try:
        sample = render_template(template, Path("photo.jpg"), "rule", [Path("style.png")])
    except (ValueError, TypeError) as e:
        return f"cannot format a name ({e})"
    p = Path(sample)
    if p.is_absolute() or ".." in p.parts or any(is_ignored_name(x) for x in p.parts):
        return f"must give a relative name without '..' or hidden/temporary parts (example: {sample!r})"
    if output_suffix(template) is not None and output_suffix(template) not in save_formats():
        return (f"the name must end in an image extension that can be written ({', '.join(sorted(save_formats()))}),"
                f" or in {{ext}} (example: {sample!r})")
    return None


def output_suffix(template: str) -> str | None:
    """The extension every output name gets, or None where it is the input's ({ext})."""
    a, b = (Path(render_template(template, Path("photo" + e), "rule", [Path("style.png")])).suffix.lower()
            for e in (".jpg", ".png"))
    return a if a == b else None


def save_formats() -> dict:
    from nst_core.images import SAVE_FORMATS  # the one list of writable formats, also used by save_image

    return SAVE_FORMATS


def folder_under(root: Path, folder: str) -> Path:
    p = Path(os.path.expanduser(folder))
    return p if p.is_absolute() else root / p


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}:{w:g}" for k, w in v.items()) + "}"
    return repr(v) if isinstance(v, str) else str(v)
