"""Where an input goes once its job has ended, and the folders the daemon writes into.

A success moves the input to processed/, a failure to failed/ with `<name>.error.json` beside it
(written atomically) saying why; `keep_inputs` leaves it in place, with the error file in failed/.
The move is recorded in the journal, so it is finished after a crash (`finish_input` is idempotent).
Nothing is created in or moved into a folder reached through a link (`safefs`): a link where
processed/ or failed/ should be is the folder's problem (`FolderProblem`), which blocks the rule.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path

from nst_core.errors import NSTError
from nst_core.outputs import atomic_write, name_max

from . import safefs
from .rules import Rule
from .jobs import FolderContext, Item
from .journal import Identity, Job
from .names import fit_name, numbered, show
from .safefs import LinkRefused, Place, fd_path

log = logging.getLogger("nst-daemon")

SIDECAR_SUFFIX = ".error.json"


class FolderProblem(NSTError):
    """A folder the daemon writes to cannot be used (full, read-only, a link): the rule waits."""

    kind = "folder"


def folder_problem(folder: Path, e: OSError) -> FolderProblem:
    if isinstance(e, LinkRefused):
        return FolderProblem(f"{show(e.path)} {e.what} (remove it; to keep files on another disk, configure "
                             "that folder's real path)")
    return FolderProblem(f"cannot write in {show(folder)} ({e.strerror or e})")


def finish_input(ctx: FolderContext, job: Job, item: Item, rule: Rule, ok: bool) -> None:
    """Move the input to processed/ or failed/ (failures get a sidecar first); idempotent after a crash.

    A success removes the sidecar of an earlier failure of the same input. A link where one of
    those folders should be blocks the rule (ctx.blocks): nothing is moved through it.
    """
    t0 = time.perf_counter()
    try:
        if ok and job.sidecar:
            _remove_sidecar(ctx, job, rule, item.root, Path(job.sidecar))
        if ok and not rule.keep_inputs:  # the error file of this name whose input left failed/ (moved back)
            failed = _failed_place(rule, item.root, item.path).path
            if not os.path.lexists(failed / item.path.name):
                _remove_sidecar(ctx, job, rule, item.root, failed / sidecar_name(item.path.name))
        if rule.keep_inputs:
            folder = _failed_place(rule, item.root, item.path)
            if ok:
                _remove_sidecar(ctx, job, rule, item.root, folder.path / sidecar_name(item.path.name))
            else:
                side = write_sidecar(folder, item.path.name, job, item, rule)
                ctx.journal.set_sidecar(job.id, side)
            return
        dest = Path(job.dest_path) if job.dest_path else None
        folder = (_processed_place if ok else _failed_place)(rule, item.root, item.path)
        if dest is not None and dest.parent != folder.path:
            dest = None  # decided under another configuration
        dfd = folder.open(create=True)
        try:
            if dest is None:
                dest = folder.path / free_name(folder.path / item.path.name, set(), dfd).name
                ctx.journal.set_dest(job.id, dest)
            if not ok:
                side = write_sidecar(folder, dest.name, job, item, rule, dfd)
                ctx.journal.set_sidecar(job.id, side)
            if os.path.lexists(item.path) and Identity.at(item.path) == job.input:
                src = Place.under(item.root, item.path.parent).open()
                try:
                    safefs.move(src, item.path.name, dfd, dest.name)
                finally:
                    os.close(src)
                ctx.journal.moved(job.id, dest)
        finally:
            os.close(dfd)
    except LinkRefused as e:
        ctx.blocks.block(rule.name, folder_problem(e.path, e).message)
    except OSError as e:
        log.error("%s: cannot move it to %s: %s (tried again at the next scan)",
                  item.path, "processed" if ok else "failed", e)
    finally:
        ctx.stats.add("move", time.perf_counter() - t0)


def move_duplicate(item: Item, rule: Rule) -> Path:
    """Move an input whose content was done already to processed/ (OSError, LinkRefused as they come)."""
    folder = _processed_place(rule, item.root, item.path)
    dfd = folder.open(create=True)
    try:
        dest = folder.path / free_name(folder.path / item.path.name, set(), dfd).name
        src = Place.under(item.root, item.path.parent).open()
        try:
            safefs.move(src, item.path.name, dfd, dest.name)
        finally:
            os.close(src)
        return dest
    finally:
        os.close(dfd)


def _processed_place(rule: Rule, root: Path, path: Path) -> Place:
    return Place.under(root, rule.processed_dir(root)).child(*_relative(path, root).parts[:-1])


def _failed_place(rule: Rule, root: Path, path: Path) -> Place:
    return Place.under(root, rule.failed_dir(root)).child(*_relative(path, root).parts[:-1])


def sidecar_name(name: str, limit: int = 255) -> str:
    """<input name>.error.json, shortened to fit the name limit."""
    return fit_name(name, limit, SIDECAR_SUFFIX)


def write_sidecar(folder: Place, name: str, job: Job, item: Item, rule: Rule, dfd: int | None = None) -> Path:
    """<name>.error.json in `folder`: what failed and why, written atomically; returns its path."""
    error = dict(job.error or {"kind": "unknown", "message": "unknown error"})
    error = {k: show(v) if isinstance(v, str) else v for k, v in error.items()}
    data = {
        "input": show(item.path),
        "rule": rule.name,
        "rule_version": rule.version,
        "error": error,
        "message": error.get("message", "unknown error"),
        "attempts": job.attempts,
        "content_sha256": job.content_hash if len(job.content_hash) == 64 else None,
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    text = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    own = dfd is None
    if own:
        dfd = folder.open(create=True)
    try:
        side = sidecar_name(name, name_max(dfd))
        try:
            atomic_write(fd_path(dfd, side), lambda f: f.write(text))
        except OSError as e:
            raise OSError(f"cannot write {show(folder.path / side)}: {e.strerror or e}") from None
    finally:
        if own:
            os.close(dfd)
    return folder.path / side


def _remove_sidecar(ctx: FolderContext, job: Job, rule: Rule, root: Path, side: Path) -> None:
    """Remove the error file of an earlier failure (reached without links); forget it in the journal."""
    base = Place.under(root, rule.failed_dir(root))
    try:
        rel = side.parent.relative_to(base.path)
    except ValueError:
        rel = None
    if rel is not None:
        try:
            dfd = base.child(*rel.parts).open()
        except OSError:
            dfd = None
        if dfd is not None:
            try:
                os.unlink(side.name, dir_fd=dfd)
                log.info("%s: removed %s, the error of an earlier attempt", job.in_path, side)
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)
    if job.sidecar:
        ctx.journal.set_sidecar(job.id, None)


def free_name(path: Path, reserved: set, dir_fd: int | None = None) -> Path:
    """path, or path with -1, -2, … before the extension: the first name that is neither taken nor reserved.

    Names are shortened to fit the file system's limit; with `dir_fd` (path's folder, open) names are
    looked up in that folder without following links."""
    limit = name_max(dir_fd if dir_fd is not None else path.parent)
    n = 0
    while True:
        p = path.with_name(numbered(path.name, n, limit))
        taken = safefs.exists(dir_fd, p.name) if dir_fd is not None else os.path.lexists(p)
        if not taken and p not in reserved:
            return p
        n += 1


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)
