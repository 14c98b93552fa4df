"""Folders and files below a trusted folder, reached without following symbolic links.

Anyone who can write to a shared inbox can put a link where the daemon expects a folder
(`ln -s /var/lib/nst-daemon inbox/processed`) or an input. The folder a path starts from (a watched
folder, the output folder, the parent of a configured absolute folder) is trusted as configured;
every name below it is opened with O_NOFOLLOW relative to the folder before it, so no link is
followed, and nothing checked can be swapped for a link before it is used.

Code that only takes paths (Pillow, `save_image`) is given `fd_path(fd, name)`, the name inside an
open folder as /proc/self/fd/N/name, which resolves to that folder and no other.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class LinkRefused(OSError):
    """A name where the daemon needs a folder or a file is a symbolic link (or not a folder)."""

    def __init__(self, path: Path, what: str):
        super().__init__(errno.ELOOP, what, str(path))
        self.path = path
        self.what = what

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass(frozen=True)
class Place:
    """A folder as a trusted start and the names below it that are opened without following links."""

    base: Path
    parts: tuple[str, ...] = ()

    @classmethod
    def under(cls, root: Path, folder: Path) -> "Place":
        """`folder` below the trusted `root` if it is there, else trusted up to its parent."""
        try:
            rel = folder.relative_to(root)
        except ValueError:
            return cls(folder.parent, (folder.name,)) if folder.name else cls(folder)
        return cls(root, rel.parts)

    @property
    def path(self) -> Path:
        return self.base.joinpath(*self.parts)

    def child(self, *names: str) -> "Place":
        return Place(self.base, self.parts + tuple(names))

    def open(self, create: bool = False) -> int:
        """A descriptor for the folder (created when asked); LinkRefused where a part is a link."""
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        here = self.base
        try:
            for part in self.parts:
                here = here / part
                try:
                    nfd = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = _open_dir(part, fd, here)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _refused(part, fd, here) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise


def _open_dir(part: str, fd: int, here: Path) -> int:
    try:
        return os.open(part, _DIR, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused(part, fd, here) from None
        raise


def _refused(part: str, fd: int, here: Path) -> LinkRefused:
    try:
        link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
    except OSError:
        link = True
    if link:
        return LinkRefused(here, "is a symbolic link; the daemon does not follow links here")
    return LinkRefused(here, "is not a folder")


def open_file(folder: Place, name: str) -> tuple[int, os.stat_result]:
    """A regular file in `folder`, opened for reading without following links, and its fstat.

    OSError (LinkRefused for a link, EINVAL for anything but a regular file) where it is not one.
    """
    dfd = folder.open()
    try:
        try:
            fd = os.open(name, _FILE, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LinkRefused(folder.path / name, "is a symbolic link; the daemon reads no input "
                                                      "through a link (copy or move the file in instead)") from None
            raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", str(folder.path / name))
    os.set_blocking(fd, True)
    return fd, st


def fd_path(fd: int, name: str = "") -> Path:
    """`name` inside the open folder `fd`, as a path that resolves through that very folder."""
    return Path(f"/proc/self/fd/{fd}") / name if name else Path(f"/proc/self/fd/{fd}")


def exists(dfd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False


def move(src_dfd: int, src_name: str, dst_dfd: int, dst_name: str) -> None:
    """Rename a file (or a link, as a link) between open folders; copy then delete across file systems."""
    try:
        os.rename(src_name, dst_name, src_dir_fd=src_dfd, dst_dir_fd=dst_dfd)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    st = os.lstat(src_name, dir_fd=src_dfd)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src_name, dir_fd=src_dfd), dst_name, dir_fd=dst_dfd)
    else:
        src = os.open(src_name, _FILE, dir_fd=src_dfd)
        try:
            dst = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          stat.S_IMODE(st.st_mode), dir_fd=dst_dfd)
            try:
                os.set_blocking(src, True)
                while True:
                    chunk = os.read(src, 1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(dst)
            except BaseException:
                os.close(dst)
                os.unlink(dst_name, dir_fd=dst_dfd)
                raise
            os.close(dst)
        finally:
            os.close(src)
    os.unlink(src_name, dir_fd=src_dfd)
