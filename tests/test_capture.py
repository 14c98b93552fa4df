"""nst_core.capture.CapturedStep and nst_core.readback: a whole step captured once, losses read late.

On the CPU (the default run) the step falls back to eager and must give exactly the iterates of
calling the step itself; progress arrives for every step in order and a cancel stops before the
next step. The `gpu` tests check on CUDA that the captured step equals the eager one, that steady
steps do not synchronise with the host, and that reduced precision and host history still work.
"""

from __future__ import annotations

import threading

import pytest
import torch

from nst_core import Cancelled, devices, lbfgs, losses
from nst_core.capture import CapturedStep
from nst_core.objective import TERMS, Objective, make_step
from nst_core.params import StyleParams
from nst_core.readback import Readback, run_steps


@pytest.fixture(scope="module")
def vgg(nst_cache_dir):
    from nst_core.weights import load_network

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NST_CACHE_DIR", str(nst_cache_dir))
        return load_network("random", last="relu5_1")


def paper_step(net, device, size=32, precision="float32", kind="device", history=100, history_device=None,
               captured=None):
    """(step function, x) for the paper's objective at size×size on `device`, from seeded noise."""
    p = StyleParams()
    net = net.to(device)
    fmt = devices.memory_format(device)
    g = torch.Generator().manual_seed(0)
    content, style, x0 = (torch.rand(3, size, size, generator=g).to(device) for _ in range(3))

    def features(img, layers=p.used_layers):
        with devices.autocast(device, precision, cache_enabled=False):
            return net(img.unsqueeze(0).contiguous(memory_format=fmt), layers)

    with torch.no_grad():
        ct = {n: f.float() for n, f in features(content, p.content_layers).items()}
        st = {n: losses.gram(f) / (f.shape[-1] * f.shape[-2]) for n, f in features(style, p.style_layers).items()}
    x = x0.clone().requires_grad_(True)
    obj = Objective(features, ct, p.content_layers, st, p.style_layers, p.content_weight, p.style_weight)
    opt = lbfgs.make(x, lr=p.step_size, history_size=history, kind=kind, history_device=history_device)
    return make_step(obj, x, opt), x


def trajectory(step, x, steps):
    xs, terms = [], []
    for _ in range(steps):
        terms.append(step().clone())
        xs.append(x.detach().clone())
    return xs, terms


# ---- CPU: the eager fallback --------------------------------------------------------------------

def test_on_the_cpu_the_captured_step_is_the_eager_step_bit_for_bit(vgg):
    plain, xp = paper_step(vgg, torch.device("cpu"))
    step, xc = paper_step(vgg, torch.device("cpu"))
    captured = CapturedStep(step, "cpu")
    want_x, want_terms = trajectory(plain, xp, 8)
    got_x, got_terms = trajectory(captured, xc, 8)
    assert captured.mode == "eager" and "cpu" in captured.reason
    assert captured.calls == 8
    assert all(torch.equal(a, b) for a, b in zip(got_x, want_x))
    assert all(torch.equal(a, b) for a, b in zip(got_terms, want_terms))
    assert want_terms[-1][0] < 0.5 * want_terms[0][0]  # the steps did optimise


def test_graphs_can_be_switched_off_and_steps_can_say_they_are_not_capturable(monkeypatch):
    from nst_core import capture

    assert capture.enabled_by_env()
    monkeypatch.setenv("NST_CUDA_GRAPHS", "0")
    assert not capture.enabled_by_env()
    x = torch.zeros(3, requires_grad=True)
    obj = Objective(lambda x: {}, {}, {}, {}, {}, 1.0, 1.0, tv_weight=1.0)
    assert make_step(obj, x, lbfgs.LBFGS(x)).capturable
    assert not make_step(obj, x, torch.optim.LBFGS([x], max_iter=1)).capturable


def test_readback_on_the_cpu_reports_each_step_at_once():
    feed = Readback(4, "cpu")
    assert feed.push(1, torch.tensor([1.0, 2.0, 3.0, 4.0])) == [(1, [1.0, 2.0, 3.0, 4.0])]
    assert feed.push(2, torch.tensor([5.0, 6.0, 7.0, 8.0])) == [(2, [5.0, 6.0, 7.0, 8.0])]
    assert feed.drain() == []


def test_run_steps_reports_every_step_in_order_with_its_terms(vgg):
    step, x = paper_step(vgg, torch.device("cpu"))
    seen = []
    last = run_steps(CapturedStep(step, "cpu"), 5, "cpu", report=lambda n, v: seen.append((n, v)), first=11)
    assert [n for n, _ in seen] == [11, 12, 13, 14, 15]
    assert all(len(v) == len(TERMS) for _, v in seen)
    totals = [v[0] for _, v in seen]
    assert totals[-1] < totals[0] and last == seen[-1][1]
    # total = content_weight * content + style_weight * style, as reported
    p = StyleParams()
    for _, (total, c, s, t) in seen:
        assert total == pytest.approx(p.content_weight * c + p.style_weight * s, rel=1e-5)


def test_a_cancel_from_the_report_stops_before_the_next_step(vgg):
    step, x = paper_step(vgg, torch.device("cpu"))
    cancel = threading.Event()
    ran = []

    def counted():
        ran.append(1)
        return step()

    def report(n, values):
        if n == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        run_steps(counted, 50, "cpu", report=report, is_cancelled=cancel.is_set)
    assert len(ran) == 3


# ---- CUDA ---------------------------------------------------------------------------------------

def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.fixture
def deterministic():
    """Fixed cuDNN algorithms and full float32, so that eager and captured runs can be compared."""
    old = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = old


@pytest.mark.gpu
def test_captured_step_equals_eager_on_cuda(vgg, deterministic):
    dev = cuda()
    plain, xp = paper_step(vgg, dev, size=64)
    step, xc = paper_step(vgg, dev, size=64)
    captured = CapturedStep(step, dev)
    want_x, want_terms = trajectory(plain, xp, 12)
    got_x, got_terms = trajectory(captured, xc, 12)
    assert captured.mode == "graph", captured.reason
    for i, (a, b) in enumerate(zip(got_x, want_x)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"step {i + 1}: {(a - b).abs().max().item()}"
    for a, b in zip(got_terms, want_terms):
        assert torch.allclose(a, b, rtol=1e-4)
    assert want_terms[-1][0] < 0.5 * want_terms[0][0]


@pytest.mark.gpu
def test_steady_captured_steps_do_not_synchronise(vgg):
    dev = cuda()
    devices.configure(dev)
    step, x = paper_step(vgg, dev, size=128)
    captured = CapturedStep(step, dev)
    feed = Readback(len(TERMS), dev)
    for i in range(4):
        feed.push(i, captured())
    assert captured.mode == "graph", captured.reason
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4, 24):
            feed.push(i, captured())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    arrived = feed.drain()
    assert arrived and arrived[-1][0] == 23


@pytest.mark.gpu
def test_eager_device_lbfgs_steps_do_not_synchronise(vgg):
    dev = cuda()
    step, x = paper_step(vgg, dev, size=64)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_torchs_lbfgs_does_synchronise(vgg):
    """The comparison the issue starts from: torch.optim.LBFGS reads scalars back every step."""
    import warnings

    dev = cuda()
    step, x = paper_step(vgg, dev, size=64, kind="torch")
    for _ in range(3):
        step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) >= 2


@pytest.mark.gpu
def test_bfloat16_step_captures_and_matches_eager(vgg, deterministic):
    dev = cuda()
    plain, xp = paper_step(vgg, dev, size=64, precision="bfloat16")
    step, xc = paper_step(vgg, dev, size=64, precision="bfloat16")
    captured = CapturedStep(step, dev)
    want_x, want_terms = trajectory(plain, xp, 6)
    got_x, got_terms = trajectory(captured, xc, 6)
    assert captured.mode == "graph", captured.reason
    assert all(t.dtype == torch.float32 for t in got_terms)
    assert torch.allclose(got_terms[-1], want_terms[-1], rtol=2e-2)
    assert want_terms[-1][0] < want_terms[0][0]


@pytest.mark.gpu
def test_host_history_on_cuda_falls_back_to_eager_with_the_same_steps(vgg, deterministic):
    dev = cuda()
    on_device, xd = paper_step(vgg, dev, size=64, history=8)
    on_host, xh = paper_step(vgg, dev, size=64, history=8, history_device="cpu")
    captured = CapturedStep(on_host, dev)
    want_x, _ = trajectory(on_device, xd, 12)
    got_x, _ = trajectory(captured, xh, 12)
    assert captured.mode == "eager" and "not capturable" in captured.reason
    assert torch.allclose(got_x[-1], want_x[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_runs_eagerly_with_the_same_result():
    dev = cuda()
    x = torch.zeros(4, device=dev)

    def step():
        x.add_(1.0)
        if x.sum().item() > 1e9:  # reads a value back: not allowed while capturing
            x.zero_()
        return x

    captured = CapturedStep(step, dev)
    for _ in range(6):
        captured()
    assert captured.mode == "eager" and "capture failed" in captured.reason
    assert torch.equal(x.cpu(), torch.full((4,), 6.0))


@pytest.mark.gpu
def test_readback_on_cuda_arrives_late_but_in_order_and_right():
    dev = cuda()
    feed = Readback(2, dev, depth=2)
    big = torch.randn(4096, 4096, device=dev)
    got = []
    for i in range(10):
        for _ in range(3):
            big = torch.tanh(big @ big.t() / 4096)  # device work the host runs ahead of
        got += feed.push(i, torch.stack([torch.tensor(float(i), device=dev), big[0, 0]]))
        assert len(feed._pending) <= 2
    got += feed.drain()
    assert [n for n, _ in got] == list(range(10))
    assert [v[0] for _, v in got] == [float(i) for i in range(10)]


@pytest.mark.gpu
def test_losses_and_optimiser_stay_float32_when_tf32_is_on():
    """TF32 is for the network; the Gram matrices, the losses and L-BFGS's products stay float32."""
    dev = cuda()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        g = torch.Generator().manual_seed(3)
        f = torch.relu(torch.randn(1, 64, 128, 128, generator=g)).to(dev)
        a = losses.gram(torch.relu(torch.randn(1, 64, 128, 128, generator=g)).to(dev)) / 128**2
        got = losses.style_loss([f], [a], [1.0]).item()
        want = losses.style_loss([f.double()], [a.double()], [1.0]).item()
        assert got == pytest.approx(want, rel=1e-5)  # TF32 would be ~1e-3 off
        assert torch.backends.cuda.matmul.allow_tf32  # put back

        d = torch.rand(100_000, generator=g).to(dev) + 0.01
        b = torch.randn(100_000, generator=g).to(dev)

        def path(tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x = torch.zeros(100_000, device=dev, requires_grad=True)
            opt = lbfgs.LBFGS(x, history_size=10)
            for _ in range(15):
                opt.update(d * x.detach() - b)  # gradient of 0.5 Σ d x² − b·x, no matrix product
            return x.detach().clone()

        assert torch.equal(path(True), path(False))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
