#!/usr/bin/env python3
"""Benchmark of the job service's intake: what receiving a job's pixels costs.

Starts `python -m nst_core serve` (from this checkout, or --repo for another one, to compare
versions) on the CPU and prints, for jobs whose raw pixels total 64 MiB, 256 MiB and 1 GiB
(two 16-bit RGBA images, as GIMP sends a deep layer and a style):
- send → accepted: the client's time to hand over the pixels until the service has queued the job
  (reading, checking and decoding them), and the throughput that makes;
- the service's resident memory before, and its peak (VmHWM) after, each intake;
then, with connections that each announce 1 GiB and send nothing, how many are taken before the
rest are answered "busy", and the service's resident memory while they wait.

    .venv/bin/python benchmarks/bench_service_intake.py
    .venv/bin/python benchmarks/bench_service_intake.py --repo /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from nst_core.service import client as nc  # noqa: E402

MiB = 1 << 20


def status_mem(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(600)
    s.connect(path)
    nc.send_frame(s, {"type": "hello", "protocol": 1, "client": "bench"})
    nc.recv_frame(s)
    return s


def job_header(side: int, payload: int) -> dict:
    img = {"width": side, "height": side, "channels": 4, "bit_depth": 16}
    return {"type": "job", "content": img, "styles": [img], "payload_size": payload,
            "params": {"weights": "random", "size": 32, "iterations": 1, "style_weight": 0}}


def intake(path: str, pid: int, side: int) -> dict:
    payload = 2 * side * side * 8
    data = os.urandom(MiB) * (payload // MiB)
    before = status_mem(pid)["VmRSS"]
    s = connect(path)
    t0 = time.perf_counter()
    nc.send_frame(s, job_header(side, payload), data)
    while True:
        header, _ = nc.recv_frame(s)
        if header["type"] in ("accepted", "error"):
            break
    took = time.perf_counter() - t0
    s.close()
    mem = status_mem(pid)
    return {"payload": payload, "seconds": took, "answer": header["type"], "rss_before": before,
            "hwm_after": mem["VmHWM"]}


def settled(path: str) -> None:
    """Wait until the intake jobs have ended (and given their pixels back)."""
    client = nc.ServiceClient(path, timeout=60)
    while True:
        st = client.status()
        if (all(w["running"] is None for w in st["workers"]) and not st["queue"]["jobs"]
                and st.get("memory_budget", {}).get("used", 0) == 0):
            return
        time.sleep(0.2)


def idle_announcers(path: str, pid: int, n: int) -> dict:
    settled(path)
    before = status_mem(pid)["VmRSS"]
    socks, taken, busy = [], 0, 0
    for _ in range(n):
        s = connect(path)
        nc.send_frame(s, job_header(8192, 2 * 8192 * 8192 * 8))
        s.settimeout(1.0)
        try:
            header, _ = nc.recv_frame(s)
            busy += header.get("kind") == "busy"
        except (socket.timeout, TimeoutError):
            taken += 1  # waiting for pixels that never come
        socks.append(s)
    time.sleep(1)
    rss = status_mem(pid)["VmRSS"]
    for s in socks:
        s.close()
    return {"connections": n, "waiting": taken, "busy": busy, "rss_before": before, "rss_while_waiting": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(HERE), help="the checkout whose service to start (default: this one)")
    ap.add_argument("--announcers", type=int, default=6, help="connections announcing 1 GiB each (default 6)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nst-bench-"))
    sock = str(tmp / "s.sock")
    env = {**os.environ, "PYTHONPATH": args.repo}
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nst_core", "serve", "--socket", sock, "--device", "cpu"],
                                cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        probe = nc.ServiceClient(sock, timeout=5)
        while not probe.ping():
            if proc.poll() is not None:
                print((tmp / "serve.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"service from {args.repo}")
        for side in (2048, 4096, 8192):
            r = intake(sock, proc.pid, side)
            print(f"intake {r['payload'] / MiB:6.0f} MiB: send → {r['answer']} {r['seconds']:6.2f} s "
                  f"({r['payload'] / MiB / r['seconds']:6.0f} MiB/s); RSS before {r['rss_before'] / MiB:6.0f} MiB, "
                  f"peak after {r['hwm_after'] / MiB:6.0f} MiB")
        r = idle_announcers(sock, proc.pid, args.announcers)
        print(f"{r['connections']} connections announcing 1 GiB each and sending nothing: {r['waiting']} waiting, "
              f"{r['busy']} answered busy; RSS {r['rss_before'] / MiB:.0f} MiB before, "
              f"{r['rss_while_waiting'] / MiB:.0f} MiB while they wait")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
