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


def test_interactive_first_and_bounded_queue():
    scheduler = Scheduler(devices=("cpu",), max_queue=2)
    started = []
    on_event = lambda name: (lambda kind, data: kind == "started" and started.append(name))  # noqa: E731
    steps = []
    content_only = FAST.replace(style_weight=0)
    try:
        blocker = scheduler.submit(picture(), [], LONG.replace(style_weight=0), priority="batch",
                                   on_event=on_event("blocker"), progress=lambda p: steps.append(p.step))
        wait_for(lambda: steps, what="the blocker to run")
        batch = scheduler.submit(picture(2), [], content_only, priority="batch", on_event=on_event("batch"))
        inter = scheduler.submit(picture(3), [], content_only, priority="interactive", on_event=on_event("inter"))
        assert (batch.position, inter.position) == (0, 0)
        with pytest.raises(QueueFull, match="queue is full"):
            scheduler.submit(picture(), [], content_only)
        st = scheduler.status()
        assert st["workers"][0]["running"]["job_id"] == blocker.id
        assert [j["job_id"] for j in st["queue"]["jobs"]] == [inter.id, batch.id]
        blocker.cancel()
        with pytest.raises(Cancelled):
            blocker.result(30)
        for job in (inter, batch):
            assert tuple(job.result(120).picture.rgb.shape) == (3, 21, 32)
        assert started == ["blocker", "inter", "batch"]
        assert scheduler.status()["jobs"] == {"done": 2, "failed": 0, "cancelled": 1}
    finally:
        scheduler.stop(cancel_running=True, timeout=30)


def test_cancel_queued_job_wrong_device_and_stop(scheduler):
    steps = []
    running = scheduler.submit(picture(), [], LONG.replace(style_weight=0, iterations=4),
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
        out = nc.ServiceClient(path).run_job(nc.RawImage(2, 2, 3, 8, bytes(range(12))), [],
                                             {"weights": "random", "size": 32, "iterations": 2, "style_weight": 0},
                                             on_progress=events.append)
        assert (out.width, out.height, out.channels) == (32, 32, 3) and events[-1]["step"] == 2
        # Stopping the socket (not the scheduler) ends its clients' jobs as "unavailable".
        outcome, events = [], []
        gimp = threading.Thread(target=lambda: outcome.append(_attempt(
            path, {"weights": "random", "size": 32, "iterations": 100_000, "style_weight": 0}, events)))
        gimp.start()
        wait_for(lambda: events or outcome, what="the client's job to run")
    finally:
        server.stop()
    gimp.join(30)
    assert isinstance(outcome[0], nc.ServiceUnavailable) and "shutting down" in outcome[0].message, outcome
    assert not os.path.exists(path)
    # The daemon's scheduler outlives the socket.
    assert scheduler.submit(picture(), [], FAST.replace(style_weight=0)).result(60).picture.width == 32


def _attempt(path, params, events):
    try:
        return nc.ServiceClient(path).run_job(nc.RawImage(2, 2, 3, 8, bytes(12)), [], params, on_progress=events.append)
    except nc.ServiceError as e:
        return e


def test_server_reports_a_missing_group(tmp_path, scheduler):
    with pytest.raises(ServiceSetupError, match="no such group"):
        ServiceServer(str(tmp_path / "s.sock"), scheduler, mode=0o660, group="no-such-group-nst").start()
    assert not (tmp_path / "s.sock").exists()


def test_second_stop_request_cancels_the_running_job(tmp_path):
    scheduler = Scheduler(devices=("cpu",))
    server = ServiceServer(str(tmp_path / "s.sock"), scheduler)  # on_stop="finish"
    server.start()
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    steps = []
    job = scheduler.submit(picture(), [], LONG.replace(style_weight=0), progress=lambda p: steps.append(p.step))
    wait_for(lambda: steps, what="the job to run")
    server.request_stop()
    time.sleep(1.5)
    assert serving.is_alive() and not job.done(), "the first stop request lets the job finish"
    assert not (tmp_path / "s.sock").exists(), "no new clients while finishing"
    server.request_stop()
    serving.join(30)
    assert not serving.is_alive()
    with pytest.raises(ServiceStopping):
        job.result(0)


def test_stop_lets_the_running_job_finish_for_its_client(tmp_path):
    path = str(tmp_path / "s.sock")
    scheduler = Scheduler(devices=("cpu",))
    server = ServiceServer(path, scheduler)  # on_stop="finish"
    server.start()
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    events, outcome = [], {}
    # Long enough that the first job is still running when the stop request comes.
    params = {"weights": "random", "size": 32, "iterations": 100, "style_weight": 0}

    def run(name, priority):
        try:
            outcome[name] = nc.ServiceClient(path).run_job(nc.RawImage(2, 2, 3, 8, bytes(12)), [], params,
                                                           priority=priority, on_progress=events.append)
        except nc.ServiceError as e:
            outcome[name] = e

    first = threading.Thread(target=run, args=("running", "interactive"))
    first.start()
    wait_for(lambda: events or outcome, what="the first job to run")
    second = threading.Thread(target=run, args=("queued", "batch"))
    second.start()
    wait_for(lambda: scheduler.status()["queue"]["batch"] == 1, what="the second job to queue")
    server.request_stop()
    first.join(60)
    second.join(60)
    serving.join(60)
    assert isinstance(outcome["running"], nc.RawImage) and outcome["running"].width == 32
    assert events[-1]["step"] == 100
    assert isinstance(outcome["queued"], nc.ServiceUnavailable) and "did not run" in outcome["queued"].message
    assert not os.path.exists(path)


def test_a_job_handle_is_a_future_to_wait_on_with_the_standard_library(scheduler):
    """JobHandle's outcome is a concurrent.futures.Future: wait() and as_completed() work on it,
    its callbacks run once, and result(timeout) of a running job is the builtin TimeoutError."""
    from concurrent import futures

    steps = []
    running = scheduler.submit(picture(), [], LONG.replace(style_weight=0), progress=lambda p: steps.append(p.step))
    wait_for(lambda: steps, what="the job to run")
    with pytest.raises(TimeoutError, match=f"job {running.id} has not finished"):
        running.result(0.05)
    quick = scheduler.submit(picture(1), [], FAST.replace(style_weight=0))
    ended = []
    quick.add_done_callback(ended.append)
    running.cancel()
    done, pending = futures.wait([running.future, quick.future], timeout=120)
    assert not pending and isinstance(running.future.exception(), Cancelled)
    assert quick.future.result().picture.width == 32 and ended == [quick]
    late = []
    quick.add_done_callback(late.append)  # after the end: at once
    assert late == [quick] and ended == [quick]
