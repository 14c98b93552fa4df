"""The engine's inner loop (issue 11) through nst_core.stylize: the device L-BFGS against torch's,
the step's eager fallback, progress and cancel through the readback, no host reads inside a step.

The steps are observed by wrapping the step function that the engine hands to `readback.run_steps`
(the real run_steps still runs it): that counts the steps really taken, and on the CPU it is where
the test watches for reads of values back to the host. The `gpu` tests (skipped without CUDA) run
the same engine with the step captured as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch

import nst_core
from nst_core import Cancelled, Session, StyleParams, engine, readback
from nst_core.samples import sample_path

_SESSION = Session()


@pytest.fixture(autouse=True, scope="module")
def _cache(nst_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NST_CACHE_DIR", str(nst_cache_dir))
        yield


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    for name in ("NST_LBFGS", "NST_CUDA_GRAPHS", "NST_TF32"):
        monkeypatch.delenv(name, raising=False)


def fast(**changes) -> StyleParams:
    """Random weights on the CPU, 64 px, the first two blocks of VGG-19."""
    base = dict(weights="random", device="cpu", size=64, iterations=5,
                content_layers={"relu2_1": 1.0}, style_layers={"relu1_1": 0.5, "relu2_1": 0.5})
    base.update(changes)
    return StyleParams(**base)


def stylize(params, **kwargs):
    return nst_core.stylize(sample_path("chelsea"), [sample_path("gravel")], params, session=_SESSION, **kwargs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class StepWatch:
    """Wraps the step the engine passes to run_steps: counts the steps taken, runs `around(n)`
    (a context manager) around the n-th step (1-based, over the whole run)."""

    def __init__(self, monkeypatch, around=None):
        self.taken = 0
        self.around = around or (lambda n: contextlib.nullcontext())
        real = readback.run_steps

        def watched(step, *args, **kwargs):
            def counted():
                self.taken += 1
                with self.around(self.taken):
                    return step()
            return real(counted, *args, **kwargs)

        monkeypatch.setattr(engine, "run_steps", watched)


# ---- the device L-BFGS in the engine --------------------------------------------------------------

def test_device_lbfgs_gives_torchs_picture_within_float_rounding(monkeypatch):
    """The same 20 steps as torch.optim.LBFGS; float32 rounding of another algebra (two triangular
    solves for the two loops) makes them differ a little. Measured: max |Δ| 0.0039 (of 1), PSNR
    76 dB, total loss 2e-5 apart. Over more steps the difference grows (50 steps: PSNR 34 dB), as
    torch's own float32 iterates drift from its float64 ones (tests/test_lbfgs.py)."""
    ours = stylize(fast(iterations=20))
    monkeypatch.setenv("NST_LBFGS", "torch")
    theirs = stylize(fast(iterations=20))
    a, b = ours.picture.rgb, theirs.picture.rgb
    diff = float((a - b).abs().max())
    assert 0 < diff < 0.02, diff  # > 0: two implementations really ran
    assert psnr(a, b) >= 60
    assert ours.losses["total"] == pytest.approx(theirs.losses["total"], rel=1e-3)
    assert ours.losses["total"] < 0.5 * stylize(fast(iterations=1)).losses["total"]


def test_an_unknown_lbfgs_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("NST_LBFGS", "fast")
    with pytest.raises(ValueError, match="NST_LBFGS='fast': must be one of device, torch"):
        stylize(fast(iterations=1))


def test_on_the_cpu_the_step_runs_eagerly_and_equals_the_uncaptured_step(monkeypatch):
    """CapturedStep's CPU fallback calls the step as it is: bit for bit what a step with capture
    switched off gives, and the result says how the steps ran."""
    fallback = stylize(fast(iterations=6, levels=2, size=96))
    monkeypatch.setenv("NST_CUDA_GRAPHS", "0")
    plain = stylize(fast(iterations=6, levels=2, size=96))
    assert fallback.loop == "eager (no CUDA graphs on cpu); eager (no CUDA graphs on cpu)"
    assert torch.equal(fallback.picture.rgb, plain.picture.rgb)
    assert fallback.losses == plain.losses


def test_adam_keeps_its_clamp_through_the_new_step():
    result = stylize(fast(optimizer="adam", iterations=8, learning_rate=0.5))
    assert result.picture.rgb.min() >= 0 and result.picture.rgb.max() <= 1
    assert result.losses["total"] < stylize(fast(optimizer="adam", iterations=1)).losses["total"]


def test_a_levels_history_is_as_long_as_its_steps_up_to_100(monkeypatch):
    """A longer history would never fill: the same steps with less memory (a 500-step level gets 100)."""
    from nst_core import lbfgs

    sizes = []
    real = lbfgs.make

    def recording(x, *args, **kwargs):
        opt = real(x, *args, **kwargs)
        sizes.append((kwargs["history_size"], opt.history_size))
        return opt

    monkeypatch.setattr(lbfgs, "make", recording)
    params = fast(iterations=7, levels=2, size=96)
    stylize(params)
    levels = engine._feasible_levels(params, nst_core.load_image(sample_path("chelsea")))
    assert len(levels) == 2 and sizes == [(n, n) for _, n in levels]
    sizes.clear()
    with pytest.raises(Cancelled):  # the optimiser is made before the first cancel check
        stylize(fast(iterations=500), cancel=lambda: bool(sizes))
    assert sizes == [(100, 100)]


# ---- progress and cancel --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["device", "torch"])
def test_progress_comes_for_every_step_in_order_and_at_most_one_step_late(monkeypatch, kind):
    monkeypatch.setenv("NST_LBFGS", kind)
    watch = StepWatch(monkeypatch)
    seen = []  # (reported step, steps taken when it was reported, level)
    stylize(fast(iterations=7, levels=2, size=96), progress=lambda e: seen.append((e.step, watch.taken, e.level)))
    assert [s for s, _, _ in seen] == list(range(1, 8))
    assert all(0 <= taken - s <= 1 for s, taken, _ in seen), seen
    assert watch.taken == 7
    assert [lv for _, _, lv in seen] == sorted(lv for _, _, lv in seen) and seen[-1][2] == 2


@pytest.mark.parametrize("kind", ["device", "torch"])
@pytest.mark.parametrize("k", [1, 4])
def test_a_cancel_set_in_the_callback_at_step_k_stops_within_one_step(monkeypatch, kind, k):
    monkeypatch.setenv("NST_LBFGS", kind)
    watch = StepWatch(monkeypatch)
    cancel = threading.Event()
    seen = []

    def on_progress(e):
        seen.append(e.step)
        if e.step == k:
            cancel.set()

    with pytest.raises(Cancelled):
        stylize(fast(iterations=40), progress=on_progress, cancel=cancel)
    assert k <= watch.taken <= k + 1
    assert seen[:k] == list(range(1, k + 1)) and max(seen) <= k + 1


def test_the_preview_is_rendered_only_when_asked(monkeypatch):
    renders = []
    real = engine._Run.render

    def counting(self, x, max_side):
        renders.append(max_side)
        return real(self, x, max_side)

    monkeypatch.setattr(engine._Run, "render", counting)
    stylize(fast(iterations=5), progress=lambda e: e.image(32) if e.step == 3 else None)
    assert renders == [32, None]  # the one preview, then the result


# ---- no reads back to the host inside a step --------------------------------------------------------

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def count_host_reads(monkeypatch) -> tuple[list, StepWatch]:
    """Wrap the Tensor methods that read a value back to the host; record each call made while a
    step runs (the flag is set by the StepWatch around each step)."""
    calls, inside = [], [False]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            if inside[0]:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    @contextlib.contextmanager
    def flag(n):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    return calls, StepWatch(monkeypatch, around=flag)


def test_a_device_lbfgs_step_reads_nothing_back_to_the_host(monkeypatch):
    calls, watch = count_host_reads(monkeypatch)
    stylize(fast(iterations=6, tv_weight=1e-3))
    assert watch.taken == 6 and calls == []


def test_torchs_lbfgs_step_does_read_back(monkeypatch):
    """The check above can fail: torch.optim.LBFGS reads float(loss) and its tolerance tests."""
    monkeypatch.setenv("NST_LBFGS", "torch")
    calls, watch = count_host_reads(monkeypatch)
    stylize(fast(iterations=6))
    assert watch.taken == 6
    assert calls.count("__float__") >= 6 and len(calls) >= 12, calls


# ---- CUDA: the captured step in the engine ------------------------------------------------------------

def cuda_params(**changes) -> StyleParams:
    return fast(device="cuda", **changes)


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
def test_engine_captured_steps_equal_eager_steps_on_cuda(monkeypatch):
    needs_cuda()
    monkeypatch.setenv("NST_TF32", "0")
    captured = stylize(cuda_params(iterations=10))
    monkeypatch.setenv("NST_CUDA_GRAPHS", "0")
    eager = stylize(cuda_params(iterations=10))
    assert captured.loop == "graph" and eager.loop.startswith("eager (disabled")
    # cuDNN's autotuned algorithms may differ between the runs: float rounding, amplified by the steps
    assert psnr(captured.picture.rgb, eager.picture.rgb) >= 45
    assert captured.losses["total"] == pytest.approx(eager.losses["total"], rel=1e-2)


@pytest.mark.gpu
def test_engine_steps_on_cuda_do_not_synchronise(monkeypatch):
    """From the 4th reported step to the 4th-last, steps and readback run with the sync debug mode
    set to "error": any host synchronisation there raises."""
    needs_cuda()
    n = 30

    def on_progress(e):
        if e.step == 4:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif e.step == n - 4:
            torch.cuda.set_sync_debug_mode("default")

    try:
        result = stylize(cuda_params(iterations=n, size=128), progress=on_progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.loop == "graph"


@pytest.mark.gpu
def test_on_cuda_progress_is_at_most_one_step_late_and_a_cancel_lands_within_one_step(monkeypatch):
    needs_cuda()
    watch = StepWatch(monkeypatch)
    seen = []
    stylize(cuda_params(iterations=12), progress=lambda e: seen.append((e.step, watch.taken)))
    assert [s for s, _ in seen] == list(range(1, 13))
    assert all(0 <= taken - s <= 1 for s, taken in seen), seen

    watch = StepWatch(monkeypatch)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        stylize(cuda_params(iterations=60), cancel=cancel,
                progress=lambda e: cancel.set() if e.step == 8 else None)
    assert 8 <= watch.taken <= 9


@pytest.mark.gpu
@pytest.mark.parametrize("tf32,precision", [("1", "float32"), ("1", "bfloat16")])
def test_tf32_and_bf16_runs_finish_with_a_sane_loss(monkeypatch, tf32, precision):
    needs_cuda()
    monkeypatch.setenv("NST_TF32", "0")
    p = StyleParams(weights="random", device="cuda", size=128, iterations=30)
    exact = stylize(p)
    monkeypatch.setenv("NST_TF32", tf32)
    totals = []
    result = stylize(StyleParams(weights="random", device="cuda", size=128, iterations=30, precision=precision),
                     progress=lambda e: totals.append(e.losses["total"]))
    assert result.loop == "graph"
    assert len(totals) == 30 and all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.5 * totals[0]
    assert 0.5 * exact.losses["total"] < result.losses["total"] < 2 * exact.losses["total"]


# ---- make_step takes any objective with loss_and_grad ---------------------------------------------------

class Quadratic:
    """Not an Objective: 0.5 xᵀAx − bᵀx with the `loss_and_grad` interface (as a tiled objective has)."""

    def __init__(self, n=200, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.a = (q * 10 ** (-2 * torch.rand(n, generator=g, dtype=torch.float64))) @ q.t()
        self.b = torch.randn(n, generator=g, dtype=torch.float64)
        self.x0 = torch.randn(n, generator=g, dtype=torch.float64)

    def loss(self, x):
        return 0.5 * x @ (self.a @ x) - self.b @ x

    def loss_and_grad(self, x):
        with torch.enable_grad():
            f = self.loss(x)
            (grad,) = torch.autograd.grad(f, x)
        return torch.stack([f, f, f.new_zeros(()), f.new_zeros(())]).detach(), grad


def test_make_step_runs_any_loss_and_grad_objective_with_every_optimiser():
    from nst_core import lbfgs
    from nst_core.objective import make_step

    obj = Quadratic()

    def iterates(kind, steps=40):
        x = obj.x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05) if kind == "adam" else lbfgs.make(x, lr=1.0, kind=kind)
        step = make_step(obj, x, opt)
        out = []
        for _ in range(steps):
            terms = step()
            out.append((float(terms[0]), x.detach().clone()))
        return out

    # torch's LBFGS driven the usual way: closure with backward(), x.grad filled by autograd
    x = obj.x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=lbfgs.DEFAULT_HISTORY)

    def closure():
        opt.zero_grad()
        f = obj.loss(x)
        f.backward()
        return f

    usual = []
    for _ in range(40):
        usual.append(x.detach().clone())
        opt.step(closure)
    usual = usual[1:] + [x.detach().clone()]

    theirs, ours, adam = iterates("torch"), iterates("device"), iterates("adam")
    assert all(torch.equal(a, b) for (_, a), b in zip(theirs, usual))  # the same steps, bit for bit
    worst = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(ours, theirs))
    print(f"device vs torch L-BFGS over 40 steps (float64): max |dx| {worst:.2g}")
    assert worst < 1e-8  # measured 1.4e-12
    start = float(obj.loss(obj.x0))
    for run in (theirs, ours, adam):
        assert run[0][0] == pytest.approx(start)  # terms at x before the first step
        assert run[-1][0] < start - 1
