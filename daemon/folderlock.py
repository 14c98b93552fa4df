"""Who watches a folder: one lock file per daemon instance in each watched folder.

Two daemons with different journals on one inbox would each find every file new in its own
journal and both process it. So a daemon holds `.nst-daemon.<journal key>.<instance>.lock` in
each folder it watches (an exclusive `flock`, released by the kernel when the process dies) and
refuses a folder where a live daemon with another journal holds one. Instances that share a
journal (nst-daemon@0, @1, …) share folders: the journal decides which one runs a job.

The file says which journal and socket its daemon uses, so `--dry-run` and `--check-config` run by
hand can read the running service's state instead of their own user's. The names start with a dot,
so the daemon never takes them as inputs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nst_core.errors import NSTError

PREFIX = ".nst-daemon."
SUFFIX = ".lock"


class FolderBusy(NSTError):
    """Another daemon, with another journal, watches the folder."""

    kind = "config"


@dataclass(frozen=True)
class Holder:
    """A daemon instance that holds (or held: `live` False) a watched folder."""

    path: Path
    key: str
    instance: str
    journal: str | None
    socket: str | None
    pid: int | None
    user: str | None
    live: bool

    def describe(self) -> str:
        who = f"nst-daemon pid {self.pid}" if self.pid else "an nst-daemon"
        if self.user:
            who += f" (user {self.user})"
        return f"{who} with the journal {self.journal or '(unknown)'}"


def journal_key(journal) -> str:
    """Identifies a journal file across processes (its resolved path)."""
    return hashlib.sha256(os.fsencode(os.path.realpath(journal))).hexdigest()[:16]


def _lock_name(key: str, instance: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", instance)[:64]
    return f"{PREFIX}{key}.{safe}{SUFFIX}"


def holders(folder: Path) -> list[Holder]:
    """Every lock file in `folder`, with whether a live process holds it; touches nothing."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            continue
        parts = name[len(PREFIX):-len(SUFFIX)].split(".", 1)
        if len(parts) != 2:
            continue
        path = Path(folder) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            live = _held(fd)
            info = _read_info(fd)
        finally:
            os.close(fd)
        out.append(Holder(path, parts[0], parts[1], info.get("journal"), info.get("socket"), info.get("pid"),
                          info.get("user"), live))
    return out


def live_holders(folders) -> list[Holder]:
    return [h for f in folders for h in holders(f) if h.live]


def _held(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _read_info(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class FolderLocks:
    """The lock files this daemon instance holds, one per watched folder."""

    def __init__(self, journal: Path, instance: str, socket: Path | None):
        self.key = journal_key(journal)
        self.name = _lock_name(self.key, instance)
        self.info = {"journal": str(journal), "socket": str(socket) if socket else None, "pid": os.getpid(),
                     "user": _user(), "instance": instance}
        self.held: dict[Path, int] = {}

    def acquire(self, folder: Path) -> str | None:
        """Hold `folder`; FolderBusy if a live daemon with another journal holds it. Returns a warning
        where the folder cannot hold a lock file (read-only to this user): then nothing is detected."""
        folder = Path(folder)
        if folder in self.held:
            return None
        path = folder / self.name
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return (f"cannot create the lock file {path} ({e.strerror}); another nst-daemon with another "
                            "journal on this folder would not be noticed")
                raise NSTError(f"{folder}: cannot create the lock file {path.name}: {e.strerror or e}") from None
            # Blocking: the journal's instance lock admits one process per instance, so only a checker's
            # brief shared lock can be in the way.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a checker may have removed it as stale between open and flock: lock the file that is there
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        for other in holders(folder):
            if other.path == path or other.key == self.key:
                continue  # this process, or an instance sharing this journal
            if other.live:
                _drop(fd, path)
                raise FolderBusy(f"{folder} is already watched by {other.describe()}; two journals on one folder "
                                 "would each process every file: give both daemons the same settings.journal "
                                 "(instances of one service share folders), or watch different folders")
            _remove_if_stale(other.path)  # left by a daemon that died
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        self.held[folder] = fd
        return None

    def release(self, folder: Path) -> None:
        fd = self.held.pop(Path(folder), None)
        if fd is not None:
            _drop(fd, Path(folder) / self.name)

    def release_all(self) -> None:
        for folder in list(self.held):
            self.release(folder)


def _remove_if_stale(path: Path) -> None:
    """Unlink a lock file nobody holds, holding it meanwhile (a daemon that opened it then finds it gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _drop(fd: int, path: Path) -> None:
    try:
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _user() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return None
