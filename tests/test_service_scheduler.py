"""The Scheduler and ServiceServer embedded in-process, as the daemon uses them (real engine, CPU)."""

from __future__ import annotations

import grp
import os
import stat
import threading
import time

import pytest
import torch

from nst_core import StyleParams
from nst_core.errors import Cancelled, DeviceError
from nst_core.images import Picture
from nst_core.service import client as nc
from nst_core.service.scheduler import QueueFull, Scheduler, ServiceStopping
from nst_core.service.server import ServiceServer, ServiceSetupError

FAST = StyleParams(weights="random", size=32, iterations=2)
LONG = StyleParams(weights="random", size=32, iterations=100_000)


def picture(seed=0, h=16, w=24) -> Picture:
    return Picture(torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)))


def wait_for(predicate, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def scheduler():
    s = Scheduler(devices=("cpu",), max_queue=3)
    s.start()
    yield s
    s.stop(cancel_running=True, timeout=30)


def test_interactive_first_fifo_within_priority_and_bounded_queue(scheduler):
    started = []
    on_event = lambda name: (lambda kind, data: kind == "started" and started.append(name))  # noqa: E731
    steps = []
    blocker = scheduler.submit(picture(), [picture(1)], LONG, priority="batch", on_event=on_event("blocker"),
                               progress=lambda p: steps.append(p.step))
    wait_for(lambda: steps, what="the blocker to run")
    batch = scheduler.submit(picture(2), [picture(1)], FAST, priority="batch", on_event=on_event("batch"))
    first = scheduler.submit(picture(3), [picture(1)], FAST, priority="interactive", on_event=on_event("i1"))
    second = scheduler.submit(picture(4), [picture(1)], FAST, priority="interactive", on_event=on_event("i2"))
    assert (batch.position, first.position, second.position) == (0, 0, 1)
    with pytest.raises(QueueFull):
        scheduler.submit(picture(), [], FAST.replace(style_weight=0))
    st = scheduler.status()
    assert st["workers"][0]["running"]["job_id"] == blocker.id
    assert [j["job_id"] for j in st["queue"]["jobs"]] == [first.id, second.id, batch.id]

    blocker.cancel()
    with pytest.raises(Cancelled):
        blocker.result(30)
    for job in (first, second, batch):
        result = job.result(120)
        assert tuple(result.picture.rgb.shape) == (3, 21, 32)
    assert started == ["blocker", "i1", "i2", "batch"]
    assert scheduler.status()["jobs"] == {"done": 3, "failed": 0, "cancelled": 1}
    cache = scheduler.status()["workers"][0]["cache"]
    assert cache["style_target_hits"] >= 3, "the same style image must come from the session cache"


def test_cancel_queued_job_wrong_device_and_stop(scheduler):
    steps = []
    running = scheduler.submit(picture(), [], LONG.replace(style_weight=0, iterations=6),
                               progress=lambda p: steps.append(p.step))
    wait_for(lambda: steps, what="the job to run")
    queued = scheduler.submit(picture(), [], FAST.replace(style_weight=0))
    queued.cancel()
    with pytest.raises(Cancelled):
        queued.result(5)
    assert queued.state == "cancelled" and queued.started is None
    with pytest.raises(DeviceError, match="this service runs on cpu"):
        scheduler.submit(picture(), [], FAST.replace(device="cuda"))
    left = scheduler.submit(picture(), [], FAST.replace(style_weight=0))
    scheduler.stop(cancel_running=False, timeout=60)
    assert running.result(0).picture.width == 32, "a running job finishes on stop(cancel_running=False)"
    with pytest.raises(ServiceStopping):
        left.result(0)
    with pytest.raises(ServiceStopping):
        scheduler.submit(picture(), [], FAST)


def test_embedded_server_with_group_socket(tmp_path, scheduler):
    group = grp.getgrgid(os.getgid()).gr_name
    path = str(tmp_path / "run" / "nst.sock")
    server = ServiceServer(path, scheduler, mode=0o660, group=group, owns_scheduler=False)
    server.start()
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750
        with pytest.raises(ServiceSetupError, match="already"):
            ServiceServer(path, scheduler).start()
        events = []
        out = nc.ServiceClient(path).stylize(nc.RawImage(2, 2, 3, 8, bytes(range(12))), [],
                                             {"weights": "random", "size": 32, "iterations": 2, "style_weight": 0},
                                             on_progress=events.append)
        assert (out.width, out.height, out.channels) == (32, 32, 3) and events[-1]["step"] == 2
    finally:
        server.stop()
    assert not os.path.exists(path)
    # The daemon's scheduler outlives the socket.
    assert scheduler.submit(picture(), [], FAST.replace(style_weight=0)).result(60).picture.width == 32


def test_server_reports_a_missing_group(tmp_path, scheduler):
    with pytest.raises(ServiceSetupError, match="no such group"):
        ServiceServer(str(tmp_path / "s.sock"), scheduler, mode=0o660, group="no-such-group-nst").start()
    assert not (tmp_path / "s.sock").exists()
