"""The daemon's own cost per file, beyond the engine, at 1, 100 and 1000 queued files.

    .venv/bin/python benchmarks/bench_daemon.py [--counts 1,100,1000] [--mode scan|events]

How the engine is excluded: every rule runs with iterations=0 and random weights at 32 px (so the
engine call is trivial), and the engine's own time, measured around each job's scheduler call
(submit to result, which includes the network load of the first job), is subtracted from the
wall time. What remains is the daemon: finding the files (scan or inotify events), settle checks
(settle: 0 here; the real settle interval is a fixed delay, not a per-file cost), hashing, the
journal (SQLite WAL, synchronous=FULL: 5 commits per job), decoding the input, writing the output
(temporary name, fsync, rename) and moving the input to processed/.

mode scan: the files are there before the daemon starts (after downtime; found by the start-up
scan). mode events: the daemon runs, then the files are moved in at once (inotify events).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

from daemon.config import load_config  # noqa: E402
from daemon.main import Daemon  # noqa: E402

STAGES = ("scan", "hash", "journal", "load", "write", "move")


def make_files(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(a, "RGB").save(folder / f"f{i:05d}.png")


def run(n: int, mode: str, root: Path) -> dict:
    root.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (48, 48, 3), dtype=np.uint8), "RGB").save(root / "style.png")
    inbox, staging = root / "inbox", root / "staging"
    inbox.mkdir()
    cfg = {
        "settings": {"journal": "state/journal.sqlite", "socket": None, "settle": 0, "scan_interval": 3600},
        "defaults": {"weights": "random", "size": 32, "iterations": 0},
        "rules": [{"rule": "b", "watch": "inbox", "style": "style.png", "output": "out"}],
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    make_files(inbox if mode == "scan" else staging, n)
    d = Daemon(load_config(root / "config.yaml"), env={})
    t0 = time.perf_counter()
    d.start()
    loop = threading.Thread(target=d.serve, daemon=True)
    loop.start()
    if mode == "events":
        d.stats.seconds.clear()
        t0 = time.perf_counter()
        for p in sorted(staging.iterdir()):
            os.rename(p, inbox / p.name)
    processed = inbox / "processed"
    while not processed.exists() or len(os.listdir(processed)) < n:
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    d.request_stop()
    loop.join()
    d.shutdown()
    s = d.stats.snapshot()["seconds"]
    assert len(os.listdir(root / "out")) == n
    return {"n": n, "wall": wall, "engine": s.get("engine", 0.0), **{k: s.get(k, 0.0) for k in STAGES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,100,1000")
    ap.add_argument("--mode", choices=("scan", "events", "both"), default="both")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    counts = [int(x) for x in args.counts.split(",")]
    modes = ("scan", "events") if args.mode == "both" else (args.mode,)
    print(f"nst-daemon overhead per file beyond the engine (iterations=0, 32 px, CPU, {os.cpu_count()} cores)")
    print(f"{'mode':6} {'files':>5} {'wall s':>7} {'engine s':>8} {'daemon ms/file':>14}  "
          + " ".join(f"{k:>7}" for k in STAGES) + "   (ms/file)")
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        for mode in modes:
            for n in counts:
                r = run(n, mode, Path(tmp) / f"{mode}-{n}")
                per = (r["wall"] - r["engine"]) / n * 1000
                print(f"{mode:6} {n:5d} {r['wall']:7.2f} {r['engine']:8.2f} {per:14.1f}  "
                      + " ".join(f"{r[k] / n * 1000:7.2f}" for k in STAGES), flush=True)


if __name__ == "__main__":
    main()
