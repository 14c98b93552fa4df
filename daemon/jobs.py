"""What the daemon's main loop and its folder workers share: the queue of folder jobs, what runs,
the output names being chosen, the rules that wait, the timings, and `FolderContext`, all a folder
worker may use of the daemon.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nst_core.service.scheduler import Scheduler

    from .rules import Config, Rule
    from .journal import Journal
    from .watch import Settler

log = logging.getLogger("nst-daemon")


@dataclass(frozen=True)
class Item:
    """A queued folder job: the journal row and the file it was made for."""

    job_id: int
    path: Path
    rule: str
    version: str
    root: Path


class JobQueue:
    """FIFO of items, deduplicated by job id (events and scans find the same file many times)."""

    def __init__(self):
        self._items: collections.deque[Item] = collections.deque()
        self._ids: set[int] = set()      # queued here or being worked on
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Item) -> bool:
        with self._cond:
            if self._closed or item.job_id in self._ids:
                return False
            self._ids.add(item.job_id)
            self._items.append(item)
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item (its id stays "in flight" until `release`); None when closed or timed out."""
        with self._cond:
            end = None if timeout is None else time.monotonic() + timeout
            while not self._items and not self._closed:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:
                return None
            return self._items.popleft()

    def release(self, job_id: int) -> None:
        with self._cond:
            self._ids.discard(job_id)

    def in_flight(self, job_id: int) -> bool:
        with self._cond:
            return job_id in self._ids

    def drop(self, keep) -> list[Item]:
        """Remove the queued items for which keep(item) is false; returns them."""
        with self._cond:
            gone = [i for i in self._items if not keep(i)]
            self._items = collections.deque(i for i in self._items if keep(i))
            for i in gone:
                self._ids.discard(i.job_id)
            return gone

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Running:
    item: Item
    started: float
    last_progress: float
    step: int = 0
    total: int = 0
    eta: float | None = None  # seconds left, as the engine estimated at last_progress
    device: str | None = None  # the scheduler's worker running it (a cluster worker's name)

    def seconds_left(self, now: float) -> float | None:
        return None if self.eta is None else max(0.0, self.eta - (now - self.last_progress))


class Stats:
    """Seconds spent per stage and counters, for status lines and the benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, n: int = 1) -> None:
        with self._lock:
            self.seconds[stage] += seconds
            self.counts[stage] += n

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def timed(self, stage: str):
        return _Timed(self, stage)

    def snapshot(self) -> dict:
        with self._lock:
            return {"seconds": dict(self.seconds), "counts": dict(self.counts)}


class _Timed:
    def __init__(self, stats: Stats, stage: str):
        self.stats, self.stage = stats, stage

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.add(self.stage, time.perf_counter() - self.t)


@dataclass
class OutputNames:
    """Output names that running jobs have chosen and not written yet, held so that two workers
    never choose the same one (take `lock` to look at or change `held`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    held: set[Path] = field(default_factory=set)


class RuleBlocks:
    """Rules whose files wait, with why: a problem of the machine rather than of the input (missing
    weights or style image, an output folder that is full or cannot be written, a link where
    processed/ should be). A block lasts until the first scan `retry()` seconds on, or a reload."""

    def __init__(self, queue: JobQueue, retry: Callable[[], float], changed: Callable[[], None]):
        self._queue, self._retry, self._changed = queue, retry, changed
        self._blocks: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def block(self, rule: str, message: str) -> None:
        """Block `rule` (its queued items leave the queue; the journal keeps them queued)."""
        with self._lock:
            new = self._blocks.get(rule, (None,))[0] != message
            self._blocks[rule] = (message, time.monotonic() + self._retry())
        if new:
            log.error("rule %s: %s; its files wait (retried in %gs, or at a reload)", rule, message, self._retry())
        self._queue.drop(lambda i: i.rule != rule)
        self._changed()

    def reason(self, rule: str) -> str | None:
        with self._lock:
            b = self._blocks.get(rule)
        return b[0] if b else None

    def __contains__(self, rule: str) -> bool:
        return self.reason(rule) is not None

    def items(self) -> list[tuple[str, str]]:
        """(rule, why) of every block."""
        with self._lock:
            return [(k, m) for k, (m, _) in self._blocks.items()]

    def expire(self) -> None:
        """Lift the blocks whose time is up (at a scan)."""
        now = time.monotonic()
        with self._lock:
            for name in [k for k, (_, until) in self._blocks.items() if until <= now]:
                del self._blocks[name]

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()


@dataclass(frozen=True)
class FolderContext:
    """All a folder worker (and the moving of inputs) may use of the daemon."""

    journal: Journal
    queue: JobQueue
    scheduler: Scheduler
    settler: Settler
    stats: Stats
    names: OutputNames
    blocks: RuleBlocks
    running: dict[int, Running]  # worker index → its job, for STATUS and the watchdog
    owner: str  # this instance's name in the journal
    stopping: threading.Event
    config: Callable[[], Config]  # the rules in use (a reload replaces them)
    styles: Callable[[Rule], list]  # a rule's style images, decoded (RuleError where one cannot be)
    stop_deadline: Callable[[], float]  # monotonic time by which a stop wants the running jobs ended
    trust_ctime: Callable[[Path], bool]  # whether change times under a watched folder are in our clock
    look_again: Callable[[Path, float, "os.stat_result | None"], None]  # settle the file again, after a delay
    changed: Callable[[], None]  # STATUS needs an update
