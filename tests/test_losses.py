"""nst_core.losses against the paper's formulas, evaluated by hand with plain Python loops."""

from __future__ import annotations

import random

import pytest
import torch

from nst_core.losses import content_loss, gram, style_layer_loss, style_loss, tv_loss


# ---- the formulas, written out element by element -----------------------------------------------

def to_lists(t: torch.Tensor) -> list:
    """C×H×W tensor → nested lists of Python floats (row-major positions k = y·W + x)."""
    return [[[float(v) for v in row] for row in ch] for ch in t.tolist()]


def flat(f: list) -> list[list[float]]:
    """N×M: each filter's responses over the M positions."""
    return [[v for row in ch for v in row] for ch in f]


def gram_by_hand(f: list) -> list[list[float]]:
    fl = flat(f)
    n, m = len(fl), len(fl[0])
    return [[sum(fl[i][k] * fl[j][k] for k in range(m)) for j in range(n)] for i in range(n)]


def content_by_hand(f: list, p: list) -> float:
    total = 0.0
    for fc, pc in zip(f, p):
        for fr, pr in zip(fc, pc):
            for a, b in zip(fr, pr):
                total += (a - b) ** 2
    return 0.5 * total


def style_by_hand(f: list, a_style: list) -> float:
    """E_l = 1/(4 N² M²) Σ_ij (G_ij − A_ij)², G and A from images of the same size."""
    g, a = gram_by_hand(f), gram_by_hand(a_style)
    n = len(f)
    m = len(f[0]) * len(f[0][0])
    s = sum((g[i][j] - a[i][j]) ** 2 for i in range(n) for j in range(n))
    return s / (4 * n * n * m * m)


def tv_by_hand(x: list) -> float:
    total = 0.0
    for ch in x:
        h, w = len(ch), len(ch[0])
        for y in range(h):
            for xx in range(w):
                if xx + 1 < w:
                    total += (ch[y][xx + 1] - ch[y][xx]) ** 2
                if y + 1 < h:
                    total += (ch[y + 1][xx] - ch[y][xx]) ** 2
    return total


def small_ints(shape, seed) -> torch.Tensor:
    """Integers in −3…3: every product and sum below is exact in float32."""
    rng = random.Random(seed)
    n = 1
    for s in shape:
        n *= s
    return torch.tensor([float(rng.randint(-3, 3)) for _ in range(n)]).reshape(shape)


def small_floats(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1


# ---- Gram matrix --------------------------------------------------------------------------------

def test_gram_exact_on_a_2x2x3_map():
    f = small_ints((2, 2, 3), 1)  # N = 2 filters, M = 6 positions
    got = gram(f)
    assert got.shape == (2, 2)
    assert got.tolist() == gram_by_hand(to_lists(f))
    assert got.dtype == torch.float32


def test_gram_by_hand_worked_example():
    # F = [[1, 2, 0, -1, 3, 1], [0, 1, 1, 2, -2, 1]] as a 2×2×3 map
    f = torch.tensor([[[1., 2., 0.], [-1., 3., 1.]], [[0., 1., 1.], [2., -2., 1.]]])
    # G_00 = 1+4+0+1+9+1 = 16; G_01 = 0+2+0-2-6+1 = -5; G_11 = 0+1+1+4+4+1 = 11
    assert gram(f).tolist() == [[16., -5.], [-5., 11.]]


def test_gram_accepts_a_batch_of_one_and_returns_float32_for_half():
    f = small_ints((1, 4, 3, 5), 2)
    assert gram(f).tolist() == gram_by_hand(to_lists(f[0]))
    h = gram(small_ints((1, 3, 2, 2), 3).half())
    assert h.dtype == torch.float32
    assert h.tolist() == gram_by_hand(to_lists(small_ints((3, 2, 2), 3)))


def test_gram_on_random_floats():
    f = small_floats((3, 4, 5), 4)
    want = gram_by_hand(to_lists(f))
    got = gram(f).tolist()
    for r, wr in zip(got, want):
        for v, w in zip(r, wr):
            assert v == pytest.approx(w, rel=1e-5, abs=1e-5)


# ---- content loss -------------------------------------------------------------------------------

def test_content_loss_exact():
    f, p = small_ints((2, 2, 3), 5), small_ints((2, 2, 3), 6)
    assert content_loss(f, p).item() == content_by_hand(to_lists(f), to_lists(p))


def test_content_loss_worked_example():
    f = torch.zeros(1, 2, 2)
    p = torch.tensor([[[1., 2.], [0., -3.]]])
    assert content_loss(f, p).item() == 0.5 * (1 + 4 + 0 + 9)
    assert content_loss(p, p).item() == 0.0


def test_content_loss_random_floats_and_gradient():
    f, p = small_floats((3, 3, 4), 7), small_floats((3, 3, 4), 8)
    assert content_loss(f, p).item() == pytest.approx(content_by_hand(to_lists(f), to_lists(p)), rel=1e-6)
    # d/dF of 1/2 Σ (F − P)² is F − P
    f.requires_grad_(True)
    content_loss(f, p).backward()
    assert torch.allclose(f.grad, (f - p).detach(), atol=1e-6)


# ---- style loss ---------------------------------------------------------------------------------

def test_style_layer_loss_is_the_papers_E_l_exact():
    x, s = small_ints((2, 2, 3), 9), small_ints((2, 2, 3), 10)
    m = 2 * 3
    target = gram(s) / m  # the engine's target: A / M of the style image
    got = style_layer_loss(x, target).item()
    want = style_by_hand(to_lists(x), to_lists(s))
    assert want > 0
    assert got == pytest.approx(want, rel=1e-6)


def test_style_layer_loss_worked_example():
    # N = 1 filter, M = 4 positions: G = Σ x² = 1+4+9+16 = 30, A = Σ s² = 4·1 = 4;
    # E = (30 − 4)² / (4 · 1² · 4²) = 676 / 64
    x = torch.tensor([[[1., 2.], [3., 4.]]])
    s = torch.ones(1, 2, 2)
    assert style_layer_loss(x, gram(s) / 4).item() == pytest.approx(676 / 64, rel=1e-7)


def test_style_layer_loss_random_floats():
    x, s = small_floats((4, 3, 3), 11), small_floats((4, 3, 3), 12)
    got = style_layer_loss(x.unsqueeze(0), gram(s) / 9).item()
    assert got == pytest.approx(style_by_hand(to_lists(x), to_lists(s)), rel=1e-5)


def test_style_layer_loss_zero_for_same_statistics_at_another_size():
    # A style map that is the generated map tiled twice has G_style = 2 G and M_style = 2 M: the same
    # per-position Gram, so the generated image already has the style's statistics.
    x = small_floats((3, 2, 3), 13)
    tiled = torch.cat([x, x], dim=-1)  # 3×2×6
    assert style_layer_loss(x, gram(tiled) / 12).item() == pytest.approx(0.0, abs=1e-6)
    # and a different map at that size does not
    assert style_layer_loss(x, gram(small_floats((3, 2, 6), 14)) / 12).item() > 1e-4


def test_style_layer_loss_gradient_matches_the_paper():
    # The paper's derivative: ∂E/∂F_ij = 1/(N² M²) ((F)ᵀ (G − A))_ji for F_ij > 0 (before the ReLU
    # mask, which lives in the network here): ∂E/∂F = (G − A) F / (N² M²).
    x = small_floats((2, 2, 2), 15).requires_grad_(True)
    s = small_floats((2, 2, 2), 16)
    n, m = 2, 4
    style_layer_loss(x, gram(s) / m).backward()
    fx = x.detach().reshape(n, m)
    expected = ((gram(x.detach()) - gram(s)) @ fx) / (n * n * m * m)
    assert torch.allclose(x.grad.reshape(n, m), expected, atol=1e-6)


# ---- total variation ----------------------------------------------------------------------------

def test_tv_loss_exact_on_a_3x2x3_image():
    x = small_ints((3, 2, 3), 17)
    assert tv_loss(x).item() == tv_by_hand(to_lists(x))


def test_tv_loss_worked_example():
    # one channel [[0, 1], [3, 1]]: horizontal (1−0)² + (1−3)² = 5, vertical (3−0)² + (1−1)² = 9
    x = torch.tensor([[[0., 1.], [3., 1.]]])
    assert tv_loss(x).item() == 14.0
    assert tv_loss(torch.full((3, 4, 5), 0.7)).item() == 0.0


def test_tv_loss_random_floats_batched():
    x = small_floats((3, 4, 5), 18)
    assert tv_loss(x.unsqueeze(0)).item() == pytest.approx(tv_by_hand(to_lists(x)), rel=1e-5)


# ---- all style layers in one node ---------------------------------------------------------------

def old_style_layer_loss(features, target):
    """The formula as autograd would take it, term by term: the reference for the fused node."""
    n = features.shape[-3]
    m = features.shape[-1] * features.shape[-2]
    f = features.reshape(n, -1)
    return ((f @ f.t()) - m * target).pow(2).sum() / (4.0 * n * n * m * m)


def vgg_like_maps(seed, dtype=torch.float32):
    """ReLU-like maps of the paper's five style layers' channel counts at a small size."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    return [torch.relu(torch.randn(1, *s, generator=g, dtype=dtype)) * (i + 1) for i, s in enumerate(shapes)]


def test_style_loss_of_five_layers_is_the_weighted_sum_of_the_papers_E_l():
    feats = vgg_like_maps(20)
    targets = [gram(f) / (f.shape[-1] * f.shape[-2]) for f in vgg_like_maps(21)]
    weights = [0.2, 0.1, 0.3, 0.25, 0.15]
    xs = [f.clone().requires_grad_(True) for f in feats]
    fused = style_loss(xs, targets, weights)
    fused.backward()
    refs = [f.clone().requires_grad_(True) for f in feats]
    want = sum(w * old_style_layer_loss(f, t) for f, t, w in zip(refs, targets, weights))
    want.backward()
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(xs, refs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6 * b.grad.abs().max().item())


def test_style_loss_by_hand_on_two_small_layers():
    a, b = small_ints((2, 2, 3), 22), small_ints((3, 2, 2), 23)
    sa, sb = small_ints((2, 2, 3), 24), small_ints((3, 2, 2), 25)
    got = style_loss([a, b], [gram(sa) / 6, gram(sb) / 4], [0.25, 0.75]).item()
    want = 0.25 * style_by_hand(to_lists(a), to_lists(sa)) + 0.75 * style_by_hand(to_lists(b), to_lists(sb))
    assert got == pytest.approx(want, rel=1e-6)


def test_style_and_content_loss_gradients_in_float64():
    g = torch.Generator().manual_seed(26)
    f = torch.rand(1, 6, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    cl = torch.rand(1, 6, 4, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    cl.requires_grad_(True)
    a = gram(torch.rand(1, 6, 3, 3, generator=g, dtype=torch.float64)) / 9
    p = torch.rand(1, 6, 4, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: style_loss([x, y], [a, a], [0.4, 0.6]), (f, cl))
    assert torch.autograd.gradcheck(lambda y: content_loss(y, p), (cl,))


def test_channels_last_maps_give_the_same_losses_and_gradients():
    feats = vgg_like_maps(27)[:3]
    targets = [gram(f) / (f.shape[-1] * f.shape[-2]) for f in vgg_like_maps(28)[:3]]
    plain = [f.clone().requires_grad_(True) for f in feats]
    last = [f.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True) for f in feats]
    assert not last[0].is_contiguous()
    a = style_loss(plain, targets, [1, 1, 1]) + content_loss(plain[1], feats[1] * 0.5)
    b = style_loss(last, targets, [1, 1, 1]) + content_loss(last[1], feats[1] * 0.5)
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    for p, q in zip(plain, last):
        assert q.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7 * p.grad.abs().max().item())


def test_reduced_precision_maps_give_float32_losses():
    f = vgg_like_maps(29)[1].bfloat16().requires_grad_(True)
    t = gram(vgg_like_maps(30)[1]) / 256
    loss = style_loss([f], [t], [1.0]) + content_loss(f, f.detach().float() + 1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert f.grad.dtype == torch.bfloat16


def count_ops(fn) -> int:
    """aten operations (views and detach left out) that `fn` runs, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tags = getattr(func, "tags", ())
            if torch.Tag.view_copy not in tags and not func.is_view and "detach" not in func.__name__:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


def test_the_fused_style_loss_runs_a_fraction_of_the_operations():
    feats = vgg_like_maps(31)
    targets = [gram(f) / (f.shape[-1] * f.shape[-2]) for f in vgg_like_maps(32)]

    def fused():
        xs = [f.clone().requires_grad_(True) for f in feats]
        style_loss(xs, targets, [0.2] * 5).backward()

    def per_layer():
        xs = [f.clone().requires_grad_(True) for f in feats]
        sum(0.2 * style_layer_loss(x, t) for x, t in zip(xs, targets)).backward()

    def autograd_formula():
        xs = [f.clone().requires_grad_(True) for f in feats]
        sum(0.2 * old_style_layer_loss(x, t) for x, t in zip(xs, targets)).backward()

    n_fused, n_layer, n_old = count_ops(fused), count_ops(per_layer), count_ops(autograd_formula)
    print(f"aten ops for 5 style layers, forward+backward: fused {n_fused}, per layer {n_layer}, autograd {n_old}")
    assert n_fused < n_layer < n_old
    assert n_fused <= 0.4 * n_old
