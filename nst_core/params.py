"""The one parameters type: every stylisation knob, its default, and its validation.

The CLI, the job service, the daemon's YAML rules and the GIMP plug-in all build a `StyleParams`
(directly or with `StyleParams.from_mapping`) and hand it to `nst_core.stylize`. No other module
holds a default for any of these fields.

Defaults follow Gatys et al. (CVPR 2016). The paper names its layers after Caffe blobs, whose
convolutions are rectified in place, so its "conv4_2" is what torchvision calls the ReLU output:
the defaults are therefore ``relu4_2`` and ``relu1_1 … relu5_1``; ``conv*`` names address the
pre-activation outputs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ParamError

# VGG-19's feature layers in order: 16 convolutions with their ReLUs and 5 pooling layers.
_BLOCKS = (2, 2, 4, 4, 4)
VGG19_LAYERS: tuple[str, ...] = tuple(
    name
    for b, n in enumerate(_BLOCKS, start=1)
    for name in [x for i in range(1, n + 1) for x in (f"conv{b}_{i}", f"relu{b}_{i}")] + [f"pool{b}"]
)
FEATURE_LAYERS = tuple(n for n in VGG19_LAYERS if not n.startswith("pool"))

PAPER_CONTENT_LAYERS = {"relu4_2": 1.0}
PAPER_STYLE_LAYERS = {f"relu{b}_1": 0.2 for b in range(1, 6)}

POOLINGS = ("avg", "max")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("noise", "content", "style")  # or a path to an image file
PRESERVE_COLORS = ("none", "luminance", "histogram")
PRECISIONS = ("float32", "bfloat16", "float16")
TILE_MODES = ("auto", "off")  # or an interior side in pixels
DEVICE_NAMES = ("auto", "cuda", "mps", "cpu")  # also "cuda:N"
WEIGHTS_NAMES = ("imagenet", "random")  # or a path to a state dict

# Each optimiser's step size when `learning_rate` is left unset (pixels live in [0, 1]).
DEFAULT_LEARNING_RATES = {"lbfgs": 1.0, "adam": 0.02}
# Up to this longest side (the paper's 512 px) one pass at full size works; above it, automatic
# coarse-to-fine starts at half the size, or a quarter, … whichever first is at most this size.
COARSE_BASE_SIZE = 512
# Share of the iterations that the finest level gets when there are several levels.
FINEST_LEVEL_SHARE = 0.6  # measured: at 0.4 coarse-to-fine never reached the single-scale loss (benchmarks/README.md)


@dataclass(frozen=True)
class StyleParams:
    """Every knob of a stylisation, with the paper's values as defaults."""

    size: int = field(default=512, metadata={"help": "longest side of the output in pixels; original (or 0): the "
                                                     "content's own size (full resolution, tiled where it must be)",
                                             "words": {"original": 0}})
    iterations: int = field(default=500, metadata={"help": "optimiser steps in all (one loss evaluation each)"})
    content_weight: float = field(default=1.0, metadata={"help": "alpha, the weight of the content loss"})
    style_weight: float = field(default=1e3, metadata={"help": "beta, the weight of the style loss (alpha/beta = 1e-3)"})
    tv_weight: float = field(default=0.0, metadata={"help": "weight of the total-variation term (removes low-level noise)"})
    content_layers: Mapping[str, float] = field(
        default_factory=lambda: dict(PAPER_CONTENT_LAYERS),
        metadata={"help": "content layers and their weights"},
    )
    style_layers: Mapping[str, float] = field(
        default_factory=lambda: dict(PAPER_STYLE_LAYERS),
        metadata={"help": "style layers and their weights w_l"},
    )
    style_blend: tuple[float, ...] | None = field(
        default=None, metadata={"help": "blend weights of several style images (default: equal)"}
    )
    style_scale: float = field(default=1.0, metadata={"help": "size of the style image relative to the content"})
    pooling: str = field(default="avg", metadata={"help": "pooling in VGG-19: avg (the paper) or max"})
    normalize_network: bool = field(
        default=True, metadata={"help": "rescale each filter to mean activation 1 over natural images (the paper's "
                                        "normalised VGG; random weights always are)"}
    )
    optimizer: str = field(default="lbfgs", metadata={"help": "lbfgs (the paper) or adam"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "optimiser step size (default: 1.0 for lbfgs, 0.02 for adam)"}
    )
    init: str = field(default="noise", metadata={"help": "start from noise (the paper), content, style, or an image file"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed, device and inputs give the same output on CPU)"})
    preserve_color: str = field(
        default="none", metadata={"help": "none, luminance (transfer luminance only) or histogram (match style colours first)"}
    )
    levels: int = field(default=0, metadata={"help": (
        f"coarse-to-fine levels; 0 chooses from the size: one pass up to {COARSE_BASE_SIZE} px (the paper), "
        f"above that levels doubling from at most {COARSE_BASE_SIZE} px (e.g. {2 * COARSE_BASE_SIZE}: "
        f"{COARSE_BASE_SIZE}, {2 * COARSE_BASE_SIZE}; {4 * COARSE_BASE_SIZE}: {COARSE_BASE_SIZE}, "
        f"{2 * COARSE_BASE_SIZE}, {4 * COARSE_BASE_SIZE}); 1: always one pass")})
    weights: str = field(default="imagenet", metadata={"help": "imagenet, random, or a path to a VGG-19 state dict"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu"})
    precision: str = field(default="float32", metadata={"help": "network precision on CUDA: float32, bfloat16 or float16"})
    max_memory: int | None = field(default=None, metadata={"help": (
        "bytes a level may use, e.g. 150M or 2G (default: the device's free memory, or the RAM available on "
        "the CPU); above it the level is tiled"), "bytes": True})
    tile: str | int = field(default="auto", metadata={"help": (
        "auto (tile only what does not fit), off, or PX: tiles with a PX-pixel interior (at least 16; margins "
        "of real neighbouring pixels are added, so the result equals the untiled one)")})

    def __post_init__(self):
        # Normalise containers so that equal parameters compare and hash equal.
        object.__setattr__(self, "content_layers", _layer_map("content_layers", self.content_layers))
        object.__setattr__(self, "style_layers", _layer_map("style_layers", self.style_layers))
        if self.style_blend is not None:
            object.__setattr__(self, "style_blend", tuple(self.style_blend))
        if isinstance(self.tile, str) and self.tile.strip().isdigit():
            object.__setattr__(self, "tile", int(self.tile))
        self.validate()

    def validate(self) -> None:
        """Raise `ParamError` naming the first bad field."""
        _check_int("size", self.size, 0, 16384)
        if 0 < self.size < 16:
            raise ParamError("size", f"must be original (0) or between 16 and 16384, got {self.size}")
        _check_int("iterations", self.iterations, 0, 1_000_000)
        for name in ("content_weight", "style_weight", "tv_weight"):
            _check_float(name, getattr(self, name), 0.0)
        if self.content_weight == 0 and self.style_weight == 0:
            raise ParamError("content_weight", "content_weight and style_weight cannot both be 0")
        if self.style_blend is not None:
            if not self.style_blend:
                raise ParamError("style_blend", "must not be empty")
            for w in self.style_blend:
                _check_float("style_blend", w, 0.0)
            if sum(self.style_blend) <= 0:
                raise ParamError("style_blend", "weights must not all be 0")
        _check_float("style_scale", self.style_scale, 0.0, exclusive_min=True)
        if self.style_scale > 8:
            raise ParamError("style_scale", f"must be at most 8, got {self.style_scale}")
        _check_choice("pooling", self.pooling, POOLINGS)
        if not isinstance(self.normalize_network, bool):
            raise ParamError("normalize_network", f"must be true or false, got {self.normalize_network!r}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.learning_rate is not None:
            _check_float("learning_rate", self.learning_rate, 0.0, exclusive_min=True)
        _check_str("init", self.init)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_choice("preserve_color", self.preserve_color, PRESERVE_COLORS)
        _check_int("levels", self.levels, 0, 8)
        _check_str("weights", self.weights)
        _check_str("device", self.device)
        if self.device not in DEVICE_NAMES and not _is_cuda_index(self.device):
            raise ParamError("device", f"must be one of {', '.join(DEVICE_NAMES)} or cuda:N, got {self.device!r}")
        _check_choice("precision", self.precision, PRECISIONS)
        if self.max_memory is not None:
            _check_int("max_memory", self.max_memory, 1 << 20, 1 << 50)
        if isinstance(self.tile, int) and not isinstance(self.tile, bool):
            _check_int("tile", self.tile, 16, 65536)
        elif self.tile not in TILE_MODES:
            raise ParamError("tile", f"must be auto, off or a tile side of at least 16 pixels, got {self.tile!r}")

    # ---- derived values -------------------------------------------------------------------------

    @property
    def ratio(self) -> float:
        """alpha/beta, the paper's content-to-style ratio (inf when style_weight is 0)."""
        return math.inf if self.style_weight == 0 else self.content_weight / self.style_weight

    @property
    def step_size(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.optimizer]

    @property
    def used_layers(self) -> tuple[str, ...]:
        """Layers whose outputs the losses read, in network order (zero-weight terms left out)."""
        wanted = set()
        if self.content_weight > 0:
            wanted |= {n for n, w in self.content_layers.items() if w > 0}
        if self.style_weight > 0:
            wanted |= {n for n, w in self.style_layers.items() if w > 0}
        return tuple(n for n in VGG19_LAYERS if n in wanted)

    def level_sizes(self) -> list[tuple[int, int]]:
        """(longest side, iterations) per coarse-to-fine level, coarsest first; sums to `iterations`.
        Size 0 (original) must be resolved against the content first (`engine.resolve_size`)."""
        n = self.levels or 1 + max(0, math.ceil(math.log2(max(self.size, 1) / COARSE_BASE_SIZE)))
        if n == 1:
            return [(self.size, self.iterations)]
        sizes = [max(16, round(self.size / 2 ** (n - 1 - i))) for i in range(n)]
        finest = round(self.iterations * FINEST_LEVEL_SHARE)
        coarse = self.iterations - finest
        per = [coarse // (n - 1) + (1 if i < coarse % (n - 1) else 0) for i in range(n - 1)]
        return list(zip(sizes, per + [finest]))

    # ---- mappings (YAML, JSON, the job protocol) ------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}[name]

    @classmethod
    def default(cls, name: str) -> Any:
        return getattr(cls(), name)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, base: "StyleParams | None" = None) -> "StyleParams":
        """Build from plain data; unknown keys and wrong types are `ParamError`s.

        Keys may use dashes or underscores (``style-weight`` or ``style_weight``). ``ratio``
        (alpha/beta) is accepted as a shorthand that sets ``style_weight = content_weight / ratio``.
        Layer maps may be given as a list of names (equal weights summing to 1) or a mapping.
        Fields that are not given keep their value in `base` (or the default).
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ParamError("parameters", f"must be a mapping, got {type(data).__name__}")
        known = set(cls.field_names())
        values: dict[str, Any] = {}
        ratio = None
        for key, value in data.items():
            if not isinstance(key, str):
                raise ParamError(str(key), "parameter names must be strings")
            name = key.replace("-", "_")
            if name == "ratio":
                ratio = value
                continue
            if name not in known:
                raise ParamError(key, f"unknown parameter (known: {', '.join(sorted(known | {'ratio'}))})")
            values[name] = _coerce(name, value)
        if ratio is not None:
            if "style_weight" in values:
                raise ParamError("ratio", "give either ratio or style_weight, not both")
            ratio = _coerce_float("ratio", ratio)
            if ratio <= 0:
                raise ParamError("ratio", f"must be greater than 0, got {ratio}")
            cw = values.get("content_weight", (base or cls()).content_weight)
            values["style_weight"] = cw / ratio if cw > 0 else 1.0 / ratio
        start = base if base is not None else cls()
        return dataclasses.replace(start, **values)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data (JSON and YAML safe) that `from_mapping` turns back into equal parameters."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def replace(self, **changes) -> "StyleParams":
        return dataclasses.replace(self, **changes)

    def __hash__(self):
        return hash(tuple(
            tuple(sorted(v.items())) if isinstance(v, Mapping) else v
            for v in (getattr(self, f.name) for f in fields(self))
        ))


# ---- helpers ------------------------------------------------------------------------------------

class _LayerMap(dict):
    """A layer→weight dict that is hashable (parameters are frozen)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def parse_layer_spec(name: str, spec: str) -> dict[str, float]:
    """Parse ``relu1_1,relu2_1`` or ``relu1_1:0.5,relu2_1:0.5`` (the CLI and YAML strings)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ParamError(name, "no layers given")
    if all(":" not in s for s in items):
        return {s: 1.0 / len(items) for s in items}
    out = {}
    for s in items:
        layer, sep, w = s.partition(":")
        if not sep:
            raise ParamError(name, f"give a weight for every layer or for none ({spec!r})")
        out[layer.strip()] = _coerce_float(name, w.strip())
    return out


def _layer_map(name: str, value: Any) -> _LayerMap:
    if isinstance(value, str):
        value = parse_layer_spec(name, value)
    elif isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) for v in value):
            raise ParamError(name, "a list of layers must hold layer names")
        value = {v: 1.0 / len(value) for v in value}
    if not isinstance(value, Mapping):
        raise ParamError(name, f"must be a mapping of layer names to weights, got {type(value).__name__}")
    out = _LayerMap()
    for layer, weight in value.items():
        if layer not in FEATURE_LAYERS:
            raise ParamError(name, f"unknown layer {layer!r} (VGG-19 has conv1_1 … conv5_4 and relu1_1 … relu5_4)")
        out[layer] = _coerce_float(f"{name}.{layer}", weight)
        if out[layer] < 0 or not math.isfinite(out[layer]):
            raise ParamError(f"{name}.{layer}", f"must be a finite number >= 0, got {weight!r}")
    return out


_HINTS = typing.get_type_hints(StyleParams)
_METADATA = {f.name: f.metadata for f in fields(StyleParams)}
_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(name: str, value: Any) -> int:
    """A byte count from a whole number or a string such as 150M, 2G, 1.5GiB (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in _BYTE_UNITS else ""
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            number = -1.0
        if number > 0 and math.isfinite(number):
            return int(number * _BYTE_UNITS[unit])
    raise ParamError(name, f"must be a byte count such as 150M or 2G, got {value!r}")


def value_type(name: str) -> Any:
    """The type of a field's values, with None taken out (``float | None`` → float)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def accepts_none(name: str) -> bool:
    """Whether the field may be None (its type hint says ``| None``)."""
    return type(None) in typing.get_args(_HINTS[name])


def _coerce(name: str, value: Any) -> Any:
    """Accept what YAML/JSON produce for each field, by its type hint; reject the rest with a ParamError."""
    if value is None and accepts_none(name):
        return None
    kind = value_type(name)
    origin = typing.get_origin(kind) or kind
    if origin is AbcMapping:  # the layer maps
        return _layer_map(name, value)
    if origin is tuple:  # style_blend: numbers, or "0.7,0.3"
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ParamError(name, f"must be a list of numbers, got {type(value).__name__}")
        return tuple(_coerce_float(name, v) for v in value)
    meta = _METADATA[name]
    if isinstance(value, str) and value.strip().lower() in meta.get("words", {}):
        return meta["words"][value.strip().lower()]
    if meta.get("bytes"):
        return parse_bytes(name, value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParamError(name, f"must be a whole number, got {value!r}")
        return value
    if kind is float:
        return _coerce_float(name, value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamError(name, f"must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ParamError(name, f"must be a string, got {value!r}")
        return value
    return value


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ParamError(name, f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ParamError(name, f"must be a number, got {value!r}")


def _check_int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamError(name, f"must be a whole number, got {v!r}")
    if not lo <= v <= hi:
        raise ParamError(name, f"must be between {lo} and {hi}, got {v}")


def _check_float(name, v, lo, exclusive_min=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ParamError(name, f"must be a finite number, got {v!r}")
    if v < lo or (exclusive_min and v == lo):
        raise ParamError(name, f"must be {'greater than' if exclusive_min else 'at least'} {lo}, got {v}")


def _check_choice(name, v, choices):
    if v not in choices:
        raise ParamError(name, f"must be one of {', '.join(choices)}, got {v!r}")


def _check_str(name, v):
    if not isinstance(v, str) or not v:
        raise ParamError(name, f"must be a non-empty string, got {v!r}")


def _is_cuda_index(device: str) -> bool:
    head, _, idx = device.partition(":")
    return head == "cuda" and idx.isdigit()
