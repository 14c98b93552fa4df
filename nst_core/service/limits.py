"""The job service's limits, in one place: frame sizes and deadlines, the memory that all
connections together may hold, and the work one job may ask for. The server announces them in its
hello (docs/PROTOCOL.md, "Limits").
"""

from __future__ import annotations

import os
import threading

from ..errors import ParamError

MAX_STYLES = 16
PAYLOAD_IMAGES = 2  # max_payload holds this many of the largest 16-bit RGBA images
REQUEST_TIMEOUT = 30.0  # s for a new connection's hello, and for any frame once its first byte came
PAYLOAD_RATE = 16 << 20  # bytes/s: a frame's deadline grows by a second for each this many payload bytes
MAX_CONNECTIONS = 128  # at once; more are answered "busy"
HEADER_BUDGET = 32 << 20  # bytes of frame headers all connections together may be sending at once
# Memory one pixel of a job's working image costs at least: a level that does not fit whole is
# tiled, so what grows with the image is only its image-sized state (nst_core.tiling).


def max_pixels() -> int:
    from ..images import MAX_PIXELS

    return MAX_PIXELS


def max_payload() -> int:
    return PAYLOAD_IMAGES * max_pixels() * 8


def announced(budget: int, work_pixels: int, request_timeout: float) -> dict:
    """The `limits` of the server's hello."""
    from . import client

    return {"max_header": client.MAX_HEADER, "max_pixels": max_pixels(), "max_payload": max_payload(),
            "max_styles": MAX_STYLES, "memory_budget": budget, "max_work_pixels": work_pixels,
            "request_timeout": request_timeout, "max_connections": MAX_CONNECTIONS}


class MemoryBudget:
    """Bytes of requests that all connections together may hold: headers while they are read, and
    a job's pixels from the moment the job announces them until it ends. Nothing is allocated
    here; a reservation only says the bytes may come."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


def device_memory(device: str) -> int:
    """Bytes of memory on `device`: the GPU's own for cuda:N, the machine's physical memory otherwise."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return torch.cuda.get_device_properties(index).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def max_work_pixels(device: str) -> int:
    """The most pixels a job may work at on `device` (its output, and each style at its working
    scale): the device's memory at tiling.TILED_BYTES_PER_PIXEL each, and never more than the
    engine's images.MAX_PIXELS."""
    from ..tiling import TILED_BYTES_PER_PIXEL

    return min(max_pixels(), device_memory(device) // TILED_BYTES_PER_PIXEL)


def check_work(content_hw: tuple[int, int], style_hws: list[tuple[int, int]], params, limit: int,
               device: str) -> None:
    """ParamError when the job's output, or a style at its working scale, has more than `limit` pixels.

    content_hw, style_hws: (height, width) of the images as given.
    """
    from ..images import fit

    h, w = content_hw
    side = params.size or max(h, w)  # size 0: the content's own size
    oh, ow = fit(h, w, side)
    why = f"this service can work at {limit:,} pixels at most on {device}"
    if oh * ow > limit:
        raise ParamError("size", f"an output of {ow}×{oh} = {ow * oh:,} pixels is too large: {why}; "
                                 f"use a smaller size")
    style_side = max(16, round(max(oh, ow) * params.style_scale))  # as the engine sizes a style
    for i, (sh, sw) in enumerate(style_hws, 1):
        th, tw = fit(sh, sw, style_side)
        if th * tw > limit:
            raise ParamError("style_scale", f"style {i} would be worked at {tw}×{th} = {tw * th:,} pixels (size "
                                            f"{params.size}, style_scale {params.style_scale:g}): {why}; use a "
                                            f"smaller style_scale or size")
