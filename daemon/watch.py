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

from .rules import Config, Rule, is_ignored_name

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

# A file that cannot be decoded yet is looked at again after a delay that doubles from `settle` up to this.
MAX_RETRY_DELAY = 30.0
MIN_RETRY_DELAY = 0.5
# A writer that holds a file open without writing for this long is taken as gone (its close was missed).
WRITER_SILENCE = 3600.0


@dataclass
class Pending:
    rule: str
    root: Path
    sig: tuple
    since: float  # clock time the signature was first seen
    not_before: float = 0.0  # a deferred file is looked at again from then on (or when it changes)


@dataclass
class _Quiet:
    sig: tuple
    since: float  # clock time since which the file is unchanged
    delay: float  # the last back-off delay


def signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


class Settler:
    """Decides when a file is complete enough to take.

    A path waits until its size and times have been unchanged for `settle` seconds. A settled file
    that then cannot be decoded may still be being written (a writer that paused longer than
    `settle`): `unfinished` makes it wait, with back-off, while it is open for writing or has been
    unchanged for less than `patience` seconds. `clock` (monotonic) and `wall` (the time file times
    are in) are injectable, so that these decisions are tested without sleeping.
    """

    def __init__(self, settle: float, patience: float = 120.0, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.settle = settle
        self.patience = patience
        self.clock, self.wall = clock, wall
        self._pending: dict[Path, Pending] = {}
        self._quiet: dict[Path, _Quiet] = {}
        self._writers: dict[Path, float] = {}  # path → clock time of its last write event, while open
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, path: Path, rule: str, root: Path) -> None:
        with self._lock:
            if path not in self._pending:
                self._pending[path] = Pending(rule, root, (), self.clock())

    def defer(self, path: Path, rule: str, root: Path, delay: float, st: os.stat_result | None = None) -> None:
        """Look at `path` again in `delay` seconds, or as soon as it changes from `st`."""
        now = self.clock()
        with self._lock:
            self._pending[path] = Pending(rule, root, signature(st) if st else (), now, now + delay)

    def discard(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def taken(self, path: Path) -> None:
        """`path` decoded: what `unfinished` knew of it is no longer needed."""
        with self._lock:
            self._quiet.pop(path, None)

    def forget(self, path: Path) -> None:
        """Everything known about `path` (it was taken, or it is gone)."""
        with self._lock:
            self._pending.pop(path, None)
            self._quiet.pop(path, None)
            self._writers.pop(path, None)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    # -- writers (inotify events; folders that are polled give none) --
    def writing(self, path: Path, is_open: bool) -> None:
        """A write (is_open) or a close after writing was seen for `path`."""
        with self._lock:
            if is_open:
                self._writers[path] = self.clock()
            else:
                self._writers.pop(path, None)

    def events_lost(self) -> None:
        """The event queue overflowed: which files are open is not known any more."""
        with self._lock:
            self._writers.clear()

    def open_for_writing(self, path: Path) -> bool:
        with self._lock:
            t = self._writers.get(path)
        return t is not None and self.clock() - t < WRITER_SILENCE

    # -- decisions --
    def ready(self, trust_ctime: Callable[[Path], bool] = lambda root: True) -> list[tuple[Path, Pending, os.stat_result]]:
        """Take the paths that have settled; drop those that vanished.

        A file whose change time (which no program can set) is already `settle` seconds old has
        settled on first sight; `trust_ctime(root)` is False for network folders, whose server
        clock may differ from ours.
        """
        now, wall = self.clock(), self.wall()
        with self._lock:
            items = list(self._pending.items())
        out = []
        for path, p in items:
            try:
                st = os.lstat(path)
            except OSError:
                self.forget(path)
                continue
            if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISLNK(st.st_mode)):
                self.forget(path)
                continue
            sig = signature(st)
            if p.not_before > now and sig == p.sig:
                continue  # deferred, and unchanged since
            if sig != p.sig:
                first = not p.sig
                p.sig, p.since = sig, now
                old = max(st.st_mtime, st.st_ctime) <= wall - self.settle
                settled = first and old and trust_ctime(p.root)
            else:
                settled = now - p.since >= self.settle
            p.not_before = 0.0
            if settled:
                self.discard(path)
                out.append((path, p, st))
        return out

    def unfinished(self, path: Path, st: os.stat_result, trust_ctime: bool = True) -> float | None:
        """A settled file that cannot be decoded: seconds to wait before looking again, or None to fail it.

        It waits while it is open for writing, and until it has been unchanged for `patience`
        seconds (by its change time where `trust_ctime`, else since this process first saw it so);
        the delay doubles at each look, from `settle` up to MAX_RETRY_DELAY.
        """
        now = self.clock()
        sig = signature(st)
        with self._lock:
            q = self._quiet.get(path)
            if q is None or q.sig != sig:
                since = now
                if trust_ctime:
                    since = now - max(0.0, self.wall() - max(st.st_mtime, st.st_ctime))
                q = _Quiet(sig, since, 0.0)
            quiet = now - q.since
            t = self._writers.get(path)
            writing = t is not None and now - t < WRITER_SILENCE
            if not writing and quiet >= self.patience:
                self._quiet.pop(path, None)
                return None
            q.delay = min(max(q.delay * 2, self.settle, MIN_RETRY_DELAY), MAX_RETRY_DELAY)
            self._quiet[path] = q
            return q.delay if writing else max(MIN_RETRY_DELAY, min(q.delay, self.patience - quiet))


# ---- events ----------------------------------------------------------------------------------------


class _Handler(FileSystemEventHandler):
    def __init__(self, on_path: Callable[[Path], None], on_dir: Callable[[Path], None],
                 on_write: Callable[[Path, bool], None] | None = None, on_lost: Callable[[], None] | None = None):
        self.on_path, self.on_dir = on_path, on_dir
        self.on_write, self.on_lost = on_write, on_lost

    def on_any_event(self, event):
        kind = event.event_type
        if kind == "events_lost":
            if self.on_lost is not None:
                self.on_lost()
            return
        if kind in ("opened", "closed_no_write"):
            return
        path = event.dest_path if kind == "moved" else event.src_path
        if not path:
            return
        path = Path(os.fsdecode(path))
        if event.is_directory:
            if kind in ("created", "moved"):
                self.on_dir(path)
            return
        if self.on_write is not None:
            if kind in ("created", "modified"):
                self.on_write(path, True)
            elif kind in ("closed", "deleted"):
                self.on_write(path, False)
            elif kind == "moved":
                self.on_write(Path(os.fsdecode(event.src_path)), False)
        if kind != "deleted":
            self.on_path(path)


class Watcher:
    """watchdog observers for every watched folder of a config: inotify locally, polling on network folders."""

    def __init__(self, config: Config, on_path: Callable[[Path], None], on_dir: Callable[[Path], None],
                 poll_interval: float, on_write: Callable[[Path, bool], None] | None = None,
                 on_lost: Callable[[], None] | None = None):
        self.config = config
        self._handler = _Handler(on_path, on_dir, on_write, on_lost)
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
