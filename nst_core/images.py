"""Images in and out: the `Picture` type every part of Neural Style passes around.

Loading (`load_image`) applies the EXIF orientation, keeps alpha exactly, and keeps 16 bits per
channel where the file has them. TIFF is read with tifffile (with imagecodecs for LZW, JPEG and
the other compressions): every sample size, chunky or planar (PlanarConfiguration=2), grey, RGB or
palette, with or without alpha; the kinds it gives no RGB for (CMYK, YCbCr, L*a*b*) go to Pillow,
at 8 bits. Other formats are read with Pillow. Its PNG decoder reduces 16-bit RGB(A) and grey+alpha
to 8 bits; we let the same C decoder run a second time with the byte order of its unpacker swapped,
which yields the low bytes (for grey+alpha, the second pass copies the bytes as they are). That
keeps PNG decoding in Pillow's C code; the tests check the result against PNG files written byte by
byte. This relies on Pillow's unpacker names, hence the pin below its next major version.

Saving (`save_image`) is atomic (`outputs.atomic_write`: a hidden temporary file in the target
folder, fsync, rename, fsync of the folder). TIFF is written by tifffile (8 or 16 bits); 16-bit PNG by the small encoder below
(Pillow cannot write 16-bit RGB). JPEG and BMP have no alpha: pictures with alpha are composited
over white, as browsers and image editors flatten them.

Problems the user can fix are `ImageError`s that name the file and the problem.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tifffile
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .outputs import atomic_write, name_max

# Largest image accepted, in pixels, checked from the header before any pixel is decoded: 8192×8192
# (64 megapixels) covers every camera up to 61 MP and stays below Pillow's own warning threshold
# (~89.5 MP), so that within Pillow's hard limit the user sees our message with the dimensions.
MAX_PIXELS = 8192 * 8192

# Formats `load_image` opens. An allow-list: Pillow would also open EPS (by running Ghostscript)
# and a few exotic formats that have no business in a watch folder. (JPEG covers MPO, the
# multi-picture JPEG of many phones.)
READ_FORMATS = (
    "PNG", "JPEG", "WEBP", "TIFF", "BMP", "DIB", "GIF", "PPM", "TGA", "ICO", "JPEG2000",
    "AVIF", "QOI", "PCX", "SGI", "PSD",
)

# Output extensions and their formats; `check_output_path` rejects anything else.
SAVE_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
}
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
JPEG_QUALITY = 95
WEBP_QUALITY = 95

_ORIENTATION_TAG = 0x0112


@dataclass
class Picture:
    """An image as the engine sees it.

    rgb:       float32 tensor 3×H×W, sRGB values in [0, 1].
    alpha:     None, or an int32 tensor H×W holding the original alpha values exactly
               (0…255 for 8-bit, 0…65535 for 16-bit pictures).
    bit_depth: 8 or 16, the precision of the source (and of the output where the format allows).
    source:    where it came from, for messages.
    info:      extra facts about the source (format, mode, EXIF orientation applied, ...).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None
    bit_depth: int = 8
    source: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.rgb.shape[-1]

    @property
    def height(self) -> int:
        return self.rgb.shape[-2]

    @property
    def max_value(self) -> int:
        """The largest channel value at this bit depth (255 or 65535), which is alpha's scale."""
        return 65535 if self.bit_depth == 16 else 255

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


# ---- loading ------------------------------------------------------------------------------------

def load_image(path) -> Picture:
    """Read an image file into a `Picture`; any problem is an `ImageError` naming the file.

    Greyscale becomes three equal channels; palette images and colour-key transparency get an
    alpha channel where they have transparency; CMYK, YCbCr and the like are converted to RGB
    (without colour profiles); 16-bit integer and float ("F", taken as [0, 1]) sources give
    `bit_depth` 16. Animated and multi-page files give their first frame.
    """
    path = Path(path)
    _check_input_file(path)
    try:
        f = open(path, "rb")
    except PermissionError:
        raise ImageError(path, "permission denied: the file cannot be read") from None
    except OSError as e:
        raise ImageError(path, f"cannot open the file ({e.strerror or e})") from None
    with f:
        got = _read_tiff(f, path) if _is_tiff(f) else None
        if got is None:
            f.seek(0)
            got = _read_pillow(f, path)
    planes, alpha, depth, orientation, info = got
    rgb = torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1)).astype(np.float32))
    rgb /= 65535.0 if depth == 16 else 255.0
    a = None if alpha is None else torch.from_numpy(alpha.astype(np.int32))
    if orientation in _ORIENT_OPS and orientation != 1:
        rgb = _orient(rgb, orientation)
        a = None if a is None else _orient(a, orientation)
        info["exif_orientation"] = orientation
    return Picture(rgb.contiguous(), None if a is None else a.contiguous(), depth, str(path), info)


def _read_pillow(f, path: Path) -> tuple[np.ndarray, np.ndarray | None, int, int, dict]:
    """Decode with Pillow: planes, alpha, bit depth, EXIF orientation, info."""
    im = _open_checked(f, path)
    with im:
        try:
            planes, alpha, depth, notes = _decode(im, f)
            orientation = _exif_orientation(im)
        except ImageError:
            raise
        except MemoryError:
            raise ImageError(path, f"not enough memory to decode a {im.width}×{im.height} image") from None
        except (OSError, SyntaxError, EOFError, ValueError, TypeError, IndexError, KeyError,
                struct.error, zlib.error) as e:
            raise ImageError(path, f"the image data is truncated or damaged ({e})") from None
        return planes, alpha, depth, orientation, {"format": im.format, "mode": im.mode, **notes}


def _check_input_file(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except NotADirectoryError:
        raise ImageError(path, "no such file (a part of the path is not a folder)") from None
    except PermissionError:
        raise ImageError(path, "permission denied: the file cannot be reached") from None
    except OSError as e:
        raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "is not a regular file (a device, pipe or socket), not an image file")
    if st.st_size == 0:
        raise ImageError(path, "the file is empty (0 bytes)")


def _read_formats() -> list[str]:
    """READ_FORMATS that this Pillow build has (AVIF, for one, is recent)."""
    Image.init()
    return [f for f in READ_FORMATS if f in Image.OPEN]


def _open_checked(f, path: Path) -> Image.Image:
    """Image.open (the header only) and the size checks, before any pixel is decoded."""
    try:
        im = Image.open(f, formats=_read_formats())
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise ImageError(path, f"the image is too large ({n}; at most {MAX_PIXELS:,} pixels are "
                               "accepted): refusing to decode it (possibly a decompression bomb)") from None
    except UnidentifiedImageError:
        dims = _png_header_size(f)
        if dims is not None and 0 in dims:
            raise ImageError(path, f"the image has no pixels ({dims[0]}×{dims[1]})") from None
        raise ImageError(path, "not an image (or cut off within its header), or not in a format Neural "
                               f"Style reads ({', '.join(_read_formats())})") from None
    except (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error) as e:
        raise ImageError(path, f"cannot read the image header: truncated or damaged ({e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageError(path, f"the image has no pixels ({w}×{h})")
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageError(path, f"the image is too large: {w}×{h} = {w * h:,} pixels, at most {MAX_PIXELS:,} "
                               "are accepted (refusing to decode it: possibly a decompression bomb)")
    return im


def _png_header_size(f) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (Pillow refuses to open a PNG with a 0 side)."""
    try:
        f.seek(0)
        head = f.read(24)
    except OSError:
        return None
    if len(head) == 24 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
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


def _decode(im: Image.Image, f) -> tuple[np.ndarray, np.ndarray | None, int, dict]:
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


# ---- TIFF ---------------------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
# Photometric interpretations that tifffile's samples give RGB(A) for: MinIsWhite, MinIsBlack, RGB,
# palette. The rest (CMYK, YCbCr, CIE L*a*b*, ...) are left to Pillow, which converts them to RGB.
_TIFF_OWN = frozenset({0, 1, 2, 3})


def _is_tiff(f) -> bool:
    try:
        f.seek(0)
        head = f.read(4)
        f.seek(0)
    except OSError:
        return False
    return head in _TIFF_MAGIC


def _read_tiff(f, path: Path) -> tuple[np.ndarray, np.ndarray | None, int, int, dict] | None:
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
        if n > MAX_PIXELS or n * page.samplesperpixel > 4 * MAX_PIXELS:
            raise ImageError(path, f"the image is too large: {w}×{h}{f'×{depth}' if depth > 1 else ''} = {n:,} "
                                   f"pixels, at most {MAX_PIXELS:,} are accepted (refusing to decode it: "
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
        tag = page.tags.get(_ORIENTATION_TAG)
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


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not make the picture unreadable
        return 1
    return value if isinstance(value, int) else 1


# The transforms of PIL.ImageOps.exif_transpose, on the last two dimensions of a tensor.
_ORIENT_OPS = {
    1: lambda t: t,
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1, -2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1, -2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def _orient(t: torch.Tensor, orientation: int) -> torch.Tensor:
    return _ORIENT_OPS[orientation](t)


# ---- pixels as they are sent over the job protocol -----------------------------------------------

def picture_from_pixels(data, width: int, height: int, channels: int = 4, bit_depth: int = 8) -> Picture:
    """A `Picture` from raw interleaved RGB/RGBA rows (16-bit samples little-endian)."""
    _check_pixel_format(width, height, channels, bit_depth)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(None, f"pixel data must be bytes, got {type(data).__name__}")
    size = 1 if bit_depth == 8 else 2
    expected = width * height * channels * size
    got = memoryview(data).nbytes
    if got != expected:
        raise ImageError(None, f"pixel data has {got:,} bytes; {width}×{height} pixels with {channels} "
                               f"channels at {bit_depth} bits need {expected:,}")
    a = np.frombuffer(data, dtype=np.uint8 if bit_depth == 8 else "<u2").reshape(height, width, channels)
    rgb = torch.from_numpy(a[..., :3].transpose(2, 0, 1).astype(np.float32))
    rgb /= 255.0 if bit_depth == 8 else 65535.0
    alpha = torch.from_numpy(a[..., 3].astype(np.int32)) if channels == 4 else None
    return Picture(rgb.contiguous(), alpha, bit_depth, "pixels", {})


def picture_to_pixels(picture: Picture, channels: int = 4, bit_depth: int = 8) -> bytes:
    """Raw interleaved RGB/RGBA rows (16-bit little-endian): RGB rounded, alpha exact.

    Alpha is rescaled only where the bit depth changes (×257 up, rounded down); 4 channels from a
    picture without alpha are opaque; 3 channels drop alpha.
    """
    _check_pixel_format(picture.width, picture.height, channels, bit_depth)
    planes = _to_ints(picture, bit_depth, channels == 4)
    return planes.astype(np.uint8 if bit_depth == 8 else "<u2").tobytes()


def _check_pixel_format(width, height, channels, bit_depth) -> None:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ImageError(None, f"{name} must be a whole number above 0, got {v!r}")
    if width * height > MAX_PIXELS:
        raise ImageError(None, f"{width}×{height} = {width * height:,} pixels is more than the "
                               f"{MAX_PIXELS:,} accepted")
    if channels not in (3, 4) or isinstance(channels, bool):
        raise ImageError(None, f"channels must be 3 (RGB) or 4 (RGBA), got {channels!r}")
    if bit_depth not in (8, 16) or isinstance(bit_depth, bool):
        raise ImageError(None, f"bit depth must be 8 or 16, got {bit_depth!r}")


def _to_ints(picture: Picture, bit_depth: int, with_alpha: bool) -> np.ndarray:
    """H×W×(3|4) uint16 array at `bit_depth`: RGB rounded, alpha exact or rescaled."""
    _check_picture(picture)
    top = 65535 if bit_depth == 16 else 255
    rgb = torch.nan_to_num(picture.rgb.detach().to("cpu", torch.float32), nan=0.0)
    rgb = (rgb.clamp(0, 1) * top).round().to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16)
    if not with_alpha:
        return rgb
    if picture.alpha is None:
        a = np.full(rgb.shape[:2], top, dtype=np.uint16)
    else:
        a = _alpha_at(picture, bit_depth).numpy().astype(np.uint16)
    return np.concatenate([rgb, a[..., None]], -1)


def _alpha_at(picture: Picture, bit_depth: int) -> torch.Tensor:
    a = picture.alpha.detach().to("cpu", torch.int64).clamp(0, picture.max_value)
    if picture.bit_depth == bit_depth:
        return a
    if bit_depth == 16:
        return a * 257
    return (a * 255 + 32767) // 65535


def _check_picture(picture: Picture) -> None:
    rgb = picture.rgb
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 3 or rgb.shape[0] != 3 or rgb.shape[1] < 1 or rgb.shape[2] < 1:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ImageError(picture.source, f"a picture's rgb must be a 3×H×W tensor, got {shape}")
    if picture.bit_depth not in (8, 16):
        raise ImageError(picture.source, f"a picture's bit depth must be 8 or 16, got {picture.bit_depth!r}")
    if picture.alpha is not None and tuple(picture.alpha.shape) != tuple(rgb.shape[1:]):
        raise ImageError(picture.source, f"alpha is {tuple(picture.alpha.shape)}, rgb is {tuple(rgb.shape[1:])}")


# ---- resizing -----------------------------------------------------------------------------------

def fit(h: int, w: int, side: int) -> tuple[int, int]:
    """(height, width) with the longest side `side`, keeping the aspect ratio."""
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_picture(picture: Picture, longest_side: int | None = None, *,
                   size: tuple[int, int] | None = None) -> Picture:
    """A resized copy: to `longest_side` (aspect kept) or to `size=(width, height)`.

    RGB is resampled bicubically with antialiasing, weighted by alpha (premultiplied) so that
    invisible pixels do not bleed into visible ones; alpha with the same filter, rounded. An
    unchanged size gives an exact copy.
    """
    _check_picture(picture)
    w, h = picture.width, picture.height
    if (longest_side is None) == (size is None):
        raise ValueError("give either longest_side or size")
    if size is None:
        if isinstance(longest_side, bool) or not isinstance(longest_side, int) or longest_side < 1:
            raise ValueError(f"longest_side must be a whole number above 0, got {longest_side!r}")
        nh, nw = fit(h, w, longest_side)
    else:
        nw, nh = size
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (nw, nh)):
            raise ValueError(f"size must be two whole numbers above 0, got {size!r}")
    if nw * nh > MAX_PIXELS:
        raise ImageError(picture.source, f"resizing to {nw}×{nh} is more than the {MAX_PIXELS:,} pixels accepted")
    alpha = None if picture.alpha is None else picture.alpha.clone()
    if (nw, nh) == (w, h):
        return replace(picture, rgb=picture.rgb.clone(), alpha=alpha, info=dict(picture.info))

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]

    rgb = picture.rgb.detach().float()
    if picture.alpha is None:
        return replace(picture, rgb=filt(rgb).clamp(0, 1), info=dict(picture.info))
    top = picture.max_value
    a = picture.alpha.detach().to(rgb.device, torch.float32)[None] / top
    out = filt(torch.cat([rgb * a, a, rgb]))
    a2 = out[3:4].clamp(0, 1)
    new_alpha = (a2[0] * top).round().to(torch.int32)
    visible = new_alpha[None] > 0
    straight = out[:3].clamp(min=0) / a2.clamp(min=1e-8)
    rgb2 = torch.where(visible, straight, out[4:]).clamp(0, 1)
    return replace(picture, rgb=rgb2, alpha=new_alpha.cpu(), info=dict(picture.info))


# ---- saving -------------------------------------------------------------------------------------

def check_output_path(path, *, overwrite: bool = True) -> str:
    """Check up front that `path` can be written as an image; returns its format (e.g. "PNG").

    The extension must be one of `SAVE_FORMATS`, the name must fit the file system's limit, the
    folder must exist, and with ``overwrite=False`` the file must not exist yet.
    """
    path = Path(path)
    ext = path.suffix.lower()
    fmt = SAVE_FORMATS.get(ext)
    if fmt is None:
        known = ", ".join(sorted(SAVE_FORMATS))
        raise ImageError(path, f"unknown output extension {ext or '(none)'!r}; use one of {known}")
    folder = path.parent
    size, limit = len(os.fsencode(path.name)), name_max(folder)
    if size > limit:
        raise ImageError(path, f"the file name is {size} bytes long; the file system allows at most {limit}")
    if not folder.is_dir():
        raise ImageError(path, f"the folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise ImageError(path, "is a folder; give a file name to write")
    if not overwrite and os.path.lexists(path):
        raise ImageError(path, "already exists (and overwriting was not asked for)")
    return fmt


def save_image(picture: Picture, path, metadata: dict | None = None, *, overwrite: bool = True) -> None:
    """Write `picture` to `path` in the format its extension names, atomically.

    metadata: written as PNG text chunks, a JPEG comment or the TIFF ImageDescription (one
    ``key=value`` line each); WEBP and BMP ignore it. 16-bit pictures become 16-bit PNG/TIFF.
    """
    path = Path(path)
    fmt = check_output_path(path, overwrite=overwrite)
    _check_picture(picture)
    text = _metadata_text(path, metadata)
    sixteen = picture.bit_depth == 16 and fmt in SIXTEEN_BIT_FORMATS
    with_alpha = picture.alpha is not None and fmt in ALPHA_FORMATS
    if fmt == "TIFF":
        planes = _to_ints(picture, 16 if sixteen else 8, with_alpha)
        planes = planes if sixteen else planes.astype(np.uint8)
        write = lambda f: _write_tiff(f, planes, text)  # noqa: E731
    elif sixteen:
        planes = _to_ints(picture, 16, with_alpha)
        write = lambda f: f.write(_encode_png16(planes, text))  # noqa: E731
    else:
        im = _to_pil(picture, with_alpha)
        write = lambda f: _save_pil(im, f, fmt, text)  # noqa: E731
    try:
        atomic_write(path, write, overwrite=overwrite)
    except ImageError:
        raise
    except FileExistsError as e:
        if e.filename != str(path):
            raise ImageError(path, f"cannot write in {str(path.parent)!r} ({e.strerror or e})") from None
        raise ImageError(path, "already exists (and overwriting was not asked for)") from None
    except OSError as e:  # the daemon reads e from the ImageError's __context__
        if e.filename == str(path.parent):
            raise ImageError(path, f"cannot write in {str(path.parent)!r} ({e.strerror or e})") from None
        raise ImageError(path, f"cannot write the image ({e.strerror or e})") from None
    except Exception as e:
        raise ImageError(path, f"cannot write the image ({type(e).__name__}: {e})") from None


def _metadata_text(path: Path, metadata: dict | None) -> dict[str, str]:
    if not metadata:
        return {}
    out = {}
    for k, v in metadata.items():
        k = str(k)
        if not 1 <= len(k) <= 79 or k != k.strip() or any(not (32 <= ord(c) <= 126 or 161 <= ord(c) <= 255) for c in k):
            raise ImageError(path, f"metadata key {k!r} is not a valid PNG keyword (1-79 printable Latin-1 characters)")
        out[k] = str(v)
    return out


def _to_pil(picture: Picture, with_alpha: bool) -> Image.Image:
    """An 8-bit Pillow image; alpha kept (with_alpha) or composited over white."""
    if with_alpha:
        a = _to_ints(picture, 8, True).astype(np.uint8)
        return Image.fromarray(a, "RGBA")
    if picture.alpha is not None:
        alpha = _alpha_at(picture, 16).to(torch.float32) / 65535
        rgb = picture.rgb.detach().to("cpu", torch.float32).nan_to_num(0.0).clamp(0, 1)
        picture = replace(picture, rgb=rgb * alpha + (1 - alpha), alpha=None)
    return Image.fromarray(_to_ints(picture, 8, False).astype(np.uint8), "RGB")


def _save_pil(im: Image.Image, f, fmt: str, text: dict[str, str]) -> None:
    desc = "\n".join(f"{k}={v}" for k, v in text.items())
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        im.save(f, "PNG", pnginfo=info, compress_level=6)
    elif fmt == "JPEG":
        kw = {"comment": desc.encode("utf-8")} if desc else {}
        im.save(f, "JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True, **kw)
    elif fmt == "WEBP":
        im.save(f, "WEBP", quality=WEBP_QUALITY, method=4, exact=True)
    else:
        im.save(f, fmt)


def _write_tiff(f, planes: np.ndarray, text: dict[str, str]) -> None:
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


# ---- 16-bit PNG encoder (Pillow writes 16-bit grey only) ------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_ROWS_PER_BATCH = 256
_IDAT_SIZE = 1 << 20


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_text_chunk(key: str, value: str) -> bytes:
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _png_filter_rows(rows: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Filter a batch of rows (n×stride uint8) with the filter that libpng's heuristic picks per
    row (least sum of absolute signed bytes); returns n×(1+stride) with the filter byte first."""
    x = rows.astype(np.int16)
    up = np.vstack([prev[None].astype(np.int16), x[:-1]])
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[:, bpp:] = up[:, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    cands = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]) & 0xFF  # 5×n×stride
    cost = np.where(cands < 128, cands, 256 - cands).sum(axis=2)  # 5×n
    best = cost.argmin(axis=0)
    chosen = np.take_along_axis(cands, best[None, :, None], axis=0)[0].astype(np.uint8)
    return np.hstack([best.astype(np.uint8)[:, None], chosen])


def _encode_png16(planes: np.ndarray, text: dict[str, str]) -> bytes:
    """A 16-bit RGB or RGBA PNG (colour type 2 or 6) from an H×W×C uint16 array."""
    h, w, c = planes.shape
    rows = np.ascontiguousarray(planes, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    out = io.BytesIO()
    out.write(_PNG_SIGNATURE)
    out.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6 if c == 4 else 2, 0, 0, 0)))
    out.write(_png_chunk(b"sRGB", b"\0"))
    for k, v in text.items():
        out.write(_png_text_chunk(k, v))
    z = zlib.compressobj(6)
    pending = bytearray()
    prev = np.zeros(rows.shape[1], np.uint8)
    for start in range(0, h, _PNG_ROWS_PER_BATCH):
        batch = rows[start:start + _PNG_ROWS_PER_BATCH]
        pending += z.compress(_png_filter_rows(batch, prev, c * 2).tobytes())
        prev = batch[-1]
        while len(pending) >= _IDAT_SIZE:
            out.write(_png_chunk(b"IDAT", bytes(pending[:_IDAT_SIZE])))
            del pending[:_IDAT_SIZE]
    pending += z.flush()
    out.write(_png_chunk(b"IDAT", bytes(pending)))
    out.write(_png_chunk(b"IEND", b""))
    return out.getvalue()
