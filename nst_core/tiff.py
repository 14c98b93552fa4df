"""TIFF in and out with tifffile: every layout (chunky or planar), sample size and compression it
reads, as 8- or 16-bit RGB planes with exact alpha; written chunky, Deflate, 8 or 16 bits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile

from .errors import ImageError

ORIENTATION_TAG = 0x0112  # TIFF tag 274, also the EXIF orientation

_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
# Photometric interpretations that tifffile's samples give RGB(A) for: MinIsWhite, MinIsBlack, RGB,
# palette. The rest (CMYK, YCbCr, CIE L*a*b*, ...) are left to Pillow, which converts them to RGB.
_TIFF_OWN = frozenset({0, 1, 2, 3})


def is_tiff(f) -> bool:
    try:
        f.seek(0)
        head = f.read(4)
        f.seek(0)
    except OSError:
        return False
    return head in _TIFF_MAGIC


def read_tiff(f, path: Path, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None, int, int, dict] | None:
    """Decode the first image of a TIFF with tifffile, every layout (chunky or planar), sample size
    and compression it knows; None for the kinds left to Pillow."""
    try:
        tif = tifffile.TiffFile(f)
    except Exception as e:  # tifffile raises several types for a damaged header
        raise ImageError(path, f"cannot read the image header: truncated or damaged ({e})") from None
    with tif:
        try:
            page = tif.pages[0]
            if int(page.photometric) not in _TIFF_OWN or page.dtype is None:
                return None
        except Exception as e:
            raise ImageError(path, f"cannot read the image header: truncated or damaged ({e})") from None
        w, h, depth = page.imagewidth, page.imagelength, max(1, page.imagedepth)
        if w <= 0 or h <= 0:
            raise ImageError(path, f"the image has no pixels ({w}×{h})")
        n = w * h * depth
        if n > max_pixels or n * page.samplesperpixel > 4 * max_pixels:
            raise ImageError(path, f"the image is too large: {w}×{h}{f'×{depth}' if depth > 1 else ''} = {n:,} "
                                   f"pixels, at most {max_pixels:,} are accepted (refusing to decode it: "
                                   "possibly a decompression bomb)")
        try:
            data = page.asarray()
            planes, alpha, bits, notes = _tiff_planes(page, data)
        except MemoryError:
            raise ImageError(path, f"not enough memory to decode a {w}×{h} image") from None
        except ImageError:
            raise
        except Exception as e:  # tifffile and imagecodecs raise many types for damaged data
            raise ImageError(path, f"the image data is truncated or damaged ({e})") from None
        tag = page.tags.get(ORIENTATION_TAG)
        orientation = int(tag.value) if tag is not None and isinstance(tag.value, int) else 1
        compression = getattr(page.compression, "name", str(page.compression))
        info = {"format": "TIFF", "mode": notes.pop("mode"), "bits_per_sample": page.bitspersample,
                "compression": compression, "planar": page.planarconfig == 2, **notes}
        if depth > 1:
            info["depth_note"] = f"the first of {depth} slices"
    return planes, alpha, bits, orientation, info


def _tiff_planes(page, data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int, dict]:
    """H×W×3 colour and H×W alpha at 8 or 16 bits from a page's samples."""
    # shaped: (separate samples, depth, length, width, contiguous samples); one of the two sample
    # axes is 1, so this puts the samples last whether the file is chunky or planar
    data = data.reshape(page.shaped)[:, 0].transpose(1, 2, 0, 3)
    data = data.reshape(data.shape[0], data.shape[1], -1)
    photometric = int(page.photometric)
    notes: dict = {}
    if photometric == 3:  # palette: 16-bit colour map entries taken to 8 bits, as Pillow does
        if page.colormap is None:
            raise ValueError("a palette image without a colour map")
        cmap = (np.asarray(page.colormap, np.uint16) >> 8).astype(np.uint8).T
        notes["mode"] = "P"
        return np.take(cmap, data[..., 0].astype(np.intp), axis=0, mode="clip"), None, 8, notes
    colour = 3 if photometric == 2 else 1
    spp = data.shape[-1]
    if spp < colour:
        raise ValueError(f"{spp} samples a pixel for RGB")
    extras = tuple(int(e) for e in page.extrasamples)
    # the first extra sample is alpha unless the file says it is "unspecified" data (0); without an
    # ExtraSamples tag, one extra sample is alpha (Pillow reads both cases so)
    has_alpha = spp > colour and (extras[0] != 0 if extras else spp == colour + 1)
    if data.dtype.kind == "f":
        notes["float_range"] = "values taken as [0, 1]"
    values, bits = _tiff_values(data[..., :colour + has_alpha], page)
    top = (1 << bits) - 1
    rgb, alpha = values[..., :colour], (values[..., colour].astype(np.int32) if has_alpha else None)
    if photometric == 0:
        rgb = top - rgb
    if alpha is not None and extras and extras[0] == 1:  # associated (premultiplied) alpha
        c, a = rgb.astype(np.int64), alpha[..., None]
        rgb = np.where(a > 0, np.minimum((c * top + a // 2) // np.maximum(a, 1), top), 0).astype(rgb.dtype)
    if colour == 1:
        rgb = np.repeat(rgb, 3, -1)
    notes["mode"] = ("RGB" if colour == 3 else "L") + ("A" if has_alpha else "")
    return rgb, alpha, bits, notes


def _tiff_values(a: np.ndarray, page) -> tuple[np.ndarray, int]:
    """Samples as uint8 (sources of 1 to 8 bits) or uint16 (wider ones, and floats taken as [0, 1])."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.rint(np.clip(a, 0.0, 1.0) * 65535).astype(np.uint16), 16
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * np.uint8(255), 8
    bits = int(page.bitspersample)
    if a.dtype.kind == "i":  # signed: the non-negative half is the range
        a, bits = np.clip(a, 0, None).astype(a.dtype.str.replace("i", "u")), bits - 1
    out_bits = 8 if bits <= 8 else 16
    dtype = np.uint8 if out_bits == 8 else np.uint16
    if bits == out_bits:
        return a.astype(dtype, copy=False), out_bits
    if bits > 16:
        return (a >> (bits - 16)).astype(np.uint16), 16
    top, m = (1 << out_bits) - 1, (1 << bits) - 1
    return ((a.astype(np.uint32) * top + m // 2) // m).astype(dtype), out_bits


def write_tiff(f, planes: np.ndarray, text: dict[str, str]) -> None:
    """RGB or RGBA (unassociated alpha), 8 or 16 bits a sample as `planes` holds them, chunky,
    Deflate with the horizontal predictor; metadata as the ImageDescription (TIFF ASCII is 7-bit:
    other characters become "?")."""
    desc = "\n".join(f"{k}={v}" for k, v in text.items()).encode("ascii", "replace").decode("ascii")
    buf = io.BytesIO()  # tifffile takes a file object's name for a path; ours is a descriptor
    tifffile.imwrite(buf, planes, photometric="rgb", planarconfig="contig",
                     extrasamples=["unassalpha"] if planes.shape[-1] == 4 else None,
                     compression="zlib", predictor=True, description=desc or None, metadata=None,
                     software=False, resolution=None)
    f.write(buf.getbuffer())
