#!/usr/bin/env python3
"""Benchmark of the cluster backend (issue 13): what going through Ray costs per job, and how work
spreads over worker nodes. A real Ray cluster on this machine (ray.cluster_utils: a head and worker
nodes, each offering the custom resource nst_gpu in place of a GPU); needs the [cluster] extra.

Printed:
- transfer: a Picture to an actor on a worker node and back (what a job's pixels cost, both ways),
  at 512 and 4096 px, median of --repeat calls;
- job overhead at 512 px: the same job (random weights, --iterations) through a local Scheduler and
  through a cluster Scheduler with one worker node; the time outside the engine (wall time minus
  the Result's own elapsed) of each, whose difference is the actor call, the pixels both ways and
  the progress polling (the wall times differ also because a CPU actor runs torch on 1 thread);
- throughput: --jobs jobs (64 px, --tp-iterations) with 1, 2 and 3 worker nodes, jobs/s. With CPU
  workers on this machine every node shares the same cores: the figure is bounded by them (2
  here), and what it shows is that the work spreads, not a speed-up.

    .venv/bin/python benchmarks/bench_cluster.py
    .venv/bin/python benchmarks/bench_cluster.py --nodes 1,2 --jobs 6 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NODE = {"num_cpus": 1, "resources": {"nst_gpu": 1}}


def _picture(side: int, seed: int = 0):
    import torch

    from nst_core.images import Picture

    g = torch.Generator().manual_seed(seed)
    return Picture(torch.rand(3, side, side * 3 // 4, generator=g))


def _params(size, iterations):
    from nst_core import StyleParams

    return StyleParams(size=size, iterations=iterations, weights="random", content_layers=("relu2_1",),
                       style_layers=("relu1_1", "relu2_1"))


def transfer(repeat: int) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, resources={"nst_gpu": 1})
    class Echo:
        def back(self, picture):
            return picture

    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("nst_gpu"))
    echo = Echo.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    ray.get(echo.back.remote(None))
    out = {}
    for side in (512, 4096):
        pic = _picture(side)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            back = ray.get(echo.back.remote(pic))
            times.append(time.perf_counter() - t)
        assert back.rgb.shape == pic.rgb.shape
        mb = pic.rgb.numel() * 4 / 2**20
        out[side] = {"ms": statistics.median(times) * 1000, "MiB_each_way": mb}
        del pic, back
    ray.kill(echo)
    return out


def run_jobs(scheduler, n, size, iterations) -> float:
    """Seconds for n jobs of `size` px submitted at once."""
    style = _picture(size, 2)
    t = time.perf_counter()
    jobs = [scheduler.submit(_picture(size, 10 + i), [style], _params(size, iterations)) for i in range(n)]
    for j in jobs:
        j.result(timeout=900)
    return time.perf_counter() - t


def job_overhead(address, repeat, iterations) -> dict:
    from nst_core.service import cluster as cl
    from nst_core.service.scheduler import Scheduler

    local = Scheduler(devices=("cpu",))
    remote = Scheduler(cluster=address, cluster_resource="nst_gpu")
    cl.POLL = 0.5
    remote.start()
    t = time.monotonic()
    while not remote.devices and time.monotonic() - t < 120:
        time.sleep(0.2)
    out = {}
    style = _picture(512, 2)
    for name, s in (("local", local), ("cluster", remote)):
        walls, outside = [], []
        for i in range(repeat + 1):  # the first warms networks, calibration and style targets
            t = time.perf_counter()
            result = s.submit(_picture(512, 10 + i), [style], _params(512, iterations)).result(timeout=900)
            if i:
                walls.append(time.perf_counter() - t)
                outside.append(walls[-1] - result.elapsed)
        out[name] = {"wall_ms": statistics.median(walls) * 1000, "outside_engine_ms": statistics.median(outside) * 1000}
    local.stop(cancel_running=True)
    remote.stop(cancel_running=True)  # also leaves the cluster (ray.shutdown)
    out["overhead_ms"] = out["cluster"]["outside_engine_ms"] - out["local"]["outside_engine_ms"]
    return out


def throughput(address, nodes, jobs, iterations) -> dict:
    from nst_core.service import cluster as cl
    from nst_core.service.scheduler import Scheduler

    cl.POLL = 0.5
    s = Scheduler(cluster=address, cluster_resource="nst_gpu")
    s.start()
    t = time.monotonic()
    while len(s.devices) < nodes and time.monotonic() - t < 180:
        time.sleep(0.2)
    run_jobs(s, nodes, 64, iterations)  # every worker warm
    handles = []
    t = time.perf_counter()
    for i in range(jobs):
        handles.append(s.submit(_picture(64, 100 + i), [_picture(64, 2)], _params(64, iterations)))
    for h in handles:
        h.result(timeout=900)
    took = time.perf_counter() - t
    per = {}
    for h in handles:
        per[h.device] = per.get(h.device, 0) + 1
    s.stop(cancel_running=True)
    return {"seconds": took, "jobs_per_s": jobs / took, "per_worker": per}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=2, help="iterations of the 512 px overhead job")
    ap.add_argument("--nodes", default="1,2,3", help="worker node counts for the throughput runs")
    ap.add_argument("--jobs", type=int, default=9)
    ap.add_argument("--tp-iterations", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(**NODE)]
    report = {"cores": os.cpu_count()}
    try:
        ray.init(address=c.address, log_to_driver=False)
        report["transfer"] = transfer(args.repeat)
        ray.shutdown()
        report["job_512"] = job_overhead(c.address, args.repeat, args.iterations)
        report["throughput"] = {}
        for n in [int(x) for x in args.nodes.split(",")]:
            while len(workers) < n:
                workers.append(c.add_node(**NODE))
            report["throughput"][n] = throughput(c.address, n, args.jobs, args.tp_iterations)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"bench_cluster: Ray {ray.__version__}, {report['cores']} cores; worker nodes are CPU processes on this machine")
    for side, r in report["transfer"].items():
        print(f"  transfer  {side:>4} px Picture to an actor and back: {r['ms']:8.1f} ms ({r['MiB_each_way']:.1f} MiB each way)")
    j = report["job_512"]
    print(f"  job 512 px, {args.iterations} it: wall local {j['local']['wall_ms']:.0f} ms, cluster "
          f"{j['cluster']['wall_ms']:.0f} ms (1 thread per actor); outside the engine local "
          f"{j['local']['outside_engine_ms']:.0f} ms, cluster {j['cluster']['outside_engine_ms']:.0f} ms: "
          f"overhead {j['overhead_ms']:+.0f} ms per job")
    for n, r in report["throughput"].items():
        print(f"  throughput {n} node(s): {args.jobs} jobs of 64 px x {args.tp_iterations} it in {r['seconds']:.1f} s = "
              f"{r['jobs_per_s']:.2f} jobs/s; per worker {sorted(r['per_worker'].values(), reverse=True)}")
    print(f"  (bounded by the {report['cores']} cores all nodes share here: the figure shows the work spreads, "
          f"not a speed-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
