"""A step captured once as a CUDA graph and replayed, or run eagerly where that cannot be.

`CapturedStep(fn, device)` wraps a function of nothing that works on fixed-shape tensors (one
level's or one tile's loss, gradient and optimiser step) and returns tensors. Each call runs `fn`
once, with the same effect:

- on CUDA the first `warmup` calls run it eagerly on a side stream (cuDNN picks its algorithms,
  cuBLAS its workspace), the next call captures it into a ``torch.cuda.CUDAGraph`` and replays
  it, and every later call only replays it: one launch for the whole step, the returned tensors
  being the graph's static outputs, overwritten by the next call;
- on the CPU, MPS, for a `fn` whose ``capturable`` attribute is False, or when capture fails (an
  operation that synchronises or is not capturable), it calls `fn` as it is, every time;
  ``mode`` says which and ``reason`` why.

Everything `fn` reads must stay where it is between calls (update inputs in place with
``copy_``), and its outputs must be consumed (or copied, see `nst_core.readback`) before the next
call. Inside `fn`, use ``devices.autocast(..., cache_enabled=False)`` for reduced precision.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

DEFAULT_WARMUP = 2
DISABLE_ENV = "NST_CUDA_GRAPHS"  # "0" runs every step eagerly (for comparison and debugging)


def enabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip() not in ("0", "false", "no", "off")


class CapturedStep:
    """Call `fn` once per call: eagerly, or by replaying its CUDA graph (see the module doc)."""

    def __init__(self, fn: Callable[[], object], device: torch.device | str, warmup: int = DEFAULT_WARMUP,
                 enabled: bool | None = None):
        self.fn = fn
        self.device = torch.device(device)
        self.warmup = max(1, int(warmup))
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._outputs = None
        self.reason: str | None = None
        if enabled is None:
            enabled = enabled_by_env()
        if self.device.type != "cuda":
            self.reason = f"no CUDA graphs on {self.device.type}"
        elif not getattr(fn, "capturable", True):
            self.reason = "the step is not capturable (it synchronises: e.g. L-BFGS history on the host)"
        elif not enabled:
            self.reason = f"disabled ({DISABLE_ENV}=0 or enabled=False)"
        self._stream = torch.cuda.Stream(self.device) if self.reason is None else None

    @property
    def mode(self) -> str:
        """"graph" once captured, "warmup" before, "eager" where capture is not used."""
        if self.graph is not None:
            return "graph"
        return "eager" if self.reason is not None else "warmup"

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self._outputs
        if self.reason is not None:
            return self.fn()
        if self.calls <= self.warmup:
            return self._on_side_stream()
        return self._capture()

    def _on_side_stream(self):
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = self.fn()
        main.wait_stream(self._stream)
        return out

    def _capture(self):
        torch.cuda.synchronize(self.device)  # once: nothing of the warm-up may still run
        torch.cuda.empty_cache()  # the warm-up's cached blocks, so the graph's pool does not double them
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' CUDA calls (the service's) stay legal during the capture
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                out = self.fn()
        except Exception as e:  # not capturable: nothing ran, run this step and the rest eagerly
            self.reason = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del graph
            _settle(self.device)
            return self.fn()
        self.graph, self._outputs = graph, out
        graph.replay()
        return out

    def release(self) -> None:
        """Drop the graph and its memory pool (the next level captures its own)."""
        self.graph = None
        self._outputs = None


def _settle(device: torch.device) -> None:
    """After a failed capture: wait for the device and clear the (non-sticky) capture error."""
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass
    torch.cuda.empty_cache()
