"""The GIMP-free part of the Neural Style plug-in: its settings, their engine parameters, pixel bytes,
messages and the installer's record. Installed beside neural-style.py (`nst gimp install` copies
both); the fast tests import it without GIMP. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import sys

PROC_NAME = "python-fu-neural-style"
JOB_PROC_NAME = "python-fu-neural-style-job"  # the job in a process of its own (see neural-style.py)
MENU_PATH = "<Image>/Filters/Artistic"
SETTINGS_FILE = "nst-plugin.json"  # written by the installer: {"python": ..., "socket": ...}
HERE = os.path.dirname(os.path.realpath(__file__))  # the plug-in's folder

OWN_SIZE = 0  # a working size of 0: the area's own size (full resolution, the engine tiles it)
# Quality presets: (label, longest side in pixels, optimiser steps). "custom" uses the size and
# iterations arguments.
QUALITY_PRESETS = {
    "draft": ("Draft", 256, 150),
    "standard": ("Standard", 512, 300),
    "fine": ("Fine", 768, 500),
    "high": ("High", 1024, 800),
    "full": ("Full resolution", OWN_SIZE, 500),
}
# Live preview: the service renders the current result at most this often, this large; GIMP
# scales it onto the new layer.
PREVIEW_INTERVAL = 2.0
PREVIEW_MAX_SIDE = 1024
# Strength s (1 … 4) sets the paper's content-to-style ratio alpha/beta = 10^-(s + 1).
STRENGTH_MIN, STRENGTH_MAX = 1.0, 4.0
DEVICES = {"auto": "auto", "gpu": "cuda", "cpu": "cpu"}  # "gpu" is "mps" on macOS
PRESERVE_COLORS = ("none", "luminance", "histogram")
# The dialog's starting values. They equal the engine's defaults (strength 2 is its alpha/beta);
# the plug-in cannot import the engine, so tests/test_gimp_installer.py checks that they match.
START = {"strength": 2.0, "style_scale": 1.0, "seed": 0, "preserve_color": "none", "device": "auto"}


class UserError(Exception):
    """A problem the user can fix; its message is shown by GIMP as it is."""


def strength_to_ratio(strength: float) -> float:
    """alpha/beta for a strength: 1 → 1e-2 (mostly content), 2 → 1e-3 (the paper), 4 → 1e-5."""
    s = min(STRENGTH_MAX, max(STRENGTH_MIN, float(strength)))
    return 10.0 ** -(s + 1.0)


def device_name(choice: str, platform: str = sys.platform) -> str:
    if choice == "gpu":
        return "mps" if platform == "darwin" else "cuda"
    return DEVICES.get(choice, "auto")


def working_size(quality: str, region_w: int, region_h: int, custom_size: int) -> int:
    """The engine's `size`: the preset's longest side, never more than the region's (no upscaling);
    OWN_SIZE is the region's longest side, so the area is stylised at full resolution.

    (The engine reads `size` 0 the same way; the plug-in sends the number, which every engine takes.)
    """
    preset = QUALITY_PRESETS.get(quality)
    size = preset[1] if preset else int(custom_size)
    longest = max(region_w, region_h)
    return max(16, longest if size == OWN_SIZE else min(size, longest))


def label(quality: str) -> str:
    """A quality choice's label in the dialog: "Standard (512 px, 300 steps)"."""
    name, size, steps = QUALITY_PRESETS[quality]
    side = "the area's own size" if size == OWN_SIZE else f"{size} px"
    return f"{name} ({side}, {steps} steps)"


def preview_side(size: int) -> int:
    """The longest side of the previews the service sends for a job of working size `size`."""
    return max(16, min(size, PREVIEW_MAX_SIDE))


def build_params(*, quality: str, custom_size: int, custom_iterations: int, strength: float,
                 preserve_color: str, style_scale: float, seed: int, device: str, weights: str,
                 region_w: int, region_h: int) -> dict:
    """The engine parameters (StyleParams field names) for the plug-in's settings."""
    preset = QUALITY_PRESETS.get(quality)
    params = {
        "size": working_size(quality, region_w, region_h, custom_size),
        "iterations": preset[2] if preset else int(custom_iterations),
        "ratio": strength_to_ratio(strength),
        "preserve_color": preserve_color,
        "style_scale": float(style_scale),
        "seed": int(seed),
        "device": device_name(device),
    }
    if weights.strip():
        params["weights"] = weights.strip()
    return params


def scaled_dims(w: int, h: int, longest: int) -> tuple[int, int, float]:
    """(width, height, scale) of a w×h image shrunk so that its longest side is at most `longest`."""
    scale = min(1.0, longest / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale)), scale


def keep_alpha(result: bytes, original: bytes, bytes_per_sample: int) -> bytes:
    """`result` (interleaved RGBA) with the alpha samples of `original` (same size and format)."""
    out = bytearray(result)
    step = 4 * bytes_per_sample
    for b in range(bytes_per_sample):
        start = 3 * bytes_per_sample + b
        out[start::step] = original[start::step]
    return bytes(out)


def swap16(data: bytes) -> bytes:
    """Swap the bytes of 16-bit samples (the protocol is little-endian; GEGL is native)."""
    out = bytearray(data)
    out[0::2], out[1::2] = data[1::2], data[0::2]
    return bytes(out)


def red_stats(data: bytes, channels: int, bit_depth: int, max_pixels: int = 65536) -> tuple[float, float]:
    """(mean, standard deviation) of the red samples in [0, 1], weighted by alpha as GIMP's histogram
    weighs them, over at most `max_pixels` evenly spaced pixels of interleaved native-endian data."""
    samples = memoryview(data).cast("H") if bit_depth == 16 else memoryview(data)
    top = 65535.0 if bit_depth == 16 else 255.0
    n = len(samples) // channels
    step = max(1, n // max_pixels)
    total = acc = acc2 = 0.0
    for i in range(0, n * channels, step * channels):
        weight = samples[i + 3] / top if channels == 4 else 1.0
        v = samples[i] / top
        total += weight
        acc += weight * v
        acc2 += weight * v * v
    if total == 0:
        return 0.0, 0.0
    mean = acc / total
    return mean, math.sqrt(max(0.0, acc2 / total - mean * mean))


def pixels_disagree(ours: tuple[float, float], gimp_mean: float, gimp_std: float, tolerance: float = 0.05) -> bool:
    """True when the red channel's mean or spread that the plug-in read is obviously not GIMP's own
    histogram of the same pixels. GIMP 3.0 reports 8-bit histograms on 0…255 and deeper ones on 0…1,
    so either reading of its numbers that matches will do."""
    return all(abs(ours[0] - gimp_mean / unit) > tolerance or abs(ours[1] - gimp_std / unit) > tolerance
               for unit in (255.0, 1.0))


def progress_text(event: dict) -> str:
    """The status bar's line for a progress event; level and tile only when there are several."""
    step, total = event.get("step", 0), event.get("total", 0)
    parts = [f"Neural Style: step {step}/{total}"]
    if (event.get("levels") or 1) > 1:
        parts.append(f"level {event.get('level')}/{event.get('levels')}")
    if (event.get("tiles") or 1) > 1:
        parts.append(f"tile {event.get('tile')}/{event.get('tiles')}")
    loss = (event.get("losses") or {}).get("total")
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    eta = event.get("eta")
    if eta is not None:
        parts.append(f"{math.ceil(eta)} s left")
    return " · ".join(parts)


def explain(kind: str, message: str) -> str:
    """The service's message plus what to do about it."""
    hints = {
        "unavailable": ("Start the service with `nst serve`, or run `nst gimp install` from the Python "
                        "environment that has Neural Style installed so that the plug-in can start one itself."),
        "busy": "The service is busy with other jobs; try again in a moment.",
        "weights": ("Put the VGG-19 weights where the message says, or enter the weights file's path "
                    "under Advanced → Weights (\"random\" gives a quick test without them)."),
        "out_of_memory": "Choose a lower Quality, select a smaller area, or set Device to CPU.",
        "device": "Set Device to auto or CPU.",
        "param": "Check the plug-in's settings.",
        "image": "Check the style image; for a layer too large for the service, select a part of it.",
        "protocol": "The plug-in and the service do not match; run `nst gimp install` again.",
        "internal": "This is a bug in the Neural Style service; its log has the details.",
    }
    text = message.rstrip(".") + "."
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    hint = hints.get(kind)
    return f"{text}\n\n{hint}" if hint else text


def read_settings(folder: str = HERE) -> dict:
    """The installer's record (nst-plugin.json beside the plug-in), or {} when there is none."""
    try:
        with open(os.path.join(folder, SETTINGS_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read {os.path.join(folder, SETTINGS_FILE)} ({e}). "
                        "Run `nst gimp install` again.") from None
    return data if isinstance(data, dict) else {}


def choose_socket(setting: str, settings: dict, environ=os.environ) -> str | None:
    """The socket to use: the plug-in's setting, $NST_SOCKET, the installer's record, else the default."""
    return (setting or "").strip() or environ.get("NST_SOCKET") or settings.get("socket") or None
