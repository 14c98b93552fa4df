"""The sysadmin's path under a real systemd 257 (a container booted from ../shared/systemd).

The test follows daemon/systemd/README.md's steps literally, as root in the container: a virtual
environment in /opt/neural-style/venv with the project installed by pip, the --units-dir link, the
studio group, the nst user, /srv/studio, studio.yaml in /etc/nst-daemon, the unit installed
unchanged, `systemctl enable --now`. Where the container differs from a workstation:

- no network: the venv is made without pip from this checkout's Python, and a .pth file lends it
  the checkout's .venv for pip itself and the heavy dependencies (torch); the project is installed
  into it by pip from a copy of this tree, as `pip install .` would;
- /etc and /root are overlaid (tmpfs), /opt and /srv are tmpfs: users, groups, units and files
  vanish with the container and nothing stays in the chroot (but /var/lib/nst-daemon, removed at
  the end); /root is made 0755 so that the nst user can run this checkout's Python, which lives
  under /root;
- the "editor" step is a scripted edit: random weights and tiny images (no ImageNet weights here),
  socket_group: studio, and a second rule with a long job.
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

from daemon_util import FAST_PARAMS, REPO, write_image

pytestmark = pytest.mark.systemd

CHROOT = Path(os.environ.get("NST_SYSTEMD_CHROOT", "/var/cache/nst-gimp3"))
SCRIPTS = REPO.parent / "shared" / "systemd"
VENV = "/opt/neural-style/venv"
CONFIG = "/etc/nst-daemon/config.yaml"
STUDIO = "/srv/studio"


class Container:
    def __init__(self, pid: str, work: Path):
        self.pid, self.work = pid, work

    def path(self, inside: str) -> Path:
        """A path in the container's mount namespace, as the host sees it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

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
        r = subprocess.run([str(SCRIPTS / "exec.sh"), self.pid, "journalctl", "-b", "-u", "nst-daemon", "--no-pager",
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
        c.run("rm", "-rf", "/var/lib/nst-daemon", "/var/cache/nst-daemon", check=False)
        subprocess.run([str(SCRIPTS / "halt.sh"), c.pid], timeout=120)
        shutil.rmtree(work, ignore_errors=True)




def isolate(c: Container) -> None:
    """Nothing the README's steps write may stay in the chroot (see the module's docstring)."""
    py = sys.base_prefix
    c.sh("set -e; mkdir -p /run/nst-test/etc-up /run/nst-test/etc-work /run/nst-test/python; "
         "mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/nst-test/etc-up,workdir=/run/nst-test/etc-work /etc; "
         f"mount --bind {py} /run/nst-test/python; mount -t tmpfs -o mode=0755 tmpfs /root; "
         f"mkdir -p {py}; mount --bind /run/nst-test/python {py}; "
         "mount -t tmpfs -o mode=0755 tmpfs /opt; mount -t tmpfs -o mode=0755 tmpfs /srv")


def pip_install(c: Container) -> None:
    """README step 1: python3 -m venv /opt/neural-style/venv && pip install (offline; see the docstring)."""
    src = c.work / "src"
    files_ = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.split(b"\0")
    for rel in filter(None, files_):
        rel = rel.decode()
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    site = f"{VENV}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    c.sh(f"set -e; {sys.base_prefix}/bin/python3 -m venv --without-pip {VENV}; "
         f"echo {REPO}/.venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages "
         f"> {site}/nst-test-dependencies.pth; cd /tmp; "
         f"{VENV}/bin/python -m pip install -q --no-cache-dir --no-deps --no-build-isolation --ignore-installed {src}")


def edit_config(c: Container, extra_rules=(), broken=False) -> Path:
    """The "editor /etc/nst-daemon/config.yaml" step, scripted; the host path of the file."""
    cfg = c.path(CONFIG)
    data = yaml.safe_load((c.work / "studio.yaml").read_text())
    data["settings"].update({"socket_group": "studio", "settle": 0.3, "stop_timeout": 2})
    data["defaults"] = dict(FAST_PARAMS)
    data["rules"] += [{"rule": "slow", "watch": f"{STUDIO}/slow", "create": True, "style": data["rules"][0]["style"],
                       "output": f"{STUDIO}/out-slow", "params": {"iterations": 100000}}, *extra_rules]
    text = yaml.safe_dump(data, sort_keys=False)
    if broken:
        text = text.replace(f"  output: {STUDIO}/out\n", f"  output: {STUDIO}/out\n  colour: blue\n")
    cfg.write_text(text)
    return cfg


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.exists() else []


def test_the_readme_steps_under_systemd(container):
    c = container
    isolate(c)
    pip_install(c)
    units = f"{VENV}/bin/nst-daemon --units-dir"
    c.sh(f'ln -sfn "$({units})" /opt/neural-style/systemd')
    # (Through the container: /opt/neural-style/systemd is an absolute link, which the host's view would misread.)
    (c.work / "studio.yaml").write_text(c.run("cat", "/opt/neural-style/systemd/studio.yaml").stdout)
    c.run("groupadd", "--system", "studio")
    c.run("useradd", "--groups", "studio", "alice")  # a studio user (the README: usermod -aG studio alice)
    c.run("useradd", "bob")  # not in the studio
    c.run("useradd", "--system", "--home-dir", "/var/lib/nst-daemon", "--shell", "/usr/sbin/nologin", "--user-group",
          "--groups", "studio", "nst")
    c.run("install", "-D", "-m", "0644", "/opt/neural-style/systemd/studio.yaml", CONFIG)
    for unit in ("nst-daemon.service", "nst-daemon@.service"):
        c.run("install", "-m", "0644", f"/opt/neural-style/systemd/{unit}", "/etc/systemd/system/")
    c.run("systemctl", "daemon-reload")
    v = c.run("systemd-analyze", "verify", "/etc/systemd/system/nst-daemon.service", "nst-daemon@0.service",
              check=False)
    ours = [line for line in (v.stdout + v.stderr).splitlines() if "nst-daemon" in line]
    assert v.returncode == 0 and not ours, v.stdout + v.stderr
    doc = c.run("systemctl", "show", "nst-daemon", "-p", "Documentation", "--value").stdout.strip()
    assert doc == "file:///opt/neural-style/systemd/README.md"
    c.run("test", "-f", doc[len("file://"):])

    # Before the studio folders exist: the daemon itself says what is missing (ReadWritePaths=-/srv/studio),
    # where systemd used to fail the start with 226/NAMESPACE before the daemon ran.
    edit_config(c)
    assert c.run("systemctl", "start", "nst-daemon", check=False, timeout=300).returncode != 0
    s = c.show()
    assert s["ActiveState"] == "failed" and "status=2" in c.run("systemctl", "status", "nst-daemon",
                                                                 check=False).stdout, s
    c.wait(lambda: f"{STUDIO}/inbox: no such folder" in c.journal(), 30, "the daemon's error")
    assert "NAMESPACE" not in c.journal()
    c.run("systemctl", "reset-failed", "nst-daemon")

    # The README's folders, the painting, the checked file; then enable --now.
    c.run("install", "-d", "-o", "nst", "-g", "studio", "-m", "2775", STUDIO, f"{STUDIO}/inbox", f"{STUDIO}/out",
          f"{STUDIO}/styles")
    painting = yaml.safe_load((c.work / "studio.yaml").read_text())["rules"][0]["style"]
    write_image(c.path(painting), 1, (48, 40), fmt="JPEG")
    r = c.run("runuser", "-u", "nst", "--", f"{VENV}/bin/nst-daemon", "--config", CONFIG, "--check-config")
    assert "rule studio" in r.stdout and "running now: no nst-daemon" in r.stdout
    t = time.monotonic()
    c.run("systemctl", "enable", "--now", "nst-daemon", timeout=300)
    started_in = time.monotonic() - t
    assert c.path("/run/nst-daemon/nst.sock").is_socket()
    assert c.path("/var/lib/nst-daemon/journal.sqlite").is_file()
    s = c.show()
    assert s["ActiveState"] == "active" and s["Type"] == "notify-reload", s
    assert "queued" in s["StatusText"] and "idle" in s["StatusText"], s

    # A studio user drops a photo; the output is the daemon's, group studio, group-writable.
    photo = write_image(c.work / "photo.png", 2)
    c.run("runuser", "-u", "alice", "--", "cp", str(photo), f"{STUDIO}/inbox/photo.png")
    c.wait(lambda: files(c.path(f"{STUDIO}/out")), 120, "the first output")
    out = files(c.path(f"{STUDIO}/out"))[0]
    assert out.name == "photo_painting.png" and (out.stat().st_mode & 0o060) == 0o060
    assert c.run("stat", "-c", "%U:%G", f"{STUDIO}/out/{out.name}").stdout.strip() == "nst:studio"
    c.wait(lambda: "1 done" in c.show()["StatusText"], 30, "STATUS= with the count")
    # The socket is the studio's: a member's `nst status` reaches the daemon, an outsider's does not.
    sock = c.run("stat", "-c", "%a %G", "/run/nst-daemon/nst.sock").stdout.split()
    assert sock == ["660", "studio"], sock
    member = c.run("runuser", "-u", "alice", "--", f"{VENV}/bin/nst", "status", "--socket", "/run/nst-daemon/nst.sock")
    assert "cpu" in member.stdout, member.stdout
    outsider = c.run("runuser", "-u", "bob", "--", f"{VENV}/bin/nst", "status", "--socket", "/run/nst-daemon/nst.sock",
                     check=False)
    assert outsider.returncode != 0

    # Reload: a good file adds a rule; `systemctl reload` waits for RELOADING=1 … READY=1.
    edit_config(c, [{"rule": "extra", "watch": f"{STUDIO}/extra", "create": True, "style": painting,
                     "output": f"{STUDIO}/out-extra"}])
    c.run("systemctl", "reload", "nst-daemon", timeout=120)
    assert "extra (new)" in c.journal()
    write_image(c.path(f"{STUDIO}/extra/b.png"), 3)
    c.wait(lambda: files(c.path(f"{STUDIO}/out-extra")), 60, "an output of the reloaded rule")
    # A bad file: `systemctl reload` fails, the status says so, the log names file, line and key, and
    # the rules in use stay.
    cfg = edit_config(c, broken=True)
    line = next(i for i, x in enumerate(cfg.read_text().splitlines(), 1) if "colour" in x)
    bad = c.run("systemctl", "reload", "nst-daemon", check=False, timeout=120)
    assert bad.returncode != 0, bad
    c.wait(lambda: "keeping the rules in use" in c.journal(), 30, "the daemon's reload")
    assert f"{CONFIG}:{line}:3: rules.studio.colour: unknown key" in c.journal()
    s = c.show()
    assert s["ActiveState"] == "active" and s["StatusText"].startswith("reload failed, old rules in use: "
                                                                      f"{CONFIG}:{line}:3: rules.studio.colour"), s
    write_image(c.path(f"{STUDIO}/extra/c.png"), 4)
    c.wait(lambda: len(files(c.path(f"{STUDIO}/out-extra"))) == 2, 60, "the old rules still working")
    edit_config(c)
    c.run("systemctl", "reload", "nst-daemon", timeout=120)
    assert not c.show()["StatusText"].startswith("reload failed")

    # Stop in the middle of a long job: requeued within stop_timeout, far inside TimeoutStopSec.
    write_image(c.path(f"{STUDIO}/slow/long.png"), 5)
    c.wait(lambda: "running long.png" in c.show()["StatusText"], 60, "the long job running")
    t = time.monotonic()
    c.run("systemctl", "stop", "nst-daemon", timeout=120)
    stopped_in = time.monotonic() - t
    assert stopped_in < 20, stopped_in
    assert c.show()["ActiveState"] == "inactive"
    assert "queued again" in c.journal()
    warnings = c.journal("-p", "warning")  # journald read the <4> prefix as the priority
    assert "within stop_timeout" in warnings and "ready:" not in warnings
    assert c.path(f"{STUDIO}/slow/long.png").exists() and not files(c.path(f"{STUDIO}/out-slow"))
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
    print(f"systemctl start returned after {started_in:.1f} s; stop mid-job took {stopped_in:.1f} s")
