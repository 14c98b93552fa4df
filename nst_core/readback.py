"""Loss values from the device without stalling it: copied asynchronously, read when they arrive.

`Readback.push(step, values)` queues a copy of a small device vector (the loss terms of a step)
into pinned host memory behind the work already queued, and returns every earlier push whose copy
has arrived, oldest first, as ``(step, [floats])``. So progress is reported as soon as the values
exist, a step or two late on a GPU that the host runs ahead of, and at once on the CPU (where the
copy is the value). At most `depth` pushes are outstanding: a further push waits for the oldest,
which bounds both the lag of the reports and how far the host can queue work ahead, so a cancel
checked by the host before each step still stops the device within `depth` steps of work.
`drain()` waits for and returns the rest (end of a level).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from .errors import Cancelled

DEFAULT_DEPTH = 2


class Readback:
    def __init__(self, size: int, device: torch.device | str, depth: int = DEFAULT_DEPTH):
        self.device = torch.device(device)
        self.depth = max(1, int(depth))
        self.size = int(size)
        self._async = self.device.type == "cuda"
        slots = self.depth + 1
        self._host = torch.zeros(slots, self.size, pin_memory=self._async)
        self._events = [torch.cuda.Event() if self._async else None for _ in range(slots)]
        self._next = 0
        self._pending: deque = deque()  # (step, slot)

    def push(self, step: int, values: torch.Tensor) -> list[tuple[int, list[float]]]:
        """Queue `values` (a device vector of `size`) as those of `step`; return what has arrived."""
        if not self._async:
            return [(step, values.detach().reshape(-1).tolist())]
        if len(self._pending) >= self.depth:
            _, oldest = self._pending[0]
            self._events[oldest].synchronize()  # bounded lag: wait for the oldest, not for all
        slot = self._next
        self._next = (self._next + 1) % len(self._events)
        self._host[slot].copy_(values.detach().reshape(-1), non_blocking=True)
        self._events[slot].record(torch.cuda.current_stream(self.device))
        self._pending.append((step, slot))
        return self._arrived()

    def _arrived(self) -> list[tuple[int, list[float]]]:
        out = []
        while self._pending and self._events[self._pending[0][1]].query():
            step, slot = self._pending.popleft()
            out.append((step, self._host[slot].tolist()))
        return out

    def drain(self) -> list[tuple[int, list[float]]]:
        """Wait for every queued copy and return them, oldest first."""
        out = []
        while self._pending:
            step, slot = self._pending.popleft()
            if self._events[slot] is not None:
                self._events[slot].synchronize()
            out.append((step, self._host[slot].tolist()))
        return out


def run_steps(step: Callable[[], torch.Tensor], iterations: int, device: torch.device | str,
              report: Callable[[int, list[float]], None] | None = None,
              is_cancelled: Callable[[], bool] = lambda: False, first: int = 1,
              depth: int = DEFAULT_DEPTH) -> list[float] | None:
    """Call `step` `iterations` times, numbering the steps from `first`; `report(number, values)`
    gets each step's returned vector as it arrives (in order, all of them by the end). A cancel
    seen before a step raises `Cancelled` before that step is queued. Returns the last values."""
    feed = None
    last = None
    for i in range(iterations):
        if is_cancelled():
            raise Cancelled("cancelled")
        values = step()
        if feed is None:
            feed = Readback(values.numel(), device, depth)
        for number, got in feed.push(first + i, values):
            last = got
            if report is not None:
                report(number, got)
    for number, got in (feed.drain() if feed is not None else []):
        last = got
        if report is not None:
            report(number, got)
    if is_cancelled():
        raise Cancelled("cancelled")
    return last
