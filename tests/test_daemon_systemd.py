"""The shipped unit files under a real systemd 257 (a container booted from ../shared/systemd).

The units are installed unchanged (in /run/systemd/system, so nothing stays in the chroot); a
drop-in adjusts only what this checkout needs, as `systemctl edit` would on a real machine:
ExecStart's config file, ReadWritePaths, a short RestartSec, and User=root, because the test
Python lives under /root (mode 0700), which the unit's `nst` user cannot enter. The shipped
ExecStart path /opt/neural-style/venv/bin/nst-daemon exists in the container (a tmpfs on /opt)
as a wrapper that runs this checkout with its .venv.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon_util import FAST_PARAMS, REPO, files, write_image

pytestmark = pytest.mark.systemd

CHROOT = Path(os.environ.get("NST_SYSTEMD_CHROOT", "/var/cache/nst-gimp3"))
SCRIPTS = REPO.parent / "shared" / "systemd"
UNIT_DIR = "/run/systemd/system"


class Container:
    def __init__(self, pid: str, work: Path):
        self.pid, self.work = pid, work

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(SCRIPTS / "exec.sh"), self.pid, *cmd], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} → {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.journal()}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kw)

    def show(self, unit: str = "nst-daemon") -> dict:
        out = self.run("systemctl", "show", unit, "-p", "ActiveState,SubState,StatusText,MainPID,NRestarts,Type").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        r = subprocess.run([str(SCRIPTS / "exec.sh"), self.pid, "journalctl", "-u", "nst-daemon", "--no-pager",
                            "-o", "cat", *args], capture_output=True, text=True, timeout=60)
        return r.stdout

    def wait(self, cond, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = cond()
            if v:
                return v
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; state {self.show()}\n{self.journal()}")


@pytest.fixture(scope="module")
def container():
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    if not (CHROOT / "usr/lib/systemd/systemd").exists():
        pytest.skip(f"no systemd chroot at {CHROOT} (build it with ../shared/gimp3/make-chroot.sh)")
    if not (SCRIPTS / "boot.sh").exists():
        pytest.skip(f"{SCRIPTS} is missing")
    work = REPO / "test-artifacts" / f"systemd-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(SCRIPTS / "boot.sh"), str(CHROOT), "nst-daemon-test", "--bind", str(REPO),
                        "--bind", sys.base_prefix], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not r.stdout.strip():
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(f"systemd-nspawn cannot boot the container here: {r.stderr.strip()[-500:]}")
    c = Container(r.stdout.strip().splitlines()[-1], work)
    try:
        yield c
    finally:
        c.run("systemctl", "stop", "nst-daemon", check=False)
        c.run("rm", "-rf", "/var/lib/nst-daemon", "/var/cache/nst-daemon", "/etc/nst-daemon", check=False)
        subprocess.run([str(SCRIPTS / "halt.sh"), c.pid], timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def write_config(work: Path, extra_rules=(), broken=False) -> Path:
    style = work / "style.png"
    if not style.exists():
        write_image(style, 1, (48, 48))
    rules = [
        {"rule": "fast", "watch": "in-fast", "create": True, "style": "style.png", "output": "out-fast"},
        {"rule": "slow", "watch": "in-slow", "create": True, "style": "style.png", "output": "out-slow",
         "params": {"iterations": 100000}},
        *extra_rules,
    ]
    data = {"settings": {"settle": 0.3, "stop_timeout": 2}, "defaults": FAST_PARAMS, "rules": rules}
    text = yaml.safe_dump(data, sort_keys=False)
    if broken:
        text = text.replace("  output: out-fast\n", "  output: out-fast\n  colour: blue\n")
    (work / "config.yaml").write_text(text)
    return work / "config.yaml"


def install(c: Container) -> None:
    wrapper = f"#!/bin/sh\nPYTHONPATH={REPO} exec {REPO}/.venv/bin/python -m daemon.main \"$@\"\n"
    c.sh("mountpoint -q /opt || mount -t tmpfs tmpfs /opt; mkdir -p /opt/neural-style/venv/bin; "
         f"printf '%s' '{wrapper}' > /opt/neural-style/venv/bin/nst-daemon; chmod 755 /opt/neural-style/venv/bin/nst-daemon")
    for unit in ("nst-daemon.service", "nst-daemon@.service"):
        c.run("cp", str(REPO / "daemon" / "systemd" / unit), f"{UNIT_DIR}/{unit}")
    dropin = (
        "[Service]\n"
        "User=\nGroup=\n"
        "ExecStart=\n"
        f"ExecStart=/opt/neural-style/venv/bin/nst-daemon --config {c.work}/config.yaml\n"
        f"ReadWritePaths=\nReadWritePaths={c.work}\n"
        "RestartSec=1\n"
    )
    c.sh(f"mkdir -p {UNIT_DIR}/nst-daemon.service.d && printf '%s' '{dropin}' > {UNIT_DIR}/nst-daemon.service.d/test.conf")
    c.run("systemctl", "daemon-reload")


def test_units_verify_start_reload_stop_and_restart(container):
    c = container
    work = c.work
    write_config(work)
    install(c)

    # systemd-analyze verify: both units, as shipped (the template through an instance).
    v = c.run("systemd-analyze", "verify", f"{UNIT_DIR}/nst-daemon.service", "nst-daemon@0.service", check=False)
    ours = [line for line in (v.stdout + v.stderr).splitlines() if "nst-daemon" in line]
    assert v.returncode == 0 and not ours, v.stdout + v.stderr

    # Start: `systemctl start` returns when READY=1 arrives, and by then everything is up.
    t = time.monotonic()
    c.run("systemctl", "start", "nst-daemon", timeout=300)
    started_in = time.monotonic() - t
    c.run("test", "-S", "/run/nst-daemon/nst.sock")  # the job service socket (RuntimeDirectory)
    c.run("test", "-f", "/var/lib/nst-daemon/journal.sqlite")  # the journal (StateDirectory)
    assert "ready:" in c.journal()
    s = c.show()
    assert s["ActiveState"] == "active" and s["Type"] == "notify-reload", s
    assert "queued" in s["StatusText"] and "idle" in s["StatusText"], s
    print(f"systemctl start returned after {started_in:.1f} s")

    # A job; the status text follows.
    write_image(work / "in-fast" / "a.png", 2)
    c.wait(lambda: files(work / "out-fast"), 120, "the first output")
    c.wait(lambda: "1 done" in c.show()["StatusText"], 30, "STATUS= with the count")

    # Reload: a good file adds a rule; `systemctl reload` waits for RELOADING=1 … READY=1.
    write_config(work, [{"rule": "extra", "watch": "in-extra", "create": True, "style": "style.png",
                         "output": "out-extra"}])
    c.run("systemctl", "reload", "nst-daemon", timeout=120)
    assert "extra (new)" in c.journal()
    write_image(work / "in-extra" / "b.png", 3)
    c.wait(lambda: files(work / "out-extra"), 60, "an output of the reloaded rule")
    # A bad file: the error names file, line and key; the rules in use stay.
    cfg = write_config(work, broken=True)
    line = next(i for i, x in enumerate(cfg.read_text().splitlines(), 1) if "colour" in x)
    c.run("systemctl", "reload", "nst-daemon", timeout=120)
    log = c.journal()
    assert "keeping the rules in use" in log and f"{cfg}:{line}:3: rules.fast.colour: unknown key" in log
    assert c.show()["ActiveState"] == "active"
    write_image(work / "in-extra" / "c.png", 4)
    c.wait(lambda: len(files(work / "out-extra")) == 2, 60, "the old rules still working")
    write_config(work)

    # Stop in the middle of a long job: requeued within stop_timeout, far inside TimeoutStopSec.
    write_image(work / "in-slow" / "long.png", 5)
    c.wait(lambda: "running long.png" in c.show()["StatusText"], 60, "the long job running")
    t = time.monotonic()
    c.run("systemctl", "stop", "nst-daemon", timeout=120)
    stopped_in = time.monotonic() - t
    assert stopped_in < 20, stopped_in
    assert c.show()["ActiveState"] == "inactive"
    assert "queued again" in c.journal()
    warnings = c.journal("-p", "warning")  # journald read the <4> prefix as the priority
    assert "not finished within stop_timeout" in warnings and "ready:" not in warnings
    assert (work / "in-slow" / "long.png").exists() and not files(work / "out-slow")
    db = sqlite3.connect(CHROOT / "var/lib/nst-daemon/journal.sqlite")
    state, attempts = db.execute("SELECT state, attempts FROM jobs WHERE in_path LIKE '%long.png'").fetchone()
    db.close()
    assert (state, attempts) == ("queued", 0)

    # Restart after a crash: kill -9 of the main process; Restart=on-failure brings it back and the
    # job that was running is queued again (and runs again).
    c.run("systemctl", "start", "nst-daemon", timeout=300)
    c.wait(lambda: "running long.png" in c.show()["StatusText"], 60, "the long job running again")
    pid = c.show()["MainPID"]
    c.run("kill", "-9", pid)
    c.wait(lambda: (lambda s: s["ActiveState"] == "active" and s["MainPID"] not in ("0", pid)
                    and s["NRestarts"] == "1")(c.show()), 120, "the restart")
    c.wait(lambda: "was running when the daemon stopped" in c.journal(), 60, "the recovery")
    c.wait(lambda: "running long.png" in c.show()["StatusText"], 60, "the long job resumed")
    c.run("systemctl", "stop", "nst-daemon", timeout=120)
    print(f"systemctl stop mid-job took {stopped_in:.1f} s")
