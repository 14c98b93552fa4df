"""Every file Neural Style writes goes through here: images (`images.save_image`), the daemon's
error files, the weights cache, the GIMP plug-in's installed files.

- `atomic_write`: a hidden temporary file beside the target, fsync, rename, fsync of the folder:
  the file appears whole or not at all, even across a power cut; a killed writer leaves only a
  temporary that `temporary_files` finds.
- `metadata`: the text an image carries, with the same keys from `nst stylize`, the job service and
  the daemon.
- `refuse_inputs`: an output never replaces one of the job's inputs.

Standard library only, so that the installer and the command line can use it before torch loads.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import IO, Callable

from .errors import ImageError

_TEMP_RANDOM = 12  # hex digits of randomness in a temporary name


def atomic_write(path, write: Callable[[IO[bytes]], object], *, overwrite: bool = True,
                 mode: int | None = None) -> None:
    """Call ``write(f)`` on a hidden temporary file beside `path` (see `temporary_name`), fsync it,
    give it `mode` (default: the mode of the file it replaces, or 0666 less the umask) and rename it
    to `path`, then fsync the folder. On any failure the temporary is removed and the error goes on: an OSError
    naming the folder where no temporary can be made there, FileExistsError naming `path` where it
    exists and ``overwrite`` is False, and whatever `write` or the file system raised otherwise."""
    path = Path(path)
    folder = path.parent
    try:
        fd, tmp = _create_temporary(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _new_file_mode(path) if mode is None else mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def name_max(folder) -> int:
    """The longest file name, in bytes, that the file system holding `folder` allows (255 if unknown)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temporary_name(path) -> str:
    """A hidden name for a temporary file beside `path`: ``.<name>.<hash>-<random>.tmp``, where the
    name is shortened (at a character boundary) so that the whole fits the folder's NAME_MAX
    whatever the length of `path`'s name, and the hash of the full name keeps two names that
    differ only past the cut apart. Creating it with O_EXCL (as `atomic_write` does) makes it unique."""
    return _temporary_prefix(Path(path)) + secrets.token_hex(_TEMP_RANDOM // 2) + ".tmp"


def temporary_files(path) -> list[Path]:
    """The temporary files beside `path` that writes to it left behind (a process killed while writing)."""
    path = Path(path)
    pattern = re.compile(re.escape(_temporary_prefix(path)) + f"[0-9a-f]{{{_TEMP_RANDOM}}}\\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def _temporary_prefix(path: Path) -> str:
    name = path.name
    digest = hashlib.blake2s(os.fsencode(name), digest_size=4).hexdigest()
    room = name_max(path.parent) - len(f"..{digest}-.tmp") - _TEMP_RANDOM
    head = name
    while head and len(os.fsencode(head)) > room:
        head = head[:-1]
    return f".{head}.{digest}-"


def _create_temporary(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / temporary_name(path)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Move tmp to path unless path exists, without a window in which another file could be replaced."""
    exists = FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError:  # a filesystem without hard links
        if os.path.lexists(path):
            raise exists from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _new_file_mode(path: Path) -> int:
    """The mode of the file being replaced, or 0666 less the umask (not the temporary's 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    umask = 0o022
    try:
        with open("/proc/self/status") as s:
            for line in s:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


# ---- what an output says about itself ----------------------------------------------------------

@functools.lru_cache(maxsize=1)
def product_name() -> str:
    """"neural-style" and its installed version: what outputs are signed with and the service's hello."""
    try:
        from importlib.metadata import version

        return f"neural-style {version('neural-style')}"
    except Exception:
        return "neural-style"


def metadata(result, program: str, **extra) -> dict[str, str]:
    """The text an output image carries; every front end writes these keys:

    ``Software`` (product and version, and the program: nst stylize, nst serve, nst-daemon),
    ``nst:weights`` (the weights' label), ``nst:params`` (the parameters as JSON, keys sorted),
    ``nst:note`` (only where the result says something about itself: random weights), and
    ``nst:<key>`` for each of `extra`, underscores as dashes (the daemon's rule, rule-version, source).
    """
    meta = {"Software": f"{product_name()} ({program})", "nst:weights": str(result.weights_label),
            "nst:params": json.dumps(result.params.to_mapping(), sort_keys=True, default=str)}
    if result.weights_note:
        meta["nst:note"] = result.weights_note
    for key, value in extra.items():
        meta["nst:" + key.replace("_", "-")] = str(value)
    return meta


def refuse_inputs(out, inputs) -> None:
    """An ImageError where `out` is one of `inputs` (the same file, under any name): no output
    replaces an input of its own job."""
    if not os.path.exists(out):
        return
    for path in inputs:
        if path and os.path.exists(path) and os.path.samefile(out, path):
            raise ImageError(out, "is one of the input images; refusing to overwrite an input")
