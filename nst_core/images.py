"""Images in and out: the `Picture` type every part of Neural Style passes around.

Loading (`load_image`) applies the EXIF orientation, keeps alpha exactly, and keeps 16 bits per
channel where the file has them. TIFF is read with tifffile (with imagecodecs for LZW, JPEG and
the other compressions): every sample size, chunky or planar (PlanarConfiguration=2), grey, RGB or
palette, with or without alpha; the kinds it gives no RGB for (CMYK, YCbCr, L*a*b*) go to Pillow,
at 8 bits (`tiff`). Other formats are read with Pillow (`pillow_decode`, which gets all 16 bits of
16-bit PNGs out of Pillow's own decoder).

Saving (`save_image`) is atomic (`outputs.atomic_write`: a hidden temporary file in the target
folder, fsync, rename, fsync of the folder). TIFF is written by tifffile (8 or 16 bits); 16-bit PNG by `png16`
(Pillow cannot write 16-bit RGB). JPEG and BMP have no alpha: pictures with alpha are composited
over white, as browsers and image editors flatten them.

Problems the user can fix are `ImageError`s that name the file and the problem.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .outputs import atomic_write, name_max
from .pillow_decode import decode, exif_orientation, png_header_size
from .png16 import encode_png16
from .tiff import is_tiff, read_tiff, write_tiff

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
        got = read_tiff(f, path, MAX_PIXELS) if is_tiff(f) else None
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
            planes, alpha, depth, notes = decode(im, f)
            orientation = exif_orientation(im)
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
        dims = png_header_size(f)
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
        write = lambda f: write_tiff(f, planes, text)  # noqa: E731
    elif sixteen:
        planes = _to_ints(picture, 16, with_alpha)
        write = lambda f: f.write(encode_png16(planes, text))  # noqa: E731
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


