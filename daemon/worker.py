"""One folder job from the journal to its output: the steps, and the order that makes them crash-safe.

    claim (journal: running, attempts + 1)
    open the input without following links; decode it   (one that cannot be decoded yet waits)
    choose the output path; record it and what was there before (journal)   ← before any write
    run the engine through the shared Scheduler (batch priority)
    write the output: temporary name in the output folder, fsync, rename (save_image)
    journal: done                                                           ← a crash just before
    move the input to processed/                                              this is found by the
                                                                              recorded path on restart
Failures: journal failed → sidecar (<name>.error.json, atomic) → input to failed/.
Problems of the machine rather than of the input (weights, the style image, an output folder that is
full or cannot be written, a link where processed/ or failed/ should be) block the rule instead: its
files wait, and STATUS says why. Nothing is created in or moved into a folder reached through a link
(see safefs).
"""

from __future__ import annotations

import collections
import datetime as _dt
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nst_core.errors import (Cancelled, DeviceError, ImageError, NSTError, OutOfMemory, QueueFull, ServiceStopping,
                             WeightsError)
from nst_core.outputs import atomic_write, metadata, name_max, refuse_inputs

from . import safefs
from .config import Rule
from .journal import Identity, Job
from .names import fit_name, numbered, show
from .safefs import LinkRefused, Place, fd_path

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
    eta: float | None = None  # seconds left, as the engine estimated at last_progress

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


class Requeue(Exception):
    """The job did not run to the end for a reason that is not the input's fault.

    wait: the input cannot be decoded yet; its job is dropped and the file looked at again in
    `wait` seconds (or when it changes from `st`).
    """

    def __init__(self, why: str, count_attempt: bool = False, wait: float | None = None,
                 st: os.stat_result | None = None):
        super().__init__(why)
        self.count_attempt = count_attempt
        self.wait, self.st = wait, st


class FolderProblem(NSTError):
    """A folder the daemon writes to cannot be used (full, read-only, a link): the rule waits."""

    kind = "folder"


class Worker(threading.Thread):
    """Takes items from the queue and runs them, one at a time, through the shared Scheduler."""

    def __init__(self, ctx, index: int):
        super().__init__(name=f"nst-folder-{index}", daemon=True)
        self.ctx = ctx
        self.index = index
        self._reserved: Path | None = None  # the output name this worker holds (ctx.reserved)
        self._out_fd: int | None = None  # the output folder of the running job, opened without links

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
            if r.wait is not None:
                journal.forget(job.id)  # found again, and hashed again, when it is looked at next
                ctx.defer(item, r.wait, r.st)
                log.info("%s: %s; looked at again in %.1f s", item.path, r, r.wait)
            else:
                log.info("%s: %s; queued again", item.path, r)
        except NSTError as e:
            if _environmental(e):
                journal.requeue(job.id)
                ctx.block(rule.name, e.message)
            else:
                self.fail(job, item, rule, e.to_mapping())
        except Exception as e:  # a bug; the daemon keeps going and the file says why
            log.exception("%s: internal error", item.path)
            self.fail(job, item, rule, {"kind": "internal", "message": f"internal error: {type(e).__name__}: {e}"})
        finally:
            self._release()

    def run_job(self, job: Job, item: Item, rule: Rule) -> None:
        ctx = self.ctx
        stats = ctx.stats
        with stats.timed("load"):
            picture = self.load(job, item)
        if min(picture.width, picture.height) < rule.min_input_side:
            raise ImageError(item.path, f"the image is only {picture.width}×{picture.height} pixels; rule {rule.name} "
                                        f"takes images of at least {rule.min_input_side} pixels on each side "
                                        "(min_input_side)")
        target = self.choose_output(job, item, rule)
        if target is None:
            return
        self.check_room(target, picture, rule)
        styles = ctx.styles(rule)
        t0 = time.perf_counter()
        result = self.stylize(picture, styles, rule, item)
        stats.add("engine", time.perf_counter() - t0)
        meta = metadata(result, "nst-daemon", rule=rule.name, rule_version=rule.version, source=show(item.path.name))
        with stats.timed("write"):
            target = self.write(job, item, rule, result.picture, target, meta)
        if target is None:
            return
        with stats.timed("journal"):
            ctx.journal.done(job.id, target)
        stats.count("done")
        log.info("%s → %s (rule %s, %.1f s)", item.path, target, rule.name, time.monotonic() - ctx.running[self.index].started)
        self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)

    def load(self, job: Job, item: Item):
        """The input, opened without following links and decoded; Requeue(wait) while it may be incomplete."""
        from nst_core.images import load_image

        ctx = self.ctx
        try:
            fd, st = safefs.open_file(Place.under(item.root, item.path.parent), item.path.name)
        except LinkRefused as e:
            raise ImageError(item.path, e.what + ("" if e.path == item.path else f" ({e.path})")) from None
        except PermissionError:
            raise ImageError(item.path, "permission denied: the file cannot be read") from None
        except FileNotFoundError:
            raise Requeue("gone before it was read", wait=0.0) from None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise ImageError(item.path, "is not a regular file (a device, pipe or socket), not an image file") from None
            raise ImageError(item.path, f"cannot open it ({e.strerror or e})") from None
        try:
            if Identity.of(st) != job.input:
                raise Requeue("changed since it settled", wait=0.0)
            source = fd_path(fd)
            try:
                if st.st_size == 0:
                    raise ImageError(source, "the file is empty (0 bytes)")
                picture = load_image(source)
            except ImageError as e:
                err = _renamed(e, source, item.path)
                now = os.fstat(fd)
                if Identity.of(now) != job.input or Identity.at(item.path) != job.input:
                    raise Requeue("changed while it was read", wait=0.0) from None
                wait = ctx.settler.unfinished(item.path, now, ctx.trust_ctime(item.root))
                if wait is None:
                    raise err from None
                how = "is open for writing" if ctx.settler.open_for_writing(item.path) else "changed recently"
                raise Requeue(f"cannot be decoded yet and {how} ({err.message})", wait=wait, st=now) from None
        finally:
            os.close(fd)
        ctx.settler.taken(item.path)
        picture.source = str(item.path)
        return picture

    def choose_output(self, job: Job, item: Item, rule: Rule) -> Path | None:
        """The output path by the rule's template and collision policy, recorded before any write.

        Folders the template names below the output folder are made without following links, and
        the name is shortened to what the file system allows."""
        from nst_core.images import check_output_path

        ctx = self.ctx
        *sub, name = Path(rule.output_name(item.path)).parts
        place = Place(rule.output, tuple(sub))
        try:
            rule.output.mkdir(parents=True, exist_ok=True)
            self._out_fd = place.open(create=True)
        except OSError as e:
            raise folder_problem(place.path, e) from None
        fd = self._out_fd
        target = place.path / fit_name(name, name_max(fd))
        check_output_path(fd_path(fd, target.name))  # ImageError for an extension no encoder writes
        if rule.on_collision == "overwrite":  # (a style image in the output folder, named as an output would be)
            try:
                refuse_inputs(fd_path(fd, target.name), [item.path, *rule.styles])
            except ImageError as e:
                raise _renamed(e, fd_path(fd, target.name), target) from None
        with ctx.names_lock:
            if rule.on_collision == "skip" and safefs.exists(fd, target.name):
                ctx.journal.done(job.id, None, note=f"skipped: {show(target)} exists")
                log.info("%s: %s exists; skipped (on_collision: skip)", item.path, target)
                self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)
                return None
            if rule.on_collision == "number":
                target = free_name(target, ctx.reserved, fd)
            self._reserve(target)
            with ctx.stats.timed("journal"):
                ctx.journal.set_output(job.id, target, _identity_at(fd, target.name))
        return target

    def check_room(self, target: Path, picture, rule: Rule) -> None:
        """FolderProblem, before the engine runs, where the output folder cannot take a file of this size."""
        from nst_core.images import fit

        fd = self._out_fd
        probe = f".nst-probe-{os.getpid()}-{self.index}.tmp"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=fd))
            os.unlink(probe, dir_fd=fd)
            vfs = os.statvfs(fd)
        except FileExistsError:
            return  # a probe left by a kill -9 of an earlier run; the write itself will tell
        except OSError as e:
            raise folder_problem(target.parent, e) from None
        h, w = fit(picture.height, picture.width, rule.params.size)
        need = h * w * (4 if picture.has_alpha else 3) * (2 if picture.bit_depth == 16 else 1) + (64 << 10)
        free = vfs.f_bavail * vfs.f_frsize
        if free < need:
            raise FolderProblem(f"the output folder {show(target.parent)} is full ({free:,} bytes free, an output of "
                                f"{w}×{h} needs up to {need:,})")

    def stylize(self, picture, styles, rule: Rule, item: Item):
        ctx = self.ctx
        running = ctx.running[self.index]

        def progress(p):
            running.step, running.total = p.step, p.total
            running.eta = p.eta
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
            if ctx.stopping.is_set() and not cancelled_for_stop:
                now = time.monotonic()
                left, needs = ctx.stop_deadline - now, running.seconds_left(now)
                if left <= 0:
                    log.warning("%s: not finished within stop_timeout; cancelling it", item.path)
                elif needs is not None and needs > left:
                    log.warning("%s: cannot finish within stop_timeout (about %.0f s of work left, %.0f s to go); "
                                "cancelling it", item.path, needs, left)
                if left <= 0 or (needs is not None and needs > left):
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
        fd = self._out_fd
        for _ in range(100):
            try:
                save_image(picture, fd_path(fd, target.name), meta, overwrite=rule.on_collision == "overwrite")
                return target
            except ImageError as e:
                if not (safefs.exists(fd, target.name) and "already exists" in e.message):
                    cause = e.__context__  # save_image's ImageError hides the OSError it came from
                    if isinstance(cause, OSError) and cause.errno not in (errno.EEXIST, errno.ENAMETOOLONG):
                        raise folder_problem(target.parent, cause) from None  # full, read-only, gone, ...
                    raise _renamed(e, fd_path(fd, target.name), target) from None
                # Someone else wrote that name since it was chosen.
                if rule.on_collision == "skip":
                    ctx.journal.done(job.id, None, note=f"skipped: {show(target)} exists")
                    self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)
                    return None
                with ctx.names_lock:
                    target = free_name(target, ctx.reserved, fd)
                    self._reserve(target)
                    ctx.journal.set_output(job.id, target, None)
        raise ImageError(target, "no free output name")

    def _reserve(self, target: Path) -> None:
        """Hold `target` against other workers (call with ctx.names_lock held)."""
        if self._reserved is not None:
            self.ctx.reserved.discard(self._reserved)
        self._reserved = target
        self.ctx.reserved.add(target)

    def _release(self) -> None:
        """Give up the output name and folder of the job that ended (done, failed, waiting or stopped)."""
        if self._reserved is not None:
            with self.ctx.names_lock:
                self.ctx.reserved.discard(self._reserved)
            self._reserved = None
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None

    # -- endings --
    def fail(self, job: Job, item: Item, rule: Rule, error: dict) -> None:
        self.ctx.journal.failed(job.id, error)
        self.ctx.stats.count("failed")
        log.warning("%s: failed (rule %s): %s", item.path, rule.name, error.get("message"))
        self.finish_input(self.ctx.journal.get(job.id), item, rule, ok=False)

    def finish_input(self, job: Job, item: Item, rule: Rule, ok: bool) -> None:
        finish_input(self.ctx, job, item, rule, ok)


def finish_input(ctx, job: Job, item: Item, rule: Rule, ok: bool) -> None:
    """Move the input to processed/ or failed/ (failures get a sidecar first); idempotent after a crash.

    A success removes the sidecar of an earlier failure of the same input. A link where one of
    those folders should be blocks the rule (ctx.block): nothing is moved through it.
    """
    t0 = time.perf_counter()
    try:
        if ok and job.sidecar:
            _remove_sidecar(ctx, job, rule, item.root, Path(job.sidecar))
        if ok and not rule.keep_inputs:  # the error file of this name whose input left failed/ (moved back)
            failed = _failed_place(rule, item.root, item.path).path
            if not os.path.lexists(failed / item.path.name):
                _remove_sidecar(ctx, job, rule, item.root, failed / sidecar_name(item.path.name))
        if rule.keep_inputs:
            folder = _failed_place(rule, item.root, item.path)
            if ok:
                _remove_sidecar(ctx, job, rule, item.root, folder.path / sidecar_name(item.path.name))
            else:
                side = write_sidecar(folder, item.path.name, job, item, rule)
                ctx.journal.set_sidecar(job.id, side)
            return
        dest = Path(job.dest_path) if job.dest_path else None
        folder = (_processed_place if ok else _failed_place)(rule, item.root, item.path)
        if dest is not None and dest.parent != folder.path:
            dest = None  # decided under another configuration
        dfd = folder.open(create=True)
        try:
            if dest is None:
                dest = folder.path / free_name(folder.path / item.path.name, set(), dfd).name
                ctx.journal.set_dest(job.id, dest)
            if not ok:
                side = write_sidecar(folder, dest.name, job, item, rule, dfd)
                ctx.journal.set_sidecar(job.id, side)
            if os.path.lexists(item.path) and Identity.at(item.path) == job.input:
                src = Place.under(item.root, item.path.parent).open()
                try:
                    safefs.move(src, item.path.name, dfd, dest.name)
                finally:
                    os.close(src)
                ctx.journal.moved(job.id, dest)
        finally:
            os.close(dfd)
    except LinkRefused as e:
        ctx.block(rule.name, folder_problem(e.path, e).message)
    except OSError as e:
        log.error("%s: cannot move it to %s: %s (tried again at the next scan)",
                  item.path, "processed" if ok else "failed", e)
    finally:
        ctx.stats.add("move", time.perf_counter() - t0)


def move_duplicate(ctx, item: Item, rule: Rule) -> Path:
    """Move an input whose content was done already to processed/ (OSError, LinkRefused as they come)."""
    folder = _processed_place(rule, item.root, item.path)
    dfd = folder.open(create=True)
    try:
        dest = folder.path / free_name(folder.path / item.path.name, set(), dfd).name
        src = Place.under(item.root, item.path.parent).open()
        try:
            safefs.move(src, item.path.name, dfd, dest.name)
        finally:
            os.close(src)
        return dest
    finally:
        os.close(dfd)


def _processed_place(rule: Rule, root: Path, path: Path) -> Place:
    return Place.under(root, rule.processed_dir(root)).child(*_relative(path, root).parts[:-1])


def _failed_place(rule: Rule, root: Path, path: Path) -> Place:
    return Place.under(root, rule.failed_dir(root)).child(*_relative(path, root).parts[:-1])


def sidecar_name(name: str, limit: int = 255) -> str:
    """<input name>.error.json, shortened to fit the name limit."""
    return fit_name(name, limit, SIDECAR_SUFFIX)


def write_sidecar(folder: Place, name: str, job: Job, item: Item, rule: Rule, dfd: int | None = None) -> Path:
    """<name>.error.json in `folder`: what failed and why, written atomically; returns its path."""
    error = dict(job.error or {"kind": "unknown", "message": "unknown error"})
    error = {k: show(v) if isinstance(v, str) else v for k, v in error.items()}
    data = {
        "input": show(item.path),
        "rule": rule.name,
        "rule_version": rule.version,
        "error": error,
        "message": error.get("message", "unknown error"),
        "attempts": job.attempts,
        "content_sha256": job.content_hash if len(job.content_hash) == 64 else None,
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    text = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    own = dfd is None
    if own:
        dfd = folder.open(create=True)
    try:
        side = sidecar_name(name, name_max(dfd))
        try:
            atomic_write(fd_path(dfd, side), lambda f: f.write(text))
        except OSError as e:
            raise OSError(f"cannot write {show(folder.path / side)}: {e.strerror or e}") from None
    finally:
        if own:
            os.close(dfd)
    return folder.path / side


def _remove_sidecar(ctx, job: Job, rule: Rule, root: Path, side: Path) -> None:
    """Remove the error file of an earlier failure (reached without links); forget it in the journal."""
    base = Place.under(root, rule.failed_dir(root))
    try:
        rel = side.parent.relative_to(base.path)
    except ValueError:
        rel = None
    if rel is not None:
        try:
            dfd = base.child(*rel.parts).open()
        except OSError:
            dfd = None
        if dfd is not None:
            try:
                os.unlink(side.name, dir_fd=dfd)
                log.info("%s: removed %s, the error of an earlier attempt", job.in_path, side)
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)
    if job.sidecar:
        ctx.journal.set_sidecar(job.id, None)


def free_name(path: Path, reserved: set, dir_fd: int | None = None) -> Path:
    """path, or path with -1, -2, … before the extension: the first name that is neither taken nor reserved.

    Names are shortened to fit the file system's limit; with `dir_fd` (path's folder, open) names are
    looked up in that folder without following links."""
    limit = name_max(dir_fd if dir_fd is not None else path.parent)
    n = 0
    while True:
        p = path.with_name(numbered(path.name, n, limit))
        taken = safefs.exists(dir_fd, p.name) if dir_fd is not None else os.path.lexists(p)
        if not taken and p not in reserved:
            return p
        n += 1


def _identity_at(dir_fd: int, name: str) -> Identity | None:
    try:
        return Identity.of(os.lstat(name, dir_fd=dir_fd))
    except OSError:
        return None


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def _renamed(e: ImageError, shown: Path, real: Path) -> ImageError:
    """The same error, naming `real` where it named `shown` (a /proc/self/fd path)."""
    message = e.message
    prefix = f"{shown}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    return ImageError(real, message.replace(str(shown), str(real)))


def folder_problem(folder: Path, e: OSError) -> FolderProblem:
    if isinstance(e, LinkRefused):
        return FolderProblem(f"{show(e.path)} {e.what} (remove it; to keep files on another disk, configure "
                             "that folder's real path)")
    return FolderProblem(f"cannot write in {show(folder)} ({e.strerror or e})")


def _environmental(e: NSTError) -> bool:
    """Errors of the machine, not of the input: the job waits instead of failing."""
    return (isinstance(e, (WeightsError, FolderProblem)) or e.kind == "rule"
            or (isinstance(e, DeviceError) and not isinstance(e, OutOfMemory)))
