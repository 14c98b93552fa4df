#!/usr/bin/env python3
"""How well the normalised network's calibration carries over to images it has not seen.

The paper's normalised VGG-19 gives every filter mean activation 1 over natural images; we
calibrate on the photographs shipped in nst_core/samples (``CALIBRATION``). This prints, per
layer: how many filters are dead, near-dead and capped, and the per-filter means on images held
out of the calibration, after normalisation: the shipped coffee.png, and where ../shared/images is
present its photograph and its three paintings (read in place). A filter that the calibration
describes well has mean 1 there too; the figures say how far from 1 the live filters land.

    .venv/bin/python benchmarks/calibration.py                          # ImageNet weights (exit 2 if absent)
    .venv/bin/python benchmarks/calibration.py --weights random
    .venv/bin/python benchmarks/calibration.py --weights random --compare-old
    .venv/bin/python benchmarks/calibration.py --weights random --calibrate-on a.png b.jpg

--compare-old repeats the measurement with the calibration this project used before (chelsea and
gravel, centre crops and mirrors, every filter capped at 10x its layer's median);
--calibrate-on calibrates on other images instead of the shipped set, for experiments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

import torch  # noqa: E402

import nst_core  # noqa: E402
from nst_core import devices  # noqa: E402
from nst_core import normalization as N  # noqa: E402
from nst_core import weights as W  # noqa: E402
from nst_core.errors import NSTError  # noqa: E402
from nst_core.samples import CALIBRATION, HELD_OUT, SAMPLES_DIR  # noqa: E402

SHARED = REPO.parent / "shared" / "images"
SHARED_SETS = {"tubingen (photo)": ["tubingen.jpg"],
               "paintings": ["starry_night.jpg", "the_scream.jpg", "shipwreck.jpg"]}


def crops_with_mirrors(paths) -> torch.Tensor:
    batch = torch.stack([c for p in paths for c in N.calibration_crops(p)])
    return torch.cat([batch, batch.flip(-1)])


def raw_state(weights: str) -> tuple[dict, str]:
    """The convolutions as the weights file (or seed) has them, before any normalisation."""
    head, _, seed = weights.partition(":")
    if head == "random":
        return W.random_state_dict(int(seed or 0)), f"random (seed {int(seed or 0)})"
    net = W.load_network(weights, normalize=False, progress=True)
    return net.state_dict(), net.weights_label


def old_scales(stats) -> dict[str, torch.Tensor]:
    """The former rule: every live filter's scale capped at 10x its layer's median."""
    out = {}
    for conv, st in stats.items():
        alive = st["mean"] > N.DEAD_RATIO * st["magnitude"]
        raw = torch.where(alive, 1.0 / st["mean"].clamp_min(1e-300), torch.ones_like(st["mean"]))
        out[conv] = raw.clamp_max(N.MAX_SCALE_OVER_MEDIAN * raw[alive].median()) if alive.any() else raw
    return out


def old_images() -> torch.Tensor:
    """The former calibration set: chelsea and gravel, centre crops, with mirrors."""
    batch = torch.stack([_centre(SAMPLES_DIR / name) for name in ("chelsea.png", "gravel.png")])
    return torch.cat([batch, batch.flip(-1)])


def _centre(path) -> torch.Tensor:
    from PIL import Image

    size = N.CALIBRATION_SIZE
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = size / min(im.size)
        w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255.0


def held_out_means(calibration_stats, scales, held_stats, capped_too=False) -> dict[str, torch.Tensor]:
    """Per convolution, the normalised means on the held-out images of the filters that the
    calibration sets to mean 1 (with `capped_too`: of all live filters)."""
    out = {}
    for conv, st in calibration_stats.items():
        normalised = st["mean"] * scales[conv].double()
        keep = st["mean"] > N.DEAD_RATIO * st["magnitude"]
        if not capped_too:
            keep &= (normalised - 1).abs() <= 1e-6
        out[conv] = (held_stats[conv]["mean"] * scales[conv].double())[keep]
    return out


def spread(means: torch.Tensor) -> dict[str, float]:
    off = means.clamp_min(1e-30).log2().abs()
    return {"median": float(means.median()), "within2": float((off < 1).double().mean()),
            "p10": float(means.quantile(0.1)), "p90": float(means.quantile(0.9)),
            "log2_p90": float(off.quantile(0.9)), "log2_p99": float(off.quantile(0.99))}


def report(title, calibration_stats, scales, held_sets, state, pooling, device, counts=None) -> None:
    held_stats = {name: N.filter_statistics(state, pooling, images, device) for name, images in held_sets.items()}
    held = {name: held_out_means(calibration_stats, scales, st) for name, st in held_stats.items()}
    print(f"\n{title}")
    print("per-filter means on the held-out images, of the filters at mean 1 on the calibration images:")
    left = f"{'':8s}" + (f"  {'':30s}" if counts else "")
    print(left + "".join(f" | {name[:24]:^24s}" for name in held))
    print(f"{'layer':8s}" + ("  filters dead near-dead capped" if counts else "")
          + " | median  ×2   p10–p90 " * len(held))
    for conv in calibration_stats:
        line = f"{conv:8s}"
        if counts:
            c = counts[conv]
            line += f"  {c['filters']:7d} {c['dead']:4d} {c['near_dead']:9d} {c['capped']:6d}"
        for means in held.values():
            s = spread(means[conv])
            line += f" | {s['median']:6.2f} {s['within2']:4.0%} {s['p10']:4.2f}–{s['p90']:<5.2f}"
        print(line)
    if counts:
        total = {k: sum(c[k] for c in counts.values()) for k in ("filters", "dead", "near_dead", "capped")}
        print(f"{'all':8s}  {total['filters']:7d} {total['dead']:4d} {total['near_dead']:9d} {total['capped']:6d}"
              f"  (capped: {total['capped'] / total['filters']:.1%} of the filters)")
    for name, st in held_stats.items():
        for capped_too in (False, True):
            s = spread(torch.cat(list(held_out_means(calibration_stats, scales, st, capped_too).values())))
            which = "all live filters" if capped_too else "filters at mean 1 on the calibration"
            print(f"  {name}, {which}: {s['within2']:.1%} within a factor 2 of 1; 90% within "
                  f"2^{s['log2_p90']:.2f}, 99% within 2^{s['log2_p99']:.2f}; median {s['median']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="imagenet", help="imagenet (default), random[:SEED] or a path")
    ap.add_argument("--pooling", default=nst_core.StyleParams.default("pooling"), choices=("avg", "max"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compare-old", action="store_true", help="also the former calibration (chelsea, gravel, cap all)")
    ap.add_argument("--calibrate-on", nargs="+", metavar="IMAGE", help="calibrate on these images instead")
    args = ap.parse_args(argv)

    try:
        state, label = raw_state(args.weights)
    except NSTError as e:
        print(f"calibration: {e.message}", file=sys.stderr)
        return e.exit_code
    device = devices.pick_device(args.device)
    started = time.perf_counter()
    held_sets = {name: crops_with_mirrors([SAMPLES_DIR / name]) for name in HELD_OUT}
    missing = []
    for name, files in SHARED_SETS.items():
        paths = [SHARED / f for f in files]
        if all(p.is_file() for p in paths):
            held_sets[name] = crops_with_mirrors(paths)
        else:
            missing += [str(p) for p in paths if not p.is_file()]
    if args.calibrate_on:
        images, source = crops_with_mirrors(args.calibrate_on), ", ".join(Path(p).name for p in args.calibrate_on)
    else:
        images, source = N.calibration_images(), ", ".join(CALIBRATION)
    print(f"weights {label}, {args.pooling} pooling, on {devices.describe(device)}")
    print(f"calibration: {images.shape[0]} crops at {N.CALIBRATION_SIZE} px (with mirrors) from {source}")
    print(f"held out: {', '.join(held_sets)}" + (f" ({', '.join(missing)} absent)" if missing else ""))

    stats = N.filter_statistics(state, args.pooling, images, device)
    counts = {}
    scales = N.scales_from_statistics(stats, counts)
    report(f"this calibration (dead: scale 1; near-dead, i.e. active at under {N.NEAR_DEAD_RATE:.0%} of the positions "
           f"or mean under {N.NEAR_DEAD_RATIO:.0%} of the mean |pre-activation|: capped at "
           f"{N.MAX_SCALE_OVER_MEDIAN:g}x the layer median)",
           stats, scales, held_sets, state, args.pooling, device, counts)
    if args.compare_old:
        old_stats = N.filter_statistics(state, args.pooling, old_images(), device)
        report("the former calibration (chelsea and gravel, centre crops with mirrors; every filter capped at "
               f"{N.MAX_SCALE_OVER_MEDIAN:g}x the layer median)", old_stats, old_scales(old_stats), held_sets,
               state, args.pooling, device)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
