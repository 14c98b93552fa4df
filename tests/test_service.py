"""The job service for real: `python -m nst_core serve` in a subprocess, real Unix sockets and signals.

Jobs use random weights at 32 px. A "long" job (thousands of iterations) keeps the worker busy
until the test cancels it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nst_core.service import client as nc

REPO = Path(__file__).resolve().parents[1]
FAST = {"weights": "random", "size": 32, "iterations": 2}
LONG = {"weights": "random", "size": 32, "iterations": 100_000}


# ---- helpers ------------------------------------------------------------------------------------

class Server:
    """`python -m nst_core serve` as a subprocess."""

    def __init__(self, sock: Path, *args: str, log: Path | None = None, device: str = "cpu"):
        self.sock = str(sock)
        self.log = log or Path(f"{sock}.log")
        self.cmd = [sys.executable, "-m", "nst_core", "serve", "--socket", self.sock, "--device", device, *args]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Server":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        probe = nc.ServiceClient(self.sock, timeout=5)
        while not probe.ping():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout} s:\n{self.log_text()}")
            time.sleep(0.1)

    def client(self, **kw) -> nc.ServiceClient:
        return nc.ServiceClient(self.sock, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def raw(w: int, h: int, channels: int = 4, bit_depth: int = 8, seed: int = 1) -> nc.RawImage:
    n = w * h * channels * bit_depth // 8
    return nc.RawImage(w, h, channels, bit_depth, bytes((i * 31 + seed * 7 + i // 5) % 256 for i in range(n)))


def connect_raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def hello(s: socket.socket) -> dict:
    nc.send_frame(s, {"type": "hello", "protocol": 1, "client": "test"})
    reply, _ = nc.recv_frame(s)
    assert reply["type"] == "hello", reply
    return reply


def closed(s: socket.socket) -> bool:
    """True when the server has closed its end (EOF or reset)."""
    try:
        s.settimeout(10)
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class BackgroundJob:
    """client.stylize in a thread, recording its events and its outcome."""

    def __init__(self, server: Server, params: dict, priority: str = "interactive", **kw):
        self.events: list[dict] = []
        self.status: list[dict] = []
        self.cancel = threading.Event()
        self.outcome = None
        self.error: BaseException | None = None
        self.finished_at = None

        def run():
            try:
                self.outcome = server.client().run_job(
                    raw(24, 16), [raw(16, 16, 3)], params, priority=priority, cancel=self.cancel,
                    on_progress=self.events.append, on_status=self._status, **kw)
            except BaseException as e:  # noqa: BLE001 - recorded for the test
                self.error = e
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _status(self, event):
        self.status.append({**event, "at": time.monotonic()})

    def started_at(self):
        return next((e["at"] for e in self.status if e["type"] == "started"), None)

    def wait_progress(self, timeout=60):
        wait_for(lambda: self.events or self.error, timeout, "a progress event")
        assert self.error is None, self.error

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job did not end"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    top = tmp_path_factory.mktemp("svc")
    srv = Server(top / "run" / "nst" / "nst.sock", "--max-queue", "3", log=top / "server.log").start()
    yield srv
    srv.stop()


# ---- the socket ---------------------------------------------------------------------------------

def test_socket_permissions_and_status(server):
    st = os.stat(server.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.sock)).st_mode) == 0o700
    status = server.client().status()
    assert status["devices"] == ["cpu"] and status["pid"] == server.proc.pid
    assert status["queue"]["max"] == 3
    out = subprocess.run([sys.executable, "-m", "nst_core", "status", "--socket", server.sock], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "device    cpu" in out.stdout and "queue     0 interactive, 0 batch (max 3)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "nst_core", "status", "--socket", server.sock, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["socket"] == server.sock


def test_status_when_nothing_listens(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nst_core", "status", "--socket", str(tmp_path / "none.sock")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "no Neural Style service is listening" in out.stderr and "nst serve" in out.stderr


def test_client_is_standalone_stdlib(server, tmp_path):
    """The client as the GIMP plug-in ships it: one file, no site-packages at all (-I -S)."""
    (tmp_path / "nst_client.py").write_bytes((REPO / "nst_core/service/client.py").read_bytes())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nst_client as c;"
            "cl = c.ServiceClient(sys.argv[2]); assert cl.ping();"
            "print(cl.status()['devices'], sorted(m for m in ('torch', 'numpy', 'PIL', 'nst_core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path), server.sock],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['cpu'] []"
    out = subprocess.run([sys.executable, "-c", "import sys, nst_core.service; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_live_socket_is_not_stolen(server):
    before = os.stat(server.sock).st_ino
    for attempt in ("lock held", "lock file gone"):
        if attempt == "lock file gone":  # the socket itself must still be probed and kept
            os.unlink(server.sock + ".lock")
        other = Server(Path(server.sock), log=Path(server.log).with_name(f"other-{len(attempt)}.log"))
        other.start(wait=False)
        assert other.proc.wait(60) == 2
        assert "already" in other.log_text() and server.sock in other.log_text(), other.log_text()
        assert os.stat(server.sock).st_ino == before
        assert server.client().ping()


# ---- jobs ---------------------------------------------------------------------------------------

def test_job_with_raw_pixels_progress_and_preview(server):
    content = raw(32, 24, 4, 8)
    events, status = [], []
    out = server.client().run_job(content, [raw(20, 20, 3, 8, seed=2)], {**FAST, "iterations": 3},
                                  on_progress=events.append, on_status=status.append, preview=16,
                                  preview_interval=0)
    assert (out.width, out.height, out.channels, out.bit_depth) == (32, 24, 4, 8)
    assert len(out.data) == 32 * 24 * 4
    assert out.data[3::4] == content.data[3::4], "alpha must come back exactly"
    assert out.data != content.data
    assert "random" in out.info["weights_note"]
    assert set(out.info["losses"]) >= {"total", "content", "style"}
    assert [e["type"] for e in status] == ["accepted", "started"]
    assert events[0]["step"] == 1 and events[-1]["step"] == events[-1]["total"] == 3
    previews = [e["preview"] for e in events if "preview" in e]
    assert previews and all(max(p.width, p.height) <= 16 and p.channels == 4 for p in previews)
    assert all(len(p.data) == p.expected_size for p in previews)


def test_job_paths_16_bit_and_output_file(server, tmp_path):
    from PIL import Image

    Image.new("RGB", (30, 20), (200, 40, 10)).save(tmp_path / "content.png")
    Image.new("RGB", (16, 16), (10, 90, 200)).save(tmp_path / "style.png")
    out = server.client().run_job(str(tmp_path / "content.png"), [str(tmp_path / "style.png")], FAST,
                                  result_format={"channels": 3, "bit_depth": 16})
    assert (out.width, out.height, out.channels, out.bit_depth) == (32, 21, 3, 16)
    assert len(out.data) == 32 * 21 * 3 * 2
    target = tmp_path / "out.png"
    client = server.client()
    assert client.run_job(raw(24, 16, 4, 16), [str(tmp_path / "style.png")], FAST, output_path=str(target)) is None
    assert client.last_result["path"] == str(target)
    with Image.open(target) as im:
        assert im.size == (32, 21) and "random" in im.info.get("nst:note", "")
    assert not [p for p in tmp_path.iterdir() if p.name not in ("content.png", "style.png", "out.png")]


def test_two_clients_at_once(server):
    jobs = [BackgroundJob(server, {**FAST, "seed": i}) for i in range(2)]
    for j in jobs:
        j.join(120)
    for j in jobs:
        assert j.error is None, j.error
        assert (j.outcome.width, j.outcome.height) == (32, 21)
    assert jobs[0].outcome.info["job_id"] != jobs[1].outcome.info["job_id"]
    assert jobs[0].outcome.data != jobs[1].outcome.data  # different seeds
    cache = server.client().status()["workers"][0]["cache"]
    assert cache["style_target_hits"] >= 1, "the same style image comes from the session's cache"


def test_priority_cancel_and_busy(server):
    """Interactive before batch when the worker is busy; a full queue says busy; cancel works."""
    blocker = BackgroundJob(server, LONG, priority="batch")
    blocker.wait_progress()
    batch = BackgroundJob(server, FAST, priority="batch")
    wait_for(lambda: batch.status, what="batch accepted")
    interactive = BackgroundJob(server, FAST, priority="interactive")
    wait_for(lambda: interactive.status, what="interactive accepted")
    assert interactive.status[0]["position"] == 0 and batch.status[0]["position"] == 0
    filler = BackgroundJob(server, FAST, priority="batch")
    wait_for(lambda: filler.status, what="filler accepted")
    with pytest.raises(nc.ServiceBusy) as busy:
        server.client().run_job(raw(8, 8), [], {**FAST, "style_weight": 0})
    assert busy.value.kind == "busy" and "queue is full" in busy.value.message
    st = server.client().status()
    assert st["workers"][0]["running"]["priority"] == "batch"
    assert [j["priority"] for j in st["queue"]["jobs"]] == ["interactive", "batch", "batch"]

    t0 = time.monotonic()
    blocker.cancel.set()
    blocker.join(30)
    assert isinstance(blocker.error, nc.JobCancelled), blocker.error
    assert time.monotonic() - t0 < 15
    for j in (interactive, batch, filler):
        j.join(120)
        assert j.error is None, j.error
    assert interactive.started_at() < batch.started_at() < filler.started_at()
    assert server.client().status()["jobs"]["cancelled"] >= 1


def test_client_disconnect_cancels_its_job(server):
    before = server.client().status()["jobs"]["cancelled"]
    s = connect_raw(server.sock)
    hello(s)
    nc.send_frame(s, {"type": "job", "content": raw(24, 16).spec(), "styles": [], "params": {**LONG, "style_weight": 0}},
                  raw(24, 16).data)
    seen = []
    while "progress" not in seen:
        seen.append(nc.recv_frame(s)[0]["type"])
    assert seen[:2] == ["accepted", "started"]
    s.close()
    wait_for(lambda: server.client().status()["workers"][0]["running"] is None, 30, "the job to stop")
    assert server.client().status()["jobs"]["cancelled"] == before + 1


# ---- bad requests -------------------------------------------------------------------------------

def _error(s) -> dict:
    header, _ = nc.recv_frame(s)
    assert header["type"] == "error", header
    return header


def test_bad_requests_get_errors_and_the_service_stays_up(server, tmp_path):
    path = server.sock
    # Malformed JSON: an error, then the connection is closed.
    s = connect_raw(path)
    s.sendall(struct.pack(">I", 9) + b"{not json")
    err = _error(s)
    assert err["kind"] == "protocol" and "malformed JSON" in err["message"]
    assert closed(s)
    # An absurd header length is refused without reading it.
    s = connect_raw(path)
    s.sendall(struct.pack(">I", 0xFFFFFFFF))
    assert _error(s)["kind"] == "protocol"
    assert closed(s)
    # Anything before hello.
    s = connect_raw(path)
    nc.send_frame(s, {"type": "status"})
    assert "hello" in _error(s)["message"]
    # A protocol version the server does not speak.
    s = connect_raw(path)
    nc.send_frame(s, {"type": "hello", "protocol": 99})
    err = _error(s)
    assert err["kind"] == "protocol" and err["supported"] == [1]
    # Unknown message type and unknown fields: an error, and the connection stays usable.
    s = connect_raw(path)
    hello(s)
    nc.send_frame(s, {"type": "launch"})
    assert "unknown message type" in _error(s)["message"]
    nc.send_frame(s, {"type": "ping", "colour": "red"})
    assert _error(s)["field"] == "colour"
    img = raw(8, 8)
    nc.send_frame(s, {"type": "job", "content": img.spec(), "styles": [], "params": FAST, "speed": 11})
    err = _error(s)
    assert err["kind"] == "protocol" and err["field"] == "speed"
    # Bad parameters: the engine's own wording.
    nc.send_frame(s, {"type": "job", "content": {"path": str(tmp_path / "c.png")}, "styles": [],
                      "params": {"size": 3}})
    err = _error(s)
    assert err["kind"] == "param" and err["field"] == "size" and "between 16 and 16384" in err["message"]
    nc.send_frame(s, {"type": "job", "content": {"path": "relative.png"}, "styles": []})
    assert _error(s)["field"] == "content.path"
    # A missing file: the job runs and fails with an image error naming the path.
    nc.send_frame(s, {"type": "job", "content": {"path": str(tmp_path / "missing.png")}, "styles": [],
                      "params": {**FAST, "style_weight": 0}})
    assert nc.recv_frame(s)[0]["type"] == "accepted"
    frames = [nc.recv_frame(s)[0] for _ in range(2)]
    assert frames[0]["type"] == "started"
    assert frames[1]["kind"] == "image" and frames[1]["path"].endswith("missing.png")
    nc.send_frame(s, {"type": "ping"})
    assert nc.recv_frame(s)[0]["type"] == "pong"
    # Wrong pixel count: answered before the payload is read, then closed.
    s = connect_raw(path)
    hello(s)
    s.sendall(_frame({"type": "job", "content": img.spec(), "styles": [], "params": FAST,
                      "payload_size": len(img.data) - 1}) + img.data[:-1])
    err = _error(s)
    assert err["kind"] == "protocol" and "wrong pixel count" in err["message"]
    assert closed(s)
    # Huge dimensions: refused from the header alone (no payload is ever sent).
    s = connect_raw(path)
    hello(s)
    huge = {"width": 100_000, "height": 100_000, "channels": 4, "bit_depth": 16}
    s.sendall(_frame({"type": "job", "content": huge, "styles": [], "params": FAST,
                      "payload_size": 100_000 * 100_000 * 8}))
    err = _error(s)
    assert err["kind"] == "image" and "pixels is more than" in err["message"]
    assert closed(s)
    # The client library checks its own images too.
    with pytest.raises(nc.ServiceError):
        server.client().run_job(nc.RawImage(8, 8, 4, 8, b"\0" * 10), [], FAST)
    # Still up and still working.
    out = server.client().run_job(raw(16, 16), [], {**FAST, "style_weight": 0})
    assert (out.width, out.height) == (32, 32)


def _frame(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body


# ---- lifecycle ----------------------------------------------------------------------------------

def test_stale_socket_is_replaced_and_sigterm_mid_job_exits_cleanly(tmp_path):
    sock = tmp_path / "s.sock"
    # A process that listened on the socket and was killed leaves the file behind.
    dead = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX);"
                             "s.bind(sys.argv[1]); s.listen(); print('up', flush=True); time.sleep(60)", str(sock)],
                            stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline() == "up\n"
    dead.kill()
    dead.wait()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert not nc.ServiceClient(str(sock)).ping()
    srv = Server(sock, "--on-stop", "cancel").start()
    try:
        assert "stale socket" in srv.log_text()
        job = BackgroundJob(srv, LONG)
        job.wait_progress()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        job.join(30)
        assert isinstance(job.error, nc.ServiceUnavailable) and "shutting down" in job.error.message, job.error
        assert not sock.exists()
        assert "SIGTERM received" in srv.log_text()
    finally:
        srv.stop()


def test_private_service_and_idle_exit(tmp_path):
    sock = str(tmp_path / "p" / "nst.sock")
    with pytest.raises(nc.ServiceUnavailable) as e:
        nc.connect(sock)
    assert "nst serve" in e.value.message
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = nc.start_private_service(sys.executable, sock, idle_exit=1, device="cpu", env=env)
    try:
        client = nc.connect(sock)
        assert client.status()["idle_exit"] == 1
        # A connected client keeps it alive past the idle time.
        s = connect_raw(sock)
        hello(s)
        time.sleep(2)
        assert proc.poll() is None
        s.close()
        assert proc.wait(30) == 0
        assert not os.path.exists(sock)
        assert "idle for" in (tmp_path / "p" / "nst-serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.gpu
def test_gpu_out_of_memory_is_a_job_error_and_the_service_stays_up(tmp_path):
    """Fill the GPU from this process, so that the service's next job runs out of memory."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    srv = Server(tmp_path / "s.sock", device="cuda").start()
    try:
        client = srv.client(timeout=60)
        job = {"weights": "random", "size": 1024, "iterations": 1, "levels": 1}
        client.run_job(raw(64, 64), [raw(64, 64, 3)], {**job, "size": 64})  # CUDA context and network loaded
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(free - (256 << 20), dtype=torch.uint8, device="cuda")
        try:
            with pytest.raises(nc.ServiceError) as e:
                client.run_job(raw(64, 64), [raw(64, 64, 3)], job)
            assert e.value.kind == "out_of_memory" and "out of memory" in e.value.message
            notices = []
            out = client.run_job(raw(64, 64), [raw(64, 64, 3)], job, allow_cpu_fallback=True,
                                 on_status=lambda ev: ev["type"] == "notice" and notices.append(ev["message"]))
            assert out.width == 1024 and "retrying once on the CPU" in notices[0]
            assert out.info["device"].startswith("cpu")
        finally:
            del hog
            torch.cuda.empty_cache()
        out = client.run_job(raw(64, 64), [raw(64, 64, 3)], job)
        assert out.width == 1024 and out.info["device"].startswith("cuda")
        assert client.status()["jobs"]["failed"] == 1
    finally:
        srv.stop()


# ---- hostile clients: memory, slow senders (issue 9) ----------------------------------------------

def rss(pid: int) -> int:
    """Resident memory of a process in bytes (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_announced_gigabyte_takes_no_memory_and_all_connections_share_a_budget(tmp_path):
    """Connections that announce 1 GiB of pixels and send nothing: memory grows only with what
    arrives, and the announcements of all connections together are bounded (busy beyond)."""
    srv = Server(tmp_path / "s.sock").start()
    try:
        big = {"width": 8192, "height": 8192, "channels": 4, "bit_depth": 16}  # 512 MiB each
        gib = 2 * 8192 * 8192 * 8
        before = rss(srv.proc.pid)
        first = connect_raw(srv.sock)
        hello(first)
        first.sendall(_frame({"type": "job", "content": big, "styles": [big], "params": FAST, "payload_size": gib}))
        wait_for(lambda: rss(srv.proc.pid) - before > 64 << 20
                 or srv.client().status().get("memory_budget", {}).get("used") == gib, what="the header to be read")
        assert rss(srv.proc.pid) - before < 64 << 20, "an announced payload must not be allocated"
        assert srv.client().status()["memory_budget"] == {"total": gib, "used": gib}
        # A second announcement over the budget is refused at once, before any of its bytes are read.
        second = connect_raw(srv.sock)
        hello(second)
        second.sendall(_frame({"type": "job", "content": big, "styles": [], "params": FAST,
                               "payload_size": gib // 2}))
        err = _error(second)
        assert err["kind"] == "busy" and "try again later" in err["message"], err
        assert closed(second)
        with pytest.raises(nc.ServiceBusy):
            srv.client().run_job(raw(16, 16), [], {**FAST, "style_weight": 0})
        # Bytes take memory as they arrive, and no more.
        first.sendall(b"\x7f" * (48 << 20))
        wait_for(lambda: rss(srv.proc.pid) - before > 40 << 20, what="the sent bytes to be held")
        assert rss(srv.proc.pid) - before < 160 << 20
        # A client that goes away gives its share back; the service works on.
        first.close()
        wait_for(lambda: srv.client().status()["memory_budget"]["used"] == 0, what="the budget to be released")
        out = srv.client().run_job(raw(16, 16), [], {**FAST, "style_weight": 0})
        assert (out.width, out.height) == (32, 32)
        assert srv.client().status()["memory_budget"]["used"] == 0, "a finished job gives its pixels back"
    finally:
        srv.stop()


def test_work_a_job_asks_for_is_bounded_by_the_device(server, tmp_path):
    """Output pixels and style pixels beyond what the device can hold are a clear param error,
    from the header alone for pixels, once read for files; the service stays up."""
    client = server.client()
    with pytest.raises(nc.ServiceError) as e:  # 16384 × 16384 output from a tiny picture
        client.run_job(raw(64, 64), [], {**FAST, "size": 16384, "style_weight": 0})
    assert e.value.kind == "param" and e.value.details["field"] == "size", e.value
    assert "16384×16384 = 268,435,456 pixels is too large" in e.value.message and "on cpu" in e.value.message
    with pytest.raises(nc.ServiceError) as e:  # a style worked at 8 × 2048 = 16384 px on its long side
        client.run_job(raw(64, 64), [raw(32, 32, 3)], {**FAST, "size": 2048, "style_scale": 8})
    assert e.value.kind == "param" and e.value.details["field"] == "style_scale", e.value
    assert "style 1 would be worked at 16384×16384" in e.value.message
    # A file is measured when the service reads it.
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 20, 200)).save(tmp_path / "square.png")
    with pytest.raises(nc.ServiceError) as e:
        client.run_job(str(tmp_path / "square.png"), [], {**FAST, "size": 16384, "style_weight": 0})
    assert e.value.kind == "param" and e.value.details["field"] == "size", e.value
    out = client.run_job(raw(16, 16), [], {**FAST, "style_weight": 0})
    assert (out.width, out.height) == (32, 32)
    assert 0 < client.server_info["limits"]["max_work_pixels"] <= 8192 * 8192


def _dribble(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send one byte every `every` seconds until done, stopped, or the server hangs up."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        try:
            sock.sendall(data[i:i + 1])
        except OSError:
            return


def test_slow_hello_and_slow_request_are_cut_at_their_deadline_and_idle_exit_still_fires(tmp_path):
    """Slowloris: a byte every 0.5 s, well inside any per-read timeout, never completes a hello or
    a request before the (2 s) deadline; the connections are cut and the idle service exits."""
    srv = Server(tmp_path / "s.sock", "--request-timeout", "2", "--idle-exit", "1").start(wait=False)
    stop = threading.Event()
    try:
        wait_for(lambda: os.path.exists(srv.sock) or srv.proc.poll() is not None, 90, "the socket")
        # Connected before the service is idle (it binds before it loads the engine).
        slow_hello = connect_raw(srv.sock)
        idle_client = connect_raw(srv.sock)
        t0 = time.monotonic()
        threading.Thread(target=_dribble, args=(slow_hello, _frame({"type": "hello", "protocol": 1}), 0.5, stop),
                         daemon=True).start()
        hello(idle_client)  # a client that said hello may wait; once it starts a request, it may not
        ping = _frame({"type": "ping"})
        t1 = time.monotonic()
        threading.Thread(target=_dribble, args=(idle_client, ping, 0.5, stop), daemon=True).start()

        slow_hello.settimeout(120)
        err = _error(slow_hello)
        assert err["kind"] == "protocol" and "hello did not arrive whole within 2 s" in err["message"], err
        assert time.monotonic() - t0 >= 2
        assert closed(slow_hello)
        idle_client.settimeout(120)
        err = _error(idle_client)
        assert err["kind"] == "protocol" and "request did not arrive whole within 2 s" in err["message"], err
        assert time.monotonic() - t1 >= 2
        assert closed(idle_client)
        assert srv.proc.wait(60) == 0, srv.log_text()
        assert "idle for" in srv.log_text()
    finally:
        stop.set()
        srv.stop()


# ---- which socket a client uses (issue 8 §4) -----------------------------------------------------

def _status(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nst_core", "status", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def test_clients_find_the_system_socket_first_and_status_says_what_it_tried(server, tmp_path):
    system = tmp_path / "system" / "nst.sock"
    own_runtime = tmp_path / "runtime"
    env = {k: v for k, v in os.environ.items() if k != "NST_SOCKET"}
    env.update(NST_SYSTEM_SOCKET=str(system), XDG_RUNTIME_DIR=str(own_runtime))
    own = own_runtime / "nst" / "nst.sock"
    code = "from nst_core.service import client as c; print(c.default_socket_path()); print(c.user_socket_path())"

    def paths():
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    # Neither exists: clients use (and a private service would start on) the user's own socket.
    assert paths() == [str(own), str(own)]
    out = _status(env)
    assert out.returncode == 1
    assert f"{system} (the system service): absent" in out.stderr
    assert f"{own} (your own service): absent" in out.stderr
    # A stale system socket (nothing listens) is passed over, and said to be stale.
    system.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(system))
    dead.close()
    assert paths() == [str(own), str(own)]
    assert "(the system service): not answering: nothing accepts connections on it (a stale socket)" in \
        _status(env).stderr
    # A live system socket is what clients use; the user's own is still where `nst serve` listens.
    system.unlink()
    system.symlink_to(server.sock)
    assert paths() == [str(system), str(own)]
    out = _status(env)
    assert out.returncode == 0 and f"service   {server.sock}" in out.stdout, out.stderr
    # $NST_SOCKET overrides both, alone.
    out = _status({**env, "NST_SOCKET": str(tmp_path / "none.sock")})
    assert out.returncode == 1 and f"no Neural Style service is listening on {tmp_path / 'none.sock'} (absent)" \
        in out.stderr and "system service" not in out.stderr
