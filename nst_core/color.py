"""Colour preservation (Gatys et al., CVPR 2017): luminance-only transfer and colour matching."""

from __future__ import annotations

import torch

# RGB → YIQ (NTSC); Y is luminance, I and Q carry the colour.
_RGB_TO_YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rgb_to_yiq(rgb: torch.Tensor) -> torch.Tensor:
    """3×H×W RGB → 3×H×W YIQ."""
    return torch.einsum("ij,jhw->ihw", _RGB_TO_YIQ.to(rgb), rgb)


def yiq_to_rgb(yiq: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,jhw->ihw", _YIQ_TO_RGB.to(yiq), yiq)


_Y = tuple(_RGB_TO_YIQ[0].tolist())


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """1×H×W luminance (weights as Python numbers: no host tensor to copy inside a captured step)."""
    return (_Y[0] * rgb[0:1] + _Y[1] * rgb[1:2] + _Y[2] * rgb[2:3])


def match_luminance(style_y: torch.Tensor, content_y: torch.Tensor) -> torch.Tensor:
    """Shift and scale the style's luminance to the content's mean and standard deviation."""
    s_mean, s_std = style_y.mean(), style_y.std().clamp_min(1e-6)
    return (style_y - s_mean) * (content_y.std() / s_std) + content_y.mean()


def as_grey_rgb(y: torch.Tensor) -> torch.Tensor:
    """Luminance shown as a 3-channel image, which is what VGG sees in luminance mode."""
    return y.expand(3, *y.shape[-2:]).contiguous()


def combine_luminance(y: torch.Tensor, content_rgb: torch.Tensor) -> torch.Tensor:
    """The generated luminance with the content's colour (I and Q)."""
    yiq = rgb_to_yiq(content_rgb)
    return yiq_to_rgb(torch.cat([y[:1], yiq[1:]], dim=0))


def match_histogram(style_rgb: torch.Tensor, content_rgb: torch.Tensor) -> torch.Tensor:
    """Recolour the style so its RGB mean and covariance equal the content's.

    x' = A (x − μ_s) + μ_c with A = Σ_c^½ Σ_s^−½ (symmetric square roots), the linear
    colour transfer that Gatys et al. 2017 use before the style transfer.
    """
    s = style_rgb.reshape(3, -1).double()
    c = content_rgb.reshape(3, -1).double()
    mu_s, mu_c = s.mean(1, keepdim=True), c.mean(1, keepdim=True)
    eye = torch.eye(3, dtype=torch.float64) * 1e-5
    cov_s = torch.cov(s) + eye
    cov_c = torch.cov(c) + eye
    a = _sqrtm(cov_c) @ torch.linalg.inv(_sqrtm(cov_s))
    out = a @ (s - mu_s) + mu_c
    return out.reshape(style_rgb.shape).to(style_rgb.dtype).clamp(0, 1)


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.t()
