"""Finding input files: watchdog events, full scans, network file systems, and the settle rule.

Events only say "look at this path"; a file is taken only when the `Settler` has seen its size
and times unchanged for the settle interval. Scans (at start-up, after a reload and at a regular
interval) find whatever events missed. Folders on network file systems get no reliable inotify
events, so they are polled (watchdog's PollingObserver).
"""

from __future__ import annotations

import logging
import os
import stat as _stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .config import Config, Rule, is_ignored_name

log = logging.getLogger("nst-daemon")


class _QuietStop(logging.Filter):
    """watchdog logs an ERROR for events that arrive while an observer stops; they are harmless here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStop())

# File system types whose change notifications do not cover changes made by other machines.
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "afs", "ceph", "glusterfs", "lustre",
    "gpfs", "beegfs", "ncpfs", "davfs", "sshfs", "fuse.sshfs", "fuse.glusterfs", "fuse.davfs2",
    "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.cephfs",
}


def network_fs(fstype: str) -> bool:
    return fstype in NETWORK_FS


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, fs type) pairs from /proc/self/mountinfo text (octal escapes decoded)."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or not rfields:
            continue
        point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
        out.append((point, rfields[0]))
    return out


def fs_type(path, mountinfo: str | None = None) -> str:
    """The file system type of the mount that holds `path` (the longest matching mount point)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "unknown"
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype in parse_mountinfo(mountinfo):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def polled(rule: Rule, root: Path) -> bool:
    return rule.poll == "always" or (rule.poll == "auto" and network_fs(fs_type(root)))


def scan(rule: Rule, root: Path) -> Iterator[Path]:
    """Every file under `root` that the rule accepts (not following symlinked folders)."""
    skipped = rule.skipped_dirs(root)
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as e:
            log.warning("cannot scan %s: %s", d, e)
            continue
        with it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if is_ignored_name(e.name):
                continue
            p = Path(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    if rule.recursive and p not in skipped:
                        stack.append(p)
                    continue
            except OSError:
                continue
            if rule.accepts(root, p):
                yield p


# ---- settle ----------------------------------------------------------------------------------------


@dataclass
class Pending:
    rule: str
    root: Path
    sig: tuple
    since: float  # monotonic time the signature was first seen


def signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


class Settler:
    """Paths waiting until their size and times have been unchanged for `settle` seconds."""

    def __init__(self, settle: float):
        self.settle = settle
        self._pending: dict[Path, Pending] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, path: Path, rule: str, root: Path) -> None:
        with self._lock:
            if path not in self._pending:
                self._pending[path] = Pending(rule, root, (), time.monotonic())

    def discard(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def ready(self, trust_ctime: Callable[[Path], bool] = lambda root: True) -> list[tuple[Path, Pending, os.stat_result]]:
        """Take the paths that have settled; drop those that vanished.

        A file whose change time (which no program can set) is already `settle` seconds old has
        settled on first sight; `trust_ctime(root)` is False for network folders, whose server
        clock may differ from ours.
        """
        now, wall = time.monotonic(), time.time()
        with self._lock:
            items = list(self._pending.items())
        out = []
        for path, p in items:
            try:
                st = os.lstat(path)
            except OSError:
                self.discard(path)
                continue
            if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISLNK(st.st_mode)):
                self.discard(path)
                continue
            sig = signature(st)
            settled = False
            if sig != p.sig:
                first = not p.sig
                p.sig, p.since = sig, now
                old = max(st.st_mtime, st.st_ctime) <= wall - self.settle
                settled = first and old and trust_ctime(p.root)
            else:
                settled = now - p.since >= self.settle
            if settled:
                self.discard(path)
                out.append((path, p, st))
        return out


# ---- events ----------------------------------------------------------------------------------------


class _Handler(FileSystemEventHandler):
    def __init__(self, on_path: Callable[[Path], None], on_dir: Callable[[Path], None]):
        self.on_path, self.on_dir = on_path, on_dir

    def on_any_event(self, event):
        if event.event_type in ("deleted", "opened", "closed_no_write"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        if not path:
            return
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.on_dir(Path(path))
            return
        self.on_path(Path(path))


class Watcher:
    """watchdog observers for every watched folder of a config: inotify locally, polling on network folders."""

    def __init__(self, config: Config, on_path: Callable[[Path], None], on_dir: Callable[[Path], None],
                 poll_interval: float):
        self.config = config
        self._handler = _Handler(on_path, on_dir)
        self._poll_interval = poll_interval
        self._observers: list = []
        self.modes: dict[Path, str] = {}

    def start(self) -> None:
        local, remote = Observer(), PollingObserver(timeout=self._poll_interval)
        used = set()
        for rule in self.config.rules:
            for root in rule.watch:
                obs = remote if polled(rule, root) else local
                try:
                    obs.schedule(self._handler, str(root), recursive=rule.recursive)
                except OSError as e:
                    log.warning("cannot watch %s (%s); it is still scanned every %gs", root, e,
                                self.config.settings.scan_interval)
                    continue
                self.modes[root] = "polled" if obs is remote else "inotify"
                used.add(obs)
        for obs in used:
            obs.daemon = True
            obs.start()
        self._observers = list(used)

    def stop(self) -> None:
        for obs in self._observers:
            obs.stop()
        for obs in self._observers:
            obs.join(timeout=10)
        self._observers = []
