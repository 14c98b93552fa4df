"""Full resolution: the exact tiled objective of DESIGN §6, its tiles, and the memory model that decides.

The content loss is a sum over positions; the style loss's gradient ∂E_l/∂F = w_l (G − M·A) F /
(N² M²) is local once the whole image's Gram matrices G are known. So one evaluation is two passes
over tiles: forward only, summing each tile's interior Gram matrices; then forward and backward per
tile, injecting that gradient (and the content gradient) at the interior features and adding the
tile's input gradient into the image's. Each tile's crop starts on the network's total stride (so
its pooling windows are the image's) and carries a margin of real neighbouring pixels at least the
receptive-field reach of the deepest layer in use, so its interior features are the untiled ones
and the loss and gradient equal the untiled ones to float rounding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from . import losses
from .devices import exact_float32
from .params import VGG19_LAYERS
from .vgg import CHANNELS

Features = Callable[[torch.Tensor, Sequence[str]], Mapping[str, torch.Tensor]]

# ---- the network's geometry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where the layers in use look: `stride` aligns every crop (the jump of the deepest layer),
    `margin` is the smallest multiple of it that covers every layer's receptive field beyond a
    tile's interior, `jumps` maps each layer to its stride in pixels."""

    stride: int
    margin: int
    jumps: Mapping[str, int]


def geometry(layers: Sequence[str]) -> Geometry:
    """The stride and margin for `layers` of VGG-19 (3×3 convolutions with padding 1, 2×2 pools).

    A feature at position p of a layer with jump j reads the pixels [p·j − left, p·j + right]:
    each convolution widens both sides by the jump where it runs, each pool the right side. A tile
    whose interior starts and ends on multiples of j then needs `left` pixels before it and
    ``right − j + 1`` after it.
    """
    deepest = max(layers, key=VGG19_LAYERS.index)
    jump, left, right, need, jumps = 1, 0, 0, 0, {}
    for name in VGG19_LAYERS[: VGG19_LAYERS.index(deepest) + 1]:
        if name.startswith("conv"):
            left += jump
            right += jump
        elif name.startswith("pool"):
            right += jump
            jump *= 2
        jumps[name] = jump
        if name in layers:
            need = max(need, left, right - jump + 1)
    return Geometry(stride=jump, margin=math.ceil(need / jump) * jump, jumps={n: jumps[n] for n in layers})


# ---- tiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """A crop of the image (what the network sees) and its interior (whose features it owns)."""

    crop: tuple[int, int, int, int]  # y0, y1, x0, x1
    inner: tuple[int, int, int, int]

    def of_image(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.crop
        return x[..., y0:y1, x0:x1]

    def interior(self, feature: torch.Tensor, jump: int) -> torch.Tensor:
        """The interior of this tile's feature map at a layer of stride `jump` (a view)."""
        (cy, _, cx, _), (y0, y1, x0, x1) = self.crop, self.inner
        return feature[..., (y0 - cy) // jump:y1 // jump - cy // jump, (x0 - cx) // jump:x1 // jump - cx // jump]


def _bands(n: int, px: int, stride: int) -> list[tuple[int, int]]:
    """Interior bands of length `px` (a multiple of `stride`) covering 0..n; a remainder shorter
    than the stride joins the band before it."""
    starts = list(range(0, n, px))
    if len(starts) > 1 and n - starts[-1] < stride:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else n) for i, a in enumerate(starts)]


def plan_tiles(h: int, w: int, px: int, geo: Geometry, margin: int | None = None) -> list[Tile]:
    """Tiles of interior side `px` (rounded down to the stride, at least one stride) over h×w.

    `margin` (a multiple of the stride) overrides the geometry's, for tests that show a smaller one fails.
    """
    s = geo.stride
    m = geo.margin if margin is None else margin
    if m % s:
        raise ValueError(f"margin {m} is not a multiple of the stride {s}")
    px = max(s, px // s * s)
    tiles = []
    for y0, y1 in _bands(h, px, s):
        for x0, x1 in _bands(w, px, s):
            crop = (max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m))
            tiles.append(Tile(crop, (y0, y1, x0, x1)))
    return tiles


# ---- the objective ----------------------------------------------------------------------------------


class TiledObjective:
    """α L_content + β L_style + λ TV of a whole image, evaluated tile by tile; `Objective`'s
    `loss_and_grad` interface.

    `features(image, layers)` maps an image crop (3×h×w, what the optimiser moves) to
    ``{layer: 1×C×h'×w' map}`` (the engine's ``_features(_seen(·), layers)``: the luminance of
    colour mode "luminance" is pointwise, so it commutes with cropping). The content targets are
    taken here from `content` tile by tile and kept on `target_device` (the host where the device
    is short); `style_targets` are the per-position Gram matrices A/M (see `tiled_grams`).
    `on_tile(k, n)` is called before tile k of n in the second pass (progress and cancelling).
    """

    def __init__(self, features: Features, tiles: Sequence[Tile], geo: Geometry, content: torch.Tensor | None,
                 content_layers: Mapping[str, float], style_targets: Mapping[str, torch.Tensor],
                 style_layers: Mapping[str, float], content_weight: float, style_weight: float,
                 tv_weight: float = 0.0, target_device: torch.device | str | None = None,
                 on_tile: Callable[[int, int], None] | None = None):
        self.features = features
        self.tiles = list(tiles)
        self.geo = geo
        self.content_layers = {n: float(w) for n, w in content_layers.items()}
        self.style = [(n, float(w), style_targets[n]) for n, w in style_layers.items()]
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)
        self.on_tile = on_tile
        self.layers = [n for n in VGG19_LAYERS if n in set(self.content_layers) | {n for n, _, _ in self.style}]
        self.content_targets: list[dict[str, torch.Tensor]] = []
        if self.content_layers:
            with torch.no_grad():
                for t in self.tiles:
                    f = self.features(t.of_image(content), list(self.content_layers))
                    self.content_targets.append({
                        n: losses.wide(t.interior(f[n], geo.jumps[n])).to(target_device or f[n].device, copy=True)
                        for n in self.content_layers})

    def loss_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(terms [total, content, style, tv] float32, ∂total/∂x) at x (3×H×W)."""
        x = x.detach()
        zero = torch.zeros((), dtype=losses.wide(x).dtype, device=x.device)
        style_loss, coef = self._style_pass(x) if self.style else (zero, {})
        grad = torch.zeros_like(x)
        content_loss = zero.clone()
        n = len(self.tiles)
        for k, t in enumerate(self.tiles):
            if self.on_tile is not None:
                self.on_tile(k + 1, n)
            crop = t.of_image(x).clone().requires_grad_(True)
            with torch.enable_grad():
                feats = self.features(crop, self.layers)
                outs, grads = [], []
                for name in self.layers:
                    f = t.interior(feats[name], self.geo.jumps[name])
                    wide = losses.wide(f)
                    g = torch.zeros(f.shape, dtype=wide.dtype, device=f.device)
                    if name in coef:
                        with exact_float32():
                            g += (coef[name].to(wide.dtype) @ wide.reshape(f.shape[-3], -1)).view(f.shape)
                    if name in self.content_layers:
                        diff = wide - self.content_targets[k][name].to(f.device)
                        w = self.content_layers[name]
                        content_loss += w * 0.5 * diff.pow(2).sum()
                        g += (self.content_weight * w) * diff
                    outs.append(f)
                    grads.append(g.to(f.dtype))
                torch.autograd.backward(outs, grads)
            y0, y1, x0, x1 = t.crop
            grad[:, y0:y1, x0:x1] += crop.grad
        tv = zero
        if self.tv_weight > 0:
            xt = x.clone().requires_grad_(True)
            with torch.enable_grad():
                tv = losses.tv_loss(xt)
                (gt,) = torch.autograd.grad(tv, xt)
            grad += self.tv_weight * gt
            tv = tv.detach()
        total = self.content_weight * content_loss + self.style_weight * style_loss + self.tv_weight * tv
        return torch.stack([total, content_loss, style_loss, tv]).detach().to(zero.dtype), grad

    def _style_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The style loss and, per style layer, the N×N matrix β·w·(G − M·A)/(N² M²) that turns a
        tile's interior features into their gradient."""
        names = [n for n, _, _ in self.style]
        grams, m = tiled_grams(self.features, x, names, self.tiles, self.geo)
        loss = torch.zeros((), dtype=losses.wide(x).dtype, device=x.device)
        coef = {}
        with exact_float32():
            for name, w, a in self.style:
                nch = grams[name].shape[0]
                d = grams[name] - m[name] * a.to(grams[name])
                c = w / (4.0 * nch ** 2 * m[name] ** 2)
                loss = loss + c * torch.dot(d.view(-1), d.view(-1))
                coef[name] = coef.get(name, 0) + (self.style_weight * 4.0 * c) * d
        return loss, coef


def tiled_grams(features: Features, image: torch.Tensor, layers: Sequence[str], tiles: Sequence[Tile],
                geo: Geometry) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The whole image's Gram matrices G^l (float32) summed over tile interiors, and each layer's
    position count M_l; forward only. A large style image's targets are ``G/M`` from here."""
    grams: dict[str, torch.Tensor] = {}
    m = dict.fromkeys(layers, 0)
    with torch.no_grad():
        for t in tiles:
            feats = features(t.of_image(image), layers)
            for name in layers:
                f = t.interior(feats[name], geo.jumps[name])
                g = losses.gram(f)
                grams[name] = grams[name] + g if name in grams else g
                m[name] += f.shape[-1] * f.shape[-2]
    return grams, m


# ---- the memory model and the planner ------------------------------------------------------------


# Peak bytes of one loss-and-gradient evaluation beyond its inputs: ACTIVATION_FACTOR × the sum of
# every layer's output up to the deepest in use (autograd keeps about half of them, the backward pass
# adds gradients of the largest), plus RUNTIME_BYTES of workspace. Measured on the CPU as peak RSS
# growth (benchmarks/bench_tiled.py --calibrate, 256-512 px): 0.84-1.36 × the sum, workspace
# included; the model's 1.0 × the sum + 128 MiB stays above every measurement.
ACTIVATION_FACTOR = 1.0
RUNTIME_BYTES = 128 << 20
# Share of the budget a plan may fill: allocator fragmentation and the framework's own workspace.
BUDGET_SHARE = 0.85
# What a tiled level keeps per pixel of its image, whatever the tiles: x, its gradient and two
# working vectors (4 × 12 B), the shortest L-BFGS history (2 × 6 × 12 B) and the content targets at
# relu4_2 (512 channels at 1/64 of the pixels: 32 B); the job service's work limit follows it.
TILED_BYTES_PER_PIXEL = 256
MIN_TILE = 16  # the smallest interior "auto" takes (px), rounded up to the stride
# L-BFGS history lengths tried, longest first, when the history of a large image would not fit.
HISTORY_CHOICES = (100, 50, 20, 10, 5)


def activation_bytes(h: int, w: int, layers: Sequence[str], precision: str = "float32") -> int:
    """Bytes of the network's outputs for an h×w input, summed over the layers up to the deepest
    of `layers` (the ones one evaluation keeps for its backward pass)."""
    deepest = max(layers, key=VGG19_LAYERS.index)
    size = 2 if precision in ("bfloat16", "float16") else 4
    total, hh, ww, ch = 0, h, w, 3
    for name in VGG19_LAYERS[: VGG19_LAYERS.index(deepest) + 1]:
        if name.startswith("pool"):
            hh, ww = hh // 2, ww // 2
        else:
            ch = CHANNELS[int(name[4])]
        total += ch * hh * ww * size
    return total


def network_bytes(layers: Sequence[str]) -> int:
    """Bytes of VGG-19's float32 weights up to the deepest of `layers`."""
    deepest = max(layers, key=VGG19_LAYERS.index)
    total, cin = 0, 3
    for name in VGG19_LAYERS[: VGG19_LAYERS.index(deepest) + 1]:
        if name.startswith("conv"):
            cout = CHANNELS[int(name[4])]
            total += (cin * 9 + 1) * cout * 4
            cin = cout
    return total


def content_target_bytes(h: int, w: int, content_layers: Sequence[str]) -> int:
    """Bytes of the content targets (float32) of an h×w image."""
    geo_j = geometry(list(content_layers)).jumps if content_layers else {}
    return sum(CHANNELS[int(n[4])] * (h // j) * (w // j) * 4 for n, j in geo_j.items())


@dataclass(frozen=True)
class Plan:
    """How one level runs: whole (tile 0) or in tiles of interior `tile` px, and the optimiser's history."""

    height: int
    width: int
    tile: int  # interior side; 0: whole
    tiles: int
    margin: int
    history: int  # L-BFGS pairs kept
    history_on_host: bool
    targets_on_host: bool
    peak_bytes: int  # the model's estimate
    budget: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget * BUDGET_SHARE

    def describe(self) -> str:
        how = (f"{self.tiles} tiles of {self.tile} px (+{self.margin} px margins)" if self.tile
               else "whole")
        hist = f", L-BFGS history {self.history}{' on the host' if self.history_on_host else ''}"
        return (f"{self.width}×{self.height} {how}{hist}: about {_mib(self.peak_bytes)} "
                f"of a {_mib(self.budget)} budget")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_bytes(device: torch.device) -> int:
    """Memory a level may use on `device`: free memory on CUDA, recommended on MPS, available RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def plan_level(h: int, w: int, layers: Sequence[str], content_layers: Sequence[str], *, budget: int,
               tile: str | int = "auto", precision: str = "float32", optimizer: str = "lbfgs",
               same_device_host: bool = True) -> Plan:
    """The plan for an h×w level within `budget` bytes.

    `tile` "off" runs whole whatever the estimate, an int is the interior side asked for, "auto"
    runs whole when the estimate fits and otherwise takes the largest tile that does (`Plan.fits`
    is False when not even the smallest does). The L-BFGS
    history is kept at its full 100 pairs where it fits in half the budget beside the rest (with the
    smallest tiles); at larger sizes it is shortened (to 50, 20, 10, 5: the longest that fits),
    and where even 5 pairs do not fit on a GPU it goes to the host. Why shorten first: measured at
    192 px with the paper's layers (benchmarks/bench_tiled.py --history, 100 steps from noise), the
    loss reached was 1.007× history 100's with 50 pairs, 1.021× with 20, 1.09× with 10 or 5; a host
    history moves the whole history through the device each step, and Adam needs many more steps.
    `same_device_host` is True on the CPU, where the host is the device (nothing moves there).
    """
    geo = geometry(list(layers))
    usable = int(budget * BUDGET_SHARE)
    image = 3 * h * w * 4
    targets = content_target_bytes(h, w, content_layers)
    fixed = network_bytes(layers) + RUNTIME_BYTES + 4 * image  # x, its gradient, the optimiser's working vectors
    history, on_host = 0, False
    if optimizer == "lbfgs":
        least = fixed + targets + _tile_peak(max(geo.stride, MIN_TILE), geo, layers, precision)
        room = min(usable // 2, usable - least)  # never more than half, and the smallest tiles must fit beside it
        fits = [n for n in HISTORY_CHOICES if 2 * (n + 1) * image <= room]
        history = fits[0] if fits else HISTORY_CHOICES[-1]
        on_host = not fits and not same_device_host
    else:
        fixed += 2 * image  # Adam's moments
    hist_bytes = 0 if on_host else 2 * (history + 1) * image
    whole = fixed + hist_bytes + targets + _whole(h, w, layers, precision)

    def make(px, tiles, peak, targets_on_host):
        return Plan(h, w, px, tiles, geo.margin if px else 0, history, on_host, targets_on_host, peak, budget)

    if tile == "off" or (tile == "auto" and whole <= usable):
        return make(0, 1, whole, False)
    targets_on_host = not same_device_host and fixed + hist_bytes + targets > usable // 2
    base = fixed + hist_bytes + (0 if targets_on_host else targets)
    if isinstance(tile, int):
        px = max(geo.stride, tile // geo.stride * geo.stride)
        n = len(plan_tiles(h, w, px, geo))
        if n == 1:  # one tile is the whole image, without the second pass
            return make(0, 1, whole, False)
        return make(px, n, base + _tile_peak(px, geo, layers, precision), targets_on_host)
    smallest = max(geo.stride, -(-MIN_TILE // geo.stride) * geo.stride)
    px = max(smallest, -(-max(h, w) // geo.stride) * geo.stride)
    while px > smallest and base + _tile_peak(px, geo, layers, precision) > usable:
        px = max(smallest, (px * 3 // 4) // geo.stride * geo.stride)
    return make(px, len(plan_tiles(h, w, px, geo)), base + _tile_peak(px, geo, layers, precision), targets_on_host)


def _whole(h, w, layers, precision) -> int:
    return int(ACTIVATION_FACTOR * activation_bytes(h, w, layers, precision))


def _tile_peak(px: int, geo: Geometry, layers, precision) -> int:
    side = px + 2 * geo.margin
    return int(ACTIVATION_FACTOR * activation_bytes(side, side, layers, precision))
