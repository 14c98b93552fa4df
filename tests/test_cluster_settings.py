"""The cluster backend's settings and flags, without Ray: parsing, validation, and an address
that cannot be reached (refused before Ray is imported, so these run in the default set)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml

from daemon.config import ConfigError, load_config
from daemon_util import REPO, make_config


def _write(folder, settings: dict, params: dict | None = None):
    return make_config(folder, [{"rule": "r", "watch": "in", "output": "out", **({"params": params} if params else {})}],
                       settings=settings)


def test_cluster_settings_load_and_default_to_local_workers(tmp_path):
    cfg = load_config(_write(tmp_path, {}))
    assert cfg.settings.cluster is None and cfg.settings.cluster_resource == "GPU"
    cfg = load_config(_write(tmp_path, {"cluster": "10.0.0.5:6379", "cluster_resource": "nst_gpu", "device": "cpu"},
                             params={"device": "cuda"}))  # a cluster's GPUs, not this machine's devices
    assert (cfg.settings.cluster, cfg.settings.cluster_resource) == ("10.0.0.5:6379", "nst_gpu")
    assert load_config(_write(tmp_path, {"cluster": "auto"})).settings.cluster == "auto"


@pytest.mark.parametrize("settings, words", [
    ({"cluster": "10.0.0.5"}, "must be auto or HOST:PORT"),
    ({"cluster": "head:99999"}, "must be auto or HOST:PORT"),
    ({"cluster": 6379}, "must be"),
    ({"cluster": "auto", "cluster_resource": "nst gpu"}, "custom Ray resource"),
])
def test_bad_cluster_settings_name_the_key_and_the_problem(tmp_path, settings, words):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, settings))
    key = "settings.cluster_resource" if "cluster_resource" in settings else "settings.cluster"
    assert key in info.value.message and words in info.value.message


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_daemon_refuses_an_unreachable_cluster_with_exit_2_naming_the_address(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    r = _run(["-m", "daemon.main", "--config", str(_write(tmp_path, {"cluster": address}))])
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cluster {address}: cannot reach the Ray head there" in r.stdout + r.stderr
    # --cluster overrides the file
    address2 = f"127.0.0.1:{_closed_port()}"
    r = _run(["-m", "daemon.main", "--config", str(_write(tmp_path, {})), "--cluster", address2])
    assert r.returncode == 2 and f"cluster {address2}: cannot reach" in r.stdout + r.stderr
    r = _run(["-m", "daemon.main", "--config", str(_write(tmp_path, {})), "--cluster", "nohost"])
    assert r.returncode == 2 and "--cluster: must be auto or HOST:PORT" in r.stderr


def test_nst_serve_refuses_an_unreachable_cluster_with_exit_2(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    r = _run(["-m", "nst_core", "serve", "--socket", str(tmp_path / "s.sock"), "--cluster", address])
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cluster {address}: cannot reach the Ray head there" in r.stderr
    r = _run(["-m", "nst_core", "serve", "--socket", str(tmp_path / "s.sock"), "--cluster", "auto",
              "--cluster-resource", "a b"])
    assert r.returncode == 2 and "cluster_resource: must be GPU or the name of a custom Ray resource" in r.stderr


def test_check_config_says_where_the_jobs_run(tmp_path):
    r = _run(["-m", "daemon.main", "--config", str(_write(tmp_path, {"cluster": "auto", "cluster_resource": "nst_gpu"})),
              "--check-config"])
    assert r.returncode == 0, r.stderr
    assert "devices: one per nst_gpu of the Ray cluster at auto" in r.stdout


def test_the_cluster_module_imports_no_ray_until_asked():
    code = ("import sys, nst_core.service.cluster as c, daemon.config; "
            "assert c.check_address('auto') is None; print('ray' in sys.modules)")
    r = _run(["-c", code])
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_an_error_from_a_cluster_worker_comes_back_as_the_same_kind_of_error():
    from nst_core.errors import Cancelled, ImageError, NSTError, OutOfMemory, ParamError
    from nst_core.service.cluster import _rebuild

    e = _rebuild(ParamError("size", "an output of 9000×9000 is too large").to_mapping())
    assert isinstance(e, ParamError) and e.field == "size" and e.message == "size: an output of 9000×9000 is too large"
    assert e.to_mapping() == {"kind": "param", "message": e.message, "field": "size"}
    e = _rebuild(ImageError("/x/a.png", "truncated").to_mapping())
    assert isinstance(e, ImageError) and e.path == "/x/a.png" and e.message == "/x/a.png: truncated"
    assert isinstance(_rebuild({"kind": "out_of_memory", "message": "m"}), OutOfMemory)
    assert isinstance(_rebuild({"kind": "cancelled", "message": "m"}), Cancelled)
    e = _rebuild({"kind": "rule", "message": "style gone"})  # a kind this side has no class for
    assert type(e) is NSTError and e.to_mapping() == {"kind": "rule", "message": "style gone"}
