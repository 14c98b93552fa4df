"""Decoding with Pillow into 8- or 16-bit RGB planes and exact alpha.

Pillow's PNG decoder reduces 16-bit RGB(A) and grey+alpha to 8 bits; we let the same C decoder run
a second time with the byte order of its unpacker swapped, which yields the low bytes (for
grey+alpha, the second pass copies the bytes as they are). That keeps PNG decoding in Pillow's C
code; the tests check the result against PNG files written byte by byte. This relies on Pillow's
unpacker names, hence the pin below its next major version.
"""

from __future__ import annotations

import re
import struct
import sys

import numpy as np
from PIL import Image

from .png16 import PNG_SIGNATURE
from .tiff import ORIENTATION_TAG

def png_header_size(f) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (Pillow refuses to open a PNG with a 0 side)."""
    try:
        f.seek(0)
        head = f.read(24)
    except OSError:
        return None
    if len(head) == 24 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


# Pillow rawmodes of 16-bit samples that it reduces to 8 bits, and how to get all 16 back.
_WIDE_RGB = re.compile(r"(RGB|RGBA|RGBX);16([BLN])")
_WIDE_LA = re.compile(r"LA;16([BLN])")


def _tile_rawmode(im: Image.Image) -> str | None:
    if not im.tile:
        return None
    args = im.tile[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(im: Image.Image, rawmode: str) -> None:
    """Point every tile of a not yet loaded image at another rawmode."""
    tiles = []
    for t in im.tile:
        args = t[3]
        args = rawmode if isinstance(args, str) else (rawmode,) + tuple(args[1:])
        tiles.append(t._replace(args=args) if hasattr(t, "_replace") else (t[0], t[1], t[2], args))
    im.tile = tiles


def _native(order: str) -> str:
    return ("L" if sys.byteorder == "little" else "B") if order == "N" else order


def decode(im: Image.Image, f) -> tuple[np.ndarray, np.ndarray | None, int, dict]:
    """Pixels as H×W×3 uint8/uint16 planes, alpha (H×W or None), bit depth, notes for `info`."""
    notes: dict = {}
    raw = _tile_rawmode(im) or ""
    fmt = im.format
    if fmt == "TIFF" and ";16" in raw:  # only kinds tifffile leaves to Pillow (CMYK, YCbCr, ...)
        notes["precision_note"] = "16-bit samples read with 8-bit precision"
    m_rgb, m_la = _WIDE_RGB.fullmatch(raw), _WIDE_LA.fullmatch(raw)
    if (m_rgb or m_la) and fmt == "PNG":
        # 16-bit colour: Pillow keeps the high bytes; decode again for the low bytes.
        im.load()
        hi = np.asarray(im)
        try:
            f.seek(0)
            with Image.open(f, formats=[fmt]) as again:
                if m_rgb:
                    order = _native(m_rgb.group(2))
                    _with_rawmode(again, f"{m_rgb.group(1)};16{'B' if order == 'L' else 'L'}")
                    again.load()
                    lo = np.asarray(again)
                    wide = (hi.astype(np.uint16) << 8) | lo
                else:
                    order = _native(m_la.group(1))
                    _with_rawmode(again, "RGBA")  # 4 bytes a pixel, copied as they are
                    again.load()
                    b = np.asarray(again).astype(np.uint16)
                    if order == "B":
                        wide = np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], -1)
                    else:
                        wide = np.stack([b[..., 1] << 8 | b[..., 0], b[..., 3] << 8 | b[..., 2]], -1)
                    wide = np.concatenate([wide[..., :1]] * 3 + [wide[..., 1:]], -1)
        except (ValueError, KeyError) as e:
            # A Pillow without these unpackers: keep the 8 bits it gives, and say so.
            notes["precision_note"] = f"16-bit samples read with 8-bit precision ({e})"
            return _split_alpha(hi) + (8, notes)
        rgb, alpha = _split_alpha(wide)
        if alpha is None:
            rgb, alpha = _keyed(rgb, rgb, im.info.get("transparency"), 65535)
        return rgb, alpha, 16, notes

    mode = im.mode
    transparency = im.info.get("transparency")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im.load()
        a = np.asarray(im)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
            a = np.rint(np.clip(a, 0.0, 1.0) * 65535)
            notes["float_range"] = "values taken as [0, 1]"
            transparency = None
        grey = np.clip(a, 0, 65535).astype(np.uint16)
        return _keyed(np.stack([grey] * 3, -1), grey, transparency, 65535) + (16, notes)
    if mode in ("P", "PA"):
        has_t = mode == "PA" or transparency is not None or getattr(im.palette, "mode", "") == "RGBA"
        a = np.asarray(im.convert("RGBA" if has_t else "RGB"))
        return _split_alpha(a) + (8, notes)
    if mode in ("RGB", "RGBA", "L", "LA"):
        im.load()
        a = np.asarray(im)
        if mode in ("L", "LA"):
            a = a[..., None] if mode == "L" else a
            a = np.concatenate([a[..., :1]] * 3 + ([a[..., 1:]] if mode == "LA" else []), -1)
        if mode in ("RGB", "L"):
            return _keyed(a, a[..., 0] if mode == "L" else a, transparency, 255) + (8, notes)
        return _split_alpha(a) + (8, notes)
    # 1, CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La: Pillow converts these to RGB(A) (CMYK naively,
    # without a colour profile).
    target = "RGBA" if mode in ("RGBa", "La") else "RGB"
    return _split_alpha(np.asarray(im.convert(target))) + (8, notes)


def _split_alpha(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    return (a[..., :3], a[..., 3].copy()) if a.shape[-1] == 4 else (a, None)


def _keyed(rgb: np.ndarray, key_src: np.ndarray, key, opaque: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour-key transparency (PNG tRNS on grey or RGB) → an alpha channel."""
    if key is None or isinstance(key, (bytes, bytearray)):
        return rgb, None
    if isinstance(key, tuple):
        if key_src.ndim != 3 or len(key) != key_src.shape[-1]:
            return rgb, None
        hit = np.all(key_src == np.asarray(key, dtype=key_src.dtype), axis=-1)
    else:
        hit = key_src == key if key_src.ndim == 2 else np.all(key_src == key, axis=-1)
    return rgb, np.where(hit, 0, opaque).astype(np.int32)


def exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not make the picture unreadable
        return 1
    return value if isinstance(value, int) else 1
