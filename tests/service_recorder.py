"""A recording proxy in front of the real job service: what a client sent is what the service got.

It listens on its own Unix socket, forwards every frame unchanged in both directions to the real
service's socket, and keeps a copy of each job: the request header and its raw images (content
first, then styles, as docs/PROTOCOL.md lays them out), the progress events (and whether they
carried a preview), and the result. A side that closes closes the other side too, so a client that
goes away still cancels its job in the service.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

import numpy as np

from nst_core.service.client import ConnectionClosed, ServiceError, recv_frame, send_frame


@dataclass
class RecordedJob:
    header: dict
    payload: bytes
    progress: list = field(default_factory=list)  # progress headers as the service sent them
    result: dict | None = None
    result_pixels: bytes = b""
    error: dict | None = None

    def images(self) -> list[np.ndarray]:
        """The job's raw images as H×W×C arrays (uint8 or uint16), content first."""
        out, offset = [], 0
        for spec in [self.header["content"], *self.header["styles"]]:
            if "path" in spec:
                continue
            dtype = np.dtype("<u2") if spec["bit_depth"] == 16 else np.dtype(np.uint8)
            n = spec["width"] * spec["height"] * spec["channels"] * dtype.itemsize
            a = np.frombuffer(self.payload[offset:offset + n], dtype=dtype)
            out.append(a.reshape(spec["height"], spec["width"], spec["channels"]))
            offset += n
        return out

    def result_image(self) -> np.ndarray:
        r = self.result
        dtype = np.dtype("<u2") if r["bit_depth"] == 16 else np.dtype(np.uint8)
        return np.frombuffer(self.result_pixels, dtype=dtype).reshape(r["height"], r["width"], r["channels"])

    @property
    def previews(self) -> int:
        return sum(1 for p in self.progress if "preview" in p)


class RecordingProxy:
    """Forward `socket_path` → `upstream`, recording jobs in `self.jobs` (in arrival order)."""

    def __init__(self, socket_path: str, upstream: str):
        self.socket_path = socket_path
        self.upstream = upstream
        self.jobs: list[RecordedJob] = []
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(socket_path), exist_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_path)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def since(self, n: int) -> list[RecordedJob]:
        with self._lock:
            return list(self.jobs[n:])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            state = {"job": None}
            for src, dst, record in ((client, server, self._from_client), (server, client, self._from_service)):
                threading.Thread(target=self._pump, args=(src, dst, record, state), daemon=True).start()

    def _pump(self, src, dst, record, state) -> None:
        try:
            while True:
                header, payload = recv_frame(src, max_payload=1 << 31)
                record(header, payload, state)
                send_frame(dst, header, payload)
        except (ConnectionClosed, ServiceError, OSError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _from_client(self, header, payload, state) -> None:
        if header.get("type") == "job":
            job = RecordedJob(dict(header), bytes(payload))
            state["job"] = job
            with self._lock:
                self.jobs.append(job)

    def _from_service(self, header, payload, state) -> None:
        job = state["job"]
        if job is None:
            return
        kind = header.get("type")
        if kind == "progress":
            job.progress.append(dict(header))
        elif kind == "result":
            job.result, job.result_pixels = dict(header), bytes(payload)
        elif kind == "error" and header.get("job_id"):
            job.error = dict(header)
