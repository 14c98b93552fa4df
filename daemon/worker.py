"""The folder worker: one folder job from the journal to its output, and the order of its steps
that makes them crash-safe.

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

Two queues lie between a settled file and the engine, on purpose. The daemon's `JobQueue` holds
journal jobs (a few bytes each, unbounded: 1000 files dropped at once are 1000 entries, nothing
decoded), deduplicated and dropped per rule at a block or reload; a folder worker takes one,
decodes it, names and records its output and, once the engine is done, writes and moves the files.
That file work belongs to the daemon (it owns the folders and the journal; with a farm the engine
runs elsewhere) and must not hold a device. The Scheduler's queue holds decoded jobs for the
devices: bounded, interactive (GIMP) before batch, shared with the socket's clients. With one
folder worker per device, each with at most one job there, the daemon holds one decoded picture per
device, and an interactive job waits only for the jobs running.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from nst_core.errors import (Cancelled, DeviceError, ImageError, NSTError, OutOfMemory, QueueFull, ServiceStopping,
                             WeightsError, WorkerLost)
from nst_core.outputs import metadata, name_max, refuse_inputs

from . import safefs
from .rules import Rule
from .inputs import FolderProblem, finish_input, folder_problem, free_name
from .jobs import FolderContext, Item, Running
from .journal import Identity, Job
from .names import fit_name, show
from .safefs import LinkRefused, Place, fd_path

log = logging.getLogger("nst-daemon")


class RuleError(NSTError):
    """A rule's style image cannot be used at job time (changed or removed since the config was read)."""

    kind = "rule"


class StyleCache:
    """The rules' style images, decoded once for each version of the file."""

    def __init__(self):
        self._pictures: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def __call__(self, rule: Rule) -> list:
        from nst_core.images import load_image

        out = []
        for p in rule.styles:
            try:
                st = os.stat(p)
            except OSError as e:
                raise RuleError(f"rule {rule.name}: style image {p}: {e.strerror or e}") from None
            key = (str(p), st.st_size, st.st_mtime_ns)
            with self._lock:
                pic = self._pictures.get(key)
            if pic is None:
                try:
                    pic = load_image(p)
                except NSTError as e:
                    raise RuleError(f"rule {rule.name}: style image: {e.message}") from None
                with self._lock:
                    self._pictures[key] = pic
            out.append(pic)
        return out


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


class FolderWorker(threading.Thread):
    """Takes items from the queue and runs them, one at a time, through the shared Scheduler."""

    def __init__(self, ctx: FolderContext, index: int):
        super().__init__(name=f"nst-folder-{index}", daemon=True)
        self.ctx = ctx
        self.index = index
        self._reserved: Path | None = None  # the output name this worker holds (ctx.names)
        self._out_fd: int | None = None  # the output folder of the running job, opened without links

    def run(self) -> None:
        ctx = self.ctx
        while not ctx.stopping.is_set():
            item = ctx.queue.get(timeout=0.5)
            if item is None:
                continue
            try:
                self.take(item)
            except Exception:  # never let one job end the worker
                log.exception("job %d (%s): unexpected error", item.job_id, item.path)
            finally:
                ctx.running.pop(self.index, None)
                ctx.queue.release(item.job_id)
                ctx.changed()

    # -- one job --
    def take(self, item: Item) -> None:
        """Run the queued job `item` unless it is stale; settle its outcome in the journal and the folders."""
        ctx = self.ctx
        journal = ctx.journal
        config = ctx.config()
        rule = config.rule(item.rule)
        job = journal.get(item.job_id)
        if job is None or job.state != "queued":
            return  # done meanwhile, or taken by another instance
        if rule is None or rule.version != item.version or item.root not in rule.watch:
            journal.forget(job.id)  # the rule changed before the job ran: found again under the new one
            ctx.look_again(item.path, 0.0, None)
            return
        if rule.name in ctx.blocks:
            return  # stays queued in the journal; the next scan brings it back
        ident = Identity.at(item.path)
        if not job.same_input(item.path, ident):
            journal.forget(job.id)
            if ident is not None:
                ctx.look_again(item.path, 0.0, None)  # rewritten since it settled: settle again
            return
        if job.attempts >= config.settings.max_attempts:
            message = (f"gave up after {job.attempts} attempts: each ended without a result (the daemon, or the "
                       "cluster worker running it, died: a crash, the watchdog, the out-of-memory killer or a lost "
                       "node)")
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
            self.run_rule_job(job, item, rule)
        except WorkerLost as e:  # costs the attempt; the file is taken again at once, by another worker
            journal.requeue(job.id, count_attempt=True)
            ctx.stats.count("lost")
            log.warning("%s: %s (attempt %d of %d); queued again", item.path, e.message, job.attempts,
                        config.settings.max_attempts)
            ctx.look_again(item.path, 0.5, None)  # (after this worker has let go of the job's id)
        except Requeue as r:
            journal.requeue(job.id, count_attempt=r.count_attempt)
            if r.wait is not None:
                journal.forget(job.id)  # found again, and hashed again, when it is looked at next
                ctx.look_again(item.path, r.wait, r.st)
                log.info("%s: %s; looked at again in %.1f s", item.path, r, r.wait)
            else:
                log.info("%s: %s; queued again", item.path, r)
        except NSTError as e:
            if machine_problem(e):
                journal.requeue(job.id)
                ctx.blocks.block(rule.name, e.message)
            else:
                self.fail(job, item, rule, e.to_mapping())
        except Exception as e:  # a bug; the daemon keeps going and the file says why
            log.exception("%s: internal error", item.path)
            self.fail(job, item, rule, {"kind": "internal", "message": f"internal error: {type(e).__name__}: {e}"})
        finally:
            self._release()

    def run_rule_job(self, job: Job, item: Item, rule: Rule) -> None:
        """The claimed job's steps, from decoding the input to moving it (the module's docstring)."""
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
        result = self.submit_and_wait(picture, styles, rule, item)
        stats.add("engine", time.perf_counter() - t0)
        meta = metadata(result, "nst-daemon", rule=rule.name, rule_version=rule.version, source=show(item.path.name))
        with stats.timed("write"):
            target = self.write(job, item, rule, result.picture, target, meta)
        if target is None:
            return
        with stats.timed("journal"):
            ctx.journal.done(job.id, target)
        stats.count("done")
        running = ctx.running[self.index]
        log.info("%s → %s (rule %s, %.1f s on %s)", item.path, target, rule.name, time.monotonic() - running.started,
                 running.device)
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
        with ctx.names.lock:
            if rule.on_collision == "skip" and safefs.exists(fd, target.name):
                ctx.journal.done(job.id, None, note=f"skipped: {show(target)} exists")
                log.info("%s: %s exists; skipped (on_collision: skip)", item.path, target)
                self.finish_input(ctx.journal.get(job.id), item, rule, ok=True)
                return None
            if rule.on_collision == "number":
                target = free_name(target, ctx.names.held, fd)
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

    def submit_and_wait(self, picture, styles, rule: Rule, item: Item):
        """The engine's Result, through the Scheduler (batch priority); a stop cancels a job that
        cannot end within stop_timeout, and a stopped job is a Requeue."""
        ctx = self.ctx
        running = ctx.running[self.index]

        def progress(p):
            running.step, running.total = p.step, p.total
            running.eta = p.eta
            running.last_progress = time.monotonic()

        def on_event(kind, data):
            if kind == "started":
                running.device = data.get("device")
                running.last_progress = time.monotonic()  # the wait for a device was no stall
                log.info("%s: started on %s", item.path, running.device)
                ctx.changed()

        while True:
            try:
                handle = ctx.scheduler.submit(picture, styles, rule.params, priority="batch", progress=progress,
                                              client=f"nst-daemon:{rule.name}", on_event=on_event)
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
                left, needs = ctx.stop_deadline() - now, running.seconds_left(now)
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
                with ctx.names.lock:
                    target = free_name(target, ctx.names.held, fd)
                    self._reserve(target)
                    ctx.journal.set_output(job.id, target, None)
        raise ImageError(target, "no free output name")

    def _reserve(self, target: Path) -> None:
        """Hold `target` against other workers (call with ctx.names.lock held)."""
        if self._reserved is not None:
            self.ctx.names.held.discard(self._reserved)
        self._reserved = target
        self.ctx.names.held.add(target)

    def _release(self) -> None:
        """Give up the output name and folder of the job that ended (done, failed, waiting or stopped)."""
        if self._reserved is not None:
            with self.ctx.names.lock:
                self.ctx.names.held.discard(self._reserved)
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


def _identity_at(dir_fd: int, name: str) -> Identity | None:
    try:
        return Identity.of(os.lstat(name, dir_fd=dir_fd))
    except OSError:
        return None


def _renamed(e: ImageError, shown: Path, real: Path) -> ImageError:
    """The same error, naming `real` where it named `shown` (a /proc/self/fd path)."""
    message = e.message
    prefix = f"{shown}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    return ImageError(real, message.replace(str(shown), str(real)))


def machine_problem(e: NSTError) -> bool:
    """Errors of the machine, not of the input: the job waits instead of failing."""
    return (isinstance(e, (WeightsError, FolderProblem)) or e.kind == "rule"
            or (isinstance(e, DeviceError) and not isinstance(e, OutOfMemory)))
