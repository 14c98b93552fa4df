"""One client connection of the job service: its requests read, its answers and events written.

A reader thread takes frames as their bytes arrive (against deadlines and the server's memory
budget), checks them with `protocol`, confines other users' clients (`access`) and hands jobs to
the scheduler; a writer thread sends what is queued for the client, so a slow client never slows
a job (progress events it has not taken yet are replaced by newer ones). A delivery thread per job
waits for the result and sends it back.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from contextlib import suppress

from ..errors import Busy, InternalError, NSTError, ProtocolError, ServiceStopping
from ..outputs import metadata, product_name, refuse_inputs
from . import access, limits, protocol
from . import client as wire
from .protocol import JobRequest

log = logging.getLogger("nst_core.service")

PROGRESS_INTERVAL = 0.05  # seconds between progress events (the first and last always go)


class _Close(Exception):
    """End the connection's read loop."""


class Connection:
    """One client: a thread that reads its requests and one that writes to it; its one job at a time."""

    def __init__(self, server, sock: socket.socket, number: int, peer: access.Peer):
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
            with suppress(OSError):
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
            with suppress(Exception):
                self.send_error(InternalError("internal error in the service while reading a request"))
        finally:
            self.cancel_job()
            self.close_after_pending()
            self._writer.join(10)
            with suppress(OSError):
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
                                                  f"(known: {', '.join(protocol.MESSAGE_TYPES)})"))

    def _check_fields(self, header: dict, allowed: set) -> None:
        err = protocol.unknown_field(header, allowed)
        if err is not None:
            self.send_error(err)
            raise _Skip

    def _hello(self, header: dict) -> None:
        try:
            self._check_fields(header, protocol.HELLO_FIELDS)
        except _Skip:
            return
        err = protocol.version_error(header)
        if err is not None:
            self.send({"type": "error", **err.to_mapping(), "supported": [protocol.PROTOCOL_VERSION]})
            self.close_after_pending()
            raise _Close
        client = header.get("client")
        self.client = str(client)[:100] if client is not None else None
        self.hello = True
        self.send({"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "server": product_name(),
                   "devices": self.server.scheduler.devices, "limits": self.server.limits})

    # -- jobs --

    def _job(self, header: dict, deadline: float) -> None:
        size = header.get("payload_size", 0)
        budget = self.server.budget
        try:
            if self.job is not None and not self.job.done():
                raise ProtocolError(None, "this connection's job is still running; one job at a time per "
                                          "connection (open another connection)")
            req = protocol.parse_job(header, self.server.limits)
            access.confine(self.peer, req.images(), req.params, req.output_path)
            protocol.check_raw_work(req, self.server.work_limit(req.params.device))
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
                content, styles = protocol.pictures(req, payload)
                del payload
                if req.output_path is not None:
                    from ..images import check_output_path

                    check_output_path(req.output_path)
                    refuse_inputs(req.output_path, [spec.get("path") for spec in [req.content, *req.styles]])
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

    def _progress_callback(self, req: JobRequest, holder: dict):
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
                event = {"type": "progress", "job_id": holder["job"].id, **protocol.json_safe(p.to_mapping())}
            payload = b""
            if want_preview:
                pic = p.image(req.preview["max_side"])  # None for a job on a cluster worker
                if pic is not None:
                    ch = channels or (4 if pic.alpha is not None else 3)
                    payload = picture_to_pixels(pic, ch, 8)
                    event["preview"] = {"width": pic.width, "height": pic.height, "channels": ch, "bit_depth": 8}
                    state["preview"] = now
            state["sent"] = now
            self.send(event, payload, coalesce=True)
        return on_progress

    def _deliver(self, job, req: JobRequest) -> None:
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
                      "losses": protocol.json_safe(result.losses), "elapsed": round(result.elapsed, 4),
                      "device": result.device}
            pic = result.picture
            if req.output_path is not None:
                save_image(pic, req.output_path, metadata(result, "nst serve"))
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
    return Busy(f"the service is busy: {n:,} more bytes of requests would exceed the {budget.total:,} bytes "
                f"that all its clients together may send it at once ({budget.used:,} in use); try again later")
