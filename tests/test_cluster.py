"""The daemon on a real Ray cluster on this machine: a head and worker nodes (real raylet processes,
ray.cluster_utils), each worker node offering the custom resource nst_gpu in place of a GPU.

Run with -m cluster (needs the [cluster] extra). Each node costs a few hundred MB and each worker
actor loads torch; jobs are tiny (random weights, 32 px).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_util import Daemon, NotifyListener, files, journal_rows, make_config, wait_until, write_image

pytestmark = pytest.mark.cluster

NODE = {"num_cpus": 1, "resources": {"nst_gpu": 1}}
# A dead node is noticed in about 3 s instead of Ray's default 15 s.
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def ray_cluster(nst_cache_dir):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["NST_CACHE_DIR"] = str(nst_cache_dir)  # the actors calibrate the random network once
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": FAST_HEALTH})
    c.workers = []  # the worker nodes this module started and has not killed
    yield c
    c.shutdown()


def set_workers(c, n: int) -> None:
    while len(c.workers) < n:
        c.workers.append(c.add_node(**NODE))
    while len(c.workers) > n:
        c.remove_node(c.workers.pop())


def kill_node(c, node, actor_pids) -> None:
    """SIGKILL every process of `node` by PID: its raylet and agents, and the actor living on it."""
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs] + list(actor_pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    c.workers.remove(node)


def after(d, line: str) -> int:
    """The index of the log line after `line` (where the next wait starts)."""
    return d.lines.index(line) + 1


def cluster_config(tmp_path, c, iterations=10, **settings):
    return make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}],
                       settings={"cluster": c.address, "cluster_resource": "nst_gpu", "settle": 0.2,
                                 "scan_interval": 5, **settings},
                       defaults={"iterations": iterations})


def test_no_worker_files_wait_until_one_joins(tmp_path, ray_cluster):
    set_workers(ray_cluster, 0)
    cfg = cluster_config(tmp_path, ray_cluster)
    listener = NotifyListener()
    try:
        with Daemon(cfg, env={"NOTIFY_SOCKET": listener.name}) as d:
            d.start()
            for i in range(2):
                write_image(tmp_path / "in" / f"a{i}.png", i)
            listener.wait_for("STATUS", "waiting for cluster workers", timeout=30)
            time.sleep(6)  # more than a scan: nothing fails while no worker is there
            assert files(tmp_path / "in" / "failed") == [] and files(tmp_path / "out") == []
            assert sorted(p.name for p in files(tmp_path / "in")) == ["a0.png", "a1.png"]
            rows = journal_rows(tmp_path / "state" / "journal.sqlite")  # one waits in the scheduler's queue
            assert {r["state"] for r in rows} <= {"queued", "running"} and all(r["attempts"] <= 1 for r in rows)
            set_workers(ray_cluster, 1)
            d.wait_log("cluster worker", timeout=90)
            wait_until(lambda: len(files(tmp_path / "out")) == 2, 120, "both outputs once a worker joined")
            assert d.stop() == 0
    finally:
        listener.close()
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert [(r["state"], r["attempts"]) for r in rows] == [("done", 1), ("done", 1)]


def test_batch_is_spread_over_the_workers_and_each_output_arrives_once(tmp_path, ray_cluster):
    set_workers(ray_cluster, 2)
    sock = tmp_path / "nst.sock"
    cfg = cluster_config(tmp_path, ray_cluster, socket=str(sock))
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: len(re.findall(r"cluster worker \S+ joined", d.text)) == 2, 90, "two workers")
        joined = set(re.findall(r"cluster worker (\S+) joined", d.text))
        n = 8
        for i in range(n):
            write_image(tmp_path / "in" / f"b{i}.png", 100 + i)
        wait_until(lambda: len(files(tmp_path / "in" / "processed")) == n, 180, "every input processed")
        st = subprocess.run([sys.executable, "-m", "nst_core", "status", "--socket", str(sock)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert d.stop() == 0
    done_on = dict(re.findall(r"in/(b\d\.png) → .* on (\S+)\)", d.text))
    print("which worker did which:", done_on)
    assert sorted(done_on) == [f"b{i}.png" for i in range(n)]
    assert set(done_on.values()) == joined, "both workers took part"
    assert len(files(tmp_path / "out")) == n and files(tmp_path / "in" / "failed") == []
    assert all(r["state"] == "done" and r["attempts"] == 1 for r in journal_rows(tmp_path / "state" / "journal.sqlite"))
    assert st.returncode == 0, st.stderr
    assert "cluster   " + ray_cluster.address in st.stdout and "2 worker(s)" in st.stdout
    for name in joined:
        assert f"device    {name}: idle" in st.stdout


def test_killing_worker_nodes_mid_job_loses_nothing_and_duplicates_nothing(tmp_path, ray_cluster):
    set_workers(ray_cluster, 2)
    cfg = cluster_config(tmp_path, ray_cluster, iterations=300, max_attempts=6)  # jobs of a few seconds
    kills, n = 3, 8
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: len(re.findall(r"cluster worker \S+ joined", d.text)) == 2, 90, "two workers")
        for i in range(n):
            write_image(tmp_path / "in" / f"k{i}.png", 200 + i, (64, 48))
        mark = len(d.lines)
        for k in range(kills):
            line = d.wait_log(": started on ", 120, start=mark)
            name = line.rsplit(" ", 1)[1]
            pids = [int(p) for w, p in re.findall(r"cluster worker (\S+) joined \(pid (\d+)\)", d.text) if w == name]
            node = next(w for w in ray_cluster.workers if f"[{w.node_id[:6]}]" in name)
            time.sleep(0.3)
            kill_node(ray_cluster, node, pids)
            mark = after(d, d.wait_log("was lost while running the job", 60, start=mark))
            ray_cluster.workers.append(ray_cluster.add_node(**NODE))  # a machine comes back
        wait_until(lambda: len(files(tmp_path / "in" / "processed")) == n, 300, "every input processed")
        assert d.stop() == 0
    outs = files(tmp_path / "out")
    assert sorted(p.name for p in outs) == sorted(f"k{i}_r.png" for i in range(n)), "each output once, none twice"
    assert files(tmp_path / "in" / "failed") == [] and files(tmp_path / "in") == []
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert all(r["state"] == "done" for r in rows) and len(rows) == n
    lost = d.text.count("was lost while running the job")
    assert lost >= kills
    assert sum(r["attempts"] - 1 for r in rows) == lost, "each loss cost its job one attempt"
    assert not list((tmp_path / "out").glob(".*")), "no temporary file left"


def test_a_job_lost_on_every_attempt_fails_into_failed_with_why(tmp_path, ray_cluster):
    set_workers(ray_cluster, 2)
    cfg = cluster_config(tmp_path, ray_cluster, iterations=100000, max_attempts=2)  # never ends by itself
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: len(re.findall(r"cluster worker \S+ joined", d.text)) == 2, 90, "two workers")
        write_image(tmp_path / "in" / "x.png", 300)
        mark = len(d.lines)
        for _ in range(2):
            name = d.wait_log("x.png: started on ", 120, start=mark).rsplit(" ", 1)[1]
            pids = [int(p) for w, p in re.findall(r"cluster worker (\S+) joined \(pid (\d+)\)", d.text) if w == name]
            kill_node(ray_cluster, next(w for w in ray_cluster.workers if f"[{w.node_id[:6]}]" in name), pids)
            mark = after(d, d.wait_log("was lost while running the job", 60, start=mark))
            ray_cluster.workers.append(ray_cluster.add_node(**NODE))
        wait_until(lambda: files(tmp_path / "in" / "failed", "x.png"), 60, "x.png in failed/")
        assert d.stop() == 0
    assert files(tmp_path / "out") == []
    err = (tmp_path / "in" / "failed" / "x.png.error.json").read_text()
    assert "gave up after 2 attempts" in err and "lost node" in err
    [row] = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert (row["state"], row["attempts"]) == ("failed", 2)


def test_scheduler_on_the_cluster_progress_cancel_and_interactive_first(ray_cluster):
    """The scheduler alone (this process the driver): progress numbers arrive, a cancel reaches the
    running actor, and an interactive job overtakes queued batch jobs, as on local workers."""
    import torch

    from nst_core import StyleParams
    from nst_core.errors import Cancelled
    from nst_core.images import Picture
    from nst_core.service import cluster

    set_workers(ray_cluster, 1)
    cluster.POLL = 0.5
    from nst_core.service.scheduler import Scheduler

    s = Scheduler(cluster=ray_cluster.address, cluster_resource="nst_gpu")
    s.start()
    try:
        wait_until(lambda: s.devices, 90, "a worker")
        pic = lambda seed: Picture(torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(seed)))  # noqa: E731
        params = StyleParams(size=32, iterations=100000, weights="random", content_layers=("relu2_1",),
                             style_layers=("relu1_1", "relu2_1"))
        steps = []
        long = s.submit(pic(1), [pic(2)], params, progress=lambda p: steps.append(p.step))
        wait_until(lambda: len(steps) >= 3, 60, "progress from the actor")
        assert steps == sorted(steps) and steps[0] >= 1
        order = []
        batch = s.submit(pic(3), [pic(2)], params.replace(iterations=5), priority="batch")
        inter = s.submit(pic(4), [pic(2)], params.replace(iterations=5), priority="interactive")
        for j in (batch, inter):
            j.add_done_callback(lambda job: order.append(job.priority))
        t = time.monotonic()
        long.cancel()
        with pytest.raises(Cancelled):
            long.result(timeout=30)
        assert time.monotonic() - t < 10
        assert inter.result(timeout=60).picture.rgb.shape == (3, 32, 24)
        batch.result(timeout=60)
        assert order == ["interactive", "batch"]
        st = s.status()
        assert st["cluster"]["workers"] == 1 and st["jobs"] == {"done": 2, "failed": 0, "cancelled": 1}
    finally:
        s.stop(cancel_running=True)
