#!/usr/bin/env python3
"""Benchmark of the stylisation engine (nst_core.stylize): speed, memory, overhead, coarse-to-fine.

What it measures, per device (cpu; cuda when present) and per output size:

1. The real loop: ``nst_core.stylize`` with the paper's layers (relu4_2; relu1_1 … relu5_1),
   L-BFGS, single scale (levels=1), the chosen weights (default ``random``), tubingen.jpg styled
   with starry_night.jpg from ../shared/images. Seconds per iteration are the median of the
   steady-state steps, timed between progress callbacks (set-up and the first --warmup steps left
   out; the benchmark's own work inside the callback is not counted).
2. A bare VGG-19 forward+backward at the same input shape on the same network object (up to
   relu5_1, gradient w.r.t. the input, loss = plain sum of the used layers' outputs). It runs
   inside the progress callback, one per loop step, so loop and bare steps alternate and share
   whatever load the machine is under; the overhead ratio is the median of the per-step ratios.
   Beside it: the loss terms alone (Gram matrices + content + style losses, forward+backward, on
   feature maps of the same shapes) and the L-BFGS bookkeeping (torch.optim.LBFGS, history 100,
   with a trivial closure on a vector of the image's size), at the history length the loop had
   and at full history, since a 500-iteration run spends most of its steps with a full history.
3. On CUDA: 512×512 for 500 L-BFGS iterations (total time), and the peak memory of 2048×2048
   with a full L-BFGS history (does it fit in 24 GB?).
4. Coarse-to-fine against single scale: time (and work) until the loss at the final size first
   drops below the losses that the single-scale run reaches after 1/4, 1/2, 3/4 and all of its
   iterations.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (the
caching allocator's footprint; the CUDA context, a few hundred MB, is in neither). On CPU the
peak resident set size of the whole process (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs before each measured phase) minus the resident size before it: this
counts tensors, autograd buffers, the L-BFGS history and memory the allocator keeps, but not
memory that was allocated and never touched; other threads of the process would count too.

    .venv/bin/python benchmarks/bench_engine.py                # cpu: 256,512 (+ cuda if present)
    .venv/bin/python benchmarks/bench_engine.py --quick        # a smaller run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_engine.py --device cuda  # cuda: 512,1024,2048 + targets
    .venv/bin/python benchmarks/bench_engine.py --json         # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

import torch  # noqa: E402

from nst_core import params as params_module  # noqa: E402
from nst_core import Session, StyleParams, devices, losses, stylize  # noqa: E402
from nst_core.images import fit  # noqa: E402

try:
    from nst_core.engine import _feasible_levels  # the levels the engine really runs
except ImportError:  # older engines: the plan as params computes it
    def _feasible_levels(params, content):
        return params.level_sizes()
from nst_core.images import Picture, load_image  # noqa: E402

IMAGES = REPO.parent / "shared" / "images"
CPU_RATIO_TARGET = 1.10
CUDA_512_TARGET_S = 3.0
CUDA_MEMORY_BUDGET = 24 * 2**30
TARGET_SIZE, TARGET_ITERATIONS = 512, 500  # the CUDA speed target: 512x512, 500 L-BFGS iterations
BIG_SIZE = 2048  # the CUDA memory target: 2048x2048 within 24 GB
LBFGS_HISTORY = 100  # the engine's L-BFGS history (nst_core.lbfgs.DEFAULT_HISTORY)


# ---- machine and memory ---------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peaks, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_resettable = False
        if device.type == "cpu":
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
                self.cpu_resettable = _proc_status_kib("VmHWM") is not None
            except OSError:
                pass

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated (reserved)"
        if self.cpu_resettable:
            return "peak RSS delta (VmHWM after clear_refs)"
        return "peak RSS since process start minus RSS before (VmHWM not resettable here)"

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated tensors; CPU: resident set size)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def reset(self) -> int:
        """Start a phase: forget earlier peaks; returns the bytes in use now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_resettable:
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()

    def peak(self) -> tuple[int, int | None]:
        """(peak bytes in use since the last reset, CUDA's peak reserved bytes or None)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        return (_proc_status_kib("VmHWM") or 0) * 1024, None


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
        "device": devices.describe(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ---- helpers ----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _square(pic: Picture) -> Picture:
    """The centre square of a picture (for the N×N rows of the targets)."""
    h, w = pic.height, pic.width
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return Picture(pic.rgb[:, top:top + s, left:left + s].contiguous(), None, pic.bit_depth,
                   f"{pic.source} (centre square)")


def _params(size: int, iterations: int, args, levels: int = 1) -> StyleParams:
    return StyleParams(size=size, iterations=iterations, levels=levels, weights=args.weights,
                       device=args.device_name, seed=0)


def _warm_session(params: StyleParams, device: torch.device) -> Session:
    """A Session whose network is already loaded (set-up is not what these figures are about)."""
    session = Session()
    session.network(params, device)
    return session


def _loss_head(feats: dict, params: StyleParams, targets: dict) -> torch.Tensor:
    """The loop's total loss on given feature maps (the engine's Objective, fed these maps)."""
    from nst_core.objective import Objective

    content = {n: w for n, w in params.content_layers.items() if w > 0}
    style = {n: w for n, w in params.style_layers.items() if w > 0}
    objective = Objective(lambda _x: feats, {n: targets[n] for n in content}, content,
                          {n: targets["gram:" + n] for n in style}, style, params.content_weight, params.style_weight)
    return objective.terms(next(iter(feats.values())))[0]


# ---- 1 + 2: the loop beside a bare forward+backward ----------------------------------------------

def measure_size(content: Picture, style: Picture, size: int, args, device: torch.device) -> dict:
    warmup, steps = args.warmup, args.steps
    params = _params(size, warmup + steps, args)
    session = _warm_session(params, device)
    net = session.network(params, device)
    layers = params.used_layers
    h, w = fit(content.height, content.width, size)
    fmt = devices.memory_format(device)
    mem = PeakMemory(device)

    # Inputs of the side measurements: a noise image like the loop's start, and targets of the
    # loss terms with the right shapes (their values do not matter for timing).
    gen = torch.Generator().manual_seed(1)
    xb = torch.rand(1, 3, h, w, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_(True)
    with torch.no_grad():
        f0 = net(xb, layers)
    targets = {n: f0[n].detach().clone() for n, wt in params.content_layers.items() if wt > 0}
    targets.update({"gram:" + n: losses.gram(f) / (f.shape[-1] * f.shape[-2]) for n, f in f0.items()})
    del f0
    style_names = [n for n, wt in params.style_layers.items() if wt > 0]

    def bare() -> float:
        xb.grad = None
        t0 = _now(device)
        feats = net(xb, layers)
        sum(f.sum() for f in feats.values()).backward()
        return _now(device) - t0

    def heads(per_layer: bool) -> tuple[float, dict]:
        """Seconds of the loss terms' forward+backward (all, and by style layer) on leaf feature maps."""
        with torch.no_grad():
            src = net(xb, layers)
        timed = {}
        for only in [None] + (style_names if per_layer else []):
            feats = {n: f.detach().requires_grad_(True) for n, f in src.items()}
            t0 = _now(device)
            if only is None:
                loss = _loss_head(feats, params, targets)
            else:
                wt = params.style_weight * params.style_layers[only]
                loss = wt * losses.style_layer_loss(feats[only], targets["gram:" + only])
            loss.backward()
            timed[only] = _now(device) - t0
        return timed.pop(None), timed

    rec = {"loop": [], "bare": [], "ratio": [], "head": [], "loop_peak": [], "bare_delta": [],
           "layer": {n: [] for n in style_names}}
    state = {"prev_exit": None}

    def on_progress(p):
        t_enter = _now(device)
        peak = mem.peak()
        if state["prev_exit"] is not None and p.step > warmup:
            rec["loop"].append(t_enter - state["prev_exit"])
            rec["loop_peak"].append(peak)
            before = mem.reset()
            tb = bare()
            rec["bare_delta"].append(mem.peak()[0] - before)
            rec["bare"].append(tb)
            rec["ratio"].append(rec["loop"][-1] / tb)
            th, by_layer = heads(p.step - warmup <= args.layer_split_steps)
            rec["head"].append(th)
            for n, t in by_layer.items():
                rec["layer"][n].append(t)
            xb.grad = None
        mem.reset()
        state["prev_exit"] = _now(device)

    base = mem.reset()
    t0 = time.perf_counter()
    stylize(content, [style], params, progress=on_progress, session=session)
    wall = time.perf_counter() - t0

    from nst_core.lbfgs import implementation

    used = implementation()  # the loop's L-BFGS ($NST_LBFGS), with the loop's history; both at full history
    window = (warmup + 1, warmup + steps)
    lbfgs = lbfgs_bookkeeping(3 * h * w, device, window, kind=used, full_steps=0,
                              history=min(LBFGS_HISTORY, warmup + steps))
    by_kind = {k: lbfgs_bookkeeping(3 * h * w, device, window, kind=k) for k in ("device", "torch")}
    lbfgs["full"] = by_kind[used]["full"]
    loop_s, bare_s, head_s = _median(rec["loop"]), _median(rec["bare"]), _median(rec["head"])
    rest = loop_s - bare_s - head_s - lbfgs["at_window"]
    ratio = _median(rec["ratio"])
    projected = ratio + (lbfgs["full"] - lbfgs["at_window"]) / bare_s
    peak, reserved = max(rec["loop_peak"], key=lambda m: m[0])
    return {
        "device": device.type, "size": size, "height": h, "width": w, "steps_timed": len(rec["loop"]),
        "warmup_steps": warmup, "loop_s_per_it": loop_s, "bare_s_per_it": bare_s,
        "overhead_ratio": ratio, "ratio_of_medians": loop_s / bare_s,
        "loop_s_min": min(rec["loop"]), "bare_s_min": min(rec["bare"]),
        "ratio_of_minima": min(rec["loop"]) / min(rec["bare"]), "loss_terms_s_min": min(rec["head"]),
        "loop_s_all": rec["loop"], "bare_s_all": rec["bare"],
        "loss_terms_s_per_it": head_s,
        "loss_terms_by_style_layer_s": {n: _median(v) for n, v in rec["layer"].items()},
        "lbfgs_s_at_measured_history": lbfgs["at_window"], "lbfgs_s_at_full_history": lbfgs["full"],
        "lbfgs_history_len_measured": lbfgs["history_at_window"],
        "lbfgs_implementation": used, "lbfgs_device_s_at_full_history": by_kind["device"]["full"],
        "lbfgs_torch_s_at_full_history": by_kind["torch"]["full"],
        "rest_s_per_it": rest, "projected_ratio_full_history": projected,
        "memory_before_bytes": base, "loop_peak_bytes": peak, "loop_peak_delta_bytes": peak - base,
        "loop_peak_reserved_bytes": reserved, "bare_peak_delta_bytes": max(rec["bare_delta"]),
        "memory_measure": mem.kind, "wall_s": wall, "loadavg_end": _loadavg(),
    }


def lbfgs_bookkeeping(numel: int, device: torch.device, window: tuple[int, int],
                      full_steps: int = 12, kind: str = "torch", history: int = LBFGS_HISTORY) -> dict:
    """Seconds per L-BFGS step (`kind`: nst_core.lbfgs's device one or torch.optim.LBFGS with
    max_iter=1; `history` pairs: the engine takes min(100, the level's steps)) minus its closure.

    The closure is the gradient of a badly conditioned quadratic, so the curvature condition holds
    and the history fills up; the median is taken over the steps of `window` (the loop's measured
    steps) and, unless `full_steps` is 0, over `full_steps` steps once the history is full.
    """
    gen = torch.Generator().manual_seed(2)
    d = (10 ** (-4 * torch.rand(numel, generator=gen))).to(device)
    x = torch.rand(numel, generator=gen).to(device).requires_grad_(True)
    from nst_core import lbfgs

    opt = lbfgs.make(x, lr=0.05, history_size=history, kind=kind)
    inside = [0.0]

    def closure():
        t0 = time.perf_counter()
        with torch.no_grad():
            x.grad = d * x
            loss = 0.5 * (d * x * x).sum()
        _sync(device)
        inside[0] = time.perf_counter() - t0
        return loss

    times, hist = [], []
    for _ in range(history + 1 + full_steps if full_steps else window[1]):
        t0 = _now(device)
        opt.step(closure)
        times.append(_now(device) - t0 - inside[0])
        hist.append(len(opt.state[x].get("old_dirs", [])) if kind == "torch" else opt.history_len())
    lo, hi = window
    return {"at_window": _median(times[lo - 1:hi]), "history_at_window": hist[hi - 1],
            "full": _median(times[history + 1:]) if full_steps else None, "history_full": hist[-1]}


# ---- 3: the CUDA targets ----------------------------------------------------------------------

def cuda_targets(content: Picture, style: Picture, args, device: torch.device) -> dict:
    sq = _square(content)
    out = {}
    # 512×512, 500 iterations, warm network: the whole stylize() call, and the loop alone.
    p = _params(TARGET_SIZE, TARGET_ITERATIONS, args)
    session = _warm_session(p, device)
    stylize(sq, [style], _params(TARGET_SIZE, 5, args), session=session)  # cuDNN autotuning at this shape
    session = _warm_session(p, device)  # style targets not cached: computed inside the timed call
    first = {}

    def on_progress(pr):
        if pr.step == 1:
            first["t"] = time.perf_counter()

    _sync(device)
    t0 = time.perf_counter()
    res = stylize(sq, [style], p, progress=on_progress, session=session)
    t1 = _now(device)
    out["512x500"] = {"shape": f"{res.picture.height}x{res.picture.width}", "iterations": TARGET_ITERATIONS,
                      "total_s": t1 - t0, "after_first_step_s": t1 - first["t"],
                      "target_s": CUDA_512_TARGET_S, "meets_target": (t1 - t0) <= CUDA_512_TARGET_S}
    # 2048×2048 with a full L-BFGS history: peak memory.
    n = args.big_iterations
    p = _params(BIG_SIZE, n, args)
    session = _warm_session(p, device)
    mem = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mem.reset()
    t0 = time.perf_counter()
    try:
        res = stylize(sq, [style], p, session=session)
        peak, reserved = mem.peak()
        out["2048_memory"] = {
            "shape": f"{res.picture.height}x{res.picture.width}", "iterations": n,
            "lbfgs_history_full": n > LBFGS_HISTORY, "peak_allocated_bytes": peak,
            "peak_reserved_bytes": reserved, "budget_bytes": CUDA_MEMORY_BUDGET,
            "fits_24gb": (peak if reserved is None else reserved) <= CUDA_MEMORY_BUDGET, "wall_s": time.perf_counter() - t0,
        }
    except Exception as e:  # OutOfMemory on a small card is a result, not a crash
        out["2048_memory"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---- 5: the GPU inner loop (issue 11), through the engine -------------------------------------------
#
# nst_core.stylize end to end on the centre square of the content (the paper's layers, average
# pooling, the chosen weights, single scale, a warm network): the engine's loop as it is now
# (nst_core.lbfgs.LBFGS on the device, the step captured by nst_core.capture.CapturedStep on CUDA,
# losses through nst_core.readback), "new", against the same engine with $NST_LBFGS=torch
# (torch.optim.LBFGS, whose step reads values back and is therefore never captured), "torch".
# fp32 is $NST_TF32=0; tf32 the default; bf16 the precision parameter (network in bfloat16).

LOOP_TARGET_S = 1.0  # issue 11: 512x512, 500 L-BFGS steps in about a second on an H100/H200
PRECISIONS = {"fp32": (False, "float32"), "tf32": (True, "float32"), "bf16": (True, "bfloat16")}
IMPLEMENTATIONS = {"device": "new (device L-BFGS, captured)", "torch": "torch.optim.LBFGS, eager"}


class _Env:
    """Environment variables set for a block, then put back."""

    def __init__(self, **values):
        self.values = values

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _set_precision(device: torch.device, name: str) -> str:
    tf32, precision = PRECISIONS[name]
    devices.configure(device, tf32=tf32)
    return precision


def _loop_session(args, device: torch.device) -> Session:
    """A session with the network loaded that keeps no style targets (each run computes its own)."""
    session = Session(max_targets=0)
    session.network(_params(TARGET_SIZE, 1, args), device)
    return session


def engine_run(session: Session, content: Picture, style: Picture, side: int, steps: int, args,
               device: torch.device, name: str, kind: str, sync_window: tuple[int, int] | None = None,
               stop_after: int | None = None) -> dict:
    """stylize() of the centre square at side x side, `steps` steps, in `session` (network loaded,
    style targets computed inside the timed call: see _loop_session); steady ms per step between progress
    reports (they arrive as the device finishes the steps); host synchronisations per step counted
    with torch.cuda's sync debug mode ("warn") between the reports of the steps in `sync_window`.
    `stop_after`: cancel once that step is reported (a long run's memory, a few steps' time)."""
    import warnings

    from nst_core import Cancelled

    tf32, precision = PRECISIONS[name]
    params = StyleParams(size=side, iterations=steps, levels=1, weights=args.weights, device=args.device_name,
                         seed=0, precision=precision)
    cuda = device.type == "cuda"
    stamps, totals = [], []
    stop = threading.Event()

    def on_progress(pr):
        stamps.append(time.perf_counter())
        totals.append(pr.losses["total"])
        if stop_after is not None and pr.step >= stop_after:
            stop.set()
        if cuda and sync_window:
            if pr.step == sync_window[0]:
                torch.cuda.set_sync_debug_mode("warn")
            elif pr.step == sync_window[1]:
                torch.cuda.set_sync_debug_mode("default")

    with _Env(NST_LBFGS=kind, NST_TF32="1" if tf32 else "0"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sync(device)
        t0 = time.perf_counter()
        try:
            res = stylize(_square(content), [style], params, progress=on_progress, session=session, cancel=stop)
        except Cancelled:
            if stop_after is None:
                raise
            return {"steps": len(totals), "stopped_after": stop_after, "total_s": time.perf_counter() - t0,
                    "first_loss": totals[0], "final_loss": totals[-1], "mode": "stopped"}
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        t1 = time.perf_counter()  # the result is on the host: nothing left on the device
    steady_from = min(steps, max(2, steps // 5))
    out = {"total_s": t1 - t0, "steps": steps, "first_loss": totals[0], "final_loss": totals[-1],
           "reports": len(totals), "mode": res.loop, "result_shape": [res.picture.height, res.picture.width],
           "steady_ms_per_step": ((stamps[-1] - stamps[steady_from - 1]) / (steps - steady_from) * 1e3
                                  if steps > steady_from else None)}
    if cuda and sync_window:
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        out["syncs_per_step"] = syncs / (sync_window[1] - sync_window[0])
        out["sync_window"] = list(sync_window)
    return out


def bare_step_ms(net, side, device, precision, graphs: bool, steps: int) -> float:
    """ms of a bare VGG-19 forward (to relu5_1) + backward to the input, same shape and precision."""
    from nst_core.capture import CapturedStep

    p = StyleParams()
    fmt = devices.memory_format(device)
    xb = torch.rand(1, 3, side, side, device=device).contiguous(memory_format=fmt).requires_grad_(True)

    def fn():
        with devices.autocast(device, precision, cache_enabled=False):
            feats = net(xb, p.used_layers)
        total = sum(f.float().sum() for f in feats.values())
        return torch.autograd.grad(total, xb)[0]

    step = CapturedStep(fn, device, enabled=graphs)
    for _ in range(4):
        step()
    t0 = _now(device)
    for _ in range(steps):
        step()
    return (_now(device) - t0) / steps * 1e3


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_loop(content: Picture, style: Picture, args, device: torch.device) -> dict:
    side, steps = args.loop_size, args.loop_steps
    session = _loop_session(args, device)
    net = session.network(_params(side, steps, args), device)
    # host syncs counted over 20 steps with a full L-BFGS history where the run is long enough
    start = max(2, min(LBFGS_HISTORY + 5, steps - 25))
    window = (start, start + 20) if steps >= start + 24 else None
    out = {"size": side, "steps": steps, "runs": [], "ratio": []}
    for name in args.loop_precisions:
        for kind, label in IMPLEMENTATIONS.items():
            try:
                engine_run(session, content, style, side, min(steps, 6), args, device, name, kind)  # autotuning
                r = engine_run(session, content, style, side, steps, args, device, name, kind, window)
            except Exception as e:  # one failing configuration must not hide the others
                r = {"error": f"{type(e).__name__}: {e}"}
            r.update(precision=name, implementation=label)
            out["runs"].append(r)
            _log(args, f"loop {name} {label}: {r.get('total_s', float('nan')):.3f} s")
            _free(device)
        # per step against a bare forward+backward, both captured (and both eager)
        precision = _set_precision(device, name)
        bare_n = max(5, min(50, steps // 10))
        row = {"precision": name}
        for graphs in (True, False):
            try:
                bare = bare_step_ms(net, side, device, precision, graphs, bare_n)
            except Exception as e:
                bare = None
                row["error"] = f"{type(e).__name__}: {e}"
            row["bare_captured_ms" if graphs else "bare_eager_ms"] = bare
        new = next((r for r in out["runs"] if r["precision"] == name and r["implementation"].startswith("new")), {})
        old = next((r for r in out["runs"] if r["precision"] == name and r["implementation"].startswith("torch")), {})
        row["new_ms"], row["torch_ms"] = new.get("steady_ms_per_step"), old.get("steady_ms_per_step")
        if row["new_ms"] and row.get("bare_captured_ms"):
            row["new_over_bare_captured"] = row["new_ms"] / row["bare_captured_ms"]
        if row["torch_ms"] and row.get("bare_eager_ms"):
            row["torch_over_bare_eager"] = row["torch_ms"] / row["bare_eager_ms"]
        out["ratio"].append(row)
        _free(device)
    devices.configure(device)
    return out


def gpu_memory(content: Picture, style: Picture, args, device: torch.device) -> dict:
    """Peak memory of stylize() at --loop-big for a 500-step run (the L-BFGS history of 100 pairs is
    preallocated: stopped after 5 steps, it has reached the peak), and the largest square it runs
    untiled (bounded binary search)."""
    side = args.loop_big
    out = {"big": side, "peak": [], "largest": []}
    session = _loop_session(args, device)
    mem = PeakMemory(device)
    for name in args.loop_precisions[1:] or args.loop_precisions:
        _free(device)
        base = mem.reset()
        try:
            r = engine_run(session, content, style, side, TARGET_ITERATIONS, args, device, name, "device",
                           stop_after=5)
            peak, reserved = mem.peak()
            out["peak"].append({"precision": name, "history": LBFGS_HISTORY, "peak_allocated_bytes": peak - base,
                                "peak_reserved_bytes": reserved, "steps": r["steps"], "wall_s": r["total_s"]})
        except Exception as e:
            out["peak"].append({"precision": name, "error": f"{type(e).__name__}: {e}"})
        _free(device)
    if device.type != "cuda" or args.fit_seconds <= 0:
        return out
    names = ["tf32" if "tf32" in args.loop_precisions else args.loop_precisions[0]]
    if args.loop_precisions[-1] != names[0]:
        names.append(args.loop_precisions[-1])
    for name in names:
        out["largest"].append(dict(precision=name, history=LBFGS_HISTORY,
                                   **largest_square(session, content, style, device, name, args, len(names))))
        _log(args, f"largest square {name}: {out['largest'][-1]}")
    return out


def largest_square(session, content, style, device, name, args, searches: int) -> dict:
    """Binary search (to 128 px) for the largest side at which a 500-step stylize() (history 100)
    runs its first 4 steps (the third captured) without running out of memory, within its share of
    --fit-seconds; the bracket found so far if time runs out."""
    deadline = time.perf_counter() + args.fit_seconds / searches
    tried = {}

    def fits(side):
        _free(device)
        try:
            engine_run(session, content, style, side, TARGET_ITERATIONS, args, device, name, "device", stop_after=4)
            tried[side] = "ok"
            return True
        except Exception as e:  # OOM, or a kernel that cannot take that many elements
            tried[side] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return False
        finally:
            _free(device)

    lo, hi = args.loop_big, None
    if not fits(lo):
        return {"largest_side": None, "tried": tried}
    while hi is None and time.perf_counter() < deadline and lo * 2 <= args.fit_max:
        if fits(lo * 2):
            lo *= 2
        else:
            hi = lo * 2
    hi = hi or min(lo * 2, args.fit_max + 128)
    while hi - lo > 128 and time.perf_counter() < deadline:
        mid = (lo + hi) // 2 // 64 * 64
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"largest_side": lo, "first_failing_side": hi if hi <= args.fit_max else None,
            "resolved_to_px": hi - lo, "timed_out": time.perf_counter() >= deadline, "tried": tried}


def print_gpu_loop(dev: dict) -> None:
    g = dev.get("gpu_loop")
    if g:
        print()
        print(f"[{dev['machine']['device']}] the engine's loop: stylize() of a {g['size']}x{g['size']} square, "
              f"{g['steps']} L-BFGS steps, warm network, end to end (style targets included, result on the host)")
        head = (f"{'precision':<9} {'implementation':<32} {'total s':>8} {'ms/step':>8} {'syncs/step':>10} "
                f"{'final loss':>11}  steps ran as")
        print(head)
        print("-" * len(head))
        for r in g["runs"]:
            if "error" in r:
                print(f"{r['precision']:<9} {r['implementation']:<32} failed: {r['error']}")
                continue
            syncs = r.get("syncs_per_step")
            ms = r["steady_ms_per_step"]
            print(f"{r['precision']:<9} {r['implementation']:<32} {r['total_s']:>8.3f} "
                  f"{'-' if ms is None else format(ms, '.3f'):>8} {'-' if syncs is None else format(syncs, '.1f'):>10} "
                  f"{r['final_loss']:>11.4g}  {r['mode']}")
        best = [r for r in g["runs"] if "total_s" in r and r["implementation"].startswith("new")]
        if best and g["size"] == TARGET_SIZE and g["steps"] == TARGET_ITERATIONS:
            b = min(best, key=lambda r: r["total_s"])
            print(f"  target: {TARGET_SIZE}x{TARGET_SIZE} x {TARGET_ITERATIONS} steps <= {LOOP_TARGET_S:.1f} s: "
                  f"best {b['total_s']:.3f} s ({b['precision']}): {'met' if b['total_s'] <= LOOP_TARGET_S else 'NOT met'}")
        windows = {tuple(r["sync_window"]) for r in g["runs"] if "sync_window" in r}
        if windows:
            print("  syncs/step: host synchronisations (torch.cuda sync debug mode 'warn') between the progress "
                  f"reports of steps {' / '.join(f'{a}-{b}' for a, b in sorted(windows))}, readback included")
        print("  per step against a bare VGG-19 forward+backward at the same shape and precision (ms):")
        for row in g["ratio"]:
            def f(k):
                v = row.get(k)
                return "-" if v is None else f"{v:.3f}"
            print(f"    {row['precision']}: new {f('new_ms')} / bare captured {f('bare_captured_ms')} = "
                  f"{f('new_over_bare_captured')}x; torch {f('torch_ms')} / bare eager {f('bare_eager_ms')} = "
                  f"{f('torch_over_bare_eager')}x" + (f"  ({row['error']})" if "error" in row else ""))
    m = dev.get("gpu_memory")
    if m:
        print()
        print(f"[{dev['machine']['device']}] memory of stylize() (L-BFGS history on the device, step captured)")
        for r in m["peak"]:
            if "error" in r:
                print(f"  {m['big']}x{m['big']} ({r['precision']}): failed: {r['error']}")
            else:
                print(f"  {m['big']}x{m['big']} ({r['precision']}, a {TARGET_ITERATIONS}-step run stopped after "
                      f"{r['steps']} steps, history {r['history']} preallocated): peak allocated "
                      f"{_mib(r['peak_allocated_bytes'])}, reserved {_mib(r['peak_reserved_bytes'])}")
        for r in m["largest"]:
            if r.get("largest_side") is None:
                print(f"  largest square ({r['precision']}, history {r['history']}): none found: {r.get('tried')}")
                continue
            fail = r.get("first_failing_side")
            why = r["tried"].get(fail, "") if fail else ""
            print(f"  largest square untiled ({r['precision']}, history {r['history']} on the device): "
                  f"{r['largest_side']}x{r['largest_side']} runs; "
                  + (f"{fail}x{fail} fails ({why})" if fail else "nothing larger tried")
                  + (" [time box reached]" if r.get("timed_out") else ""))


# ---- 4: coarse-to-fine against single scale ------------------------------------------------------

class _Turnstile:
    """Lets several threads take turns, one loop step at a time, so that they share the machine's load."""

    def __init__(self, names):
        self.cv = threading.Condition()
        self.order = list(names)
        self.turn = self.order[0]
        self.done = set()

    def wait(self, name):
        with self.cv:
            self.cv.wait_for(lambda: self.turn == name)

    def pass_on(self, name, finished=False):
        with self.cv:
            if finished:
                self.done.add(name)
            left = [n for n in self.order if n not in self.done]
            if left:
                i = self.order.index(name)
                self.turn = next(n for n in self.order[i + 1:] + self.order[:i + 1] if n in left)
            self.cv.notify_all()


def time_to_loss(content: Picture, style: Picture, args, device: torch.device) -> dict:
    """Single scale and coarse-to-fine runs, interleaved step by step (each in its own thread, one
    running at a time), so that a change in the machine's load hits all of them alike. A run's time
    is its own: set-up and steps, without the time it waited for its turn."""
    size, n = args.c2f_size, args.c2f_iterations
    levels = args.c2f_levels or len(StyleParams(size=size).level_sizes())
    if levels < 2:
        levels = 2  # the automatic choice is single scale up to 512 px: force two levels
    variants = [("single", 1, None), ("coarse-to-fine", levels, None)]
    variants += [(f"coarse-to-fine share {s:g}", levels, s) for s in args.c2f_shares]
    default_share = params_module.FINEST_LEVEL_SHARE
    gate = _Turnstile([v[0] for v in variants])
    runs, errors = {}, {}

    def run(label, levels, share):
        gate.wait(label)
        try:
            # The share is read when the run starts (the levels are planned then), while no other
            # run is going: an experiment only, put back below.
            params_module.FINEST_LEVEL_SHARE = default_share if share is None else share
            p = _params(size, n, args, levels=levels)
            plan = _feasible_levels(p, content)
            session = _warm_session(p, device)  # network warm; style targets are computed in the run
            curve = []
            clock = {"start": time.perf_counter(), "waited": 0.0}

            def on_progress(pr):
                t = time.perf_counter()
                curve.append({"step": pr.step, "level": pr.level, "elapsed": t - clock["start"] - clock["waited"],
                              "loss": pr.losses["total"], "final_level": pr.level == len(plan)})
                gate.pass_on(label)
                gate.wait(label)
                clock["waited"] += time.perf_counter() - t

            res = stylize(content, [style], p, progress=on_progress, session=session)
            own = time.perf_counter() - clock["start"] - clock["waited"]
            runs[label] = {"levels": plan, "curve": curve, "total_s": own, "final_loss": res.losses["total"],
                           "pixels": res.picture.height * res.picture.width}
        except Exception as e:  # reported, and the other runs go on
            errors[label] = f"{type(e).__name__}: {e}"
        finally:
            gate.pass_on(label, finished=True)

    threads = [threading.Thread(target=run, args=v, name=v[0]) for v in variants]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        params_module.FINEST_LEVEL_SHARE = default_share
    if errors:
        raise RuntimeError(f"time-to-loss runs failed: {errors}")
    runs = {v[0]: runs[v[0]] for v in variants}

    for label, r in runs.items():
        # Work in final-size iterations: each step weighted by its pixel count over the final one's.
        sides = [side for side, k in r["levels"] for _ in range(k)]
        acc = 0.0
        for c in r["curve"]:
            hh, ww = fit(content.height, content.width, sides[c["step"] - 1])
            acc += hh * ww / r["pixels"]
            c["work"] = acc
        first_final = next(c for c in r["curve"] if c["final_level"])
        r["final_level_first_loss"] = first_final["loss"]
        r["final_level_start_s"] = first_final["elapsed"]

    single = runs["single"]["curve"]
    marks = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    rows = []
    for k in marks:
        thr = single[k - 1]["loss"]
        row = {"single_iterations": k, "threshold": thr}
        for label, run in runs.items():
            hit = next((c for c in run["curve"] if c["final_level"] and c["loss"] <= thr), None)
            row[label] = None if hit is None else {"elapsed": hit["elapsed"], "step": hit["step"],
                                                  "work": hit["work"]}
        rows.append(row)
    return {"size": size, "iterations": n, "runs": {k: {kk: vv for kk, vv in v.items() if kk != "curve"}
                                                   for k, v in runs.items()},
            "curves": {k: v["curve"] for k, v in runs.items()}, "thresholds": rows}


# ---- output -----------------------------------------------------------------------------------

def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def _projected(r: dict) -> float:
    """The loop ratio with a full L-BFGS history: ratio + (L-BFGS@100 - L-BFGS@k) / bare."""
    return r["overhead_ratio"] + (r["lbfgs_s_at_full_history"] - r["lbfgs_s_at_measured_history"]) / r["bare_s_per_it"]


def print_report(report: dict) -> None:
    m = report["machine"]
    print("Neural Style engine benchmark")
    print(f"  CPU     {m['cpu']} ({m['cpu_cores_usable']} usable cores), torch threads {m['torch_threads']}")
    print(f"  torch   {m['torch']} (Python {m['python']}, {m['platform']})")
    for dev in report["devices"]:
        print(f"  device  {dev['machine']['device']}" + (f", {dev['machine']['gpu_memory_gib']} GiB, CUDA "
                                                         f"{dev['machine']['cuda']}" if "gpu" in dev["machine"] else ""))
    print(f"  weights {report['weights']}; content {report['content']}; style {report['style']}")
    print(f"  load average at start {m['loadavg_start']}, at end {report['loadavg_end']} "
          f"(a shared machine makes timings noisy: figures are medians over steps)")
    for dev in report["devices"]:
        rows = dev["sizes"]
        if rows:
            print()
            print(f"[{dev['machine']['device']}] seconds per iteration, steady state "
                  f"(median of {rows[0]['steps_timed']} steps after {rows[0]['warmup_steps']} warm-up steps; "
                  f"loop and bare steps interleaved)")
            head = (f"{'size':>5} {'HxW':>10} {'loop ms/it':>11} {'bare ms/it':>11} {'ratio':>6} "
                    f"{'loss terms':>10} {'L-BFGS@k':>9} {'rest':>7} {'L-BFGS@100':>10} {'ratio@100':>9} "
                    f"{'loop peak mem':>14} {'bare peak mem':>14}")
            print(head)
            print("-" * len(head))
            for r in rows:
                print(f"{r['size']:>5} {r['height']:>4}x{r['width']:<5} {_ms(r['loop_s_per_it']):>11} "
                      f"{_ms(r['bare_s_per_it']):>11} {r['overhead_ratio']:>5.3f}x {_ms(r['loss_terms_s_per_it']):>10} "
                      f"{_ms(r['lbfgs_s_at_measured_history']):>9} {_ms(r['rest_s_per_it']):>7} "
                      f"{_ms(r['lbfgs_s_at_full_history']):>10} {_projected(r):>8.3f}x "
                      f"{_mib(r['loop_peak_delta_bytes']):>14} {_mib(r['bare_peak_delta_bytes']):>14}")
            print("  ratio: median over steps of loop/bare; ratio of the medians / of the fastest steps (the least "
                  "disturbed by other processes): "
                  + ", ".join(f"{r['size']}: {r['ratio_of_medians']:.3f} / {r['ratio_of_minima']:.3f} "
                              f"({_ms(r['loop_s_min'])} / {_ms(r['bare_s_min'])} ms)" for r in rows))
            print("  loss terms: Gram matrices + content and style losses, forward+backward, on feature maps "
                  "of this size; by style layer (ms): "
                  + "; ".join(f"{r['size']}: " + " ".join(f"{n.replace('relu', '')}={_ms(v)}"
                                                          for n, v in r["loss_terms_by_style_layer_s"].items())
                              for r in rows))
            print(f"  L-BFGS@k: the loop's L-BFGS ({rows[0].get('lbfgs_implementation', 'torch')}) bookkeeping at "
                  f"its history length k="
                  f"{rows[0]['lbfgs_history_len_measured']}; L-BFGS@100 with a full history (a 500-step run's "
                  f"usual state); ratio@100 = ratio + (L-BFGS@100 - L-BFGS@k) / bare")
            print("  rest = loop - bare - loss terms - L-BFGS@k: the engine's own per-step cost plus noise")
            print("  L-BFGS bookkeeping at full history (ms), nst_core.lbfgs (device-resident) against "
                  "torch.optim.LBFGS: "
                  + ", ".join(f"{r['size']}: {_ms(r.get('lbfgs_device_s_at_full_history'))} against "
                              f"{_ms(r.get('lbfgs_torch_s_at_full_history', r['lbfgs_s_at_full_history']))}"
                              for r in rows))
            print(f"  memory: {rows[0]['memory_measure']}")
            for r in rows:
                if dev["machine"]["device"].startswith("cpu") and r["size"] == 256:
                    ok = r["overhead_ratio"] <= CPU_RATIO_TARGET
                    print(f"  target: CPU 256 px loop <= {CPU_RATIO_TARGET:.2f}x bare: measured "
                          f"{r['overhead_ratio']:.3f}x ({'met' if ok else 'NOT met'}); with a full L-BFGS history "
                          f"{_projected(r):.3f}x ({'met' if _projected(r) <= CPU_RATIO_TARGET else 'NOT met'})")
        t = dev.get("cuda_targets")
        if t:
            a = t["512x500"]
            print(f"  target: {TARGET_SIZE}x{TARGET_SIZE} ({a['shape']}), {a['iterations']} L-BFGS iterations: {a['total_s']:.2f} s in all "
                  f"({a['after_first_step_s']:.2f} s after the first step); target <= {a['target_s']:.0f} s: "
                  f"{'met' if a['meets_target'] else 'NOT met'}")
            b = t["2048_memory"]
            if "error" in b:
                print(f"  target: {BIG_SIZE}x{BIG_SIZE} in 24 GB: failed: {b['error']}")
            else:
                print(f"  target: {BIG_SIZE}x{BIG_SIZE} ({b['shape']}), {b['iterations']} iterations (L-BFGS history "
                      f"{'full' if b['lbfgs_history_full'] else 'NOT full'}): peak allocated "
                      f"{b['peak_allocated_bytes'] / 2**30:.2f} GiB, reserved "
                      f"{'-' if b['peak_reserved_bytes'] is None else format(b['peak_reserved_bytes'] / 2**30, '.2f')} "
                      f"GiB; fits in 24 GB: {'yes' if b['fits_24gb'] else 'NO'} (by reserved memory; the CUDA "
                      f"context, a few hundred MB, not counted)")
        print_gpu_loop(dev)
        c = dev.get("time_to_loss")
        if c:
            print()
            print(f"[{dev['machine']['device']}] coarse-to-fine vs single scale at {c['size']} px, "
                  f"{c['iterations']} iterations each (same seed; runs interleaved step by step, each timed on its "
                  f"own): time until the loss at the final size first drops below the single-scale run's loss "
                  f"after k iterations")
            for label, run in c["runs"].items():
                plan = ", ".join(f"{s} px x {k}" for s, k in run["levels"])
                print(f"  {label:<26} levels: {plan}; {run['total_s']:.1f} s in all; loss at the final size: "
                      f"{run['final_level_first_loss']:.4g} at its first step there "
                      f"({run['final_level_start_s']:.1f} s), {run['final_loss']:.4g} at the end")
            labels = list(c["runs"])
            head = f"{'k':>4} {'threshold':>11} " + " ".join(f"{lab[:26]:>26}" for lab in labels)
            print(head)
            print("-" * len(head))
            for row in c["thresholds"]:
                cells = []
                for lab in labels:
                    h = row[lab]
                    cells.append(f"{'not reached':>26}" if h is None else
                                 f"{h['elapsed']:>8.1f} s ({h['work']:>5.1f} it-eq)".rjust(26))
                print(f"{row['single_iterations']:>4} {row['threshold']:>11.4g} " + " ".join(cells))
            print("  it-eq: work done by then in final-size iterations (each step weighted by its pixel count); "
                  "times include the set-up of each level (targets), the network is warm")
            print("  seconds per final-size iteration: " + "; ".join(
                f"{lab} {run['total_s'] / c['curves'][lab][-1]['work']:.2f}" for lab, run in c["runs"].items()))


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark nst_core.stylize: s/it and peak memory beside a bare VGG-19 forward+backward "
                    "(overhead ratio), the CUDA targets, and coarse-to-fine vs single-scale time-to-loss.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="auto", help="auto (default: cpu, plus cuda when present), cpu, cuda or cuda:N")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated output sizes (longest side); default 256,512 on cpu, 512,1024,2048 on cuda")
    ap.add_argument("--steps", type=int, default=None, help="timed steady-state steps per size (default 10; --quick 6; cuda 30)")
    ap.add_argument("--warmup", type=int, default=3, help="loop steps left out before timing (default 3)")
    ap.add_argument("--layer-split-steps", type=int, default=3,
                    help="steps in which the loss terms are also timed layer by layer (default 3)")
    ap.add_argument("--weights", default="random", help="random (default; needs no download), imagenet or a path")
    ap.add_argument("--content", default=str(IMAGES / "tubingen.jpg"), help="content image (default ../shared/images/tubingen.jpg)")
    ap.add_argument("--style", default=str(IMAGES / "starry_night.jpg"), help="style image (default ../shared/images/starry_night.jpg)")
    ap.add_argument("--c2f-size", type=int, default=None, help="final size of the time-to-loss runs (cpu 512, --quick 256, cuda 2048)")
    ap.add_argument("--c2f-iterations", type=int, default=None, help="iterations of each time-to-loss run (cpu 60, --quick 40, cuda 300)")
    ap.add_argument("--c2f-levels", type=int, default=0, help="levels of the coarse-to-fine run (0: chosen from the size)")
    ap.add_argument("--c2f-shares", default="",
                    help="also try these finest-level shares (comma-separated, e.g. 0.6,0.8) in place of "
                         f"params.FINEST_LEVEL_SHARE={params_module.FINEST_LEVEL_SHARE} (an experiment only)")
    ap.add_argument("--sections", default="sizes,targets,c2f",
                    help="what to run (default sizes,targets,c2f): sizes (s/it, ratio, memory), targets (cuda only), "
                         "c2f (time-to-loss), loop (the new GPU loop driven directly: time, ratio, syncs), "
                         "memory (its peak at --loop-big and the largest square that fits)")
    ap.add_argument("--loop-size", type=int, default=TARGET_SIZE, help=f"side of the loop section's runs (default {TARGET_SIZE})")
    ap.add_argument("--loop-steps", type=int, default=TARGET_ITERATIONS, help=f"steps of each loop run (default {TARGET_ITERATIONS})")
    ap.add_argument("--loop-precisions", default="fp32,tf32,bf16", help="fp32 (no TF32), tf32, bf16 (default all three)")
    ap.add_argument("--loop-big", type=int, default=BIG_SIZE, help=f"side of the peak-memory run (default {BIG_SIZE})")
    ap.add_argument("--fit-seconds", type=float, default=120.0,
                    help="time box of the largest-square searches (two searches; 0 skips them; default 120)")
    ap.add_argument("--fit-max", type=int, default=16384, help="largest side the search tries (default 16384)")
    ap.add_argument("--big-iterations", type=int, default=LBFGS_HISTORY + 5,
                    help="iterations of the cuda 2048x2048 memory run (default 105: more than 100 fills the L-BFGS history)")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller run: cpu 256 only, 6 steps, time-to-loss at 256 px (128 then 256) with 40 iterations")
    ap.add_argument("--json", action="store_true", help="print one JSON object (everything measured) instead of tables")
    ap.add_argument("--json-file", metavar="PATH", help="also write that JSON object to PATH (tables still printed)")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: print the tables of a JSON file written before")
    args = ap.parse_args(argv)
    args.c2f_shares = [float(s) for s in args.c2f_shares.split(",") if s.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - {"sizes", "targets", "c2f", "loop", "memory"}
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))} (sizes, targets, c2f, loop, memory)")
    args.loop_precisions = [s.strip() for s in args.loop_precisions.split(",") if s.strip()]
    bad = set(args.loop_precisions) - set(PRECISIONS)
    if bad or not args.loop_precisions:
        ap.error(f"--loop-precisions: unknown {', '.join(sorted(bad)) or '(none given)'} ({', '.join(PRECISIONS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print_report(json.loads(Path(args.from_json).read_text()))
        return 0
    if args.device == "auto":
        names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        names = [args.device]
    missing = [p for p in (args.content, args.style) if not Path(p).is_file()]
    if missing:
        print(f"bench_engine: no such image: {', '.join(missing)} (the benchmark reads ../shared/images; "
              f"use --content/--style)", file=sys.stderr)
        return 2
    content, style = load_image(args.content), load_image(args.style)
    report = {"weights": args.weights, "content": args.content, "style": args.style, "devices": [],
              "args": {k: v for k, v in vars(args).items()}}
    for name in names:
        device = devices.pick_device(name)
        devices.configure(device)
        args.device_name = name
        cuda = device.type == "cuda"
        sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
                 ([512, 1024, 2048] if cuda else ([256] if args.quick else [256, 512])))
        a = argparse.Namespace(**vars(args))
        a.steps = args.steps or (6 if args.quick else (30 if cuda else 10))
        a.c2f_size = args.c2f_size or (2048 if cuda else (256 if args.quick else 512))
        a.c2f_iterations = args.c2f_iterations or (300 if cuda else (40 if args.quick else 60))
        dev = {"machine": machine_info(device), "sizes": []}
        report.setdefault("machine", dev["machine"])
        for size in (sizes if "sizes" in args.sections else []):
            dev["sizes"].append(measure_size(content, style, size, a, device))
            _log(args, f"{name} {size}: loop {dev['sizes'][-1]['loop_s_per_it']:.3f} s/it, "
                       f"ratio {dev['sizes'][-1]['overhead_ratio']:.3f}")
        if cuda and "targets" in args.sections:
            dev["cuda_targets"] = cuda_targets(content, style, a, device)
        if "c2f" in args.sections:
            dev["time_to_loss"] = time_to_loss(content, style, a, device)
        if "loop" in args.sections:
            dev["gpu_loop"] = gpu_loop(content, style, a, device)
        if "memory" in args.sections:
            dev["gpu_memory"] = gpu_memory(content, style, a, device)
        if cuda:
            devices.configure(device)  # TF32 back on
        report["devices"].append(dev)
    report["loadavg_end"] = _loadavg()
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.json:
        json.dump(report, sys.stdout, indent=1, default=str)
        print()
    else:
        print_report(report)
    return 0


def _log(args, msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
