"""The Unix-socket front of the job service (docs/PROTOCOL.md): the listening socket, and the
server that accepts clients and hands each to a `Connection`, whose jobs go to a `Scheduler`.

The memory budget that all connections share, and their number, are bounded here (`limits`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import stat
import threading
import time
from contextlib import suppress

from ..errors import DeviceError, ServiceSetupError
from ..outputs import product_name
from . import access, limits, protocol
from . import client as wire
from .connection import Connection
from .scheduler import Scheduler

log = logging.getLogger("nst_core.service")



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
                with suppress(FileNotFoundError):
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
        self._connections: set[Connection] = set()
        self._conn_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stop_asked = False  # request_stop()'s flag (see there)
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
            self.limits = limits.announced(self.budget.total,  # a cluster may have no worker yet
                                           max(self.scheduler.work_limits.values(), default=limits.max_pixels()),
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

        Safe to call from a signal handler: it sets a plain flag that serve_forever() polls, since
        an Event's set() could wait for the lock the interrupted main thread holds in its wait().
        """
        if self._stopped and self.owns_scheduler:
            log.info("asked again to stop: cancelling the running job")
            self.scheduler.cancel_running()
        self._stop_asked = True

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        try:
            while not self._stop_asked:
                time.sleep(0.25)
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
            "type": "status", "protocol": protocol.PROTOCOL_VERSION, "server": product_name(), "pid": os.getpid(),
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
                conn = Connection(self, sock, self._conn_ids, peer)
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

    def _forget(self, conn: "Connection") -> None:
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
        return max(((self.scheduler.work_limits[w.device], w.device) for w in eligible), default=None)


def _refuse(sock: socket.socket, message: str) -> None:
    """Answer a connection that is not taken with a busy error, and close it."""
    try:
        sock.setblocking(False)  # a short frame fits the socket's buffer; never wait for this client
        wire.send_frame(sock, {"type": "error", "kind": "busy", "message": message})
    except OSError:
        pass
    finally:
        sock.close()


