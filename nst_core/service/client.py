"""Client for the Neural Style job service (docs/PROTOCOL.md), and the protocol's framing.

Pure standard library (Python 3.10+), one self-contained file: the GIMP plug-in ships it beside
itself as ``nst_client.py``, and the server imports its framing from here.

    client = connect(python="/opt/nst/venv/bin/python")      # a running service, or a private one
    out = client.run_job(RawImage(w, h, 4, 8, data), ["/styles/wave.jpg"],
                         {"size": 512, "iterations": 300}, on_progress=print, cancel=event)
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20  # bytes of JSON in one frame header
_LEN = struct.Struct(">I")


SYSTEM_SOCKET = "/run/nst-daemon/nst.sock"  # the daemon's socket under systemd (RuntimeDirectory=nst-daemon)


def user_socket_path() -> str:
    """Where this user's own service listens: $NST_SOCKET, else $XDG_RUNTIME_DIR/nst/nst.sock, else
    /tmp/nst-$UID/nst.sock."""
    if os.environ.get("NST_SOCKET"):
        return os.environ["NST_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "nst", "nst.sock")
    return os.path.join("/tmp", f"nst-{os.getuid()}", "nst.sock")


def system_socket_path() -> str:
    """The system daemon's socket: $NST_SYSTEM_SOCKET, else /run/nst-daemon/nst.sock."""
    return os.environ.get("NST_SYSTEM_SOCKET") or SYSTEM_SOCKET


def candidate_sockets() -> list[tuple[str, str]]:
    """The sockets a client tries, in order, each with what it is: $NST_SOCKET alone when it is set;
    else the system service's socket, then this user's own."""
    if os.environ.get("NST_SOCKET"):
        return [(os.environ["NST_SOCKET"], "$NST_SOCKET")]
    return [(system_socket_path(), "the system service"), (user_socket_path(), "your own service")]


def default_socket_path() -> str:
    """The socket a client uses: $NST_SOCKET; else the system service's socket when a service accepts
    connections on it (the daemon on a shared workstation); else this user's own, where `connect`
    starts a private service."""
    candidates = candidate_sockets()
    for path, _ in candidates[:-1]:
        if socket_problem(path) is None:
            return path
    return candidates[-1][0]


def socket_folder_problem(folder: str) -> str | None:
    """Why a socket in `folder` cannot be trusted, or None.

    As ssh-agent and systemd do for their runtime folders: the folder must not be writable by
    group or others, and must belong to this user or root, or else sit in a folder of this user or
    root that nobody else can write (the system service's own /run/nst-daemon). A folder that does
    not exist yet is no problem (the server creates it 0700).
    """
    try:
        link = os.lstat(folder)
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot inspect the socket folder {folder}: {e.strerror}"
    trusted = (os.geteuid(), 0)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
        return (f"the socket folder {folder} is a symbolic link made by {_user_name(link.st_uid)}, not by you: "
                f"another user may have put it there to impersonate the service. Remove it, or set "
                f"XDG_RUNTIME_DIR or NST_SOCKET")
    if not stat.S_ISDIR(st.st_mode):
        return f"the socket folder {folder} is not a folder"
    if st.st_mode & 0o022:
        return (f"the socket folder {folder} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}, owner "
                f"{_user_name(st.st_uid)}): anyone could replace the socket. Make it private (chmod go-w {folder}), "
                f"or set XDG_RUNTIME_DIR or NST_SOCKET")
    if st.st_uid in trusted:
        return None
    parent = os.path.dirname(os.path.realpath(folder))
    try:
        pst = os.stat(parent)
    except OSError:
        pst = None
    if pst is not None and pst.st_uid in trusted and not pst.st_mode & 0o022:
        return None  # only root or this user can have made it, and given it to its owner
    return (f"the socket folder {folder} belongs to {_user_name(st.st_uid)}, not to you: another user may have "
            f"made it to impersonate the service. Remove it (as root), or set XDG_RUNTIME_DIR or NST_SOCKET")


def socket_problem(path: str, timeout: float = 2.0) -> str | None:
    """None when something accepts connections on `path`; else why not, in a few words: absent,
    permission denied, not answering, an unsafe folder."""
    try:
        _connect(path, timeout).close()
    except ServiceUnavailable as e:
        return e.details.get("reason", e.message)
    return None


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected socket; ServiceUnavailable with details["reason"] (a few words) when there is none."""
    def fail(reason: str, what: str | None = None):
        raise ServiceUnavailable(message=what or f"no Neural Style service is listening on {path} ({reason})",
                                 details={"reason": reason, "socket": path})

    problem = socket_folder_problem(os.path.dirname(os.path.abspath(path)) or "/")
    if problem:
        fail(f"refused: {problem}", f"not connecting to {path}: {problem}")
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            fail("not a socket", f"{path} is not a socket")
    except OSError:
        pass  # connect() tells why
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return sock
    except FileNotFoundError:
        sock.close()
        fail("absent")
    except ConnectionRefusedError:
        sock.close()
        fail("not answering: nothing accepts connections on it (a stale socket)")
    except PermissionError:
        sock.close()
        reason = f"permission denied{_permission_hint(path)}"
        fail(reason, f"cannot connect to the Neural Style service at {path}: {reason}")
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        fail(reason, f"cannot connect to the Neural Style service at {path}: {reason}")


def _permission_hint(path: str) -> str:
    try:
        st = os.stat(path)
    except PermissionError:
        return f" (its folder {os.path.dirname(path)} is closed to you)"
    except OSError:
        return ""
    group = _group_name(st.st_gid)
    hint = f" (the socket is {_login(st.st_uid)}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & 0o020 and st.st_gid not in os.getgroups():
        hint += (f"; you are not in group {group}: ask to be added (sudo usermod -aG {group} "
                 f"{_login(os.getuid())}), then log in again")
    return hint + ")"


def _login(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _user_name(uid: int) -> str:
    name = _login(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _group_name(gid: int) -> str:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)


@dataclass
class RawImage:
    """Interleaved RGB/RGBA pixels, rows top to bottom; 16-bit samples little-endian.

    `info` holds what the service said about a result: weights_note (show it to the user when it
    is not None), losses, elapsed, device, job_id, notices.
    """

    width: int
    height: int
    channels: int
    bit_depth: int
    data: bytes
    info: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def expected_size(self) -> int:
        return self.width * self.height * self.channels * (self.bit_depth // 8)

    def spec(self) -> dict:
        return {"width": self.width, "height": self.height, "channels": self.channels, "bit_depth": self.bit_depth}

    def check(self, what: str = "image") -> None:
        if self.channels not in (3, 4) or self.bit_depth not in (8, 16):
            raise ServiceError("param", f"{what}: channels must be 3 or 4 and bit_depth 8 or 16, "
                                        f"got {self.channels} and {self.bit_depth}")
        if self.width < 1 or self.height < 1:
            raise ServiceError("param", f"{what}: width and height must be at least 1")
        if len(self.data) != self.expected_size:
            raise ServiceError("param", f"{what}: {self.width}×{self.height}×{self.channels} at {self.bit_depth} bits "
                                        f"needs {self.expected_size} bytes, got {len(self.data)}")


# ---- errors -------------------------------------------------------------------------------------

class ServiceError(Exception):
    """An error from (or about) the service; `kind` and `message` as the `nst` command words them."""

    def __init__(self, kind: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = dict(details or {})

    def __str__(self) -> str:
        return self.message

    @staticmethod
    def from_mapping(m: dict) -> "ServiceError":
        kind = str(m.get("kind", "error"))
        details = {k: v for k, v in m.items() if k not in ("type", "kind", "message")}
        cls = _ERROR_CLASSES.get(kind, ServiceError)
        return cls(kind, str(m.get("message", kind)), details)


class ServiceUnavailable(ServiceError):
    """No service answers on the socket (or it went away)."""

    def __init__(self, kind: str = "unavailable", message: str = "the service is not available", details=None):
        super().__init__(kind, message, details)


class ServiceBusy(ServiceError):
    """The service's queue is full; try again later."""


class JobCancelled(ServiceError):
    """The job was cancelled."""


class FrameError(ServiceError):
    """A malformed frame; the connection cannot be used any more."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__("protocol", message, {"field": field} if field else None)


class ConnectionClosed(ServiceError):
    """The peer closed the connection at a frame boundary."""

    def __init__(self, message: str = "the connection was closed"):
        super().__init__("unavailable", message)


_ERROR_CLASSES = {"busy": ServiceBusy, "cancelled": JobCancelled, "unavailable": ServiceUnavailable}


# ---- framing (shared with the server) -----------------------------------------------------------

def send_frame(sock: socket.socket, header: dict, payload=()) -> None:
    """Send one frame; `payload` is bytes or a sequence of bytes-like parts sent back to back."""
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    size = sum(memoryview(p).nbytes for p in parts)
    if size:
        header = {**header, "payload_size": size}
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    sock.sendall(_LEN.pack(len(body)) + body)
    for p in parts:
        if memoryview(p).nbytes:
            sock.sendall(p)


class FrameTimeout(FrameError):
    """A frame (or the hello) did not arrive whole before its deadline."""


def wait_readable(sock: socket.socket, deadline: float | None) -> None:
    """Block until `sock` has data (or EOF); FrameTimeout once `deadline` (time.monotonic()) passes.

    With no deadline this returns at once, leaving the wait to the socket's own timeout.
    """
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining > 0:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            ready = poller.poll(max(1, int(remaining * 1000)))
        else:
            ready = select.select([sock], [], [], remaining)[0]
        if ready:
            return
    raise FrameTimeout("the message did not arrive whole in time")


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly n bytes, held in memory only as they arrive (an announced size allocates nothing)."""
    buf = bytearray()
    while len(buf) < n:
        wait_readable(sock, deadline)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise FrameError(f"the connection closed in the middle of a frame ({len(buf)} of {n} bytes)")
        buf += chunk
    return buf


def recv_length(sock: socket.socket, max_header: int = MAX_HEADER, deadline: float | None = None) -> int:
    """The next frame's header length; ConnectionClosed when the peer closed between frames."""
    wait_readable(sock, deadline)
    first = sock.recv(_LEN.size)
    if not first:
        raise ConnectionClosed()
    if len(first) < _LEN.size:
        first = bytes(first) + bytes(recv_exact(sock, _LEN.size - len(first), deadline))
    (n,) = _LEN.unpack(first)
    if n < 2 or n > max_header:
        raise FrameError(f"frame header of {n} bytes (must be 2 to {max_header}); is this a Neural Style client?")
    return n


def decode_header(raw: bytes) -> dict:
    """A frame header's JSON, checked: an object with a string `type` and a valid `payload_size`."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"malformed JSON in the frame header ({e})") from None
    if not isinstance(header, dict):
        raise FrameError("the frame header must be a JSON object")
    if not isinstance(header.get("type"), str):
        raise FrameError("the frame header needs a string 'type'", "type")
    size = header.get("payload_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise FrameError(f"payload_size must be a whole number >= 0, got {size!r}", "payload_size")
    return header


def recv_header(sock: socket.socket, max_header: int = MAX_HEADER, deadline: float | None = None) -> dict:
    """Read a frame's header; the payload (header["payload_size"] bytes) is left to the caller."""
    n = recv_length(sock, max_header, deadline)
    return decode_header(recv_exact(sock, n, deadline))


def recv_frame(sock: socket.socket, max_header: int = MAX_HEADER, max_payload: int | None = None):
    """(header, payload bytes) of the next frame."""
    header = recv_header(sock, max_header)
    size = header.get("payload_size", 0)
    if max_payload is not None and size > max_payload:
        raise FrameError(f"payload of {size} bytes is over the limit of {max_payload}", "payload_size")
    return header, (bytes(recv_exact(sock, size)) if size else b"")


# ---- the client ---------------------------------------------------------------------------------

class ServiceClient:
    """Talks to one service socket; each call opens its own connection (safe from several threads)."""

    def __init__(self, socket_path: str | None = None, timeout: float = 10.0, client_name: str = "nst_client"):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.client_name = client_name
        self.server_info: dict = {}
        self.last_result: dict | None = None

    # -- connections --

    def _open(self) -> socket.socket:
        sock = _connect(self.socket_path, self.timeout)
        try:
            send_frame(sock, {"type": "hello", "protocol": PROTOCOL_VERSION, "client": self.client_name})
            reply = self._reply(sock)
            if reply.get("type") != "hello":
                raise FrameError(f"expected hello from the service, got {reply.get('type')!r}")
            self.server_info = reply
        except BaseException:
            sock.close()
            raise
        return sock

    def _reply(self, sock: socket.socket) -> dict:
        try:
            header, _ = recv_frame(sock)
        except ConnectionClosed:
            raise ServiceUnavailable(message="the service closed the connection") from None
        except socket.timeout:
            raise ServiceUnavailable(message=f"the service at {self.socket_path} did not answer within {self.timeout} s") from None
        except OSError as e:
            raise ServiceUnavailable(message=f"lost the connection to the service: {e}") from None
        if header["type"] == "error":
            raise ServiceError.from_mapping(header)
        return header

    def _request(self, header: dict) -> dict:
        sock = self._open()
        try:
            send_frame(sock, header)
            return self._reply(sock)
        finally:
            sock.close()

    # -- requests --

    def ping(self) -> bool:
        """True when a service answers on the socket."""
        try:
            return self._request({"type": "ping"}).get("type") == "pong"
        except (ServiceError, OSError):
            return False

    def status(self) -> dict:
        """The service's status message (devices, queue, running jobs, cache); see PROTOCOL.md."""
        return self._request({"type": "status"})

    def run_job(self, content, styles, params: dict, *, priority: str = "interactive",
                on_progress: Callable[[dict], Any] | None = None, cancel=None, output_path: str | None = None,
                preview: int | None = None, preview_interval: float = 1.0, result_format: dict | None = None,
                allow_cpu_fallback: bool = False, on_status: Callable[[dict], Any] | None = None) -> RawImage | None:
        """Run one job and return the result's pixels (or None when `output_path` was written).

        content/styles: RawImage or a path the service can read. params: StyleParams fields.
        on_progress(event): step, total, level, levels, losses, elapsed, eta, and `preview` (a
        RawImage) when `preview` (its longest side) is asked for. cancel: a threading.Event or a
        callable, polled at least 10 times a second; when it turns true the job is cancelled and
        JobCancelled raised. on_status(event) gets the accepted/started/notice messages.
        Raises ServiceError (or a subclass) with the service's wording.
        """
        images = [("content", content)] + [(f"style {i + 1}", s) for i, s in enumerate(styles)]
        specs, parts = [], []
        for what, img in images:
            if isinstance(img, RawImage):
                img.check(what)
                specs.append(img.spec())
                parts.append(img.data)
            elif isinstance(img, (str, os.PathLike)):
                specs.append({"path": os.path.abspath(os.fspath(img))})
            else:
                raise TypeError(f"{what}: expected a RawImage or a path, got {type(img).__name__}")
        header = {"type": "job", "content": specs[0], "styles": specs[1:], "params": dict(params or {}),
                  "priority": priority, "allow_cpu_fallback": bool(allow_cpu_fallback)}
        if preview:
            header["preview"] = {"max_side": int(preview), "interval": float(preview_interval)}
        if output_path is not None:
            header["output_path"] = os.path.abspath(os.fspath(output_path))
        if result_format:
            header["result_format"] = dict(result_format)
        is_cancelled = _cancel_check(cancel)

        sock = self._open()
        try:
            try:
                send_frame(sock, header, parts)
            except (BrokenPipeError, ConnectionResetError):
                # The service refused the job before reading its pixels: its answer is waiting.
                self._reply(sock)
                raise ServiceUnavailable(message="the service closed the connection while the job was sent")
            return self._follow(sock, on_progress, on_status, is_cancelled)
        finally:
            sock.close()

    def _follow(self, sock, on_progress, on_status, is_cancelled) -> RawImage | None:
        cancel_sent_at = None
        notices: list[str] = []
        while True:
            if cancel_sent_at is None and is_cancelled():
                try:
                    send_frame(sock, {"type": "cancel"})
                except OSError:
                    raise JobCancelled("cancelled", "cancelled") from None
                cancel_sent_at = time.monotonic()
            readable, _, _ = select.select([sock], [], [], 0.1)
            if not readable:
                if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > self.timeout:
                    raise JobCancelled("cancelled", "cancelled (the service did not confirm in time)")
                continue
            try:
                header, payload = recv_frame(sock)
            except ConnectionClosed:
                raise ServiceUnavailable(message="the service closed the connection during the job") from None
            except socket.timeout:
                raise ServiceUnavailable(message="the service stopped sending in the middle of a message") from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise ServiceUnavailable(message=f"lost the connection to the service: {e}") from None
            kind = header.get("type")
            if kind == "progress":
                if on_progress is not None:
                    event = {k: v for k, v in header.items() if k not in ("type", "payload_size")}
                    if "preview" in event:
                        event["preview"] = RawImage(data=payload, **event["preview"])
                    on_progress(event)
            elif kind in ("accepted", "started", "notice"):
                if kind == "notice":
                    notices.append(str(header.get("message", "")))
                if on_status is not None:
                    on_status(dict(header))
            elif kind == "result":
                info = {k: v for k, v in header.items() if k not in ("type", "payload_size")}
                info["notices"] = notices
                self.last_result = info
                if "path" in header:
                    return None
                return RawImage(header["width"], header["height"], header["channels"], header["bit_depth"],
                                payload, info=info)
            elif kind == "error":
                raise ServiceError.from_mapping(header)
            # Messages of types this client does not know are ignored (see Versioning).


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a threading.Event or a callable")


# ---- finding or starting a service --------------------------------------------------------------

def start_private_service(python: str, socket_path: str, idle_exit: float = 300, device: str = "auto",
                          log_path: str | None = None, timeout: float = 120.0, env: dict | None = None,
                          cwd: str | None = None) -> subprocess.Popen:
    """Start `python -m nst_core serve` detached and wait until it answers on `socket_path`.

    Its output goes to `log_path` (default: nst-serve.log beside the socket). Raises
    ServiceUnavailable with the end of that log when it does not come up within `timeout` s.
    """
    socket_path = os.path.abspath(socket_path)
    folder = os.path.dirname(socket_path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    problem = socket_folder_problem(folder)
    if problem:
        raise ServiceUnavailable(message=f"not starting a service at {socket_path}: {problem}")
    log_path = log_path or os.path.join(folder, "nst-serve.log")
    cmd = [python, "-m", "nst_core", "serve", "--socket", socket_path, "--idle-exit", f"{idle_exit:g}",
           "--device", device]
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, env=env, cwd=cwd)
        except OSError as e:
            raise ServiceUnavailable(message=f"cannot start the Neural Style service with {python}: {e}") from None
    probe = ServiceClient(socket_path, timeout=2.0)
    deadline = time.monotonic() + timeout
    while True:
        if probe.ping():
            return proc
        if proc.poll() is not None:
            if probe.ping():  # another service won the race to this socket: use it
                return proc
            raise ServiceUnavailable(message=(
                f"the Neural Style service started with {python} exited (code {proc.returncode}); "
                f"its log ({log_path}) ends with:\n{_tail(log_path)}"))
        if time.monotonic() > deadline:
            proc.terminate()
            raise ServiceUnavailable(message=(
                f"the Neural Style service started with {python} did not answer within {timeout:g} s; "
                f"its log ({log_path}) ends with:\n{_tail(log_path)}"))
        time.sleep(0.1)


def connect(socket_path: str | None = None, python: str | None = None, idle_exit: float = 300,
            timeout: float = 10.0, **start_options) -> ServiceClient:
    """A client for the running service (`default_socket_path()` when no path is given: the system
    service's, else this user's own); else start a private one from `python` (if given) on
    `socket_path` or this user's own socket."""
    client = ServiceClient(socket_path, timeout=timeout)
    if client.ping():
        return client
    if not python:
        raise ServiceUnavailable(message=(
            f"no Neural Style service is listening on {client.socket_path}. Start one with "
            f"`nst serve` (or `nst serve --socket {client.socket_path}`), or set the Python interpreter "
            f"that has nst_core installed so that a private service can be started."))
    own = socket_path or user_socket_path()
    start_private_service(python, own, idle_exit=idle_exit, **start_options)
    return ServiceClient(own, timeout=timeout)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip() or "(empty)"
    except OSError:
        return "(no log)"


__all__ = [
    "PROTOCOL_VERSION", "default_socket_path", "user_socket_path", "system_socket_path", "candidate_sockets",
    "socket_problem", "socket_folder_problem", "RawImage", "ServiceError", "ServiceUnavailable", "ServiceBusy",
    "JobCancelled", "ServiceClient", "start_private_service", "connect",
]
