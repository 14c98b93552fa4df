"""The job queue of the service: one worker thread per device, interactive jobs first.

Embeddable: the daemon runs a `Scheduler` in-process for its folder jobs (priority "batch") and
hands the same scheduler to a `ServiceServer` for GIMP's jobs ("interactive").

    scheduler = Scheduler(devices=("auto",)); scheduler.start()
    job = scheduler.submit(picture_or_path, [style], StyleParams(...), priority="batch")
    result = job.result()          # engine Result, or raises the NSTError / Cancelled
    scheduler.stop(cancel_running=False)

With `cluster="auto"` or `"HOST:PORT"` the workers are Ray actors, one per GPU of a Ray cluster,
that come and go with the cluster's nodes (cluster.py); jobs wait while there are none.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent import futures
from contextlib import suppress
from typing import Callable

from ..errors import (Cancelled, DeviceError, InternalError, NSTError, OutOfMemory, ParamError, QueueFull,
                      ServiceStopping, WorkerLost)
from ..params import StyleParams

log = logging.getLogger("nst_core.service")

PRIORITIES = {"interactive": 0, "batch": 1}


class JobHandle:
    """A submitted job: cancel it, poll it, or wait for its engine `Result`.

    Its outcome is a `concurrent.futures.Future` (`future`, for `concurrent.futures.wait` and
    friends); `cancel` differs from the Future's: it also stops a job that is running, which then
    ends with `Cancelled`.
    """

    def __init__(self, scheduler, seq, content, styles, params, priority, progress, allow_cpu_fallback, client,
                 on_event, eligible):
        self.id = f"j{seq}"
        self.seq = seq
        self.content = content
        self.styles = list(styles)
        self.params = params
        self.priority = priority
        self.allow_cpu_fallback = allow_cpu_fallback
        self.client = client
        self.position = 0
        self.state = "queued"  # running, done, failed, cancelled
        self.device: str | None = None
        self.step = 0
        self.total = params.iterations
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self._scheduler = scheduler
        self._progress = progress
        self._on_event = on_event
        self._eligible = eligible
        self._cancel = threading.Event()
        self._cancel_requested = False
        self._stopped_by_service = False
        self.future: futures.Future = futures.Future()  # cancel the job, not this: see cancel()
        self._ending = False  # set once, under _lock, by the first _finish
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Cancel: a queued job never runs, a running one stops within one optimiser step."""
        self._cancel_requested = True
        self._cancel.set()
        self._scheduler._dequeue(self, Cancelled("cancelled before it started"))

    def done(self) -> bool:
        return self.future.done()

    def _cancel_for_stop(self) -> None:
        """Cancel because the service is going away: the job ends with ServiceStopping."""
        self._stopped_by_service = True
        self._cancel.set()
        self._scheduler._dequeue(self, ServiceStopping("the service is shutting down; the job did not run"))

    def result(self, timeout: float | None = None):
        """The engine's Result; raises the job's NSTError (Cancelled when cancelled), or
        TimeoutError when it has not ended within `timeout` seconds."""
        try:
            return self.future.result(timeout)
        except futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise TimeoutError(f"job {self.id} has not finished after {timeout} s") from None

    def add_done_callback(self, fn: Callable[["JobHandle"], None]) -> None:
        """Call fn(job) when it ends (at once if it has), from the thread that ends it."""
        self.future.add_done_callback(lambda _future: fn(self))

    def summary(self) -> dict:
        now = time.monotonic()
        return {
            "job_id": self.id, "priority": self.priority, "state": self.state, "client": self.client,
            "device": self.device, "step": self.step, "total": self.total, "size": self.params.size,
            "waited": round((self.started or now) - self.submitted, 3),
            "elapsed": round(now - self.started, 3) if self.started else 0.0,
        }

    # -- called by the scheduler --

    def _event(self, kind: str, data: dict) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:
                log.exception("job %s: event callback failed", self.id)

    def _on_progress(self, p) -> None:
        self.step, self.total = p.step, p.total
        if self._progress is not None:
            self._progress(p)

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._ending:
                return
            self._ending = True
            self.content, self.styles = None, []  # the pixels go now, not with the handle
            self.finished = time.monotonic()
            if error is None:
                self.state = "done"
            elif isinstance(error, Cancelled):
                self.state = "cancelled"
            else:
                self.state = "failed"
            self._scheduler._ended(self)  # counted before anyone waiting on the job sees it end
        with suppress(futures.InvalidStateError):  # a future cancelled by hand
            if error is None:  # callbacks run here, in this thread; the Future logs any that fails
                self.future.set_result(result)
            else:
                self.future.set_exception(error)


class Worker:
    """A device and its warm Session; or, for a cluster worker, `remote` (cluster.Remote) and a name."""

    def __init__(self, device: str, session, remote=None):
        self.device = device
        self.session = session
        self.remote = remote
        self.gone = False  # a cluster worker that left: its thread ends
        self.job: JobHandle | None = None
        self.thread: threading.Thread | None = None


class Scheduler:
    """A bounded priority queue and one worker thread (with one warm engine Session) per device."""

    def __init__(self, devices=("auto",), max_queue: int = 64, session_factory=None, cluster: str | None = None,
                 cluster_resource: str = "GPU"):
        if isinstance(devices, str):
            devices = [devices]
        self.requested_devices = list(devices) or ["auto"]
        if max_queue < 1:
            raise ParamError("max_queue", f"must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self._session_factory = session_factory or _new_session
        self.work_limits: dict[str, int] = {}  # device → the most pixels a job may work at there
        self._cond = threading.Condition()
        self._queue: list[JobHandle] = []
        self._workers: list[Worker] = []
        self._seq = itertools.count(1)
        self._started = False
        self._stopping = False
        self._cpu_session = None
        self.counts = {"done": 0, "failed": 0, "cancelled": 0}
        self.last_activity = time.monotonic()
        self.cluster_address = cluster
        self.cluster_resource = cluster_resource
        self.cluster = None  # cluster.Cluster once started
        self.on_change: Callable[[], None] | None = None  # told when cluster workers join or leave

    @property
    def devices(self) -> list[str]:
        return [w.device for w in self._workers]

    def start(self) -> None:
        """Resolve the devices (DeviceError if one is absent) and start one worker per device; with a
        cluster, join it (ClusterError) and take its workers as they come."""
        with self._cond:
            if self._started:
                return
            if self.cluster_address:
                from .cluster import Cluster

                self.cluster = Cluster(self, self.cluster_address, self.cluster_resource)
                self.cluster.start()
                self._started = True
                return
            from ..devices import pick_device, stable_name

            resolved = []
            for name in self.requested_devices:
                dev = stable_name(pick_device(name))
                if dev not in resolved:
                    resolved.append(dev)
            from .limits import max_work_pixels

            for dev in resolved:
                self.work_limits[dev] = max_work_pixels(dev)
                worker = Worker(dev, self._session_factory(dev))
                worker.thread = threading.Thread(target=self._work, args=(worker,), name=f"nst-worker-{dev}",
                                                 daemon=True)
                self._workers.append(worker)
            self._started = True
        for w in self._workers:
            w.thread.start()
        log.info("workers on %s", ", ".join(self.devices))

    def submit(self, content, styles, params: StyleParams, *, priority: str = "batch", progress=None,
               allow_cpu_fallback: bool = False, client: str | None = None, on_event=None) -> JobHandle:
        """Queue a job. Raises QueueFull, ServiceStopping, or DeviceError (device not served).

        progress(engine Progress) runs on the worker thread after every step. on_event(kind, data)
        gets "started" ({"device"}) and "notice" ({"message"}).
        """
        if priority not in PRIORITIES:
            raise ParamError("priority", f"must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if not isinstance(params, StyleParams):
            raise ParamError("params", f"must be StyleParams, got {type(params).__name__}")
        self.start()
        with self._cond:
            if self._stopping:
                raise ServiceStopping("the service is shutting down; the job was not queued")
            eligible = self._fits(params.device)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the service is busy: its queue is full ({self.max_queue} jobs waiting); "
                                f"try again later")
            job = JobHandle(self, next(self._seq), content, styles, params, priority, progress, allow_cpu_fallback,
                            client, on_event, eligible)
            rank = (PRIORITIES[priority], job.seq)
            job.position = sum(1 for j in self._queue if (PRIORITIES[j.priority], j.seq) < rank)
            self._queue.append(job)
            self.last_activity = time.monotonic()
            self._cond.notify_all()
        log.info("job %s queued (%s, %s, size %d, %d iterations)", job.id, priority, client or "in-process",
                 params.size, params.iterations)
        return job

    def stop(self, cancel_running: bool, timeout: float | None = None) -> None:
        """Stop taking jobs: queued ones end with ServiceStopping; running ones finish or are cancelled."""
        with self._cond:
            self._stopping = True
            queued, self._queue = self._queue, []
            running = [w.job for w in self._workers if w.job is not None]
            self._cond.notify_all()
        for job in queued:
            job._finish(error=ServiceStopping("the service is shutting down; the job did not run"))
        if cancel_running:
            for job in running:
                job._cancel.set()
        for w in list(self._workers):
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join(timeout)
        if self.cluster is not None:
            self.cluster.stop()

    def add_worker(self, worker: Worker, work_limit: int) -> None:
        """A cluster worker joins: its thread starts taking jobs."""
        with self._cond:
            if self._stopping:
                return
            self.work_limits[worker.device] = work_limit
            worker.thread = threading.Thread(target=self._work, args=(worker,), name=f"nst-worker-{worker.device}",
                                             daemon=True)
            self._workers.append(worker)
            self._cond.notify_all()
        worker.thread.start()
        self.changed()

    def remove_worker(self, worker: Worker) -> None:
        """A cluster worker left: it takes no more jobs (the one it runs ends with WorkerLost)."""
        with self._cond:
            worker.gone = True
            if worker in self._workers:
                self._workers.remove(worker)
            self._cond.notify_all()
        self.changed()

    def add_remote(self, name: str, remote, work_limit: int) -> None:
        """A cluster worker joins (cluster.Remote: its actor); its thread starts taking jobs."""
        self.add_worker(Worker(name, None, remote=remote), work_limit)

    def cluster_workers(self) -> list[Worker]:
        """The cluster workers serving now."""
        with self._cond:
            return [w for w in self._workers if w.remote is not None]

    def changed(self) -> None:
        """Tell on_change (the daemon's STATUS) that the workers changed."""
        if self.on_change is not None:
            self.on_change()

    def cancel_running(self) -> None:
        """Cancel the jobs that are running now (queued ones stay)."""
        with self._cond:
            for w in self._workers:
                if w.job is not None:
                    w.job._cancel.set()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and all(w.job is None for w in self._workers)

    def status(self) -> dict:
        with self._cond:
            queue = sorted(self._queue, key=lambda j: (PRIORITIES[j.priority], j.seq))
            workers = [(w, w.job) for w in self._workers]
            counts = dict(self.counts)
        out = {
            "devices": [w.device for w, _ in workers],
            "workers": [{"device": w.device, "running": job.summary() if job else None,
                         **({"node": w.remote.stats()} if w.remote else {"cache": _stats(w.session)})}
                        for w, job in workers],
            "queue": {"interactive": sum(1 for j in queue if j.priority == "interactive"),
                      "batch": sum(1 for j in queue if j.priority == "batch"),
                      "max": self.max_queue, "jobs": [j.summary() for j in queue]},
            "jobs": counts,
        }
        if self.cluster is not None:
            out["cluster"] = {"address": self.cluster_address, "resource": self.cluster_resource,
                              "nodes": self.cluster.nodes, "workers": len(workers)}
        return out

    # -- internals --

    def _fits(self, wanted: str) -> Callable[[Worker], bool]:
        """Which workers may run a job for device `wanted` (DeviceError when no local worker can)."""
        if self.cluster_address:  # workers come and go: "cuda" or "cuda:N" means a GPU worker anywhere
            kind = wanted.partition(":")[0]
            return lambda w: wanted == "auto" or w.remote.info["device"].partition(":")[0] == kind
        match = self._eligible(wanted)
        return lambda w: w in match

    def _eligible(self, wanted: str) -> list[Worker]:
        if self.cluster_address:
            fits = self._fits(wanted)
            return [w for w in self._workers if fits(w)]
        if wanted == "auto":
            return list(self._workers)
        match = [w for w in self._workers if w.device == wanted or (wanted == "cuda" and w.device.startswith("cuda:"))]
        if not match:
            raise DeviceError(f"device {wanted}: this service runs on {', '.join(self.devices)}; use device auto, "
                              f"or start a service for {wanted} (nst serve --device {wanted})")
        return match

    def _dequeue(self, job: JobHandle, error: BaseException) -> None:
        with self._cond:
            if job not in self._queue:
                return
            self._queue.remove(job)
        job._finish(error=error)

    def _ended(self, job: JobHandle) -> None:
        with self._cond:
            for w in self._workers:
                if w.job is job:
                    w.job = None
            self.counts[job.state] += 1
            self.last_activity = time.monotonic()

    def _take(self, worker: Worker) -> JobHandle | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if worker.gone:
                    return None
                mine = [j for j in self._queue if j._eligible(worker)]
                if mine:
                    job = min(mine, key=lambda j: (PRIORITIES[j.priority], j.seq))
                    self._queue.remove(job)
                    job.state = "running"
                    job.device = worker.device
                    job.started = time.monotonic()
                    worker.job = job
                    return job
                self._cond.wait()

    def _work(self, worker: Worker) -> None:
        while True:
            job = self._take(worker)
            if job is None:
                return
            try:
                self._run(worker, job)
            finally:
                if not job.done():  # not reached by _run's own handlers (a BaseException)
                    job._finish(error=InternalError("internal error in the service: the job was interrupted"))
            took = (job.finished or time.monotonic()) - job.started
            log.info("job %s %s in %.2f s on %s", job.id, job.state, took, worker.device)

    def _run(self, worker: Worker, job: JobHandle) -> None:
        from .. import devices
        from ..engine import stylize
        from ..images import Picture, load_image
        from .limits import check_work

        job._event("started", {"device": worker.device})
        if worker.remote is not None:
            return self._run_remote(worker, job)
        params = job.params if job.params.device == worker.device else job.params.replace(device=worker.device)
        try:
            if job._cancel.is_set():
                raise Cancelled("cancelled")
            content = job.content if isinstance(job.content, Picture) else load_image(job.content)
            styles = [s if isinstance(s, Picture) else load_image(s) for s in job.styles]
            check_work((content.height, content.width), [(s.height, s.width) for s in styles], params,
                       self.work_limits[worker.device], worker.device)
            try:
                result = stylize(content, styles, params, progress=job._on_progress, cancel=job._cancel,
                                 session=worker.session)
            except OutOfMemory as e:
                _free_memory(worker.device)
                if not job.allow_cpu_fallback or worker.device == "cpu":
                    raise
                message = f"{e.message}; retrying once on the CPU"
                log.warning("job %s: %s", job.id, message)
                job._event("notice", {"message": message})
                result = stylize(content, styles, params.replace(device="cpu"), progress=job._on_progress,
                                 cancel=job._cancel, session=self._cpu())
            job._finish(result=result)
        except Exception as e:
            if not isinstance(e, NSTError) and devices.is_out_of_memory(e):  # host memory, outside the engine's check
                _free_memory(worker.device)
                e = OutOfMemory(f"out of memory on {worker.device} at size {params.size}: "
                                f"use a smaller size ({type(e).__name__}: {e})")
            self._fail(job, e)

    def _run_remote(self, worker: Worker, job: JobHandle) -> None:
        from .cluster import run_remote

        try:
            if job._cancel.is_set():
                raise Cancelled("cancelled")
            job._finish(result=run_remote(self, worker, job))
        except Exception as e:
            if isinstance(e, WorkerLost):
                self.remove_worker(worker)  # its actor is dead or unreachable; the cluster makes a new one
            self._fail(job, e)

    def _fail(self, job: JobHandle, e: Exception) -> None:
        """End `job` with `e` (called from the except block): a stop by the service, an error for the
        user, or a bug, which is logged with its traceback while the service keeps serving."""
        if isinstance(e, Cancelled) and (job._stopped_by_service or (self._stopping and not job._cancel_requested)):
            e = ServiceStopping("the service is shutting down; the job was stopped")
        if not isinstance(e, NSTError):
            log.exception("job %s failed", job.id)
            e = InternalError(f"internal error in the service: {type(e).__name__}: {e}")
        job._finish(error=e)

    def _cpu(self):
        with self._cond:
            for w in self._workers:
                if w.device == "cpu":
                    return w.session
            if self._cpu_session is None:
                self._cpu_session = self._session_factory("cpu")
            return self._cpu_session


def _new_session(device: str):
    from ..engine import Session

    return Session()


def _stats(session) -> dict:
    try:
        return dict(session.stats())
    except Exception as e:  # status must never fail because of the cache
        return {"error": str(e)}


def _free_memory(device: str) -> None:
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
