"""One folder job from the journal to its output: the steps, and the order that makes them crash-safe.

    claim (journal: running, attempts + 1)
    choose the output path; record it and what was there before (journal)   ← before any write
    decode the input; run the engine through the shared Scheduler (batch priority)
    write the output: temporary name in the output folder, fsync, rename (save_image)
    journal: done                                                           ← a crash just before
    move the input to processed/                                              this is found by the
                                                                              recorded path on restart
Failures: journal failed → sidecar (<name>.error.json, atomic) → input to failed/.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nst_core.errors import Cancelled, DeviceError, ImageError, NSTError, OutOfMemory, WeightsError

from .config import Rule
from .journal import Identity, Job

log = logging.getLogger("nst-daemon")

SIDECAR_SUFFIX = ".error.json"


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


class Requeue(Exception):
    """The job did not run to the end for a reason that is not the input's fault."""

    def __init__(self, why: str, count_attempt: bool = False, rediscover: bool = False):
        super().__init__(why)
        self.count_attempt = count_attempt
        self.rediscover = rediscover


class Worker(threading.Thread):
    """Takes items from the queue and runs them, one at a time, through the shared Scheduler."""

    def __init__(self, ctx, index: int):
        super().__init__(name=f"nst-folder-{index}", daemon=True)
        self.ctx = ctx
        self.index = index

    def run(self) -> None:
        ctx = self.ctx
        while not ctx.stopping.is_set():
            item = ctx.queue.get(timeout=0.5)
            if item is None:
                continue
            try:
                self.process(item)
            except Exception:  # never let one job end the worker
                log.exception("job %d (%s): unexpected error", item.job_id, item.path)
            finally:
                ctx.running.pop(self.index, None)
                ctx.queue.release(item.job_id)
                ctx.changed()

    # -- one job --
    def process(self, item: Item) -> None:
        ctx = self.ctx
        journal = ctx.journal
        rule = ctx.config.rule(item.rule)
        job = journal.get(item.job_id)
        if job is None or job.state != "queued":
            return  # done meanwhile, or taken by another instance
        if rule is None or rule.version != item.version or item.root not in rule.watch:
            journal.forget(job.id)  # the rule changed before the job ran: found again under the new one
            ctx.rediscover(item.path)
            return
        if ctx.blocked_reason(rule.name):
            return  # stays queued in the journal; the next scan brings it back
        ident = Identity.at(item.path)
        if not job.same_input(item.path, ident):
            journal.forget(job.id)
            if ident is not None:
                ctx.rediscover(item.path)  # rewritten since it settled: settle again
            return
        if job.attempts >= ctx.config.settings.max_attempts:
            message = (f"gave up after {job.attempts} attempts: the daemon stopped while running this job each time "
                       "(a crash, the watchdog or the out-of-memory killer)")
            if journal.give_up(job.id, {"kind": "crashed", "message": message}):
                ctx.stats.count("failed")
                log.warning("%s: failed (rule %s): %s", item.path, rule.name, message)
                self.finish_input(journal.get(job.id), item, rule, ok=False)
            return
        job = journal.claim(job.id, ctx.owner)
        if job is None:
            return
        now = time.monotonic()
        ctx.running[self.index] = Running(item, now, now, 0, rule.params.iterations)
        ctx.changed()
        try:
            self.run_job(job, item, rule)
        except Requeue as r:
            journal.requeue(job.id, count_attempt=r.count_attempt)
            log.info("%s: %s; queued again", item.path, r)
            if r.rediscover:
                ctx.rediscover(item.path)
        except NSTError as e:
            if _environmental(e):
                journal.requeue(job.id)
                ctx.block(rule.name, e.message)
            else:
                self.fail(job, item, rule, e.to_mapping())
        except Exception as e:  # a bug; the daemon keeps going and the file says why
            log.exception("%s: internal error", item.path)
            self.fail(job, item, rule, {"kind": "internal", "message": f"internal error: {type(e).__name__}: {e}"})

    def run_job(self, job: Job, item: Item, rule: Rule) -> None:
        ctx = self.ctx
        stats = ctx.stats
        _refuse_escaping_link(item.path, item.root)
        target = self.choose_output(job, item, rule)
        if target is None:
            return
        with stats.timed("load"):
            from nst_core.images import load_image

            try:
                picture = load_image(item.path)
            except ImageError:
                if Identity.at(item.path) != job.input:
                    raise Requeue("changed while it was read", rediscover=True) from None
                raise
        if min(picture.width, picture.height) < rule.min_input_side:
            raise ImageError(item.path, f"the image is only {picture.width}×{picture.height} pixels; rule {rule.name} "
                                        f"takes images of at least {rule.min_input_side} pixels on each side "
                                        "(min_input_side)")
        styles = ctx.styles(rule)
        t0 = time.perf_counter()
        result = self.stylize(picture, styles, rule, item)
        stats.add("engine", time.perf_counter() - t0)
        meta = {"Software": f"neural-style nst-daemon ({ctx.server_name})", "nst-rule": rule.name,
                "nst-rule-version": rule.version, "nst-source": item.path.name,
                "nst-params": json.dumps(rule.params.to_mapping(), sort_keys=True, default=str)}
        if getattr(result, "weights_note", None):
            meta["nst-weights-note"] = result.weights_note
        with stats.timed("write"):
            target = self.write(job, item, rule, result.picture, target, meta)
        if target is None:
            return
        with stats.timed("journal"):
            ctx.journal.done(job.id, target)
        stats.count("done")
        log.info("%s → %s (rule %s, %.1f s)", item.path, target, rule.name, time.monotonic() - ctx.running[self.index].started)
        self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)

    def choose_output(self, job: Job, item: Item, rule: Rule) -> Path | None:
        """The output path by the rule's template and collision policy, recorded before any write."""
        from nst_core.images import check_output_path

        ctx = self.ctx
        target = rule.output / rule.output_name(item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(target)  # ImageError for an extension no encoder writes
        with ctx.names_lock:
            if rule.on_collision == "skip" and os.path.lexists(target):
                ctx.journal.done(job.id, None, note=f"skipped: {target} exists")
                log.info("%s: %s exists; skipped (on_collision: skip)", item.path, target)
                self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)
                return None
            if rule.on_collision == "number":
                target = free_name(target, ctx.reserved)
            ctx.reserved.add(target)
            with ctx.stats.timed("journal"):
                ctx.journal.set_output(job.id, target, Identity.at(target))
        return target

    def stylize(self, picture, styles, rule: Rule, item: Item):
        from nst_core.service.scheduler import QueueFull, ServiceStopping

        ctx = self.ctx
        running = ctx.running[self.index]

        def progress(p):
            running.step, running.total = p.step, p.total
            running.last_progress = time.monotonic()

        while True:
            try:
                handle = ctx.scheduler.submit(picture, styles, rule.params, priority="batch", progress=progress,
                                              client=f"nst-daemon:{rule.name}")
                break
            except QueueFull:
                if ctx.stopping.wait(0.5):
                    raise Requeue("the daemon is stopping") from None
            except ServiceStopping:
                raise Requeue("the daemon is stopping") from None
        cancelled_for_stop = False
        while True:
            if ctx.stopping.is_set() and not cancelled_for_stop and time.monotonic() >= ctx.stop_deadline:
                log.warning("%s: not finished within stop_timeout; cancelling it", item.path)
                handle.cancel()
                cancelled_for_stop = True
            try:
                return handle.result(timeout=0.2)
            except TimeoutError:
                continue
            except (Cancelled, ServiceStopping):
                if ctx.stopping.is_set():
                    raise Requeue("stopped by the daemon's shutdown") from None
                raise

    def write(self, job: Job, item: Item, rule: Rule, picture, target: Path, meta: dict) -> Path | None:
        from nst_core.images import save_image

        ctx = self.ctx
        try:
            for _ in range(100):
                try:
                    save_image(picture, target, meta, overwrite=rule.on_collision == "overwrite")
                    return target
                except ImageError as e:
                    if not os.path.lexists(target) or "already exists" not in e.message:
                        raise
                    # Someone else wrote that name since it was chosen.
                    if rule.on_collision == "skip":
                        ctx.journal.done(job.id, None, note=f"skipped: {target} exists")
                        self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)
                        return None
                    with ctx.names_lock:
                        ctx.reserved.discard(target)
                        target = free_name(target, ctx.reserved)
                        ctx.reserved.add(target)
                        ctx.journal.set_output(job.id, target, None)
            raise ImageError(target, "no free output name")
        finally:
            with ctx.names_lock:
                ctx.reserved.discard(target)

    # -- endings --
    def fail(self, job: Job, item: Item, rule: Rule, error: dict) -> None:
        self.ctx.journal.failed(job.id, error)
        self.ctx.stats.count("failed")
        log.warning("%s: failed (rule %s): %s", item.path, rule.name, error.get("message"))
        self.finish_input(self.ctx.journal.get(job.id), item, rule, ok=False)

    def finish_input(self, job: Job, item: Item, rule: Rule, ok: bool) -> None:
        finish_input(self.ctx, job, item, rule, ok)


def finish_input(ctx, job: Job, item: Item, rule: Rule, ok: bool) -> None:
    """Move the input to processed/ or failed/ (failures get a sidecar first); idempotent after a crash."""
    t0 = time.perf_counter()
    try:
        if rule.keep_inputs:
            if not ok:
                d = rule.failed_dir(item.root) / _relative(item.path, item.root)
                write_sidecar(d.with_name(d.name + SIDECAR_SUFFIX), job, item, rule)
            return
        if job.dest_path:
            dest = Path(job.dest_path)
        else:
            folder = rule.processed_dir(item.root) if ok else rule.failed_dir(item.root)
            dest = free_name(folder / _relative(item.path, item.root), set())
            ctx.journal.set_dest(job.id, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not ok:
            write_sidecar(dest.with_name(dest.name + SIDECAR_SUFFIX), job, item, rule)
        if os.path.lexists(item.path) and Identity.at(item.path) == job.input:
            _move(item.path, dest)
    except OSError as e:
        log.error("%s: cannot move it to %s: %s (tried again at the next scan)",
                  item.path, "processed" if ok else "failed", e)
    finally:
        ctx.stats.add("move", time.perf_counter() - t0)


def write_sidecar(path: Path, job: Job, item: Item, rule: Rule) -> None:
    """<input name>.error.json beside the failed input: what failed and why, atomically."""
    data = {
        "input": str(item.path),
        "rule": rule.name,
        "rule_version": rule.version,
        "error": job.error or {"kind": "unknown", "message": "unknown error"},
        "message": (job.error or {}).get("message", "unknown error"),
        "attempts": job.attempts,
        "content_sha256": job.content_hash if len(job.content_hash) == 64 else None,
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def free_name(path: Path, reserved: set) -> Path:
    """path, or path with -1, -2, … before the extension: the first name that is neither taken nor reserved."""
    if not os.path.lexists(path) and path not in reserved:
        return path
    stem, suffix = path.name[: len(path.name) - len(path.suffix)] if path.suffix else path.name, path.suffix
    n = 1
    while True:
        p = path.with_name(f"{stem}-{n}{suffix}")
        if not os.path.lexists(p) and p not in reserved:
            return p
        n += 1


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def _move(src: Path, dest: Path) -> None:
    try:
        os.rename(src, dest)
    except FileNotFoundError:
        if os.path.lexists(src):
            raise  # the destination folder went away
        # moved meanwhile by another instance
    except OSError as e:
        if e.errno != 18:  # EXDEV: processed/ on another file system
            raise
        shutil.move(str(src), str(dest))


def _refuse_escaping_link(path: Path, root: Path) -> None:
    if not path.is_symlink():
        return
    target = os.path.realpath(path)
    real_root = os.path.realpath(root)
    if not (target == real_root or target.startswith(real_root.rstrip("/") + "/")):
        raise ImageError(path, f"is a symbolic link to {target}, outside the watched folder {root}: refused")


def _environmental(e: NSTError) -> bool:
    """Errors of the machine, not of the input: the job waits instead of failing."""
    return isinstance(e, WeightsError) or (isinstance(e, DeviceError) and not isinstance(e, OutOfMemory))
