"""File names as the daemon meets them: any bytes but '/' and NUL, up to the file system's limit.

Paths are `str` with undecodable bytes kept as surrogates (os.fsdecode), so they round-trip to the
same bytes. `show` makes any name printable on one line (logs, STATUS, sidecars); `fit_name`
shortens a name the daemon makes (outputs, numbered names, sidecars) to what the folder allows.
"""

from __future__ import annotations

import hashlib
import os

NAME_MAX = 255  # bytes: what Linux file systems allow (images.name_max asks the folder's)

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def show(value) -> str:
    """`value` (a path, a name or any text) on one line, printable: control characters and bytes that
    are not UTF-8 become backslash escapes."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _ESCAPES.get(c) or
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def _size(s: str) -> int:
    return len(os.fsencode(s))


def split_name(name: str) -> tuple[str, str]:
    """(stem, extension) of a file name; a leading dot does not start an extension."""
    dot = name.rfind(".")
    if dot <= 0 or dot == len(name) - 1:
        return name, ""
    return name[:dot], name[dot:]


def fit_name(name: str, limit: int = NAME_MAX, suffix: str = "") -> str:
    """`name` + `suffix` if it fits in `limit` bytes; else the name's stem cut at a character boundary,
    with a short hash of the whole name so that different long names stay different, keeping the
    extension and `suffix`."""
    if _size(name + suffix) <= limit:
        return name + suffix
    stem, ext = split_name(name)
    mark = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    keep = limit - _size(mark + ext + suffix)
    if keep < 1:  # an absurd extension: cut the name as a whole
        stem, ext, keep = name, "", limit - _size(mark + suffix)
    cut = stem
    while cut and _size(cut) > keep:
        cut = cut[:-1]
    return cut + mark + ext + suffix


def numbered(name: str, n: int, limit: int = NAME_MAX) -> str:
    """name for n == 0, else name with -n before the extension, shortened to fit `limit` bytes."""
    if n == 0:
        return fit_name(name, limit)
    stem, ext = split_name(fit_name(name, limit))
    tail = f"-{n}{ext}"
    while stem and _size(stem + tail) > limit:
        stem = stem[:-1]
    return stem + tail
