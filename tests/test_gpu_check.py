"""benchmarks/gpu_check.sh in its CPU dry run: every part runs (so that an import or syntax error
cannot waste the few GPU minutes), the output stays within 8 files, and parts are time-boxed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def dry_run(tmp_path, nst_cache_dir, **env):
    out = tmp_path / "out"
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "NST_CACHE_DIR": str(nst_cache_dir), **env}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=600)
    return proc, out


def test_the_dry_run_runs_every_part(tmp_path, nst_cache_dir):
    proc, out = dry_run(tmp_path, nst_cache_dir)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in ("env", "pytest", "loop", "memory", "targets"):
        assert f"  {part}: ok in " in summary, summary
    assert "tiled: not run" in summary or "tiled: ok" in summary
    assert "imports ok" in summary and "skipped" in summary  # the gpu tests were collected
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    report = json.loads((out / "bench_loop.json").read_text())
    runs = report["devices"][0]["gpu_loop"]["runs"]
    assert {r["implementation"].split(" ")[0] for r in runs} == {"new", "torch.optim.LBFGS,"}
    assert all(r["final_loss"] < r["first_loss"] for r in runs), runs
    assert "[cpu" in summary and "new (device L-BFGS" in summary


def test_a_part_that_hangs_is_cut_at_its_time_box_and_reported(tmp_path, nst_cache_dir):
    proc, out = dry_run(tmp_path, nst_cache_dir, PARTS="tiled", TILED_CHECK="echo hook-ran; sleep 300",
                        GPU_CHECK_BUDGET="15")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1
    assert "tiled: TIMED OUT after 10 s" in summary
    assert "hook-ran" in (out / "tiled.txt").read_text()


def test_a_spent_budget_skips_the_remaining_parts(tmp_path, nst_cache_dir):
    proc, out = dry_run(tmp_path, nst_cache_dir, PARTS="env loop", GPU_CHECK_BUDGET="5")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1
    assert "env: SKIPPED" in summary and "loop: SKIPPED" in summary
