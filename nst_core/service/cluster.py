"""The scheduler's cluster backend: one Ray actor per GPU of a Ray cluster, each with a warm Session.

Used when a `Scheduler` is given a cluster address (`settings.cluster`, `--cluster`); nothing else
imports ray, which is the optional extra `neural-style[cluster]`.

    Cluster(scheduler, "auto" | "HOST:PORT", resource="GPU").start()   # ClusterError: exit 2

Membership: a thread reads `ray.nodes()` every `poll` seconds and keeps one `StyleWorker` actor per
unit of `resource` on each live node (`num_gpus=1` for "GPU", else `resources={name: 1}`, the
custom resource that stands in for a GPU on CPU machines), pinned to that node. An actor that
answers joins the scheduler as a worker named HOST[NODE]/DEVICE; the actors of a node that left are
forgotten. Until one joins, jobs wait in the scheduler's queue.

A job (`run_remote`, on the scheduler's worker thread): the pictures and StyleParams go to the actor
by value (style pictures are put in the object store once), the engine Result comes back by value.
Progress is polled: every PROGRESS_POLL s the thread asks the actor for its last step (numbers
only; a cluster job sends no preview image). Cancel: the thread calls the actor's cancel(token),
which sets the engine's cancel flag. An actor that dies, or whose node leaves, mid-job ends the job
with WorkerLost (the daemon reruns it elsewhere, counting an attempt).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import weakref

from ..errors import (Cancelled, ClusterError, DeviceError, ImageError, InternalError, NSTError, OutOfMemory,
                      ParamError, WeightsError, WorkerLost)

log = logging.getLogger("nst_core.service")

POLL = 3.0  # seconds between looks at the cluster's nodes
PROGRESS_POLL = 0.25  # seconds between progress questions to the actor running a job
JOIN_TIMEOUT = 300.0  # seconds an actor may take to start (load torch) before it is given up
JOIN_PATIENCE = 30.0  # seconds the daemon retries a head that listens but is not ready (its start)
_ERRORS = {c.kind: c for c in (Cancelled, DeviceError, OutOfMemory, WeightsError, ImageError, ParamError,
                               InternalError, NSTError)}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("cluster: Ray is not installed; install the cluster extra "
                           "(pip install 'neural-style[cluster]')") from None
    return ray


def check_address(address: str) -> str | None:
    """Why `address` is not a cluster address (auto, or HOST:PORT), or None."""
    if address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be auto or HOST:PORT of the Ray head (e.g. 10.0.0.5:6379), got {address!r}"
    return None


def check_resource(name: str) -> str | None:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        return f"must be GPU or the name of a custom Ray resource (letters, digits, _ and -), got {name!r}"
    return None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` as a driver; ClusterError naming it when that fails."""
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:  # fail in seconds with a plain reason, before Ray's own retries
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise ClusterError(f"cluster {address}: cannot reach the Ray head there ({e.strerror or e}); start it "
                               f"with `ray start --head --port={port}` or fix settings.cluster") from None
    ray = _import_ray()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    end = time.monotonic() + JOIN_PATIENCE
    try:
        while True:
            try:
                ray.init(address=address, namespace="nst", log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False)
                break
            except Exception as e:  # ConnectionError, or Ray's own for a head still starting or not one
                if time.monotonic() > end:
                    why = str(e).strip().splitlines()[0] if str(e).strip() else "no reason given"
                    raise ClusterError(f"cluster {address}: cannot join the Ray cluster ({type(e).__name__}: "
                                       f"{why})") from None
                time.sleep(2)
    finally:
        for sig, handler in handlers.items():  # ray.init sets its own, which exit at once
            signal.signal(sig, handler)


class StyleWorker:
    """A Ray actor on a GPU node: a warm Session on its device, one job at a time.

    Runs with max_concurrency > 1 so that progress() and cancel() answer while run() works."""

    def __init__(self):
        from ..runtime import prepare_process

        prepare_process()
        from ..devices import pick_device, stable_name
        from ..engine import Session
        from .limits import max_work_pixels

        self.device = stable_name(pick_device("auto"))
        self.session = Session()
        self.work_limit = max_work_pixels(self.device)
        self._lock = threading.Lock()
        self._token = None
        self._cancel = threading.Event()
        self._cancelled: set = set()
        self._progress: dict | None = None

    def info(self) -> dict:
        import ray

        return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": self.device, "pid": os.getpid(), "work_limit": self.work_limit}

    def run(self, token, content, styles, params):
        """("ok", engine Result) or ("error", NSTError.to_mapping()): an error crosses as its mapping."""
        import ray

        from .. import devices
        from ..engine import stylize
        from .limits import check_work

        styles = [ray.get(s) if isinstance(s, ray.ObjectRef) else s for s in styles]
        with self._lock:
            self._token, self._cancel, self._progress = token, threading.Event(), None
            if token in self._cancelled:
                self._cancel.set()
        try:
            check_work((content.height, content.width), [(s.height, s.width) for s in styles], params,
                       self.work_limit, self.device)
            result = stylize(content, styles, params.replace(device=self.device), progress=self._on_progress,
                             cancel=self._cancel, session=self.session)
            return "ok", result
        except NSTError as e:
            return "error", e.to_mapping()
        except Exception as e:
            if devices.is_out_of_memory(e):
                return "error", {"kind": "out_of_memory",
                                 "message": f"out of memory on {self.device} at size {params.size}: use a "
                                            f"smaller size ({type(e).__name__}: {e})"}
            return "error", {"kind": "internal",
                             "message": f"internal error on cluster worker {socket.gethostname()}: "
                                        f"{type(e).__name__}: {e}"}
        finally:
            with self._lock:
                self._token = None
                self._cancelled.discard(token)

    def _on_progress(self, p) -> None:
        self._progress = p.to_mapping()

    def progress(self) -> dict | None:
        return self._progress

    def cancel(self, token) -> None:
        with self._lock:
            if self._token == token:
                self._cancel.set()
            else:
                self._cancelled.add(token)  # it has not started here yet


def _rebuild(m: dict) -> NSTError:
    """The actor's error, as the NSTError subclass it was (its message and fields kept)."""
    cls = _ERRORS.get(m.get("kind"), NSTError)
    e = cls.__new__(cls)
    NSTError.__init__(e, m.get("message", "unknown error"))
    for k in ("field", "path"):
        if k in m:
            setattr(e, k, m[k])
    if cls is NSTError:
        e.kind = m.get("kind", "error")
    return e


class Remote:
    """The scheduler worker's handle on its actor."""

    def __init__(self, cluster: "Cluster", actor, info: dict):
        self.cluster = cluster
        self.actor = actor
        self.info = info
        self.node_id = info["node_id"]
        self.host = info["host"]

    def stats(self) -> dict:
        return {"node": self.host, "node_id": self.node_id, "device": self.info["device"]}


def _no_preview(max_side=None):
    return None


def run_remote(scheduler, worker, job):
    """Run `job` on the worker's actor; the engine Result, or raise the job's NSTError / WorkerLost."""
    ray = _import_ray()
    from ..engine import Progress
    from ..images import Picture, load_image

    remote: Remote = worker.remote
    actor = remote.actor
    token = f"{os.getpid()}-{id(scheduler)}-{job.id}"
    content = job.content if isinstance(job.content, Picture) else load_image(job.content)  # files are read here
    styles = [remote.cluster.put_style(s if isinstance(s, Picture) else load_image(s)) for s in job.styles]
    ref = actor.run.remote(token, content, styles, job.params)
    cancel_sent = False
    seen = None
    pending = None
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=PROGRESS_POLL)
            if ready:
                status, value = ray.get(ref)
                break
            if worker.gone:
                raise WorkerLost(f"cluster worker {worker.device} was lost while running the job (its node left "
                                 "the cluster)")
            if job._cancel.is_set() and not cancel_sent:
                actor.cancel.remote(token)
                cancel_sent = True
            if pending is not None and ray.wait([pending], timeout=0)[0]:
                p = ray.get(pending)
                pending = None
                if p and p["step"] != seen:
                    seen = p["step"]
                    job._on_progress(Progress(**p, _render=_no_preview))
            if pending is None:
                pending = actor.progress.remote()
    except ray.exceptions.RayActorError as e:
        raise WorkerLost(f"cluster worker {worker.device} was lost while running the job "
                         f"({type(e).__name__})") from None
    except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as e:
        raise WorkerLost(f"the result of cluster worker {worker.device} was lost ({type(e).__name__})") from None
    if status == "error":
        raise _rebuild(value)
    return value


_ACTOR = None


def _actor_class(ray):
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(StyleWorker)
    return _ACTOR


class Cluster:
    """The scheduler's link to the Ray cluster: joining it, and the actors as nodes come and go."""

    def __init__(self, scheduler, address: str, resource: str = "GPU", poll: float | None = None):
        self.scheduler = scheduler
        self.address = address
        self.resource = resource
        self.poll = POLL if poll is None else poll
        self._pending: list[tuple[object, object, str, float]] = []  # (actor, info ref, node id, since)
        self._styles: dict[int, tuple] = {}  # id(picture) → (weakref to it, its object reference)
        self._styles_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.nodes = 0  # live nodes that offer `resource`

    def start(self) -> None:
        connect(self.address)
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="nst-cluster", daemon=True)
        self._thread.start()
        log.info("joined the Ray cluster at %s; one worker per %s", self.address, self.resource)

    def stop(self) -> None:
        self._stop.set()
        ray = sys.modules.get("ray")
        if ray is None:  # never joined (an unreachable head is refused before Ray is imported)
            return
        for w in self.scheduler.cluster_workers():
            self._kill(w.remote.actor)
        for actor, *_ in self._pending:
            self._kill(actor)
        self._pending = []
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        if ray.is_initialized():
            ray.shutdown()

    def put_style(self, picture):
        """The style picture as an object reference, put once per picture object."""
        ray = _import_ray()
        with self._styles_lock:
            held = self._styles.get(id(picture))
            if held is not None and held[0]() is picture:
                return held[1]
            for k in [k for k, (w, _) in self._styles.items() if w() is None]:
                del self._styles[k]  # pictures gone: the rule's style changed, or a service job ended
            ref = ray.put(picture)
            self._styles[id(picture)] = (weakref.ref(picture), ref)
        return ref

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.refresh()
            except Exception:  # a hiccup of the cluster must not end membership
                log.exception("cluster %s: cannot read its nodes", self.address)

    def refresh(self) -> None:
        """Actors for the units of `resource` that joined; forget those of nodes that left."""
        ray = _import_ray()
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        self.nodes = sum(1 for n in alive.values() if n.get("Resources", {}).get(self.resource, 0) >= 1)
        for w in self.scheduler.cluster_workers():
            if w.remote.node_id not in alive:
                log.warning("cluster worker %s left (its node is gone)", w.device)
                self.scheduler.remove_worker(w)
        self._settle_pending(alive)
        have: dict[str, int] = {}
        for w in self.scheduler.cluster_workers():
            have[w.remote.node_id] = have.get(w.remote.node_id, 0) + 1
        for _, _, node_id, _ in self._pending:
            have[node_id] = have.get(node_id, 0) + 1
        for node_id, n in alive.items():
            want = int(n.get("Resources", {}).get(self.resource, 0))
            for _ in range(want - have.get(node_id, 0)):
                self._create(node_id)
        self.scheduler.changed()

    def _create(self, node_id: str) -> None:
        ray = _import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        need = {"num_gpus": 1} if self.resource == "GPU" else {"resources": {self.resource: 1}}
        actor = _actor_class(ray).options(
            num_cpus=0, max_restarts=0, max_concurrency=4, **need,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
        self._pending.append((actor, actor.info.remote(), node_id, time.monotonic()))

    def _settle_pending(self, alive: dict) -> None:
        ray = _import_ray()
        keep = []
        for actor, ref, node_id, since in self._pending:
            if node_id not in alive:
                self._kill(actor)
                continue
            if not ray.wait([ref], timeout=0)[0]:
                if time.monotonic() - since > JOIN_TIMEOUT:
                    log.warning("cluster: a worker on node %s did not start within %g s; given up", node_id[:8],
                                JOIN_TIMEOUT)
                    self._kill(actor)
                else:
                    keep.append((actor, ref, node_id, since))
                continue
            try:
                info = ray.get(ref)
            except Exception as e:  # it died while starting; the next look tries again
                log.warning("cluster: a worker on node %s died while starting (%s)", node_id[:8], type(e).__name__)
                continue
            remote = Remote(self, actor, info)
            name = f"{info['host']}[{node_id[:6]}]/{info['device']}"
            self.scheduler.add_remote(name, remote, info["work_limit"])
            log.info("cluster worker %s joined (pid %d)", name, info["pid"])
        self._pending = keep

    @staticmethod
    def _kill(actor) -> None:
        try:
            _import_ray().kill(actor, no_restart=True)
        except Exception:
            pass
