"""nst-ray-worker.service under a real systemd 257 (the container of test_daemon_systemd.py): the
unit, installed unchanged with the README's ray-worker.env, joins a Ray head as user nst, the
daemon (run by hand against that head) gets a worker on it and stylises a file there, and stopping
the unit takes the worker away while files wait.

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


def test_the_ray_worker_unit_joins_the_head_and_runs_the_daemons_jobs(container):
    c = container
    isolate(c)
    pip_install(c)
    c.sh(f"printf '#!{VENV}/bin/python\\nfrom ray.scripts.scripts import main\\nmain()\\n' > {VENV}/bin/ray; "
         f"chmod 755 {VENV}/bin/ray")
    c.sh(f'ln -sfn "$({VENV}/bin/nst-daemon --units-dir)" /opt/neural-style/systemd')
    c.run("useradd", "--system", "--home-dir", "/var/lib/nst-daemon", "--shell", "/usr/sbin/nologin", "--user-group",
          "nst")
    c.run("install", "-m", "0644", "/opt/neural-style/systemd/nst-ray-worker.service", "/etc/systemd/system/")
    c.sh(f"mkdir -p /etc/nst-daemon && printf 'NST_RAY_HEAD={HEAD}\\nNST_RAY_GPUS=1\\n' > /etc/nst-daemon/ray-worker.env")
    c.run("systemctl", "daemon-reload")
    v = c.run("systemd-analyze", "verify", "/etc/systemd/system/nst-ray-worker.service", check=False)
    assert v.returncode == 0 and "nst-ray-worker" not in v.stdout + v.stderr, v.stdout + v.stderr
    # The head, by hand (README): no GPU of its own here, so the daemon's workers can only be the unit's.
    c.run(f"{VENV}/bin/ray", "start", "--head", "--port=6379", "--num-cpus=1", "--num-gpus=0",
          "--include-dashboard=false", "--disable-usage-stats", timeout=180)
    try:
        c.run("systemctl", "enable", "--now", "nst-ray-worker", timeout=120)

        def gpus():
            r = c.run(f"{VENV}/bin/ray", "status", f"--address={HEAD}", check=False, timeout=60)
            m = re.search(r"([\d.]+)/([\d.]+) GPU", r.stdout)
            return m and float(m.group(2)) == 1.0

        c.wait(gpus, 120, "the unit's node in `ray status` with its 1 GPU")
        main = c.show("nst-ray-worker")["MainPID"]
        raylets = c.sh("pgrep -f 'raylet/raylet' -u nst || true").stdout.split()
        assert raylets, "the unit's raylet runs as nst"
        assert c.run("ps", "-o", "user=", "-p", main).stdout.strip() == "nst"

        # The daemon (by hand, as root; its own unit is tested in test_daemon_systemd.py).
        c.sh("mkdir -p /srv/studio/in /srv/studio/out /srv/studio/styles")
        write_image(c.path("/srv/studio/styles/s.png"), 1, (48, 40))
        c.path("/srv/studio/config.yaml").write_text(
            "settings: {journal: /srv/studio/journal.sqlite, socket: null, settle: 0.3, scan_interval: 5}\n"
            f"defaults: {dict(FAST_PARAMS, iterations=3)}\n"
            "rules:\n- {rule: r, watch: /srv/studio/in, style: /srv/studio/styles/s.png, output: /srv/studio/out}\n")
        c.sh(f"cd /srv/studio && nohup {VENV}/bin/nst-daemon --config /srv/studio/config.yaml --cluster {HEAD} "
             "> /srv/studio/daemon.log 2>&1 & echo $! > /srv/studio/daemon.pid")
        log = c.path("/srv/studio/daemon.log")
        c.wait(lambda: "cluster worker" in log.read_text(), 180, "a worker on the unit's node")
        write_image(c.path("/srv/studio/in/a.png"), 2)
        c.wait(lambda: files(c.path("/srv/studio/out")), 180, "the output made on the unit's node")
        assert "a.png → /srv/studio/out/a_r.png" in log.read_text()

        # The machine leaves: its worker is forgotten, new files wait (not failed).
        c.run("systemctl", "stop", "nst-ray-worker", timeout=120)
        assert c.show("nst-ray-worker")["ActiveState"] == "inactive"
        c.wait(lambda: "left (its node is gone)" in log.read_text(), 60, "the worker forgotten")
        write_image(c.path("/srv/studio/in/b.png"), 3)
        time.sleep(5)
        assert c.path("/srv/studio/in/b.png").exists() and not c.path("/srv/studio/in/failed").exists()
        # ... and run when it is back.
        c.run("systemctl", "start", "nst-ray-worker", timeout=120)
        c.wait(lambda: len(files(c.path("/srv/studio/out"))) == 2, 180, "the waiting file done once the node is back")
    finally:
        c.sh("kill $(cat /srv/studio/daemon.pid) 2>/dev/null; sleep 2; true", check=False)
        c.run("systemctl", "stop", "nst-ray-worker", check=False, timeout=120)
        c.run(f"{VENV}/bin/ray", "stop", "--force", check=False, timeout=120)
