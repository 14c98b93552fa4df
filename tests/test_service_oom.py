"""Running out of host memory for real (issue 9 §7): a process whose address space is capped
(RLIMIT_AS) a little above what it has mapped once torch is loaded, given a job too large for that.
It is the same `out_of_memory` error as the GPU's, exit 2, in the CLI, the service and the daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_util import Daemon, files, sidecar, wait_until, write_image
from nst_core.service import client as nc

REPO = Path(__file__).resolve().parents[1]
HEADROOM_MB = 1024  # address space left once torch and the engine are mapped

# Run a module (`-m name args…`) after capping the address space; torch is mapped first, since
# its libraries alone reserve gigabytes of address space they never touch.
CAPPED = r"""
import resource, runpy, sys
import nst_core.engine  # noqa: F401
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
limit = vm + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
args = sys.argv[2:]
if args[0] != "-m":  # the interpreter named after the wrapper (the daemon tests' prefix)
    args = args[1:]
sys.argv = [args[1], *args[2:]]
runpy.run_module(args[1], run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def capped(tmp_path, nst_cache_dir):
    """[python, wrapper, MB, "-m"]: prefix for `module args…` run under the memory cap."""
    script = tmp_path / "capped.py"
    script.write_text(CAPPED)
    return [sys.executable, str(script), str(HEADROOM_MB), "-m"]


def _env(nst_cache_dir) -> dict:
    # One OpenMP thread: each thread's arena and stack count against the cap too.
    return {**os.environ, "PYTHONPATH": str(REPO), "NST_CACHE_DIR": str(nst_cache_dir), "OMP_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2"}


def test_cli_out_of_host_memory_is_exit_2_naming_the_size(tmp_path, capped, nst_cache_dir):
    out = tmp_path / "out.png"
    r = subprocess.run([*capped, "nst_core", "stylize", str(REPO / "nst_core/samples/chelsea.png"),
                        str(REPO / "nst_core/samples/gravel.png"), "-o", str(out), "--weights", "random",
                        "--device", "cpu", "--size", "4096", "--levels", "1", "--iterations", "1", "--quiet"],
                       cwd=REPO, env=_env(nst_cache_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "out of memory on cpu at size 4096" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["capped.py"]


def test_service_out_of_host_memory_is_a_job_error_and_the_service_stays_up(tmp_path, capped, nst_cache_dir):
    sock = tmp_path / "s.sock"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([*capped, "nst_core", "serve", "--socket", str(sock), "--device", "cpu"], cwd=REPO,
                            env=_env(nst_cache_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        client = nc.ServiceClient(str(sock), timeout=60)
        wait_until(lambda: client.ping() or proc.poll() is not None, 120, "the service")
        content = nc.RawImage(64, 48, 3, 8, bytes(64 * 48 * 3))
        small = {"weights": "random", "size": 32, "iterations": 1, "style_weight": 0}
        assert client.run_job(content, [], small).width == 32
        with pytest.raises(nc.ServiceError) as e:
            client.run_job(content, [], {**small, "size": 2048, "levels": 1})
        assert e.value.kind == "out_of_memory", e.value
        assert "out of memory on cpu at size 2048" in e.value.message
        assert client.run_job(content, [], small).width == 32, "the service works on"
        assert client.status()["jobs"] == {"done": 2, "failed": 1, "cancelled": 0}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_daemon_out_of_host_memory_fails_the_input_and_runs_on(tmp_path, capped, nst_cache_dir):
    write_image(tmp_path / "styles" / "style.png", 1, (32, 32))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "settings": {"journal": "state/journal.sqlite", "socket": None, "settle": 0.2},
        "defaults": {"weights": "random", "size": 32, "iterations": 1, "style_weight": 0},
        "rules": [{"rule": "big", "watch": "inbox", "output": "out", "style": "styles/style.png",
                   "params": {"size": 2048, "levels": 1}},
                  {"rule": "small", "watch": "inbox-small", "output": "out-small", "style": "styles/style.png"}]}))
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox-small").mkdir()
    env = {"NST_CACHE_DIR": str(nst_cache_dir), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    with Daemon(cfg, env=env, prefix=capped[:3]) as d:
        d.start()
        write_image(tmp_path / "inbox" / "photo.png", 2, (64, 48))
        failed = tmp_path / "inbox" / "failed" / "photo.png"
        wait_until(lambda: Path(str(failed) + ".error.json").exists(), 180, "the input to fail")
        side = sidecar(failed)
        assert side["error"]["kind"] == "out_of_memory" and "at size 2048" in side["message"], side
        write_image(tmp_path / "inbox-small" / "next.png", 3, (64, 48))
        wait_until(lambda: files(tmp_path / "out-small"), 120, "the next input to be done")
        assert d.proc.poll() is None
        assert "Traceback" not in d.text, d.text
        assert d.stop() == 0
