#!/usr/bin/env python3
"""Lay out labelled images in a grid (docs/figure1.sh and benchmarks/quality.py use it).

    python3 scripts/contact_sheet.py OUT.png COLUMNS LABEL=IMAGE [LABEL=IMAGE ...]

Every image is scaled to the same height (--height, else the smallest image's), with its label
above it; an empty IMAGE (``LABEL=``) leaves a labelled blank cell. Needs Pillow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 14
GAP = 4


def contact_sheet(cells: list[tuple[str, Image.Image | Path | str | None]], columns: int,
                  height: int | None = None) -> Image.Image:
    """One RGB image: `cells` (label, image or path or None) in rows of `columns`, every image
    `height` pixels high (default: the smallest image's height)."""
    images = [_open(img) for _, img in cells]
    height = height or min((im.height for im in images if im is not None), default=128)
    scaled = [None if im is None else im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS)
              for im in images]
    width = max((im.width for im in scaled if im is not None), default=height)
    rows = (len(cells) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (width + GAP) + GAP, rows * (height + LABEL_HEIGHT + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, ((label, _), im) in enumerate(zip(cells, scaled)):
        x = GAP + (i % columns) * (width + GAP)
        y = GAP + (i // columns) * (height + LABEL_HEIGHT + GAP)
        draw.text((x, y), label, fill="black", font=font)
        if im is not None:
            sheet.paste(im, (x, y + LABEL_HEIGHT))
    return sheet


def _open(img) -> Image.Image | None:
    if img is None or img == "":
        return None
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    with Image.open(img) as im:
        return im.convert("RGB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output")
    ap.add_argument("columns", type=int)
    ap.add_argument("cells", nargs="+", metavar="LABEL=IMAGE")
    ap.add_argument("--height", type=int, help="height of each image (default: the smallest image's)")
    args = ap.parse_args(argv)
    cells = []
    for cell in args.cells:
        label, sep, path = cell.partition("=")
        if not sep:
            ap.error(f"{cell!r}: give LABEL=IMAGE")
        if path and not Path(path).is_file():
            print(f"contact_sheet: {path}: no such file", file=sys.stderr)
            return 2
        cells.append((label, path or None))
    contact_sheet(cells, args.columns, args.height).save(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
