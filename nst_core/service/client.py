"""Client for the Neural Style job service (docs/PROTOCOL.md), and the protocol's framing.

Pure standard library (Python 3.10+), one self-contained file: the GIMP plug-in ships it beside
itself as ``nst_client.py``, and the server imports its framing from here.

    client = connect(python="/opt/nst/venv/bin/python")      # a running service, or a private one
    out = client.stylize(RawImage(w, h, 4, 8, data), ["/styles/wave.jpg"],
                         {"size": 512, "iterations": 300}, on_progress=print, cancel=event)
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20  # bytes of JSON in one frame header
_LEN = struct.Struct(">I")


def default_socket_path() -> str:
    """$NST_SOCKET, else $XDG_RUNTIME_DIR/nst/nst.sock, else /tmp/nst-$UID/nst.sock."""
    if os.environ.get("NST_SOCKET"):
        return os.environ["NST_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "nst", "nst.sock")
    return os.path.join("/tmp", f"nst-{os.getuid()}", "nst.sock")


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


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if k == 0:
            raise FrameError(f"the connection closed in the middle of a frame ({got} of {n} bytes)")
        got += k
    return buf


def recv_header(sock: socket.socket, max_header: int = MAX_HEADER) -> dict:
    """Read a frame's header; the payload (header["payload_size"] bytes) is left to the caller."""
    first = sock.recv(_LEN.size)
    if not first:
        raise ConnectionClosed()
    if len(first) < _LEN.size:
        first = bytes(first) + bytes(recv_exact(sock, _LEN.size - len(first)))
    (n,) = _LEN.unpack(first)
    if n < 2 or n > max_header:
        raise FrameError(f"frame header of {n} bytes (must be 2 to {max_header}); is this a Neural Style client?")
    raw = recv_exact(sock, n)
    try:
        header = json.loads(raw.decode("utf-8"))
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ServiceUnavailable(message=f"no Neural Style service is listening on {self.socket_path} ({e.strerror})") from None
        except OSError as e:
            sock.close()
            raise ServiceUnavailable(message=f"cannot connect to the Neural Style service at {self.socket_path}: {e}") from None
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

    def stylize(self, content, styles, params: dict, *, priority: str = "interactive",
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
    """A client for the running service; else start a private one from `python` (if given)."""
    client = ServiceClient(socket_path, timeout=timeout)
    if client.ping():
        return client
    if not python:
        raise ServiceUnavailable(message=(
            f"no Neural Style service is listening on {client.socket_path}. Start one with "
            f"`nst serve` (or `nst serve --socket {client.socket_path}`), or set the Python interpreter "
            f"that has nst_core installed so that a private service can be started."))
    start_private_service(python, client.socket_path, idle_exit=idle_exit, **start_options)
    return client


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip() or "(empty)"
    except OSError:
        return "(no log)"


__all__ = [
    "PROTOCOL_VERSION", "default_socket_path", "RawImage", "ServiceError", "ServiceUnavailable", "ServiceBusy",
    "JobCancelled", "ServiceClient", "start_private_service", "connect",
]
