#!/usr/bin/env python3
"""Benchmark of the job service: latency to the first progress event and per-job overhead.

The same 512 px job (tubingen.jpg styled with starry_night.jpg from ../shared/images, or a
synthetic pair where that folder is absent; sent as raw RGBA pixels at the output size, as the GIMP
plug-in sends them) runs on a warm service (`python -m nst_core serve` in a subprocess, or
--socket for one that is running) and directly through `nst_core.stylize` with a warm Session.

Printed, as medians over --repeat jobs (after one warm-up job each way):
- request → accepted / started / first progress event, as the client sees them;
- engine alone: stylize() start → first progress callback;
- per-job overhead: client wall time minus the engine's own elapsed time inside the service
  (framing, pixels both ways, queueing, threads), and service wall time minus direct wall time.

    .venv/bin/python benchmarks/bench_service.py                     # cpu: 3 iterations, 3 jobs
    .venv/bin/python benchmarks/bench_service.py --device cuda       # 100 iterations, 5 jobs
    .venv/bin/python benchmarks/bench_service.py --preview 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nst_core.runtime import prepare_process  # noqa: E402

prepare_process()  # before torch loads, as the entry points do

import torch  # noqa: E402

from nst_core import Session, StyleParams, stylize  # noqa: E402
from nst_core.images import Picture, load_image, picture_from_pixels, picture_to_pixels, resize_picture  # noqa: E402
from nst_core.service import client as nc  # noqa: E402

IMAGES = REPO.parent / "shared" / "images"


def images(size: int) -> tuple[nc.RawImage, nc.RawImage, str]:
    if (IMAGES / "tubingen.jpg").exists() and (IMAGES / "starry_night.jpg").exists():
        content = resize_picture(load_image(IMAGES / "tubingen.jpg"), size)
        style = resize_picture(load_image(IMAGES / "starry_night.jpg"), size)
        what = "tubingen.jpg × starry_night.jpg"
    else:
        g = torch.Generator().manual_seed(0)
        content = Picture(torch.rand(3, size * 3 // 4, size, generator=g))
        style = Picture(torch.rand(3, size, size, generator=g))
        what = "synthetic noise (../shared/images absent)"
    c = nc.RawImage(content.width, content.height, 4, 8, picture_to_pixels(content, 4, 8))
    s = nc.RawImage(style.width, style.height, 3, 8, picture_to_pixels(style, 3, 8))
    return c, s, what


def start_server(sock: str, device: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nst_core", "serve", "--socket", sock, "--device", device],
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    probe = nc.ServiceClient(sock, timeout=5)
    deadline = time.monotonic() + 120
    while not probe.ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the service did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def via_service(client: nc.ServiceClient, content, style, params: dict, preview: int | None) -> dict:
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_status(e):
        marks.setdefault(e["type"], time.perf_counter() - t0)

    def on_progress(e):
        marks.setdefault("progress", time.perf_counter() - t0)

    out = client.run_job(content, [style], params, priority="interactive", on_progress=on_progress,
                         on_status=on_status, preview=preview)
    wall = time.perf_counter() - t0
    return {"wall": wall, "engine": out.info["elapsed"], "overhead": wall - out.info["elapsed"],
            "accepted": marks["accepted"], "started": marks["started"], "first_progress": marks["progress"]}


def direct(session: Session, content: nc.RawImage, style: nc.RawImage, params: StyleParams) -> dict:
    c = picture_from_pixels(content.data, content.width, content.height, content.channels, content.bit_depth)
    s = picture_from_pixels(style.data, style.width, style.height, style.channels, style.bit_depth)
    first: list[float] = []
    t0 = time.perf_counter()
    result = stylize(c, [s], params, progress=lambda p: first or first.append(time.perf_counter() - t0),
                     session=session)
    return {"wall": time.perf_counter() - t0, "engine": result.elapsed, "first_progress": first[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=None, help="default: 3 on cpu, 100 on cuda")
    ap.add_argument("--repeat", type=int, default=None, help="timed jobs each way (default: 3 on cpu, 5 on cuda)")
    ap.add_argument("--weights", default="random", help="random (default) or imagenet / a path where present")
    ap.add_argument("--preview", type=int, default=None, metavar="SIDE", help="ask for previews of this size")
    ap.add_argument("--socket", default=None, help="use this running service instead of starting one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    iterations = args.iterations or (100 if on_gpu else 3)
    repeat = args.repeat or (5 if on_gpu else 3)
    content, style, what = images(args.size)
    params = {"size": args.size, "iterations": iterations, "weights": args.weights, "levels": 1}

    tmp = tempfile.TemporaryDirectory(prefix="nst-bench-")
    sock = args.socket or os.path.join(tmp.name, "nst.sock")
    proc = None if args.socket else start_server(sock, args.device, Path(tmp.name) / "serve.log")
    session = Session()
    sp = StyleParams.from_mapping({**params, "device": args.device})
    service_runs, direct_runs = [], []
    try:
        client = nc.ServiceClient(sock, timeout=30, client_name="bench_service")
        device = client.status()["devices"]
        via_service(client, content, style, {**params, "iterations": 2}, args.preview)  # warm-ups
        direct(session, content, style, sp.replace(iterations=2))
        for _ in range(repeat):  # alternated, so that both see the same machine load
            service_runs.append(via_service(client, content, style, params, args.preview))
            direct_runs.append(direct(session, content, style, sp))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    report = {
        "device": device, "images": what, "size": args.size, "content_px": [content.width, content.height],
        "iterations": iterations, "repeat": repeat, "preview": args.preview, "cpu_threads": torch.get_num_threads(),
        "service": {k: med(service_runs, k) for k in service_runs[0]},
        "direct": {k: med(direct_runs, k) for k in direct_runs[0]},
    }
    report["service_minus_direct_wall"] = report["service"]["wall"] - report["direct"]["wall"]
    report["first_progress_extra"] = report["service"]["first_progress"] - report["direct"]["first_progress"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s, d = report["service"], report["direct"]
    ms = lambda v: f"{v * 1000:8.1f} ms"  # noqa: E731
    print(f"job service benchmark: {args.size} px ({content.width}×{content.height} RGBA in, {what}), "
          f"{iterations} L-BFGS iterations, weights {args.weights}, device {', '.join(device)}, "
          f"{repeat} jobs each way after a warm-up, medians")
    print(f"  request → accepted                 {ms(s['accepted'])}")
    print(f"  request → started (worker took it) {ms(s['started'])}")
    print(f"  request → first progress event     {ms(s['first_progress'])}")
    print(f"  engine alone: start → first step   {ms(d['first_progress'])}")
    print(f"  first event, service − engine      {ms(report['first_progress_extra'])}")
    print(f"  job wall time: service / direct    {ms(s['wall'])} / {ms(d['wall'])}   "
          f"(fastest: {ms(min(r['wall'] for r in service_runs)).strip()} / "
          f"{ms(min(r['wall'] for r in direct_runs)).strip()})")
    print(f"  per-job overhead: wall − engine    {ms(s['overhead'])}   (in the service: framing, pixels, queue)")
    print(f"  per-job overhead: service − direct {ms(report['service_minus_direct_wall'])}")
    if not on_gpu:
        print("  (on a shared CPU the engine's own step time varies by seconds from job to job, so the lines that "
              "compare with the direct run are noise there; 'wall − engine' is the service's own cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
