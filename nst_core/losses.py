"""The paper's loss terms, on feature maps of one image (C×H×W or 1×C×H×W)."""

from __future__ import annotations

import torch


def gram(features: torch.Tensor) -> torch.Tensor:
    """G_ij = Σ_k F_ik F_jk over the M = H·W positions (float32 whatever the features' dtype)."""
    n = features.shape[-3]
    f = features.float()
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
    return 0.5 * (features.float() - target.float()).pow(2).sum()


def style_layer_loss(features: torch.Tensor, target_gram_per_position: torch.Tensor) -> torch.Tensor:
    """E_l = 1/(4 N² M²) Σ (G − A)², with the target given as A/M_style.

    Keeping the target per position lets a style image of another size than the generated
    image contribute at the right scale; when the sizes agree this is the paper's E_l exactly.
    """
    n = features.shape[-3]
    m = features.shape[-1] * features.shape[-2]
    g = gram(features)
    return (g - m * target_gram_per_position).pow(2).sum() / (4.0 * n * n * m * m)


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation Σ (Δx² + Δy²) over neighbouring pixels, which damps low-level noise."""
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    return dx.pow(2).sum() + dy.pow(2).sum()
