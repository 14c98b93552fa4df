"""benchmarks/quality.py, the paper's experiment for the day ImageNet weights are here: it runs with
random weights at tiny sizes on the package's samples, and refuses to run without its weights."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from nst_core.params import StyleParams
from nst_core.samples import sample_path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality.py"
PAPER_STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def run(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def environment(cache: Path, torch_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NST_WEIGHTS", "NST_WEIGHTS_URL", "XDG_CACHE_HOME")}
    return dict(env, NST_CACHE_DIR=str(cache), TORCH_HOME=str(torch_home), **extra)


def test_runs_with_random_weights_on_tiny_sizes(tmp_path, nst_cache_dir):
    out = tmp_path / "quality"
    proc = run("--weights", "random", "--device", "cpu", "--size", 32, "--iterations", 2, "--json", "--out", out,
               "--content", sample_path("chelsea"), "--styles", sample_path("coffee"), sample_path("gravel"),
               env=environment(nst_cache_dir, tmp_path / "torch"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    # the paper's settings: every parameter but the ones given is nst stylize's default
    assert report["params"] == StyleParams(weights="random", device="cpu", size=32, iterations=2).to_mapping()
    assert [Path(r["style"]).name for r in report["runs"]] == ["coffee.png", "gravel.png"]
    for r in report["runs"]:
        assert list(r["balance"]) == PAPER_STYLE_LAYERS
        assert all(math.isfinite(v) and v > 0 for v in r["balance"].values())
        assert math.isclose(sum(r["beta_wl_El"].values()), r["beta_style"], rel_tol=1e-9)
        assert math.isclose(r["balance"]["relu3_1"] * r["alpha_content"], r["beta_wl_El"]["relu3_1"], rel_tol=1e-9)
        with Image.open(r["output"]) as im:
            assert im.size == (32, 21)  # chelsea is 451×300
    assert proc.stdout.count("β·w_l·E_l / α·L_content: relu1_1 ") == 2  # said for people too
    with Image.open(out / "sheet.png") as im:  # styles along the top, one row per content
        assert im.width > im.height > 128


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_imagenet_weights_it_exits_2_saying_what_to_fetch(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/models/vgg19-dcbb9e9d.pth"
    proc = run("--content", sample_path("chelsea"), "--styles", sample_path("coffee"), "--out", tmp_path / "q",
               env=environment(tmp_path / "cache", tmp_path / "torch", NST_WEIGHTS_URL=url))
    assert proc.returncode == 2, proc.stderr
    assert "vgg19-dcbb9e9d.pth" in proc.stderr and "NST_WEIGHTS" in proc.stderr and url in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()  # nothing ran
