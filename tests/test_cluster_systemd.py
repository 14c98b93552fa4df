"""The farm's units under a real systemd 257 (the container of test_daemon_systemd.py), installed
unchanged: nst-ray-head.service and nst-daemon.service (settings.cluster: the head) on the head,
nst-ray-worker.service (with the README's ray-worker.env) for a GPU machine. Files wait while no
worker is there, run on the worker's node once it joins (as user nst), wait again when the unit
stops, and run when it is back.

Offline as in test_daemon_systemd.py: the venv borrows the checkout's .venv (which must hold the
[cluster] extra), and bin/ray is the two-line console script that `pip install ray` would write.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("ray")

from daemon_util import FAST_PARAMS, write_image  # noqa: E402
from test_daemon_systemd import VENV, container, files, isolate, pip_install  # noqa: E402,F401

pytestmark = [pytest.mark.systemd, pytest.mark.cluster]

HEAD = "127.0.0.1:6379"


def test_the_ray_units_and_the_daemons_unit_run_a_farm(container):
    c = container
    isolate(c)
    pip_install(c)
    c.sh(f"printf '#!{VENV}/bin/python\\nfrom ray.scripts.scripts import main\\nmain()\\n' > {VENV}/bin/ray; "
         f"chmod 755 {VENV}/bin/ray")
    c.sh(f'ln -sfn "$({VENV}/bin/nst-daemon --units-dir)" /opt/neural-style/systemd')
    c.run("useradd", "--system", "--home-dir", "/var/lib/nst-daemon", "--shell", "/usr/sbin/nologin", "--user-group",
          "nst")
    for unit in ("nst-ray-head.service", "nst-ray-worker.service", "nst-daemon.service"):
        c.run("install", "-m", "0644", f"/opt/neural-style/systemd/{unit}", "/etc/systemd/system/")
    # The README's two lines; and, as this "GPU machine" is the head's own, ports other than the head's.
    (c.path("/etc/nst-daemon")).mkdir(exist_ok=True)
    c.path("/etc/nst-daemon/ray-worker.env").write_text(
        f"NST_RAY_HEAD={HEAD}\nNST_RAY_GPUS=1\n"
        "NST_RAY_PORTS=--node-manager-port=6390 --object-manager-port=6391 --runtime-env-agent-port=6392 "
        "--dashboard-agent-grpc-port=6393 --dashboard-agent-listen-port=6394 --metrics-export-port=6395 "
        "--min-worker-port=10202 --max-worker-port=10301\n")
    c.run("systemctl", "daemon-reload")
    v = c.run("systemd-analyze", "verify", "/etc/systemd/system/nst-ray-head.service",
              "/etc/systemd/system/nst-ray-worker.service", check=False)
    assert v.returncode == 0 and "nst-ray" not in v.stdout + v.stderr, v.stdout + v.stderr

    # The head machine: Ray's head (no GPU here) and the daemon under their units, as the README says.
    c.run("install", "-d", "-o", "nst", "-g", "nst", "/srv/studio", "/srv/studio/in", "/srv/studio/out",
          "/srv/studio/styles")
    write_image(c.path("/srv/studio/styles/s.png"), 1, (48, 40))
    c.path("/etc/nst-daemon/config.yaml").write_text(
        f"settings: {{cluster: '{HEAD}', settle: 0.3, scan_interval: 5}}\n"
        f"defaults: {dict(FAST_PARAMS, iterations=3)}\n"
        "rules:\n- {rule: r, watch: /srv/studio/in, style: /srv/studio/styles/s.png, output: /srv/studio/out}\n")
    try:
        c.run("systemctl", "enable", "--now", "nst-ray-head", timeout=120)
        c.wait(lambda: c.run(f"{VENV}/bin/ray", "status", f"--address={HEAD}", check=False, timeout=60).returncode == 0,
               120, "the head up")
        c.sh("mkdir -p /etc/systemd/system/nst-daemon.service.d && printf '[Unit]\\nRequires=nst-ray-head.service\\n"
             "After=nst-ray-head.service\\n' > /etc/systemd/system/nst-daemon.service.d/cluster.conf && "
             "systemctl daemon-reload")  # the README's drop-in
        assert "nst-ray-head.service" in c.run("systemctl", "show", "nst-daemon", "-p", "Requires", "--value").stdout
        c.run("systemctl", "enable", "--now", "nst-daemon", timeout=300)
        c.wait(lambda: "waiting for cluster workers" in c.show()["StatusText"], 30, "STATUS: waiting for workers")
        write_image(c.path("/srv/studio/in/a.png"), 2)
        time.sleep(4)
        assert c.path("/srv/studio/in/a.png").exists() and not files(c.path("/srv/studio/out"))

        # A GPU machine joins (here the same container): the unit's node, as user nst.
        c.run("systemctl", "enable", "--now", "nst-ray-worker", timeout=120)
        c.wait(lambda: files(c.path("/srv/studio/out")), 240, "the waiting file done on the worker's node")
        main = c.show("nst-ray-worker")["MainPID"]
        assert main != "0" and c.run("ps", "-o", "user=", "-p", main).stdout.strip() == "nst"
        raylets = c.sh("pgrep -u nst -f raylet/raylet").stdout.split()
        assert len(raylets) == 2, "the head's and the worker's raylets, both as nst"
        assert "a.png → /srv/studio/out/a_r.png" in c.journal()
        c.wait(lambda: re.search(r"cluster: \S+\[\w+\]/cpu idle", c.show()["StatusText"]), 30, "STATUS names the worker")
        st = c.run(f"{VENV}/bin/nst", "status", "--socket", "/run/nst-daemon/nst.sock").stdout
        assert f"cluster   {HEAD}: 1 worker(s) on 1 node(s) offering GPU" in st, st

        # The machine leaves: its worker is forgotten, new files wait (not failed) ...
        c.run("systemctl", "stop", "nst-ray-worker", timeout=120)
        assert c.show("nst-ray-worker")["ActiveState"] == "inactive"
        c.wait(lambda: "waiting for cluster workers" in c.show()["StatusText"], 60, "the worker forgotten")
        write_image(c.path("/srv/studio/in/b.png"), 3)
        time.sleep(5)
        assert c.path("/srv/studio/in/b.png").exists() and not c.path("/srv/studio/in/failed").exists()
        # ... and run when it is back.
        c.run("systemctl", "start", "nst-ray-worker", timeout=120)
        c.wait(lambda: len(files(c.path("/srv/studio/out"))) == 2, 240, "the waiting file done once the node is back")
        c.run("systemctl", "stop", "nst-daemon", timeout=120)
        assert c.show()["ActiveState"] == "inactive"
    finally:
        for unit in ("nst-ray-worker", "nst-ray-head"):  # shown where the test fails
            print(c.run("journalctl", "-b", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout[-3000:])
        for unit in ("nst-daemon", "nst-ray-worker", "nst-ray-head"):
            c.run("systemctl", "stop", unit, check=False, timeout=120)
