#!/usr/bin/env python3
"""Benchmark of image input and output: `load_image` and `save_image` on 16-bit pictures.

A synthetic 16-bit RGB picture (gradients plus 8 bits of noise, so that compression has work to
do) of --size WxH is written as TIFF by tifffile in the layouts and compressions users bring
(chunky and planar; none, Deflate, LZW) and loaded with `load_image`; then `save_image` writes it
as 16-bit TIFF and PNG. Printed: median seconds over --repeat runs, file size, and whether the
values came back exactly.

    .venv/bin/python benchmarks/bench_images.py                 # 3000x2000, 3 runs
    .venv/bin/python benchmarks/bench_images.py --size 6000x4000 --repeat 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from nst_core.images import load_image, picture_from_pixels, picture_to_pixels, save_image  # noqa: E402


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="3000x2000", help="WxH of the picture")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))

    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint16)
    a = (np.stack([x * 65000 // w, y * 65000 // h, (x + y) * 30000 // (w + h)], -1) + noise).astype(np.uint16)
    raw = a.astype("<u2").tobytes()
    print(f"16-bit RGB {w}x{h}, median of {args.repeat}")

    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        folder = Path(tmp)
        for planar in (False, True):
            for compression in (None, "zlib", "lzw"):
                path = folder / "in.tif"
                data = np.ascontiguousarray(a.transpose(2, 0, 1)) if planar else a
                tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate" if planar else "contig",
                                 compression=compression, predictor=compression is not None, metadata=None)
                s = timed(lambda: load_image(path), args.repeat)
                exact = picture_to_pixels(load_image(path), 3, 16) == raw
                label = f"load TIFF {'planar' if planar else 'chunky'} {compression or 'none'}"
                print(f"  {label:<28} {s:6.2f} s  {path.stat().st_size / 1e6:6.1f} MB  exact: {exact}")

        picture = picture_from_pixels(raw, w, h, 3, 16)
        for ext in ("tif", "png"):
            path = folder / f"out.{ext}"
            s = timed(lambda: save_image(picture, path), args.repeat)
            exact = picture_to_pixels(load_image(path), 3, 16) == raw
            print(f"  {'save ' + ext.upper():<28} {s:6.2f} s  {path.stat().st_size / 1e6:6.1f} MB  exact: {exact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
