"""nst_core.images: loading, saving, pixel transport and resizing, on real files."""

from __future__ import annotations

import os
import resource
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import png  # pypng: a PNG decoder that is not ours, for our 16-bit PNGs
import pytest
import tifffile
import torch
from PIL import Image, ImageOps

from nst_core.errors import ImageError
from nst_core.images import (
    MAX_PIXELS,
    Picture,
    check_output_path,
    load_image,
    picture_from_pixels,
    picture_to_pixels,
    resize_picture,
    save_image,
)
from nst_core.outputs import temporary_files, temporary_name

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


# ---- helpers ------------------------------------------------------------------------------------

def png_bytes(width, height, bit_depth, color_type, rows: bytes | None = None, extra=b"") -> bytes:
    """A PNG written byte by byte (filter 0 on every row), independent of the code under test."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + idat + chunk(b"IEND", b"")


def write_png16(path, samples: np.ndarray) -> None:
    """samples: H×W×C uint16 with C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)."""
    h, w, c = samples.shape
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(png_bytes(w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], rows))


def write_png16_interlaced(path, samples: np.ndarray) -> None:
    """An Adam7-interlaced 16-bit RGB(A) PNG, byte by byte."""
    h, w, c = samples.shape
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = samples[y0::dy, x0::dx]
        if sub.size:
            rows += b"".join(b"\0" + r.astype(">u2").tobytes() for r in sub)
    data = bytearray(png_bytes(w, h, 16, 6 if c == 4 else 2, rows))
    data[28] = 1  # IHDR interlace method: Adam7
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def rgb16(picture: Picture) -> np.ndarray:
    return (picture.rgb * 65535).round().to(torch.int64).permute(1, 2, 0).numpy()


def noise(h, w, c, bits, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**bits, (h, w, c), dtype=np.uint16 if bits == 16 else np.uint8)


def pixels_of(a: np.ndarray) -> bytes:
    return a.astype("<u2").tobytes() if a.dtype == np.uint16 else a.tobytes()


# ---- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    a = noise(5, 8, 4, 8, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(a, "RGBA").save(path, exif=exif)

    pic = load_image(path)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im))
    assert (pic.height, pic.width) == want.shape[:2]
    assert (pic.height, pic.width) == ((8, 5) if orientation >= 5 else (5, 8))
    assert np.array_equal((pic.rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), want[..., :3])
    assert np.array_equal(pic.alpha.numpy(), want[..., 3])


def test_exif_rotation_of_a_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10] = 255  # a white band on the left of the stored image
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    pic = load_image(tmp_path / "r.jpg")
    assert (pic.width, pic.height) == (40, 60)
    assert pic.rgb[:, :10].mean() > 0.9 and pic.rgb[:, 15:].mean() < 0.1  # the band is now on top
    assert pic.info["exif_orientation"] == 6


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_values_are_not_truncated(tmp_path, channels):
    a = noise(6, 7, channels, 16, seed=channels)
    write_png16(tmp_path / "x.png", a)
    pic = load_image(tmp_path / "x.png")
    assert pic.bit_depth == 16
    grey = channels <= 2
    want_rgb = np.repeat(a[..., :1], 3, -1) if grey else a[..., :3]
    assert np.array_equal(rgb16(pic), want_rgb)
    assert (rgb16(pic) % 256).any()  # low bytes are there
    if channels in (2, 4):
        assert np.array_equal(pic.alpha.numpy(), a[..., -1])
        assert pic.alpha.dtype == torch.int32
    else:
        assert pic.alpha is None


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_interlaced_png(tmp_path, channels):
    a = noise(13, 11, channels, 16, seed=9)
    write_png16_interlaced(tmp_path / "i.png", a)
    with Image.open(tmp_path / "i.png") as im:
        assert im.info.get("interlace") == 1
    pic = load_image(tmp_path / "i.png")
    assert pic.bit_depth == 16 and picture_to_pixels(pic, channels, 16) == pixels_of(a)


@pytest.mark.parametrize("ext", ["png", "tif"])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_save_load_round_trip_is_bit_exact(tmp_path, ext, channels):
    a = noise(33, 41, channels, 16, seed=3)
    pic = picture_from_pixels(pixels_of(a), 41, 33, channels, 16)
    save_image(pic, tmp_path / f"x.{ext}")
    back = load_image(tmp_path / f"x.{ext}")
    assert back.bit_depth == 16
    assert picture_to_pixels(back, channels, 16) == pixels_of(a)


def test_16bit_png_is_a_standard_16bit_file(tmp_path):
    # a smooth image exercises all of PNG's row filters; Pillow's own (8-bit) reading must agree
    y, x = np.mgrid[0:64, 0:80]
    a = np.stack([x * 800, y * 1000, (x * y * 13) % 65536, 65535 - x * 500], -1).astype(np.uint16)
    save_image(picture_from_pixels(pixels_of(a), 80, 64, 4, 16), tmp_path / "s.png")
    raw = (tmp_path / "s.png").read_bytes()
    assert raw[24] == 16 and raw[25] == 6  # IHDR: 16 bits, RGBA
    with Image.open(tmp_path / "s.png") as im:
        assert np.array_equal(np.asarray(im), (a >> 8).astype(np.uint8))
    assert picture_to_pixels(load_image(tmp_path / "s.png"), 4, 16) == pixels_of(a)


def test_8bit_alpha_round_trip_is_bit_exact(tmp_path):
    a = noise(17, 23, 4, 8, seed=5)
    for ext in ("png", "tif", "webp"):
        save_image(picture_from_pixels(a.tobytes(), 23, 17, 4, 8), tmp_path / f"a.{ext}")
        back = load_image(tmp_path / f"a.{ext}")
        assert back.bit_depth == 8 and back.alpha is not None
        assert np.array_equal(back.alpha.numpy(), a[..., 3]), ext
        if ext != "webp":  # WEBP colour is lossy
            assert picture_to_pixels(back, 4, 8) == a.tobytes(), ext


def test_greyscale_palette_cmyk_and_float_are_accepted(tmp_path):
    g = noise(4, 5, 1, 8)[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    pic = load_image(tmp_path / "l.png")
    assert pic.alpha is None and torch.equal(pic.rgb[0], pic.rgb[2])
    assert np.array_equal((pic.rgb[1] * 255).round().byte().numpy(), g)

    Image.fromarray(np.stack([g, 255 - g], -1), "LA").save(tmp_path / "la.png")
    assert np.array_equal(load_image(tmp_path / "la.png").alpha.numpy(), 255 - g)

    Image.fromarray(g.astype(np.uint16) * 257 + 1).save(tmp_path / "i16.png")
    pic = load_image(tmp_path / "i16.png")
    assert pic.bit_depth == 16 and np.array_equal(rgb16(pic)[..., 0], g.astype(np.int64) * 257 + 1)

    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2, 2, 1, 0])
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=1)
    pal.save(tmp_path / "pt.gif", transparency=1)
    assert load_image(tmp_path / "p.png").alpha is None
    for name in ("pt.png", "pt.gif"):
        pic = load_image(tmp_path / name)
        assert pic.alpha.tolist() == [[255, 0, 255], [255, 0, 255]], name
        assert pic.rgb[:, 0, 0].tolist() == [1.0, 0.0, 0.0]

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    cmyk.save(tmp_path / "c.jpg", quality=100)
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        pic = load_image(tmp_path / name)
        assert pic.rgb.shape == (3, 4, 4) and pic.info["mode"] == "CMYK"
        r, g_, b = pic.rgb.mean(dim=(1, 2)).tolist()
        assert r > 0.9 and g_ < 0.1 and b < 0.1, name

    Image.fromarray(np.array([[0.0, 0.25], [1.0, 2.0]], np.float32), "F").save(tmp_path / "f.tif")
    pic = load_image(tmp_path / "f.tif")
    assert pic.bit_depth == 16 and pic.rgb[0].flatten().tolist() == pytest.approx([0, 0.25, 1, 1], abs=1e-4)


def test_rgb_colour_key_transparency_becomes_alpha(tmp_path):
    a = np.array([[[10, 20, 30], [1, 2, 3]]], np.uint8)
    Image.fromarray(a).save(tmp_path / "k.png", transparency=(1, 2, 3))
    assert load_image(tmp_path / "k.png").alpha.tolist() == [[255, 0]]


def test_real_photo_from_shared_images():
    path = SHARED_IMAGES / "tubingen.jpg"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    pic = load_image(path)
    with Image.open(path) as im:
        size = ImageOps.exif_transpose(im).size
    assert (pic.width, pic.height) == size
    assert pic.rgb.dtype == torch.float32 and 0 <= pic.rgb.min() and pic.rgb.max() <= 1
    assert pic.rgb.std() > 0.05 and pic.bit_depth == 8 and pic.source == str(path)


# ---- bad inputs ---------------------------------------------------------------------------------

def assert_image_error(path, *words):
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert str(path) in msg and e.value.path == str(path)
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_empty_folder_and_not_an_image(tmp_path):
    assert_image_error(tmp_path / "nope.png", "no such file")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_image_error(tmp_path / "empty.png", "empty")
    assert_image_error(tmp_path, "folder")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    assert_image_error(tmp_path / "notes.png", "not an image")
    (tmp_path / "file").write_text("x")
    assert_image_error(tmp_path / "file" / "inside.png", "not a folder")
    os.mkfifo(tmp_path / "pipe.png")
    assert_image_error(tmp_path / "pipe.png", "not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    try:
        assert_image_error(path, "permission denied")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
    full = tmp_path / f"full.{ext}"
    Image.fromarray(noise(64, 64, 3, 8)).save(full)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert_image_error(cut, "truncated")
    (tmp_path / f"head.{ext}").write_bytes(full.read_bytes()[:20])
    assert_image_error(tmp_path / f"head.{ext}")


def test_zero_size_and_bombs_are_refused_before_decoding(tmp_path):
    (tmp_path / "zero.png").write_bytes(png_bytes(0, 5, 8, 2))
    assert_image_error(tmp_path / "zero.png", "no pixels", "0×5")

    # headers only: a few dozen bytes on disk that claim 72 and 10,000 megapixels
    (tmp_path / "bomb.png").write_bytes(png_bytes(9_000, 8_000, 8, 2))
    assert (tmp_path / "bomb.png").stat().st_size < 100 and 9_000 * 8_000 > MAX_PIXELS
    msg = assert_image_error(tmp_path / "bomb.png", "9000×8000", "too large")
    assert f"{MAX_PIXELS:,}" in msg
    (tmp_path / "huge.png").write_bytes(png_bytes(100_000, 100_000, 8, 2))
    assert_image_error(tmp_path / "huge.png", "too large", "10,000,000,000")


# ---- saving -------------------------------------------------------------------------------------

def small_picture(alpha=True, bits=8):
    return picture_from_pixels(pixels_of(noise(9, 11, 4 if alpha else 3, bits)), 11, 9, 4 if alpha else 3, bits)


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.PNG") == "PNG"
    assert check_output_path(tmp_path / "a.jpeg") == "JPEG"
    with pytest.raises(ImageError, match=r"'\.gif'"):
        check_output_path(tmp_path / "a.gif")
    with pytest.raises(ImageError, match="does not exist"):
        check_output_path(tmp_path / "no" / "a.png")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ImageError, match="already exists"):
        check_output_path(tmp_path / "a.png", overwrite=False)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old content " * 10_000)
    out.chmod(0o640)
    save_image(small_picture(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert load_image(out).width == 11
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file's mode is kept
    fresh = tmp_path / "fresh.tif"
    umask = os.umask(0o022)
    os.umask(umask)
    save_image(small_picture(bits=16), fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.tif", "out.png"]
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_failed_saves_create_nothing(tmp_path):
    pic = small_picture()
    for bad in (tmp_path / "x.xyz", tmp_path / "missing" / "x.png", tmp_path / "noext"):
        with pytest.raises(ImageError) as e:
            save_image(pic, bad)
        assert str(bad) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_save_that_fails_while_writing_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.png"
    save_image(small_picture(), out)
    before = out.read_bytes()
    big = picture_from_pixels(noise(256, 256, 3, 8).tobytes(), 256, 256, 3, 8)  # ~200 KB of noise
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))  # writes past 50 KB fail
    try:
        with pytest.raises(ImageError) as e:
            save_image(big, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(out) in str(e.value)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_overwrite_false(tmp_path):
    out = tmp_path / "o.png"
    save_image(small_picture(), out, overwrite=False)
    before = out.read_bytes()
    with pytest.raises(ImageError, match="already exists"):
        save_image(small_picture(alpha=False), out, overwrite=False)
    assert out.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("bits", [8, 16])
def test_png_metadata_becomes_text_chunks(tmp_path, bits):
    meta = {"nst:weights": "random", "nst:note": "größer 日本"}
    save_image(small_picture(bits=bits), tmp_path / "m.png", metadata=meta)
    with Image.open(tmp_path / "m.png") as im:
        im.load()
        assert {k: im.text[k] for k in meta} == meta
    save_image(small_picture(), tmp_path / "m.jpg", metadata=meta)
    with Image.open(tmp_path / "m.jpg") as im:
        assert b"nst:weights=random" in im.info["comment"]


def test_formats_without_alpha_are_composited_over_white(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (200, 10, 10, 255)  # opaque red stays
    a[0, 1] = (0, 0, 0, 0)  # transparent black becomes white
    a[1, :] = (0, 0, 0, 128)  # half-transparent black becomes mid grey
    pic = picture_from_pixels(a.tobytes(), 2, 2, 4, 8)
    save_image(pic, tmp_path / "x.bmp")
    back = load_image(tmp_path / "x.bmp")
    assert back.alpha is None
    got = (back.rgb * 255).round().int().permute(1, 2, 0).tolist()
    assert got[0] == [[200, 10, 10], [255, 255, 255]]
    assert got[1] == [[127, 127, 127]] * 2
    save_image(pic, tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg").alpha is None


def test_16bit_picture_to_jpeg_is_8bit(tmp_path):
    save_image(small_picture(bits=16), tmp_path / "x.jpg")
    back = load_image(tmp_path / "x.jpg")
    assert back.bit_depth == 8 and (back.width, back.height) == (11, 9)


# ---- pixel transport ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels", [3, 4])
def test_pixels_round_trip_is_bit_exact(bits, channels):
    data = pixels_of(noise(13, 7, channels, bits, seed=bits + channels))
    pic = picture_from_pixels(data, 7, 13, channels, bits)
    assert (pic.width, pic.height, pic.bit_depth) == (7, 13, bits)
    assert pic.has_alpha == (channels == 4)
    assert picture_to_pixels(pic, channels, bits) == data


def test_pixel_conversions():
    a = np.array([[[255, 0, 128, 0], [1, 2, 3, 128]]], np.uint8)
    pic = picture_from_pixels(a.tobytes(), 2, 1, 4, 8)
    wide = np.frombuffer(picture_to_pixels(pic, 4, 16), "<u2").reshape(1, 2, 4)
    assert wide[..., 3].tolist() == [[0, 128 * 257]] and wide[0, 0, :3].tolist() == [65535, 0, 128 * 257]
    assert picture_to_pixels(pic, 3, 8) == a[..., :3].tobytes()
    opaque = picture_from_pixels(a[..., :3].tobytes(), 2, 1, 3, 8)
    assert picture_to_pixels(opaque, 4, 8)[3::4] == b"\xff\xff"


def test_bad_pixel_buffers():
    with pytest.raises(ImageError, match=r"has 11 bytes.*need 12"):
        picture_from_pixels(b"\0" * 11, 2, 2, 3, 8)
    with pytest.raises(ImageError, match="need 32"):
        picture_from_pixels(b"\0" * 16, 2, 2, 4, 16)
    for w, h, c, bits in ((0, 2, 3, 8), (2, -1, 3, 8), (2, 2, 5, 8), (2, 2, 3, 12), (MAX_PIXELS, 2, 3, 8)):
        with pytest.raises(ImageError):
            picture_from_pixels(b"", w, h, c, bits)


# ---- resizing -----------------------------------------------------------------------------------

def test_resize_keeps_aspect_and_is_exact_when_unchanged():
    pic = picture_from_pixels(pixels_of(noise(30, 40, 4, 16)), 40, 30, 4, 16)
    same = resize_picture(pic, 40)
    assert torch.equal(same.rgb, pic.rgb) and torch.equal(same.alpha, pic.alpha) and same.rgb is not pic.rgb
    small = resize_picture(pic, 20)
    assert (small.width, small.height, small.bit_depth) == (20, 15, 16)
    assert small.alpha.dtype == torch.int32 and 0 <= small.alpha.min() and small.alpha.max() <= 65535
    assert (resize_picture(pic, size=(7, 9)).width, resize_picture(pic, size=(7, 9)).height) == (7, 9)
    tall = picture_from_pixels(noise(50, 10, 3, 8).tobytes(), 10, 50, 3, 8)
    assert (resize_picture(tall, 25).width, resize_picture(tall, 25).height) == (5, 25)


def test_resize_antialiases_and_does_not_bleed_invisible_colour():
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    pic = picture_from_pixels(np.repeat(checker[..., None], 3, -1).tobytes(), 64, 64, 3, 8)
    small = resize_picture(pic, 8)
    assert small.rgb.sub(0.5).abs().max() < 0.02  # a fine checkerboard averages to grey

    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (255, 0, 0, 255)  # opaque red
    a[:, 8:] = (0, 255, 0, 0)  # invisible green
    half = resize_picture(picture_from_pixels(a.tobytes(), 16, 16, 4, 8), 8)
    visible = half.alpha > 0
    assert visible[:, :4].all() and not visible[:, 6:].any()
    assert half.rgb[1][visible].max() < 0.02  # no green in visible pixels


# ---- sample images ------------------------------------------------------------------------------

def test_samples_are_there_small_and_loadable():
    from nst_core.samples import SAMPLES, SAMPLES_DIR, sample_path

    assert (SAMPLES_DIR / "ATTRIBUTION.md").is_file()
    attribution = (SAMPLES_DIR / "ATTRIBUTION.md").read_text()
    for role, name in SAMPLES.items():
        path = sample_path(role)
        assert path == sample_path(name) == sample_path(Path(name).stem) == SAMPLES_DIR / name
        assert path.stat().st_size < 300_000 and name in attribution
        pic = load_image(path)
        assert max(pic.width, pic.height) <= 512 and pic.rgb.std() > 0.05
    for bad in ("nope", "../images.py", "ATTRIBUTION.md"):
        with pytest.raises(ImageError, match="no such sample"):
            sample_path(bad)


# ---- TIFF: inputs written by tifffile, our outputs read by tifffile ------------------------------

LAYOUTS = {"grey": (1, "minisblack"), "grey+alpha": (2, "minisblack"), "rgb": (3, "rgb"), "rgba": (4, "rgb")}


def write_tiff(path, samples: np.ndarray, *, planar=False, compression=None, **kw) -> None:
    """samples: H×W×C (C as in LAYOUTS), written by tifffile, chunky or planar (PlanarConfiguration=2)."""
    c = samples.shape[-1]
    photometric = LAYOUTS[{1: "grey", 2: "grey+alpha", 3: "rgb", 4: "rgb"}[c]][1]
    data = samples[..., 0] if c == 1 else samples
    if planar and c > 1:
        data = np.ascontiguousarray(samples.transpose(2, 0, 1))
    extras = {"extrasamples": ["unassalpha"]} if c in (2, 4) else {}
    kw.setdefault("rowsperstrip", 4)  # several strips, so that every strip is decoded and placed
    tifffile.imwrite(path, data, photometric=photometric, planarconfig="separate" if planar and c > 1 else "contig",
                     compression=compression, metadata=None, **extras, **kw)


def expected_planes(samples: np.ndarray):
    """(rgb H×W×3, alpha H×W or None) that a layout's samples must load as."""
    c = samples.shape[-1]
    rgb = np.repeat(samples[..., :1], 3, -1) if c <= 2 else samples[..., :3]
    return rgb, (samples[..., -1] if c in (2, 4) else None)


def loaded_planes(pic: Picture):
    top = pic.max_value
    rgb = (pic.rgb * top).round().to(torch.int64).permute(1, 2, 0).numpy()
    return rgb, (None if pic.alpha is None else pic.alpha.numpy())


def test_16bit_planar_tiff_loads_with_the_right_values(tmp_path):
    # the file of the report: 16-bit RGB, PlanarConfiguration=2 (Pillow reads it as 8-bit garbage)
    a = noise(21, 17, 3, 16, seed=12)
    write_tiff(tmp_path / "planar.tif", a, planar=True)
    with tifffile.TiffFile(tmp_path / "planar.tif") as t:
        assert t.pages[0].planarconfig == 2 and t.pages[0].bitspersample == 16
    pic = load_image(tmp_path / "planar.tif")
    assert pic.bit_depth == 16 and pic.alpha is None
    assert np.array_equal(loaded_planes(pic)[0], a)


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "packbits"])
@pytest.mark.parametrize("layout,planar", [(name, planar) for name in LAYOUTS for planar in (False, True)
                                           if not (planar and name == "grey")],  # one sample: no planar layout
                         ids=lambda v: ("planar" if v else "chunky") if isinstance(v, bool) else v)
@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_in(tmp_path, bits, layout, planar, compression):
    c = LAYOUTS[layout][0]
    a = noise(19, 13, c, bits, seed=bits * 10 + c)
    kw = {"predictor": True} if compression in ("zlib", "lzw") else {}  # horizontal differencing, as writers do
    write_tiff(tmp_path / "in.tif", a, planar=planar, compression=compression, **kw)
    pic = load_image(tmp_path / "in.tif")
    assert pic.bit_depth == bits and (pic.width, pic.height) == (13, 19)
    want_rgb, want_alpha = expected_planes(a)
    got_rgb, got_alpha = loaded_planes(pic)
    assert np.array_equal(got_rgb, want_rgb)
    assert (want_alpha is None) == (got_alpha is None)
    if want_alpha is not None:
        assert got_alpha.dtype == np.int32 and np.array_equal(got_alpha, want_alpha)


@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_miniswhite_and_associated_alpha(tmp_path, bits):
    top = 2**bits - 1
    g = noise(6, 5, 1, bits, seed=2)[..., 0]
    tifffile.imwrite(tmp_path / "w.tif", g, photometric="miniswhite", metadata=None)
    assert np.array_equal(loaded_planes(load_image(tmp_path / "w.tif"))[0][..., 1], top - g)
    bw = g > top // 2  # 1 bit a pixel, as fax and scanner files are
    tifffile.imwrite(tmp_path / "bw.tif", bw, photometric="miniswhite", metadata=None)
    with tifffile.TiffFile(tmp_path / "bw.tif") as t:
        assert t.pages[0].bitspersample == 1
    pic = load_image(tmp_path / "bw.tif")
    assert pic.bit_depth == 8 and np.array_equal(loaded_planes(pic)[0][..., 0], np.where(bw, 0, 255))

    # premultiplied (associated) alpha is divided out, as Pillow does for RGBa; alpha itself is kept
    alpha = np.array([[0, top // 2, top]] * 2, np.uint64)
    colour = np.array([[top, top, top], [top, top // 3, 0]], np.uint64)[:, None, :].repeat(3, 1)
    dtype = np.uint8 if bits == 8 else np.uint16
    pre = np.concatenate([(colour * alpha[..., None] + top // 2) // top, alpha[..., None]], -1).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", pre, photometric="rgb", extrasamples=["assocalpha"], metadata=None)
    pic = load_image(tmp_path / "a.tif")
    rgb, got_alpha = loaded_planes(pic)
    assert np.array_equal(got_alpha, alpha)
    visible = alpha > 0
    assert np.abs(rgb[visible] - colour[visible].astype(np.int64)).max() <= (2 if bits == 8 else 3)


def test_tiff_extra_sample_without_alpha_meaning_is_not_alpha(tmp_path):
    # ExtraSamples = 0 ("unspecified data") is not transparency: Pillow reads it as RGBX, so do we
    a = noise(4, 6, 4, 8, seed=4)
    tifffile.imwrite(tmp_path / "x.tif", a, photometric="rgb", extrasamples=["unspecified"], metadata=None)
    pic = load_image(tmp_path / "x.tif")
    assert pic.alpha is None and np.array_equal(loaded_planes(pic)[0], a[..., :3])


def test_tiff_float_and_wide_integer_samples(tmp_path):
    f = np.array([[0.0, 0.25, 1.0, 2.0, -1.0, np.nan]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="minisblack", metadata=None)
    pic = load_image(tmp_path / "f.tif")
    assert pic.bit_depth == 16 and pic.info["float_range"]
    assert loaded_planes(pic)[0][0, :, 0].tolist() == [0, 16384, 65535, 65535, 0, 0]

    rgb = np.random.default_rng(1).random((3, 4, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "frgb.tif", rgb, photometric="rgb", metadata=None)
    got = loaded_planes(load_image(tmp_path / "frgb.tif"))[0]
    assert np.array_equal(got, np.rint(rgb * 65535).astype(np.int64))

    wide = np.array([[0, 65536, 2**32 - 1]], np.uint32)  # the full 32-bit range maps to the full 16-bit range
    tifffile.imwrite(tmp_path / "u32.tif", wide, photometric="minisblack", metadata=None)
    assert loaded_planes(load_image(tmp_path / "u32.tif"))[0][0, :, 0].tolist() == [0, 1, 65535]


# EXIF/TIFF orientations as array operations on H×W×C (the TIFF 6.0 definitions)
ORIENTED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_orientation_is_applied(tmp_path, orientation, bits):
    a = noise(5, 8, 4, bits, seed=orientation)
    path = tmp_path / "o.tif"
    write_tiff(path, a, extratags=[(274, "H", 1, orientation, True)])
    want = ORIENTED[orientation](a)
    if bits == 8:  # the table agrees with Pillow's exif_transpose of the same file
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(ImageOps.exif_transpose(im)), want)
    pic = load_image(path)
    rgb, alpha = loaded_planes(pic)
    assert (pic.height, pic.width) == ((8, 5) if orientation >= 5 else (5, 8))
    assert np.array_equal(rgb, want[..., :3]) and np.array_equal(alpha, want[..., 3])
    if orientation != 1:
        assert pic.info["exif_orientation"] == orientation


@pytest.mark.parametrize("kind", ["jpeg", "group4", "palette", "cmyk", "bilevel"])
def test_other_tiff_kinds_load_as_pillow_decodes_them(tmp_path, kind):
    a = noise(24, 16, 3, 8, seed=8)
    im = Image.fromarray(a)
    path = tmp_path / f"{kind}.tif"
    if kind == "jpeg":
        im.save(path, compression="jpeg", quality=90)
    elif kind == "group4":
        im.convert("1").save(path, compression="group4")
    elif kind == "bilevel":
        im.convert("1").save(path)
    elif kind == "palette":
        im.convert("P").save(path, compression="tiff_lzw")
    else:
        im.convert("CMYK").save(path)
    with Image.open(path) as ref:
        want = np.asarray(ref.convert("RGB")).astype(np.int64)
    pic = load_image(path)
    assert pic.bit_depth == 8 and pic.alpha is None
    assert np.array_equal(loaded_planes(pic)[0], want)


def test_truncated_or_damaged_tiff(tmp_path):
    a = noise(64, 64, 3, 16)
    for compression in (None, "zlib", "lzw"):
        write_tiff(tmp_path / "full.tif", a, compression=compression, rowsperstrip=8)
        data = (tmp_path / "full.tif").read_bytes()
        (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
        assert_image_error(tmp_path / "cut.tif", "truncated")
    (tmp_path / "head.tif").write_bytes(data[:12])
    assert_image_error(tmp_path / "head.tif")


def test_tiff_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((4, 4, 3), np.uint8), photometric="rgb", compression="zlib", metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as t:  # claim 10 gigapixels in a file of a few hundred bytes
        t.pages[0].tags["ImageWidth"].overwrite(100_000)
        t.pages[0].tags["ImageLength"].overwrite(100_000)
    assert path.stat().st_size < 1000
    assert_image_error(path, "too large", "100000×100000", f"{MAX_PIXELS:,}")


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("bits", [8, 16])
def test_our_tiff_is_read_back_by_tifffile_bit_exactly(tmp_path, bits, channels):
    a = noise(37, 29, channels, bits, seed=bits + channels)
    save_image(picture_from_pixels(pixels_of(a), 29, 37, channels, bits), tmp_path / "out.tiff",
               metadata={"nst:weights": "random"})
    with tifffile.TiffFile(tmp_path / "out.tiff") as t:
        page = t.pages[0]
        got = page.asarray()
        assert page.photometric == tifffile.PHOTOMETRIC.RGB and page.bitspersample == bits
        assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
        assert tuple(page.extrasamples) == ((tifffile.EXTRASAMPLE.UNASSALPHA,) if channels == 4 else ())
        assert "nst:weights=random" in page.description
    assert got.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert np.array_equal(got, a)


@pytest.mark.parametrize("channels", [3, 4])
def test_our_16bit_png_is_read_back_by_pypng_bit_exactly(tmp_path, channels):
    y, x = np.mgrid[0:50, 0:70]
    a = np.stack([x * 900 + 7, y * 1300 + 3, (x * y * 31) % 65536, 65535 - x * 600][:channels], -1).astype(np.uint16)
    a[::7, ::5] = noise(8, 14, channels, 16, seed=1)  # and some noise, so no filter fits everything
    save_image(picture_from_pixels(pixels_of(a), 70, 50, channels, 16), tmp_path / "out.png",
               metadata={"nst:weights": "random"})
    width, height, rows, info = png.Reader(filename=str(tmp_path / "out.png")).read()
    assert (width, height, info["bitdepth"], info["planes"], info["alpha"]) == (70, 50, 16, channels, channels == 4)
    assert np.array_equal(np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(50, 70, channels), a)


# ---- long names and temporary files -------------------------------------------------------------

def name_of(n_bytes: int, char: str = "a", ext: str = ".png") -> str:
    """A file name of exactly n_bytes bytes in UTF-8, made of `char` (1, 2 or 3 bytes) and ext."""
    body = n_bytes - len(ext)
    width = len(char.encode())
    name = char * (body // width) + "x" * (body % width) + ext
    assert len(name.encode()) == n_bytes
    return name


@pytest.mark.parametrize("char", ["a", "é", "日"])
def test_output_names_up_to_name_max_are_written(tmp_path, char):
    # names of 242-255 bytes used to be refused: the temporary name was 14 bytes longer
    pic = small_picture()
    for n in (200, 241, 242, 250, 254, 255):
        out = tmp_path / name_of(n, char)
        save_image(pic, out)
        assert load_image(out).width == 11
        assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], n
        out.unlink()
    save_image(small_picture(bits=16), tmp_path / name_of(255, char, ".tiff"))
    assert [len(p.name.encode()) for p in tmp_path.iterdir()] == [255]


def test_a_name_longer_than_the_file_system_allows_is_refused_up_front(tmp_path):
    out = tmp_path / name_of(256)
    with pytest.raises(ImageError) as e:
        check_output_path(out)
    assert "256 bytes" in str(e.value) and "255" in str(e.value)
    with pytest.raises(ImageError):
        save_image(small_picture(), out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("char", ["a", "é", "日"])
def test_temporary_names_are_hidden_unique_and_fit(tmp_path, char):
    for n in range(5, 256):
        out = tmp_path / name_of(n, char)
        names = {temporary_name(out) for _ in range(20)}
        assert len(names) == 20
        for t in names:
            raw = t.encode()  # valid UTF-8: never cut inside a character
            assert t.startswith(".") and t.endswith(".tmp") and "/" not in t
            assert len(raw) <= 255, (n, len(raw))
    # two long names that differ only past what fits have different temporary names
    a, b = tmp_path / name_of(255, "a", ".png"), tmp_path / name_of(255, "a", ".jpg")
    ta, tb = temporary_name(a), temporary_name(b)
    assert ta[:-17] != tb[:-17]  # everything but the random part


KILLED_WRITERS = """
import os, signal, sys
from pathlib import Path
from nst_core.outputs import atomic_write

def write(f):
    f.write(b"half an image")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing

for target in sys.argv[1:]:  # one writer process for each target, each killed while writing
    pid = os.fork()
    if pid == 0:
        atomic_write(Path(target), write)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status))
"""


def test_temporary_files_finds_what_a_killed_write_left_and_nothing_else(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out, other = tmp_path / name_of(255, "é", ".png"), tmp_path / name_of(255, "é", ".jpg")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITERS, str(out), str(other)], cwd=repo, timeout=120,
                          capture_output=True, text=True)
    assert proc.stdout.split() == [str(int(signal.SIGKILL))] * 2, proc.stderr
    left = sorted(tmp_path.iterdir())
    assert len(left) == 2 and all(p.name.startswith(".") and p.name.endswith(".tmp") for p in left)
    assert not out.exists() and not other.exists()
    mine = temporary_files(out)
    (tmp_path / (mine[0].name[:-16] + "not-one-of-ours")).write_bytes(b"")
    assert len(mine) == 1 and mine[0].read_bytes() == b"half an image" and temporary_files(out) == mine
    assert temporary_files(other) != mine and len(temporary_files(other)) == 1
    save_image(small_picture(), out)  # and a later write to the same name is not disturbed by them
    assert out.is_file()
