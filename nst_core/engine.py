"""The one stylisation function, and the Session that keeps its networks and style targets warm."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import color, devices, lbfgs, losses, tiling
from .capture import CapturedStep
from .errors import Cancelled, ImageError, OutOfMemory, ParamError
from .images import Picture, fit, load_image, resize_picture
from .objective import TERMS, Objective, make_step
from .params import INITS, StyleParams
from .readback import run_steps
from .vgg import VGGFeatures

RANDOM_WEIGHTS_NOTE = (
    "made with random (untrained) VGG-19 weights: the pipeline ran, but this is not an artistic result"
)


@dataclass
class Progress:
    """One step of a stylisation, as handed to the progress callback."""

    step: int
    total: int
    level: int
    levels: int
    losses: dict
    elapsed: float
    eta: float | None
    tile: int = 1  # the tile being worked on at a tiled level (all done: tile == tiles)
    tiles: int = 1
    _render: Callable[[int | None], Picture] = field(repr=False, default=None)

    def image(self, max_side: int | None = None) -> Picture:
        """The current result (colour preserved, alpha put back); valid only during the callback.

        Rendered only when asked. On a GPU the losses are reported a step late, and the image may
        then be a step further on than they are."""
        return self._render(max_side)

    def to_mapping(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "total", "level", "levels", "tile", "tiles", "losses",
                                           "elapsed", "eta")}


@dataclass
class Result:
    picture: Picture
    params: StyleParams
    losses: dict
    elapsed: float
    device: str
    weights_label: str
    weights_note: str | None = None
    loop: str = ""  # how each level's steps ran: "graph" (a captured CUDA graph, replayed) or "eager (why)"


class Session:
    """Loaded networks and computed style targets, kept for the next job (one per device)."""

    def __init__(self, max_networks: int = 2, max_targets: int = 32):
        self._lock = threading.Lock()
        self._networks: OrderedDict = OrderedDict()
        self._targets: OrderedDict = OrderedDict()
        self.max_networks = max_networks
        self.max_targets = max_targets
        self.target_hits = 0
        self.target_misses = 0

    def network(self, params: StyleParams, device: torch.device) -> VGGFeatures:
        from .weights import load_network

        last = params.used_layers[-1]
        key = (params.weights, params.pooling, params.normalize_network, str(device), last)
        with self._lock:
            net = self._networks.get(key)
            if net is not None:
                self._networks.move_to_end(key)
                return net
        net = load_network(params.weights, pooling=params.pooling, normalize=params.normalize_network,
                           last=last, device=device, progress=True)
        net = net.to(memory_format=devices.memory_format(device))
        with self._lock:
            self._networks[key] = net
            while len(self._networks) > self.max_networks:
                self._networks.popitem(last=False)
        return net

    def style_target(self, key: tuple, compute: Callable[[], dict]) -> dict:
        with self._lock:
            hit = self._targets.get(key)
            if hit is not None:
                self._targets.move_to_end(key)
                self.target_hits += 1
                return hit
        value = compute()
        with self._lock:
            self.target_misses += 1
            self._targets[key] = value
            while len(self._targets) > self.max_targets:
                self._targets.popitem(last=False)
        return value

    def stats(self) -> dict:
        with self._lock:
            return {
                "networks": [f"{k[0]} {k[1]} pooling, up to {k[4]} on {k[3]}" for k in self._networks],
                "style_targets": len(self._targets),
                "style_target_hits": self.target_hits,
                "style_target_misses": self.target_misses,
            }


def stylize(
    content: Picture | str | Path,
    styles: Sequence[Picture | str | Path],
    params: StyleParams,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    session: Session | None = None,
) -> Result:
    """Stylise `content` with `styles` under `params` (Gatys et al. 2016, with the 2017 controls).

    `progress` is called after every optimiser step; setting `cancel` (an Event, or a callable
    returning True) makes this raise `Cancelled` within one step. `session` keeps networks and
    style targets warm for later calls; without one, nothing outlives the call. Raises `NSTError`s
    for bad input, missing weights, absent devices and GPU out-of-memory.
    """
    started = time.perf_counter()
    session = session or Session()  # released when this call returns
    is_cancelled = _cancel_check(cancel)
    content = content if isinstance(content, Picture) else load_image(content)
    params = resolve_size(params, content)
    styles = [s if isinstance(s, Picture) else load_image(s) for s in styles]
    blend = _blend_weights(params, len(styles))
    init_picture = _init_picture(params)

    device = devices.pick_device(params.device)
    devices.configure(device)
    run = None
    try:
        net = session.network(params, device)
        run = _Run(params, net, device, content, styles, blend, init_picture, session, is_cancelled, progress, started)
        x = run.optimise()
        picture = run.render(x, None)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise OutOfMemory(_oom_message(params, device, run)) from e
    except RuntimeError as e:
        if devices.is_out_of_memory(e):
            raise OutOfMemory(_oom_message(params, device, run)) from e
        raise
    return Result(
        picture=picture,
        params=params,
        losses=run.last_losses,
        elapsed=time.perf_counter() - started,
        device=devices.describe(device),
        weights_label=getattr(net, "weights_label", params.weights),
        weights_note=RANDOM_WEIGHTS_NOTE if getattr(net, "is_random", False) else None,
        loop="; ".join(run.loop_modes),
    )


class _Run:
    """The state of one stylisation across its coarse-to-fine levels."""

    def __init__(self, params, net, device, content, styles, blend, init_picture, session, is_cancelled,
                 progress, started):
        self.p = params
        self.net = net
        self.device = device
        self.content = content
        self.styles = styles
        self.blend = blend
        self.init_picture = init_picture
        self.session = session
        self.is_cancelled = is_cancelled
        self.progress = progress
        self.started = started
        self.fmt = devices.memory_format(device)
        self.out_h, self.out_w = fit(content.height, content.width, params.size)
        self.levels = _feasible_levels(params, content, styles)
        self.total = sum(n for _, n in self.levels)
        self.content_layers = {k: w for k, w in params.content_layers.items() if w > 0} if params.content_weight > 0 else {}
        self.style_layers = {k: w for k, w in params.style_layers.items() if w > 0} if params.style_weight > 0 else {}
        self.last_losses = {"total": 0.0, "content": 0.0, "style": 0.0, "tv": 0.0}
        self.step = 0
        self.loop_modes: list[str] = []  # per level: CapturedStep's mode (and why eager)
        self.budget = params.max_memory or tiling.available_bytes(device)
        self.plan: tiling.Plan | None = None  # the level's, once planned

    def _plan(self, h: int, w: int, layers, content_layers=()) -> tiling.Plan:
        return tiling.plan_level(h, w, list(layers), list(content_layers), budget=self.budget, tile=self.p.tile,
                                 precision=self.p.precision, optimizer=self.p.optimizer,
                                 same_device_host=self.device.type == "cpu")

    # ---- images at a level ----------------------------------------------------------------------

    def _content_at(self, h, w) -> torch.Tensor:
        return resize(self.content.rgb, h, w).to(self.device)

    def _seen(self, rgb: torch.Tensor) -> torch.Tensor:
        """What the network sees of an RGB image: the luminance only in luminance mode."""
        if self.p.preserve_color == "luminance":
            return color.as_grey_rgb(color.luminance(rgb))
        return rgb

    def _style_seen(self, style: Picture, content_rgb: torch.Tensor, side: int) -> torch.Tensor:
        sh, sw = style_size(self.p, style, side)
        s = resize(style.rgb, sh, sw).to(self.device)
        if self.p.preserve_color == "histogram":
            s = color.match_histogram(s, content_rgb)
        elif self.p.preserve_color == "luminance":
            y = color.match_luminance(color.luminance(s), color.luminance(content_rgb))
            s = color.as_grey_rgb(y)
        return s

    def _features(self, image: torch.Tensor, layers, cache: bool = True) -> dict:
        """The network's maps of a 3×H×W image; `cache` False inside a captured step (see devices.autocast)."""
        with devices.autocast(self.device, self.p.precision, cache_enabled=cache):
            return self.net(image.unsqueeze(0).contiguous(memory_format=self.fmt), layers)

    def _style_targets(self, content_rgb: torch.Tensor, side: int) -> dict:
        """Blended per-position Gram matrices A^l/M of all style images, from the session cache."""
        blended: dict[str, torch.Tensor] = {}
        for style, b in zip(self.styles, self.blend):
            s = self._style_seen(style, content_rgb, side)
            digest = hashlib.blake2b(s.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
            key = (digest, tuple(s.shape), self.p.weights, self.p.pooling, self.p.normalize_network, str(self.device),
                   tuple(sorted(self.style_layers)), self.p.precision)

            def compute(s=s):
                names = list(self.style_layers)
                plan = self._plan(*s.shape[-2:], names)
                if plan.tile:  # a style image too large to take whole: its Gram matrices tile by tile
                    geo = tiling.geometry(names)
                    grams, m = tiling.tiled_grams(self._features, s, names,
                                                  tiling.plan_tiles(*s.shape[-2:], plan.tile, geo), geo)
                    return {n: grams[n] / m[n] for n in names}
                with torch.no_grad():
                    feats = self._features(s, self.style_layers)
                return {n: losses.gram(f) / (f.shape[-1] * f.shape[-2]) for n, f in feats.items()}

            grams = self.session.style_target(key, compute)
            for n, g in grams.items():
                blended[n] = blended.get(n, 0) + b * g
        return blended

    def _initial(self, h, w) -> torch.Tensor:
        init = self.p.init
        if init == "noise":
            gen = torch.Generator().manual_seed(self.p.seed)
            x = torch.rand(3, h, w, generator=gen)
        elif init == "content":
            x = resize(self.content.rgb, h, w)
        elif init == "style":
            x = resize(self.styles[0].rgb, h, w) if self.styles else resize(self.content.rgb, h, w)
        else:
            x = resize(self.init_picture.rgb, h, w)
        x = x.to(self.device)
        if self.p.preserve_color == "luminance" and init != "noise":
            x = self._seen(x)
        return x

    # ---- optimisation ---------------------------------------------------------------------------

    def optimise(self) -> torch.Tensor:
        x = None
        for li, (side, iters) in enumerate(self.levels):
            h, w = fit(self.content.height, self.content.width, side)
            if li == len(self.levels) - 1:
                h, w = self.out_h, self.out_w
            content_rgb = self._content_at(h, w)
            x = self._initial(h, w) if x is None else resize(x.detach(), h, w)
            x = self._level(x, content_rgb, side, iters, li)
        return x.detach()

    def _level(self, x, content_rgb, side, iters, li) -> torch.Tensor:
        """`iters` optimiser steps at one size: plan → objective (whole or tiled) → optimiser → step
        (captured on CUDA where whole) → run."""
        x = x.detach().to(torch.float32).clone(memory_format=torch.contiguous_format).requires_grad_(True)
        layers = set(self.content_layers) | set(self.style_layers)
        self.plan = plan = self._plan(*x.shape[-2:], layers, self.content_layers)
        if self.p.tile == "auto" and not plan.fits:
            raise OutOfMemory(_oom_message(self.p, self.device, self))
        self._level_at = (li, iters, side, time.perf_counter(), self.step)
        objective = self._objective(content_rgb, side, x)
        # A history longer than the level's steps would never fill: the same steps with less memory.
        history = min(plan.history or lbfgs.DEFAULT_HISTORY, max(1, iters))
        step = make_step(objective, x, self._optimiser(x, history=history, on_host=plan.history_on_host))
        if plan.tile:
            step.capturable = False  # a Python loop over tiles with progress between them
        if self.p.optimizer == "adam":
            step = _clamped(step, x)
        captured = CapturedStep(step, self.device)
        try:
            self._steps(captured, x, iters, li, side)
        finally:
            self.loop_modes.append(captured.mode if captured.reason is None else f"{captured.mode} ({captured.reason})")
            captured.release()
        return x

    def _objective(self, content_rgb, side, x):
        """The level's loss, `Objective` or (where the plan tiles) `tiling.TiledObjective`: anything
        with ``loss_and_grad(x) -> (terms, grad)`` (TERMS order) fits here."""
        p, plan = self.p, self.plan
        layers = set(self.content_layers) | set(self.style_layers)
        style_targets = self._style_targets(content_rgb, side) if self.style_layers else {}
        if plan is not None and plan.tile:
            geo = tiling.geometry(list(layers))
            return tiling.TiledObjective(
                lambda im, names: self._features(self._seen(im), names),
                tiling.plan_tiles(*x.shape[-2:], plan.tile, geo), geo, content_rgb,
                self.content_layers, style_targets, self.style_layers, p.content_weight, p.style_weight, p.tv_weight,
                target_device="cpu" if plan.targets_on_host else None,
                on_tile=lambda k, n: self._on_tile(k, n, x))
        with torch.no_grad():
            content_targets = (
                {n: f.detach().float() for n, f in self._features(self._seen(content_rgb), self.content_layers).items()}
                if self.content_layers else {}
            )
        return Objective(lambda x: self._features(self._seen(x), layers, cache=False),
                         content_targets, self.content_layers, style_targets, self.style_layers,
                         p.content_weight, p.style_weight, p.tv_weight)

    def _optimiser(self, x, history: int = lbfgs.DEFAULT_HISTORY, on_host: bool = False):
        """L-BFGS on the device ($NST_LBFGS=torch: torch.optim.LBFGS), its history on the host where the
        plan says so, or Adam."""
        if self.p.optimizer == "lbfgs":
            return lbfgs.make(x, lr=self.p.step_size, history_size=history,
                              history_device="cpu" if on_host else None)
        return torch.optim.Adam([x], lr=self.p.step_size)

    def _on_tile(self, k: int, n: int, x) -> None:
        """Before tile k of n in a tiled step: cancel there, and report tile k − 1 done."""
        if self.is_cancelled():
            raise Cancelled("cancelled")
        if self.progress is not None and k > 1:
            li, iters, side, level_start, first_step = self._level_at
            done = self.step - first_step + (k - 1) / n  # of this level's steps, the one in hand in part
            self._report(self.step, done, li, iters, side, level_start, k - 1, n, x)

    def _report(self, step, done, li, iters, side, level_start, tile, tiles, x) -> None:
        """Call the progress callback: `done` of this level's `iters` steps took the time since `level_start`."""
        rate = (time.perf_counter() - level_start) / done
        self.progress(Progress(
            step=step, total=self.total, level=li + 1, levels=len(self.levels),
            losses=dict(self.last_losses), elapsed=time.perf_counter() - self.started,
            eta=self._eta(li, iters - done, rate, side), tile=tile, tiles=tiles,
            _render=lambda max_side: self.render(x.detach(), max_side),
        ))

    def _steps(self, step, x, iters, li, side) -> None:
        """The level's steps, with progress as the losses arrive (a step late on a GPU)."""
        level_start = time.perf_counter()
        first = self.step + 1
        tiles = self.plan.tiles if self.plan is not None else 1

        def report(number: int, values: list[float]) -> None:
            self.step = number
            self.last_losses = dict(zip(TERMS, values))
            if self.progress is not None:
                self._report(number, number - first + 1, li, iters, side, level_start, tiles, tiles, x)

        # depth 1: the host queues the next step while the device runs this one, so the device never
        # waits, losses come one step late, and a cancel set in a callback lets at most one more step run.
        run_steps(step, iters, self.device, report=report, is_cancelled=self.is_cancelled, first=first, depth=1)

    def _eta(self, li, left_here, rate, side) -> float:
        """Seconds left: this level's pace, scaled by pixel count for the finer levels."""
        later = sum(n * (s / side) ** 2 for s, n in self.levels[li + 1:])
        return rate * (left_here + later)

    # ---- output ---------------------------------------------------------------------------------

    def render(self, x: torch.Tensor, max_side: int | None) -> Picture:
        """x as a Picture at the output size (or at most `max_side`), colour and alpha restored."""
        x = x.detach().float()
        h, w = self.out_h, self.out_w
        if tuple(x.shape[-2:]) != (h, w):
            x = resize(x, h, w)
        if self.p.preserve_color == "luminance":
            x = color.combine_luminance(color.luminance(x), resize(self.content.rgb, h, w).to(x.device))
        x = x.clamp(0, 1).cpu()
        alpha = self.content.alpha
        if alpha is not None and tuple(alpha.shape) != (h, w):
            alpha = resize_alpha(alpha, h, w, self.content.max_value)
        pic = Picture(x, alpha, self.content.bit_depth, self.content.source)
        if max_side is not None and max(h, w) > max_side:
            pic = resize_picture(pic, max_side)
        return pic


# ---- helpers --------------------------------------------------------------------------------------

def _clamped(step, x: torch.Tensor):
    """`step`, then x clamped to [0, 1] (Adam's steps leave the image's range; L-BFGS's are kept as the paper's)."""
    def clamped() -> torch.Tensor:
        terms = step()
        with torch.no_grad():
            x.clamp_(0, 1)
        return terms
    clamped.capturable = getattr(step, "capturable", False)
    return clamped


def resize(rgb: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Antialiased bicubic resize of a C×H×W tensor (unchanged when the size already matches)."""
    if tuple(rgb.shape[-2:]) == (h, w):
        return rgb
    return F.interpolate(rgb.unsqueeze(0).float(), size=(h, w), mode="bicubic", align_corners=False,
                         antialias=True).squeeze(0).clamp(0, 1)


def resize_alpha(alpha: torch.Tensor, h: int, w: int, maxval: int) -> torch.Tensor:
    """Resize an integer alpha plane (exact when the size is unchanged)."""
    if tuple(alpha.shape) == (h, w):
        return alpha
    a = F.interpolate(alpha[None, None].float() / maxval, size=(h, w), mode="bilinear", align_corners=False,
                      antialias=True)[0, 0]
    return (a.clamp(0, 1) * maxval).round().to(torch.int32)


def min_side(params: StyleParams, layers=None) -> int:
    """The shortest image side the network can take up to the deepest of `layers` (default: every
    layer in use): each pooling before it halves it."""
    from .params import VGG19_LAYERS

    last = VGG19_LAYERS.index(_deepest(params.used_layers if layers is None else layers))
    return 2 ** sum(1 for n in VGG19_LAYERS[:last] if n.startswith("pool"))


def _deepest(layers) -> str:
    from .params import VGG19_LAYERS

    return max(layers, key=VGG19_LAYERS.index)


def style_size(params: StyleParams, style: Picture, side: int) -> tuple[int, int]:
    """(height, width) of a style image as the network sees it at a level whose longest side is `side`."""
    return fit(style.height, style.width, max(16, round(side * params.style_scale)))


def _small_style(params: StyleParams, styles: Sequence[Picture], side: int) -> tuple[Picture, int, int] | None:
    """The first style image too small for the style layers at `side`, with its size there."""
    layers = [n for n, w in params.style_layers.items() if w > 0]
    if params.style_weight <= 0 or not layers:
        return None
    need = min_side(params, layers)
    for s in styles:
        h, w = style_size(params, s, side)
        if min(h, w) < need:
            return s, h, w
    return None


def check_style_sizes(params: StyleParams, styles: Sequence[Picture]) -> None:
    """A ParamError naming the style image that is too small for the style layers at `params.size`."""
    small = _small_style(params, styles, params.size)
    if small is None:
        return
    s, h, w = small
    layers = [n for n, wt in params.style_layers.items() if wt > 0]
    scale = f" and style_scale {params.style_scale:g}" if params.style_scale != 1 else ""
    raise ParamError("styles", f"{s.source or 'a style image'} ({s.width}×{s.height}) becomes {w}×{h} at size "
                               f"{params.size}{scale}, too small for layer {_deepest(layers)}: its shorter side must "
                               f"be at least {min_side(params, layers)} pixels; use a larger size or style_scale, or "
                               "a style image closer to square")


def _feasible_levels(params: StyleParams, content: Picture, styles: Sequence[Picture] = ()) -> list[tuple[int, int]]:
    """The coarse-to-fine levels, with levels too small for the network (content or style) folded into the next."""
    need = min_side(params)
    levels, carried = [], 0
    for side, iters in params.level_sizes():
        h, w = fit(content.height, content.width, side)
        if (min(h, w) < need or _small_style(params, styles, side)) and side != params.size:
            carried += iters
            continue
        levels.append((side, iters + carried))
        carried = 0
    h, w = fit(content.height, content.width, params.size)
    if min(h, w) < need:
        raise ParamError("size", f"{params.size} makes {content.source or 'the content'} {w}×{h}, too small for "
                                 f"layer {params.used_layers[-1]}: its shorter side must be at least {need} pixels")
    check_style_sizes(params, styles)
    return levels


def _blend_weights(params: StyleParams, n_styles: int) -> list[float]:
    if n_styles == 0:
        if params.style_weight > 0:
            raise ParamError("styles", "at least one style image is needed unless style_weight is 0")
        return []
    if params.style_blend is None:
        return [1.0 / n_styles] * n_styles
    if len(params.style_blend) != n_styles:
        raise ParamError("style_blend", f"has {len(params.style_blend)} weights for {n_styles} style images")
    total = sum(params.style_blend)
    return [b / total for b in params.style_blend]


def _init_picture(params: StyleParams) -> Picture | None:
    if params.init in INITS:
        return None
    if not Path(params.init).exists():
        raise ImageError(params.init, f"init must be one of {', '.join(INITS)} or an image file; no such file")
    return load_image(params.init)


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def resolve_size(params: StyleParams, content: Picture) -> StyleParams:
    """`params` with size 0 (original) replaced by the content's longest side."""
    if params.size:
        return params
    side = max(content.height, content.width)
    if side > 16384:
        raise ParamError("size", f"original: {content.source or 'the content'} is {content.width}×{content.height}, "
                                 "longer than 16384 pixels; give a size")
    return params.replace(size=max(16, side))


def _oom_message(params: StyleParams, device: torch.device, run: "_Run | None" = None) -> str:
    plan = run.plan if run is not None else None
    where = f" ({plan.describe()})" if plan is not None else ""
    budget = "" if params.max_memory is None else f" with --max-memory {params.max_memory:,} bytes"
    return (f"out of memory on {device} at size {params.size}{where}{budget}: use a smaller size or "
            f"max_memory (which tiles the level), tile PX, precision bfloat16, or --device cpu")
