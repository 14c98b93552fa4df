"""The paper's loss terms, on feature maps of one image (C×H×W or 1×C×H×W)."""

from __future__ import annotations

import math

import torch

from .devices import exact_float32


def gram(features: torch.Tensor) -> torch.Tensor:
    """G_ij = Σ_k F_ik F_jk over the M = H·W positions (float32 for any narrower dtype)."""
    n = features.shape[-3]
    f = wide(features)
    with exact_float32():
        return _gram(f, n)


def _gram(f: torch.Tensor, n: int) -> torch.Tensor:
    if f.dim() == 4 and f.shape[0] == 1 and not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        # channels-last (CUDA): the M×N view needs no copy, where the N×M one would.
        return _Gram.apply(f.permute(0, 2, 3, 1).reshape(-1, n), True)
    return _Gram.apply(f.reshape(n, -1), False)


class _Gram(torch.autograd.Function):
    """F Fᵀ (or Fᵀ F for an M×N `rows` layout) whose backward is one matrix product, (dG + dGᵀ) F.

    Autograd's own backward of ``f @ f.t()`` takes two products and adds one of them transposed
    (a strided pass over F-sized memory); this is the same gradient at about half the cost.
    """

    @staticmethod
    def forward(ctx, f, rows):
        ctx.save_for_backward(f)
        ctx.rows = rows
        return f.t() @ f if rows else f @ f.t()

    @staticmethod
    def backward(ctx, grad):
        (f,) = ctx.saved_tensors
        sym = grad + grad.t()
        return (f @ sym if ctx.rows else sym @ f), None


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_content = 1/2 Σ (F − P)²."""
    return _ContentLoss.apply(wide(features), wide(target))


def style_layer_loss(features: torch.Tensor, target_gram_per_position: torch.Tensor) -> torch.Tensor:
    """E_l = 1/(4 N² M²) Σ (G − A)², with the target given as A/M_style.

    Keeping the target per position lets a style image of another size than the generated
    image contribute at the right scale; when the sizes agree this is the paper's E_l exactly.
    """
    return style_loss([features], [target_gram_per_position], [1.0])


def style_loss(features, targets, weights) -> torch.Tensor:
    """L_style = Σ_l w_l E_l over all style layers in one autograd node (see `style_layer_loss`).

    Per layer the forward pass is one matrix product that also subtracts the target and scales
    (``addmm``: √c_l (G − M·A), c_l = w_l / (4 N² M²)) and one dot product; the layers' terms are
    then summed. The backward pass is one product per layer, 2 c_l (D + Dᵀ) F, with D kept from the
    forward pass. No tensor is made from host data, so a CUDA graph can capture it. Feature maps of
    any float dtype; the losses are float32.
    """
    feats = [wide(f) for f in features]
    roots = tuple(math.sqrt(w / (4.0 * f.shape[-3] ** 2 * (f.shape[-1] * f.shape[-2]) ** 2))
                  for f, w in zip(feats, weights))
    return _StyleLoss.apply(roots, len(feats), *feats, *[t.to(feats[0].dtype) for t in targets])


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation Σ (Δx² + Δy²) over neighbouring pixels, which damps low-level noise."""
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    return dx.pow(2).sum() + dy.pow(2).sum()


def wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for reduced-precision tensors (float64 stays, for gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


def _matrix(f: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """F as an N×M matrix view, or as M×N (``rows``) for channels-last maps, where that needs no copy."""
    n = f.shape[-3]
    if f.dim() == 4 and f.shape[0] == 1 and not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        return f.permute(0, 2, 3, 1).reshape(-1, n), True
    return f.reshape(n, -1), False


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All elements of t as a vector, in memory order (a view for contiguous and channels-last maps)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1)


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    v = _flat(t)
    if v.is_cuda and v.numel() > 2**31 - 1:  # cuBLAS dot counts in int32
        return v.pow(2).sum()
    return torch.dot(v, v)


class _ContentLoss(torch.autograd.Function):
    """1/2 Σ (F − P)²: a subtraction and a dot product; the backward pass is the kept F − P."""

    @staticmethod
    def forward(ctx, f, p):
        diff = f - p
        ctx.save_for_backward(diff)
        return 0.5 * _sum_of_squares(diff)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff * grad, None


class _StyleLoss(torch.autograd.Function):
    """Σ_l ‖√c_l (F_l F_lᵀ − M_l A_l)‖² (see `style_loss`)."""

    @staticmethod
    def forward(ctx, roots, count, *tensors):
        with exact_float32():
            return _StyleLoss._forward(ctx, roots, count, *tensors)

    @staticmethod
    def _forward(ctx, roots, count, *tensors):
        feats, targets = tensors[:count], tensors[count:]
        ds, squares = [], []
        for f, a, r in zip(feats, targets, roots):
            mat, rows = _matrix(f)
            m = f.shape[-1] * f.shape[-2]
            pair = (mat.t(), mat) if rows else (mat, mat.t())
            d = torch.addmm(a, *pair, beta=-m * r, alpha=r)
            ds.append(d)
            squares.append(torch.dot(d.view(-1), d.view(-1)))
        ctx.count, ctx.roots = count, roots
        ctx.save_for_backward(*feats, *ds)
        return squares[0] if count == 1 else torch.stack(squares).sum()

    @staticmethod
    def backward(ctx, grad):
        with exact_float32():
            return _StyleLoss._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        feats, ds = ctx.saved_tensors[:ctx.count], ctx.saved_tensors[ctx.count:]
        grads = []
        for f, d, r in zip(feats, ds, ctx.roots):
            mat, rows = _matrix(f)
            sym = torch.add(d, d.t()).mul_(grad)
            if rows:
                h, w = f.shape[-2:]
                g = torch.addmm(mat, mat, sym, beta=0, alpha=2 * r)
                grads.append(g.view(1, h, w, -1).permute(0, 3, 1, 2))
            else:
                grads.append(torch.addmm(mat, sym, mat, beta=0, alpha=2 * r).view(f.shape))
        return (None, None, *grads, *([None] * ctx.count))
