"""The paper's objective at one level (or one tile) as a step over fixed-shape tensors.

`Objective` evaluates α L_content + β L_style + λ TV for an image x and returns the loss terms
as one device vector (`TERMS` order) with the gradient, never reading a value back to the host.
`make_step` joins it to an optimiser: the function it returns takes one L-BFGS step and returns
the terms, so the whole step (forward, backward, two-loop recursion, move) can be captured once
as a CUDA graph (`nst_core.capture.CapturedStep`) and replayed.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from . import losses

TERMS = ("total", "content", "style", "tv")


class Objective:
    """Loss terms of one image size: the feature function, fixed targets and the weights.

    `features(x)` maps the image x (3×H×W, what the optimiser moves) to ``{layer: map}`` for every
    layer named in `content_layers` and `style_layers` (the engine's ``_features(_seen(x), …)``);
    `content_targets` are the content image's maps, `style_targets` the per-position Gram
    matrices A/M; the layer dicts hold the weights of the layers in use (zero weights left out).
    """

    def __init__(self, features: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                 content_targets: Mapping[str, torch.Tensor], content_layers: Mapping[str, float],
                 style_targets: Mapping[str, torch.Tensor], style_layers: Mapping[str, float],
                 content_weight: float, style_weight: float, tv_weight: float = 0.0):
        self.features = features
        self.content = [(n, float(w), content_targets[n]) for n, w in content_layers.items()]
        self.style = [(n, float(w), style_targets[n]) for n, w in style_layers.items()]
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """[total, content, style, tv] (float32, differentiable) at x."""
        feats = self.features(x) if (self.content or self.style) else {}
        zero = x.new_zeros((), dtype=torch.float32)
        c = sum((w * losses.content_loss(feats[n], p) for n, w, p in self.content), zero)
        s = (losses.style_loss([feats[n] for n, _, _ in self.style], [a for _, _, a in self.style],
                               [w for _, w, _ in self.style]) if self.style else zero)
        t = losses.tv_loss(x) if self.tv_weight > 0 else zero
        total = self.content_weight * c + self.style_weight * s + self.tv_weight * t
        return torch.stack([total, c, s, t])

    def loss_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(terms, ∂total/∂x) at x; x must require grad. Leaves ``x.grad`` alone."""
        with torch.enable_grad():
            terms = self.terms(x)
            (grad,) = torch.autograd.grad(terms[0], x)
        return terms.detach(), grad


def make_step(objective, x: torch.Tensor, optimizer) -> Callable[[], torch.Tensor]:
    """One optimiser step at x as a function of nothing, returning the terms at x before the step.

    `objective` is anything with ``loss_and_grad(x) -> (terms, grad)`` (an `Objective`, or one
    that evaluates the image in tiles). With our `nst_core.lbfgs.LBFGS` the step is free of host
    synchronisation and of tensors made from host data, so it can be captured; a torch.optim
    optimiser (torch's LBFGS for comparison, Adam) gets the gradient as ``x.grad`` from its closure.
    """
    if hasattr(optimizer, "update"):
        def step() -> torch.Tensor:
            terms, grad = objective.loss_and_grad(x)
            optimizer.update(grad)
            return terms
        step.capturable = getattr(optimizer, "capturable", True)
        return step

    box = {}

    def closure():
        terms, grad = objective.loss_and_grad(x)
        x.grad = grad
        box["terms"] = terms
        return terms[0]

    def step() -> torch.Tensor:
        optimizer.step(closure)
        return box["terms"]
    step.capturable = False  # torch.optim.LBFGS reads scalars back (float(loss), if ys > 1e-10, ...)
    return step
