"""The Unix-socket front of the job service (docs/PROTOCOL.md).

One thread reads each connection and one writes to it (a slow client never slows a job: progress
events that it has not taken yet are replaced by newer ones). Jobs go to a `Scheduler`. Requests
are read as their bytes arrive, against deadlines and a memory budget shared by all connections
(`limits`); clients of other users are confined (`access`).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import math
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass

from ..errors import DeviceError, ImageError, NSTError
from ..params import StyleParams
from . import access, limits
from . import client as wire
from .access import ServiceSetupError
from .scheduler import PRIORITIES, InternalError, Scheduler, ServiceStopping

log = logging.getLogger("nst_core.service")

PROTOCOL_VERSION = wire.PROTOCOL_VERSION
PROGRESS_INTERVAL = 0.05  # seconds between progress events (the first and last always go)


def server_name() -> str:
    try:
        from importlib.metadata import version

        return f"neural-style {version('neural-style')}"
    except Exception:
        return "neural-style"


class ProtocolError(NSTError):
    """A request that does not follow docs/PROTOCOL.md."""

    kind = "protocol"

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def to_mapping(self) -> dict:
        m = super().to_mapping()
        if self.field:
            m["field"] = self.field
        return m


# ---- the listening socket -----------------------------------------------------------------------

def _bind(path: str, mode: int, group: str | None):
    """(listening socket, lock fd, (st_dev, st_ino)) at `path`: stale sockets replaced, live ones kept."""
    try:
        return _listen(path, mode, group)
    except OSError as e:  # a folder this user may not write, a full disk…: say so, exit 2
        where = f" ({e.filename})" if e.filename and e.filename != path else ""
        raise ServiceSetupError(f"cannot listen on {path}: {e.strerror or e}{where}") from None


def _listen(path: str, mode: int, group: str | None):
    if len(os.fsencode(path)) > 107:
        raise ServiceSetupError(f"socket path {path} is too long for a Unix socket (at most 107 bytes)")
    gid = None if group is None else access.check_socket_group(group)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o750 if gid is not None else 0o700)
        if gid is not None:
            os.chown(folder, -1, gid)
    problem = wire.socket_folder_problem(folder)
    if problem:
        raise ServiceSetupError(f"not listening on {path}: {problem}")
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceSetupError(f"a Neural Style service is already running (or starting) on {path}; "
                                   f"not taking it over") from None
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ServiceSetupError(f"{path} exists and is not a socket; not touching it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing the stale socket %s (nothing listens on it)", path)
                with _suppress(FileNotFoundError):
                    os.unlink(path)
            except OSError as e:
                raise ServiceSetupError(f"{path}: cannot tell whether a service listens there ({e})") from None
            else:
                raise ServiceSetupError(f"a service is already listening on {path}; not taking it over")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no moment with wider permissions than 0600
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(64)
        st = os.lstat(path)
        return sock, lock_fd, (st.st_dev, st.st_ino)
    except BaseException:
        os.close(lock_fd)
        raise


class _suppress:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        return t is not None and issubclass(t, self.exc)


# ---- the server ---------------------------------------------------------------------------------

class ServiceServer:
    """Accepts clients on a Unix socket and runs their jobs on `scheduler`.

    start() binds and returns; serve_forever() blocks until request_stop() (signal-safe) or the
    idle timeout; stop() closes everything. on_stop: "finish" lets the running job end, "cancel"
    cancels it. With owns_scheduler=False (the daemon) stop() leaves the scheduler running.
    """

    def __init__(self, socket_path: str, scheduler: Scheduler, mode: int = 0o600, group: str | None = None,
                 idle_exit: float = 0, on_stop: str = "finish", owns_scheduler: bool = True,
                 request_timeout: float = limits.REQUEST_TIMEOUT, memory_budget: int | None = None):
        if on_stop not in ("finish", "cancel"):
            raise ValueError(f"on_stop must be finish or cancel, got {on_stop!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be above 0, got {request_timeout!r}")
        self.socket_path = os.path.abspath(socket_path)
        self.scheduler = scheduler
        self.mode = mode
        self.group = group
        self.idle_exit = idle_exit
        self.on_stop = on_stop
        self.owns_scheduler = owns_scheduler
        self.request_timeout = float(request_timeout)
        self.budget = limits.MemoryBudget(memory_budget if memory_budget is not None else limits.max_payload())
        self.header_budget = limits.MemoryBudget(limits.HEADER_BUDGET)  # apart, so that a full one leaves status
        self.limits: dict = {}
        self._listener = None
        self._lock_fd = None
        self._identity = None
        self._connections: set[_Connection] = set()
        self._conn_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopped = False
        self._accept_thread = None
        self._started_at = time.monotonic()
        self._last_activity = time.monotonic()
        self._conn_ids = 0

    def start(self) -> None:
        """Bind (failing fast, before torch loads, when the socket is taken), start the workers."""
        self._listener, self._lock_fd, self._identity = _bind(self.socket_path, self.mode, self.group)
        try:
            self.scheduler.start()
            self.limits = limits.announced(self.budget.total, max(self.scheduler.work_limits.values()),
                                           self.request_timeout)
        except BaseException:
            self._listener.close()
            self._listener = None
            self._unlink_socket()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._started_at = self._last_activity = time.monotonic()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nst-accept", daemon=True)
        self._accept_thread.start()
        log.info("listening on %s (devices: %s, pid %d)", self.socket_path, ", ".join(self.scheduler.devices),
                 os.getpid())

    def request_stop(self) -> None:
        """Ask serve_forever() to stop; a second request while stopping cancels the running job.

        Safe to call from a signal handler.
        """
        if self._stopped and self.owns_scheduler:
            log.info("asked again to stop: cancelling the running job")
            self.scheduler.cancel_running()
        self._stop_requested.set()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        try:
            while not self._stop_requested.wait(0.5):
                pass
        finally:
            self.stop()

    def stop(self, timeout: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            self._unlink_socket()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(5)
        with self._conn_lock:
            conns = list(self._connections)
        if self.owns_scheduler:
            log.info("stopping (%s the running job)", "finishing" if self.on_stop == "finish" else "cancelling")
            self.scheduler.stop(cancel_running=self.on_stop == "cancel", timeout=timeout)
        else:
            for c in conns:
                c.cancel_job(for_stop=True)
        for c in conns:
            c.finish_deliveries(timeout=30)
            c.close_after_pending()
        for c in conns:
            c.join(5)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    def _unlink_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def status(self) -> dict:
        with self._conn_lock:
            clients = sorted((c.client or "unnamed") for c in self._connections)
        return {
            "type": "status", "protocol": PROTOCOL_VERSION, "server": server_name(), "pid": os.getpid(),
            "socket": self.socket_path, "uptime": round(time.monotonic() - self._started_at, 3),
            "clients": len(clients), "client_names": clients, "idle_exit": self.idle_exit,
            "memory_budget": {"total": self.budget.total, "used": self.budget.used},
            **self.scheduler.status(),
        }

    # -- internals --

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stop_requested.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.25)
            except (OSError, ValueError):
                return
            if ready:
                try:
                    sock, _ = listener.accept()
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.EINVAL):
                        return
                    continue
                self._conn_ids += 1
                peer = access.peer_of(sock, group_socket=self.group is not None)
                with self._conn_lock:
                    full = len(self._connections) >= limits.MAX_CONNECTIONS
                    self._last_activity = time.monotonic()
                if full:
                    _refuse(sock, f"the service is busy: {limits.MAX_CONNECTIONS} connections are open; "
                                  f"try again later")
                    continue
                conn = _Connection(self, sock, self._conn_ids, peer)
                with self._conn_lock:
                    self._connections.add(conn)
                try:
                    conn.start()
                except RuntimeError as e:  # no thread to be had: refuse this one, keep serving
                    log.warning("connection %d refused: %s", conn.number, e)
                    self._forget(conn)
                    _refuse(sock, "the service is busy: it cannot start another thread; try again later")
            self._check_idle()

    def _check_idle(self) -> None:
        if self.idle_exit <= 0:
            return
        with self._conn_lock:
            busy = bool(self._connections)
            last = self._last_activity
        if busy or not self.scheduler.idle():
            return
        quiet = time.monotonic() - max(last, self.scheduler.last_activity)
        if quiet >= self.idle_exit:
            log.info("idle for %.0f s: exiting", quiet)
            self.request_stop()

    def _forget(self, conn: "_Connection") -> None:
        with self._conn_lock:
            self._connections.discard(conn)
            self._last_activity = time.monotonic()

    def work_limit(self, device: str) -> tuple[int, str] | None:
        """(the most pixels a job for `device` may work at, on which device); "auto": the largest of
        the workers. None when no worker serves `device` (the scheduler says so)."""
        try:
            eligible = self.scheduler._eligible(device)
        except DeviceError:
            return None
        return max((self.scheduler.work_limits[w.device], w.device) for w in eligible)


def _refuse(sock: socket.socket, message: str) -> None:
    """Answer a connection that is not taken with a busy error, and close it."""
    try:
        sock.setblocking(False)  # a short frame fits the socket's buffer; never wait for this client
        wire.send_frame(sock, {"type": "error", "kind": "busy", "message": message})
    except OSError:
        pass
    finally:
        sock.close()


# ---- one client connection ----------------------------------------------------------------------

class _Close(Exception):
    """End the connection's read loop."""


@dataclass
class _JobRequest:
    content: dict
    styles: list
    params: StyleParams
    priority: str
    preview: dict | None
    output_path: str | None
    result_format: dict
    allow_cpu_fallback: bool
    payload_size: int


_HELLO_FIELDS = {"type", "protocol", "client"}
_JOB_FIELDS = {"type", "content", "styles", "params", "priority", "preview", "output_path", "result_format",
               "allow_cpu_fallback", "payload_size"}
_RAW_FIELDS = {"width", "height", "channels", "bit_depth"}


class _Connection:
    def __init__(self, server: ServiceServer, sock: socket.socket, number: int, peer: access.Peer):
        self.server = server
        self.sock = sock
        self.number = number
        self.peer = peer
        self.opened = time.monotonic()
        self.client: str | None = None
        self.hello = False
        self.job = None
        self._deliveries: list[threading.Thread] = []
        self._job_lock = threading.Lock()  # "accepted" goes out before any event of the job
        self._out: collections.deque = collections.deque()
        self._out_cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_loop, name=f"nst-conn-{number}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"nst-send-{number}", daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
        self._writer.join(timeout)

    # -- sending (any thread) --

    def send(self, header: dict, payload: bytes = b"", coalesce: bool = False) -> None:
        with self._out_cond:
            if coalesce and self._out:
                last = self._out[-1]
                if last[0] == "frame" and last[3] and not last[2]:
                    self._out[-1] = ("frame", header, payload, True)
                    return
            self._out.append(("frame", header, payload, coalesce))
            self._out_cond.notify()

    def send_error(self, error: NSTError, job_id: str | None = None, close: bool = False) -> None:
        m = {"type": "error", **error.to_mapping()}
        if job_id is not None:
            m["job_id"] = job_id
        self.send(m)
        if close:
            self.close_after_pending()

    def close_after_pending(self) -> None:
        with self._out_cond:
            self._out.append(("close",))
            self._out_cond.notify()

    def _write_loop(self) -> None:
        try:
            while True:
                with self._out_cond:
                    while not self._out:
                        self._out_cond.wait()
                    item = self._out.popleft()
                if item[0] == "close":
                    return
                _, header, payload, _ = item
                try:
                    wire.send_frame(self.sock, header, payload)
                except OSError:
                    return
                except ValueError as e:  # not JSON-safe: a bug; tell the client rather than hang it
                    log.error("cannot encode a %s message: %s", header.get("type"), e)
                    return
        finally:
            with _suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    # -- reading --

    def _read_loop(self) -> None:
        timeout = self.server.request_timeout
        try:
            while True:
                if self.hello:  # a client may wait between requests; a request, once begun, may not
                    _wait_for_data(self.sock)
                    deadline = time.monotonic() + timeout
                else:  # the whole hello within the timeout of connecting
                    deadline = self.opened + timeout
                header = self._read_header(deadline)
                try:
                    self._handle(header, deadline)
                except _Skip:
                    pass
        except wire.ConnectionClosed:
            pass
        except wire.FrameTimeout:
            what = "request" if self.hello else "hello"
            log.info("connection %d: no complete %s within %g s: closed", self.number, what, timeout)
            self.send_error(ProtocolError(None, f"the {what} did not arrive whole within {timeout:g} s; closing"))
        except wire.FrameError as e:
            self.send_error(ProtocolError(e.details.get("field"), e.message))
        except _Close:
            pass
        except OSError:
            pass
        except Exception:  # a bug: keep the service up
            log.exception("connection %d failed", self.number)
            with _suppress(Exception):
                self.send_error(InternalError("internal error in the service while reading a request"))
        finally:
            self.cancel_job()
            self.close_after_pending()
            self._writer.join(10)
            with _suppress(OSError):
                self.sock.close()
            self.server._forget(self)

    def _read_header(self, deadline: float) -> dict:
        """The next frame's header, its bytes counted against the memory budget while it is read."""
        n = wire.recv_length(self.sock, wire.MAX_HEADER, deadline)
        budget = self.server.header_budget
        if not budget.reserve(n):
            self.send_error(_budget_error(budget, n), close=True)
            raise _Close
        try:
            return wire.decode_header(wire.recv_exact(self.sock, n, deadline))
        finally:
            budget.release(n)

    def cancel_job(self, for_stop: bool = False) -> None:
        job = self.job
        if job is not None and not job.done():
            job._cancel_for_stop() if for_stop else job.cancel()

    def finish_deliveries(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in list(self._deliveries):
            t.join(max(0.0, deadline - time.monotonic()))

    def _handle(self, header: dict, deadline: float) -> None:
        kind = header["type"]
        size = header.get("payload_size", 0)
        if not self.hello and kind != "hello":
            self.send_error(ProtocolError("type", f"the first message must be hello, got {kind!r}"), close=True)
            raise _Close
        if kind == "job":
            self._job(header, deadline)
            return
        if size:
            self.send_error(ProtocolError("payload_size", f"a {kind} message carries no payload"), close=True)
            raise _Close
        if kind == "hello":
            self._hello(header)
        elif kind == "ping":
            self._check_fields(header, {"type"})
            self.send({"type": "pong"})
        elif kind == "status":
            self._check_fields(header, {"type"})
            self.send(self.server.status())
        elif kind == "cancel":
            self._check_fields(header, {"type", "job_id"})
            job = self.job
            if job is not None and header.get("job_id") in (None, job.id):
                self.cancel_job()
        else:
            self.send_error(ProtocolError("type", f"unknown message type {kind!r} "
                                                  f"(known: hello, ping, status, job, cancel)"))

    def _check_fields(self, header: dict, allowed: set) -> None:
        unknown = sorted(set(header) - allowed - {"payload_size"})
        if unknown:
            self.send_error(ProtocolError(unknown[0], f"unknown field in a {header['type']} message "
                                                      f"(known: {', '.join(sorted(allowed - {'type'}))})"))
            raise _Skip

    def _hello(self, header: dict) -> None:
        try:
            self._check_fields(header, _HELLO_FIELDS)
        except _Skip:
            return
        version = header.get("protocol")
        if version != PROTOCOL_VERSION:
            err = ProtocolError("protocol", f"unsupported protocol version {version!r}; this service speaks "
                                            f"{PROTOCOL_VERSION}")
            self.send({"type": "error", **err.to_mapping(), "supported": [PROTOCOL_VERSION]})
            self.close_after_pending()
            raise _Close
        client = header.get("client")
        self.client = str(client)[:100] if client is not None else None
        self.hello = True
        self.send({"type": "hello", "protocol": PROTOCOL_VERSION, "server": server_name(),
                   "devices": self.server.scheduler.devices, "limits": self.server.limits})

    # -- jobs --

    def _job(self, header: dict, deadline: float) -> None:
        size = header.get("payload_size", 0)
        budget = self.server.budget
        try:
            if self.job is not None and not self.job.done():
                raise ProtocolError(None, "this connection's job is still running; one job at a time per "
                                          "connection (open another connection)")
            req = _parse_job(header, self.server.limits)
            access.confine(self.peer, [("content", req.content)] +
                           [(f"styles[{i}]", s) for i, s in enumerate(req.styles)], req.params, req.output_path)
            _check_raw_work(req, self.server.work_limit(req.params.device))
            if size and not budget.reserve(size):
                raise _budget_error(budget, size)
        except NSTError as e:
            self.send_error(e, close=bool(size))
            if size:
                raise _Close
            return
        held = size  # released when the job ends, or now if it never starts
        try:
            # Held in memory only as it arrives; a slow sender meets the frame's deadline.
            payload = wire.recv_exact(self.sock, size, deadline + size / limits.PAYLOAD_RATE) if size else b""
            try:
                content, styles = _pictures(req, payload)
                del payload
                if req.output_path is not None:
                    _check_output(req)
            except NSTError as e:
                self.send_error(e)
                return
            holder: dict = {}
            with self._job_lock:
                try:
                    job = self.server.scheduler.submit(
                        content, styles, req.params, priority=req.priority,
                        progress=self._progress_callback(req, holder), allow_cpu_fallback=req.allow_cpu_fallback,
                        client=self.client or f"connection {self.number}", on_event=self._event_callback(holder))
                except NSTError as e:
                    self.send_error(e)
                    return
                holder["job"] = self.job = job
                self.send({"type": "accepted", "job_id": job.id, "position": job.position})
            if held:
                job.add_done_callback(lambda _job, n=held: budget.release(n))
                held = 0
        finally:
            if held:
                budget.release(held)
        t = threading.Thread(target=self._deliver, args=(job, req), name=f"nst-deliver-{job.id}", daemon=True)
        self._deliveries = [d for d in self._deliveries if d.is_alive()] + [t]
        t.start()

    def _event_callback(self, holder):
        def on_event(kind, data):
            with self._job_lock:
                self.send({"type": kind, "job_id": holder["job"].id, **data})
        return on_event

    def _progress_callback(self, req: _JobRequest, holder: dict):
        from ..images import picture_to_pixels

        state = {"sent": None, "preview": None}
        channels = req.result_format.get("channels") or req.content.get("channels")

        def on_progress(p):
            now = time.monotonic()
            final = p.step >= p.total
            want_preview = req.preview is not None and (
                state["preview"] is None or now - state["preview"] >= req.preview["interval"] or final)
            if not (state["sent"] is None or final or want_preview or now - state["sent"] >= PROGRESS_INTERVAL):
                return
            with self._job_lock:
                event = {"type": "progress", "job_id": holder["job"].id, **_json_safe(p.to_mapping())}
            payload = b""
            if want_preview:
                pic = p.image(req.preview["max_side"])
                ch = channels or (4 if pic.alpha is not None else 3)
                payload = picture_to_pixels(pic, ch, 8)
                event["preview"] = {"width": pic.width, "height": pic.height, "channels": ch, "bit_depth": 8}
                state["preview"] = now
            state["sent"] = now
            self.send(event, payload, coalesce=True)
        return on_progress

    def _deliver(self, job, req: _JobRequest) -> None:
        from ..images import picture_to_pixels, save_image

        try:
            result = job.result()
        except NSTError as e:
            self.send_error(e, job_id=job.id, close=isinstance(e, ServiceStopping))
            return
        except Exception as e:
            log.exception("job %s", job.id)
            self.send_error(InternalError(f"internal error in the service: {e}"), job_id=job.id)
            return
        try:
            common = {"type": "result", "job_id": job.id, "weights_note": result.weights_note,
                      "losses": _json_safe(result.losses), "elapsed": round(result.elapsed, 4),
                      "device": result.device}
            pic = result.picture
            if req.output_path is not None:
                save_image(pic, req.output_path, _metadata(result))
                self.send({**common, "path": req.output_path})
                return
            channels = req.result_format.get("channels") or req.content.get("channels") or \
                (4 if pic.alpha is not None else 3)
            depth = req.result_format.get("bit_depth") or req.content.get("bit_depth") or pic.bit_depth
            data = picture_to_pixels(pic, channels, depth)
            self.send({**common, "width": pic.width, "height": pic.height, "channels": channels,
                       "bit_depth": depth}, data)
        except NSTError as e:
            self.send_error(e, job_id=job.id)
        except Exception as e:
            log.exception("job %s: delivering the result failed", job.id)
            self.send_error(InternalError(f"internal error in the service: {type(e).__name__}: {e}"), job_id=job.id)


class _Skip(Exception):
    """The request was answered with an error; keep reading."""


def _wait_for_data(sock: socket.socket) -> None:
    """Block until the client sends something (or closes)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while not poller.poll():
        pass


def _budget_error(budget: limits.MemoryBudget, n: int) -> NSTError:
    return limits.Busy(f"the service is busy: {n:,} more bytes of requests would exceed the {budget.total:,} bytes "
                       f"that all its clients together may send it at once ({budget.used:,} in use); "
                       f"try again later")


def _check_raw_work(req: "_JobRequest", limit: tuple[int, str] | None) -> None:
    """The work bound, from the header alone, for a job whose images all come as pixels (the
    scheduler checks every job again once its files are read)."""
    if limit is None or any("path" in spec for spec in [req.content, *req.styles]):
        return
    limits.check_work((req.content["height"], req.content["width"]),
                      [(s["height"], s["width"]) for s in req.styles], req.params, *limit)


# ---- request parsing ----------------------------------------------------------------------------

def _parse_job(h: dict, lim: dict) -> _JobRequest:
    """Validate a job header completely, before its payload is read."""
    unknown = sorted(set(h) - _JOB_FIELDS)
    if unknown:
        raise ProtocolError(unknown[0], f"unknown field in a job (known: {', '.join(sorted(_JOB_FIELDS - {'type'}))})")
    if "content" not in h:
        raise ProtocolError("content", "a job needs a content image")
    content = _image_spec("content", h["content"], lim)
    styles = h.get("styles", [])
    if not isinstance(styles, list):
        raise ProtocolError("styles", f"must be a list of images, got {type(styles).__name__}")
    if len(styles) > lim["max_styles"]:
        raise ProtocolError("styles", f"at most {lim['max_styles']} style images, got {len(styles)}")
    styles = [_image_spec(f"styles[{i}]", s, lim) for i, s in enumerate(styles)]
    params = StyleParams.from_mapping(h.get("params") or {})
    priority = h.get("priority", "interactive")
    if priority not in PRIORITIES:
        raise ProtocolError("priority", f"must be interactive or batch, got {priority!r}")
    preview = h.get("preview")
    if preview is not None:
        if not isinstance(preview, dict) or set(preview) - {"max_side", "interval"}:
            raise ProtocolError("preview", "must be null or {max_side, interval}")
        side = preview.get("max_side", 256)
        interval = preview.get("interval", 1.0)
        if not _is_int(side) or not 16 <= side <= 4096:
            raise ProtocolError("preview.max_side", f"must be a whole number from 16 to 4096, got {side!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
            raise ProtocolError("preview.interval", f"must be a number of seconds from 0 to 3600, got {interval!r}")
        preview = {"max_side": side, "interval": float(interval)}
    out = h.get("output_path")
    if out is not None and (not isinstance(out, str) or not os.path.isabs(out)):
        raise ProtocolError("output_path", f"must be null or an absolute path, got {out!r}")
    fmt = h.get("result_format") or {}
    if not isinstance(fmt, dict) or set(fmt) - {"channels", "bit_depth"}:
        raise ProtocolError("result_format", "must be null or {channels, bit_depth}")
    if fmt.get("channels") not in (None, 3, 4) or isinstance(fmt.get("channels"), bool):
        raise ProtocolError("result_format.channels", f"must be 3 or 4, got {fmt.get('channels')!r}")
    if fmt.get("bit_depth") not in (None, 8, 16) or isinstance(fmt.get("bit_depth"), bool):
        raise ProtocolError("result_format.bit_depth", f"must be 8 or 16, got {fmt.get('bit_depth')!r}")
    fallback = h.get("allow_cpu_fallback", False)
    if not isinstance(fallback, bool):
        raise ProtocolError("allow_cpu_fallback", f"must be true or false, got {fallback!r}")
    size = h.get("payload_size", 0)
    expected = sum(_raw_size(s) for s in [content, *styles] if "path" not in s)
    if size > lim["max_payload"]:
        raise ProtocolError("payload_size", f"payload of {size:,} bytes is over the limit of {lim['max_payload']:,}")
    if size != expected:
        raise ProtocolError("payload_size", f"wrong pixel count: the raw images described need {expected:,} bytes, "
                                            f"the header announces {size:,}")
    return _JobRequest(content, styles, params, priority, preview, out, fmt, fallback, size)


def _image_spec(what: str, spec, lim: dict) -> dict:
    if not isinstance(spec, dict):
        raise ProtocolError(what, f"must be {{path}} or {{width, height, channels, bit_depth}}, got {spec!r:.80}")
    if "path" in spec:
        if set(spec) != {"path"}:
            raise ProtocolError(what, f"a path image takes no other fields, got {', '.join(sorted(spec))}")
        if not isinstance(spec["path"], str) or not os.path.isabs(spec["path"]):
            raise ProtocolError(f"{what}.path", f"must be an absolute path, got {spec['path']!r}")
        return spec
    if set(spec) != _RAW_FIELDS:
        extra = sorted(set(spec) - _RAW_FIELDS)
        missing = sorted(_RAW_FIELDS - set(spec))
        raise ProtocolError(f"{what}.{(extra or missing)[0]}",
                            "unknown field" if extra else "missing (raw images need width, height, channels, bit_depth)")
    w, h, c, b = (spec[k] for k in ("width", "height", "channels", "bit_depth"))
    for name, v in (("width", w), ("height", h)):
        if not _is_int(v) or v < 1:
            raise ProtocolError(f"{what}.{name}", f"must be a whole number above 0, got {v!r}")
    if not _is_int(c) or c not in (3, 4):
        raise ProtocolError(f"{what}.channels", f"must be 3 (RGB) or 4 (RGBA), got {c!r}")
    if not _is_int(b) or b not in (8, 16):
        raise ProtocolError(f"{what}.bit_depth", f"must be 8 or 16, got {b!r}")
    if w * h > lim["max_pixels"]:
        raise ImageError(None, f"{what}: {w}×{h} = {w * h:,} pixels is more than the {lim['max_pixels']:,} accepted")
    return spec


def _raw_size(spec: dict) -> int:
    return spec["width"] * spec["height"] * spec["channels"] * spec["bit_depth"] // 8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pictures(req: _JobRequest, payload: bytes):
    from ..images import picture_from_pixels

    view = memoryview(payload)
    offset = 0
    out = []
    for i, spec in enumerate([req.content, *req.styles]):
        if "path" in spec:
            out.append(spec["path"])
            continue
        n = _raw_size(spec)
        pic = picture_from_pixels(view[offset:offset + n], spec["width"], spec["height"], spec["channels"],
                                  spec["bit_depth"])
        pic.source = "content (pixels)" if i == 0 else f"style {i} (pixels)"
        out.append(pic)
        offset += n
    return out[0], out[1:]


def _check_output(req: _JobRequest) -> None:
    from ..images import check_output_path

    check_output_path(req.output_path)
    for spec in [req.content, *req.styles]:
        p = spec.get("path")
        if p and os.path.exists(p) and os.path.exists(req.output_path) and os.path.samefile(p, req.output_path):
            raise ImageError(req.output_path, "is one of the input images; refusing to overwrite an input")


def _metadata(result) -> dict:
    import json

    meta = {"nst:weights": result.weights_label, "nst:params": json.dumps(result.params.to_mapping())}
    if result.weights_note:
        meta["nst:note"] = result.weights_note
    return meta


def _json_safe(value):
    """Non-finite floats (a diverging loss) become null: the protocol is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
