#!/usr/bin/env python3
"""Benchmark of full-resolution stylisation with the exact tiled objective (nst_core.tiling).

Sections (each prints its figures; --json-file writes them all):

- sizes: ``nst_core.stylize`` at one level (levels=1) for a few steps per size, whole (tile off)
  where it fits and tiled within --budget: seconds per step (median of the steps after the first),
  peak memory, the plan's tiles; the tiled/untiled ratio where both ran; seconds per step per
  megapixel (linear growth keeps it flat).
- photo (--photo): a 6000×4000 (24 MP) photo at the paper's settings (500 L-BFGS steps, automatic
  coarse-to-fine: 375 … 6000 px): each level's s/step measured over a few steps, and the projected
  time of the whole run (Σ steps × s/step).
- history (--history): L-BFGS history 100, 50, 20, 10, 5 at one size for --history-steps steps:
  the loss each reaches, relative to history 100 (what `tiling.plan_level` shortens to).
- calibrate (--calibrate): peak memory growth of one loss-and-gradient evaluation against
  `tiling.activation_bytes` (what ACTIVATION_FACTOR and RUNTIME_BYTES come from).

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set growth
(VmHWM, reset through /proc/self/clear_refs, minus VmRSS before). Random weights (the figures do
not depend on what the network has learnt).

    .venv/bin/python benchmarks/bench_tiled.py                       # cpu: 128-512 px, 300 MiB budget
    .venv/bin/python benchmarks/bench_tiled.py --quick --device cpu  # seconds (gpu_check's dry run)
    python3 benchmarks/bench_tiled.py --device cuda --photo          # 1K/2K/4K/8K within 24 GB, 24 MP
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import nst_core  # noqa: E402
from nst_core import Session, StyleParams, runtime, tiling  # noqa: E402
from nst_core.images import Picture, load_image, resize_picture  # noqa: E402
from nst_core.params import PAPER_CONTENT_LAYERS, PAPER_STYLE_LAYERS, parse_bytes  # noqa: E402
from nst_core.samples import sample_path  # noqa: E402

SHALLOW = dict(content_layers={"relu2_1": 1.0}, style_layers={"relu1_1": 0.3, "relu2_1": 0.3, "relu3_1": 0.4})
PAPER = dict(content_layers=PAPER_CONTENT_LAYERS, style_layers=PAPER_STYLE_LAYERS)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


class Peak:
    """Peak memory over a block: CUDA allocations, or the process's resident set growth on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.bytes = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import ctypes
            import gc

            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, or earlier runs hide this one's
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _status("VmHWM") - self.base


def _content(width: int, height: int, source: Picture) -> Picture:
    return resize_picture(source, size=(width, height))


def run(session, content, style, params, device) -> dict:
    """One stylize call: seconds per step (median after the first), peak memory, the tiles."""
    marks, tiles = [], [1]

    def progress(e):
        if e.tile == e.tiles:
            marks.append(time.perf_counter())
            tiles[0] = e.tiles

    start = time.perf_counter()
    try:
        with Peak(device) as peak:
            nst_core.stylize(content, [style], params, progress=progress, session=session)
    except nst_core.NSTError as e:
        return {"error": str(e).splitlines()[0]}
    steps = [b - a for a, b in zip([start] + marks, marks)][1:] or [marks[0] - start]
    return {"s_per_step": statistics.median(steps), "peak_mib": peak.bytes / 2**20, "tiles": tiles[0],
            "first_step_s": marks[0] - start if marks else None}


def section_sizes(args, session, source, style) -> list[dict]:
    rows = []
    layers = PAPER if args.paper else SHALLOW
    print(f"[{args.device}] sizes: {args.steps} steps, levels 1, {'paper' if args.paper else 'relu1_1…relu3_1'} "
          f"layers, budget {args.budget / 2**20:.0f} MiB for the tiled runs")
    for side in args.sizes:
        h = round(side * 2 / 3) if args.aspect else side
        content = _content(side, h, source)
        base = StyleParams(weights="random", device=args.device, size=side, iterations=args.steps, levels=1,
                           precision=args.precision, init="content", **layers)
        used = list(base.used_layers)
        whole_plan = tiling.plan_level(h, side, used, list(base.content_layers), budget=args.budget, tile="off")
        row = {"size": f"{side}×{h}", "megapixels": side * h / 1e6,
               "whole_estimate_mib": whole_plan.peak_bytes / 2**20}
        if not args.no_whole:
            row["whole"] = run(session, content, style, base.replace(tile="off"), args.device)
        row["tiled"] = run(session, content, style, base.replace(max_memory=args.budget, tile=args.tile),
                           args.device)
        w, t = row.get("whole", {}), row["tiled"]
        if "s_per_step" in w and "s_per_step" in t and t["tiles"] > 1:
            row["overhead"] = t["s_per_step"] / w["s_per_step"]
        if "s_per_step" in t:
            row["tiled_s_per_step_per_mp"] = t["s_per_step"] / row["megapixels"]
        rows.append(row)
        print("  " + _line(row), flush=True)
    return rows


def _line(row) -> str:
    def part(name, r):
        if not r:
            return ""
        if "error" in r:
            return f" {name}: {r['error'][:90]}"
        return f" {name}: {r['s_per_step']:.3f} s/step, peak {r['peak_mib']:.0f} MiB, {r['tiles']} tile(s);"
    extra = f" overhead {row['overhead']:.2f}×;" if "overhead" in row else ""
    per = f" {row['tiled_s_per_step_per_mp']:.2f} s/step/MP" if "tiled_s_per_step_per_mp" in row else ""
    return f"{row['size']} (whole ~{row['whole_estimate_mib']:.0f} MiB est.):{part('whole', row.get('whole'))}" \
           f"{part('tiled', row['tiled'])}{extra}{per}"


def section_photo(args, session, source, style) -> dict:
    """The 24 MP photo at the paper's settings: per-level s/step, projected total."""
    params = StyleParams(weights="random", device=args.device, size=6000, precision=args.precision, **PAPER)
    content = _content(6000, 4000, source)
    levels, total = [], 0.0
    print(f"[{args.device}] photo: 6000×4000 at the paper's settings ({params.iterations} L-BFGS steps, "
          f"levels {[s for s, _ in params.level_sizes()]})")
    for side, iters in params.level_sizes():
        r = run(session, resize_picture(content, side), style,
                params.replace(size=side, levels=1, iterations=args.photo_steps, init="content"), args.device)
        r.update(side=side, steps=iters)
        if "s_per_step" in r:
            total += iters * r["s_per_step"]
        levels.append(r)
        print(f"  level {side} px: {r.get('s_per_step', float('nan')):.3f} s/step × {iters} steps, "
              f"{r.get('tiles')} tile(s), peak {r.get('peak_mib', float('nan')):.0f} MiB {r.get('error', '')}",
              flush=True)
    print(f"  projected: {total:.0f} s for the whole run (plus set-up)")
    return {"levels": levels, "projected_s": total}


def section_history(args, session, source, style) -> list[dict]:
    from nst_core import engine

    rows = []
    print(f"[{args.device}] history: {args.history_size} px, {args.history_steps} L-BFGS steps from noise, "
          "paper layers")
    original = tiling.HISTORY_CHOICES
    for n in (100, 50, 20, 10, 5):
        losses = []
        tiling_hist = (n,)
        tiling.HISTORY_CHOICES = tiling_hist  # the planner's only choice: this run's history
        try:
            params = StyleParams(weights="random", device=args.device, size=args.history_size,
                                 iterations=args.history_steps, levels=1, **PAPER)
            r = engine.stylize(_content(args.history_size, args.history_size, source), [style], params,
                               session=session, progress=lambda e: losses.append(e.losses["total"]))
        finally:
            tiling.HISTORY_CHOICES = original
        rows.append({"history": n, "final_loss": r.losses["total"], "loss_at_half": losses[len(losses) // 2]})
    ref = rows[0]["final_loss"]
    for row in rows:
        row["relative_to_100"] = row["final_loss"] / ref
        print(f"  history {row['history']:3d}: loss {row['final_loss']:.4g} ({row['relative_to_100']:.3f}× "
              f"history 100's), at half way {row['loss_at_half']:.4g}")
    return rows


def section_calibrate(args) -> list[dict]:
    from nst_core import losses
    from nst_core.objective import Objective
    from nst_core.vgg import VGGFeatures

    rows = []
    print(f"[{args.device}] calibrate: peak growth of one loss-and-gradient against the summed layer outputs")
    for last, names in (("relu3_1", ["relu1_1", "relu2_1", "relu3_1"]), ("relu5_1", list(PAPER_STYLE_LAYERS))):
        net = VGGFeatures(last=last).to(args.device)
        for side in args.calibrate_sizes:
            x = torch.rand(3, side, side, device=args.device).requires_grad_(True)
            with torch.no_grad():
                small = net(torch.rand(1, 3, 64, 64, device=args.device), names)
                targets = {n: losses.gram(f) / (f.shape[-1] * f.shape[-2]) for n, f in small.items()}
            obj = Objective(lambda im: net(im.unsqueeze(0), names), {}, {}, targets, dict.fromkeys(names, 0.2), 0.0, 1e3)
            with Peak(args.device) as peak:
                obj.loss_and_grad(x)
            act = tiling.activation_bytes(side, side, names)
            rows.append({"layers": last, "side": side, "growth_mib": peak.bytes / 2**20, "activations_mib": act / 2**20,
                         "ratio": peak.bytes / act})
            print(f"  up to {last} at {side}²: {peak.bytes / 2**20:.0f} MiB, layer outputs {act / 2**20:.0f} MiB, "
                  f"ratio {peak.bytes / act:.2f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a short run (gpu_check.sh's tiled part)")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget", type=lambda s: parse_bytes("budget", s), help="bytes for the tiled runs (150M, 2G)")
    ap.add_argument("--tile", default="auto")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--paper", action="store_true", help="the paper's layers (default on CUDA)")
    ap.add_argument("--aspect", action="store_true", help="3:2 images instead of squares")
    ap.add_argument("--no-whole", action="store_true", help="skip the untiled runs")
    ap.add_argument("--photo", action="store_true", help="the 24 MP photo at the paper's settings")
    ap.add_argument("--photo-steps", type=int, default=3)
    ap.add_argument("--history", action="store_true")
    ap.add_argument("--history-size", type=int, default=192)
    ap.add_argument("--history-steps", type=int, default=100)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--calibrate-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[256, 384, 512])
    ap.add_argument("--json-file")
    args = ap.parse_args(argv)
    runtime.prepare_process()
    cuda = args.device.startswith("cuda")
    if args.tile.isdigit():
        args.tile = int(args.tile)
    if args.sizes is None:
        args.sizes = ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192]) if cuda else \
                     ([96, 192] if args.quick else [128, 256, 384, 512])
    if args.budget is None:
        args.budget = (24 << 30) if cuda else ((200 if args.quick else 300) << 20)
    args.paper = args.paper or cuda
    if args.quick:
        args.steps = min(args.steps, 3)
    source = load_image(sample_path("chelsea.png"))
    style = load_image(sample_path("gravel.png"))
    session = Session()
    report = {"device": args.device, "budget": args.budget, "torch": torch.__version__}
    if args.calibrate:
        report["calibrate"] = section_calibrate(args)
    report["sizes"] = section_sizes(args, session, source, style)
    if args.photo:
        report["photo"] = section_photo(args, session, source, style)
    if args.history:
        report["history"] = section_history(args, session, source, style)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
