"""The paper's loss terms, on feature maps of one image (C×H×W or 1×C×H×W)."""

from __future__ import annotations

import torch


def gram(features: torch.Tensor) -> torch.Tensor:
    """G_ij = Σ_k F_ik F_jk over the M = H·W positions (float32 whatever the features' dtype)."""
    f = features.reshape(features.shape[-3], -1).float()
    return f @ f.t()


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
