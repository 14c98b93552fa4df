"""Other users against the job service, for real: users and groups made with useradd/groupadd,
processes run as them (issue 9 §2, §3; issue 8 §4). Needs root; skips elsewhere.

Users, made once for the module: `service` runs `nst serve --group <group>`; `member` is in that
group (a GIMP user on the studio workstation); `other` is not (and plays the attacker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from nst_core.service import client as nc

REPO = Path(__file__).resolve().parents[1]
FAST = {"weights": "random", "size": 32, "iterations": 2, "style_weight": 0}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd to make real users")


def _python_for_others() -> str | None:
    """This Python, or the system's of the same version where this one is closed to other users
    (a venv made from a Python under /root); it runs with this environment's packages on its path."""
    def open_to_all(path: str) -> bool:
        parts = Path(path).resolve().parents
        return os.stat(path).st_mode & 0o001 and all(os.stat(d).st_mode & 0o001 for d in parts)

    if open_to_all(sys.executable):
        return sys.executable
    same = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return same if os.path.exists(same) and open_to_all(same) else None


PY = _python_for_others() or sys.executable
PACKAGES = os.pathsep.join(dict.fromkeys([str(REPO), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))


def _admin(*cmd: str) -> None:
    """useradd & co., retried while another process holds the lock on /etc/passwd."""
    for _ in range(40):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            return
        if "lock" not in out.stderr.lower():
            raise AssertionError(f"{' '.join(cmd)}: {out.stderr}")
        time.sleep(0.25)
    raise AssertionError(f"{' '.join(cmd)}: {out.stderr}")


class User:
    def __init__(self, name: str, home: Path):
        import pwd

        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid
        self.groups = [g for g in os.getgrouplist(name, pw.pw_gid) if g != pw.pw_gid]
        self.home = home
        home.mkdir(mode=0o700)
        os.chown(home, self.uid, self.gid)

    def run(self, args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO, env=self.env(env), user=self.uid, group=self.gid,
                              extra_groups=self.groups, capture_output=True, text=True, timeout=kw.pop("timeout", 120),
                              **kw)

    def popen(self, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(args, cwd=REPO, env=self.env(env), user=self.uid, group=self.gid,
                                extra_groups=self.groups, **kw)

    def env(self, extra: dict | None) -> dict:
        """A login-like environment: no XDG_RUNTIME_DIR (so /tmp/nst-$UID), no NST_SOCKET."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "PYTHONPATH": PACKAGES, "LANG": "C.UTF-8",
               "OMP_WAIT_POLICY": "PASSIVE", "NST_CACHE_DIR": str(self.home / "cache"),
               "NST_SYSTEM_SOCKET": "/nonexistent/nst.sock"}
        env.update(extra or {})
        return env

    @property
    def tmp_folder(self) -> Path:
        return Path(f"/tmp/nst-{self.uid}")


@pytest.fixture(scope="module")
def people():
    if _python_for_others() is None:
        pytest.skip(f"no Python that other users may run ({sys.executable} is closed to them)")
    tag = f"{os.getpid() % 100000}"
    group, lonely = f"nstg{tag}", f"nstx{tag}"
    names = {"service": f"nsts{tag}", "member": f"nstm{tag}", "other": f"nsto{tag}"}
    base = Path(tempfile.mkdtemp(prefix="nst-access-", dir="/tmp"))
    base.chmod(0o755)  # root's, open to read: the users' homes go in it
    made_groups, made_users, users = [], [], {}
    try:
        for g in (group, lonely):
            _admin("groupadd", g)
            made_groups.append(g)
        for role, name in names.items():
            extra = ["-G", group] if role in ("service", "member") else []
            _admin("useradd", "-M", "-s", "/usr/sbin/nologin", *extra, name)
            made_users.append(name)
        users = {role: User(name, base / role) for role, name in names.items()}
        for u in users.values():
            shutil.rmtree(u.tmp_folder, ignore_errors=True)
        yield {"group": group, "lonely": lonely, "base": base, **users}
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True)
        for g in made_groups:
            subprocess.run(["groupdel", g], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        for u in users.values():
            shutil.rmtree(u.tmp_folder, ignore_errors=True)


@pytest.fixture(scope="module")
def group_service(people):
    """`nst serve --group G` as the service user, its socket where the daemon's is: a folder of the
    service user's, mode 0755 (RuntimeDirectory=nst-daemon), in a folder of root's."""
    svc = people["service"]
    run = people["base"] / "run"
    run.mkdir(mode=0o755)
    folder = run / "nst-daemon"
    folder.mkdir(mode=0o755)
    os.chown(folder, svc.uid, svc.gid)
    sock = folder / "nst.sock"
    log = open(people["base"] / "service.log", "wb")
    proc = svc.popen([PY, "-m", "nst_core", "serve", "--socket", str(sock), "--group", people["group"],
                      "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    probe = nc.ServiceClient(str(sock), timeout=5)
    deadline = time.monotonic() + 120
    while not probe.ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the service did not start: " + (people["base"] / "service.log").read_text()[-3000:])
        time.sleep(0.2)
    yield sock
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# The member's client: each attempt's outcome as JSON (the service's error kind and field, or "ok").
CLIENT = r"""
import json, os, sys
from nst_core.service import client as c

sock, secret, own_out, service_out = sys.argv[1:5]
pixels = c.RawImage(8, 8, 3, 8, bytes(range(192)))
fast = {"weights": "random", "size": 32, "iterations": 2, "style_weight": 0}
cl = c.ServiceClient(sock, timeout=60)
out = {}
try:
    open(secret, "rb")
    out["reads secret itself"] = True
except PermissionError:
    out["reads secret itself"] = False
attempts = {
    "content path": lambda: cl.run_job(secret, [], fast),
    "style path": lambda: cl.run_job(pixels, [secret], {**fast, "style_weight": 1000}),
    "init file": lambda: cl.run_job(pixels, [], {**fast, "init": secret}),
    "weights file": lambda: cl.run_job(pixels, [], {**fast, "weights": secret}),
    "write where only the service can": lambda: cl.run_job(pixels, [], fast, output_path=service_out),
    "write in my own folder": lambda: cl.run_job(pixels, [], fast, output_path=own_out),
    "pixels": lambda: cl.run_job(pixels, [], fast),
}
for name, attempt in attempts.items():
    try:
        r = attempt()
        out[name] = "ok" if r is None else f"ok {r.width}x{r.height}"
    except c.ServiceError as e:
        out[name] = [e.kind, e.details.get("field"), e.message]
print(json.dumps(out))
"""


def test_a_group_member_gets_pixels_in_and_out_but_none_of_the_service_users_files(people, group_service):
    svc, member = people["service"], people["member"]
    private = people["base"] / "private"
    private.mkdir(mode=0o700)
    os.chown(private, svc.uid, svc.gid)
    from PIL import Image

    secret = private / "secret.png"
    Image.new("RGB", (24, 24), (250, 10, 10)).save(secret)
    os.chown(secret, svc.uid, svc.gid)
    secret.chmod(0o600)
    own_out = member.home / "out.png"
    service_out = private / "written.png"
    script = people["base"] / "client.py"
    script.write_text(CLIENT)
    r = member.run([PY, str(script), str(group_service), str(secret), str(own_out), str(service_out)])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out.pop("reads secret itself") is False, "the test's secret must be closed to the member"
    assert out.pop("pixels") == "ok 32x32", "group members use the service with pixels"
    expected_fields = {"content path": "content.path", "style path": "styles[0].path", "init file": "init",
                       "weights file": "weights", "write where only the service can": "output_path",
                       "write in my own folder": "output_path"}
    for name, field in expected_fields.items():
        kind, got_field, message = out[name] if isinstance(out[name], list) else (out[name], None, "")
        assert (kind, got_field) == ("param", field), (name, out[name])
        assert f"runs as user {svc.name}" in message and f"(user {member.name})" in message, message
    assert not service_out.exists() and not own_out.exists()
    assert not [p for p in private.iterdir() if p != secret], "nothing written in the service user's folder"


def test_status_and_discovery_tell_member_from_non_member(people, group_service):
    member, other = people["member"], people["other"]
    env = {"NST_SYSTEM_SOCKET": str(group_service)}
    code = "from nst_core.service import client as c; print(c.default_socket_path())"
    r = member.run([PY, "-c", code], env=env)
    assert r.stdout.strip() == str(group_service), "a member's client (the GIMP plug-in) finds the system service"
    r = member.run([PY, "-m", "nst_core", "status"], env=env)
    assert r.returncode == 0 and f"service   {group_service}" in r.stdout, r.stderr
    r = other.run([PY, "-m", "nst_core", "status"], env=env)
    assert r.returncode == 1
    assert (f"{group_service} (the system service): permission denied (the socket is {people['service'].name}:"
            f"{people['group']}, mode 0660; you are not in group {people['group']}: ask to be added (sudo usermod "
            f"-aG {people['group']} {other.name}), then log in again)") in r.stderr, r.stderr
    assert f"{other.tmp_folder}/nst.sock (your own service): absent" in r.stderr
    # Discovery leaves a socket it may not use to those who may: the outsider's client (and the
    # private service it would start) uses the outsider's own socket.
    r = other.run([PY, "-c", code], env=env)
    assert r.stdout.strip() == f"{other.tmp_folder}/nst.sock", r.stderr


FAKE_SERVICE = r"""
import os, socket, sys
from nst_core.service import client as c

path, log = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen()
print("up", flush=True)
while True:
    conn, _ = s.accept()
    with open(log, "a") as f:
        f.write("a client connected\n")
    try:
        c.recv_frame(conn)
        c.send_frame(conn, {"type": "hello", "protocol": 1, "server": "impostor", "devices": ["cpu"], "limits": {}})
        c.recv_frame(conn)
        c.send_frame(conn, {"type": "status", "socket": path, "server": "impostor", "pid": 1})
    except Exception:
        pass
    conn.close()
"""


def test_a_socket_folder_made_by_another_user_is_refused_by_server_and_client(people):
    victim, attacker = people["member"], people["other"]
    folder = victim.tmp_folder  # where the victim's service lives without XDG_RUNTIME_DIR
    # The attacker makes the folder first, open to all, to swap the socket later.
    r = attacker.run(["mkdir", "-m", "0777", str(folder)])
    assert r.returncode == 0, r.stderr
    r = victim.run([PY, "-m", "nst_core", "serve", "--device", "cpu", "--idle-exit", "1"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"not listening on {folder}/nst.sock: the socket folder {folder} is writable by others (mode 0777, " \
           f"owner {attacker.name}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(folder) == [], "nothing created in the attacker's folder"
    # The attacker's folder, closed to others this time, with an impostor listening in it.
    folder.rmdir()
    assert attacker.run(["mkdir", "-m", "0755", str(folder)]).returncode == 0
    log = people["base"] / "impostor.log"
    log.touch()
    os.chown(log, attacker.uid, attacker.gid)
    script = people["base"] / "impostor.py"
    script.write_text(FAKE_SERVICE)
    impostor = attacker.popen([PY, str(script), str(folder / "nst.sock"), str(log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline() == "up\n"
        r = victim.run([PY, "-m", "nst_core", "status"])
        assert r.returncode == 1, r.stdout
        assert f"the socket folder {folder} belongs to {attacker.name} (uid {attacker.uid}), not to you" in r.stderr
        assert log.read_text() == "", "the victim's client must not talk to the impostor"
        # Nor does it start a private service there (as the GIMP plug-in would).
        code = ("import sys; from nst_core.service import client as c\n"
                "try:\n    c.connect(python=sys.executable)\nexcept c.ServiceError as e:\n    print(e.message)")
        r = victim.run([PY, "-c", code])
        assert "belongs to" in r.stdout and log.read_text() == "", r.stdout + r.stderr
    finally:
        impostor.kill()
        impostor.wait()
    # The victim's own folder, once made wide open by mistake, is refused too.
    shutil.rmtree(folder)
    victim_run = victim.run([PY, "-m", "nst_core", "serve", "--device", "cpu", "--idle-exit", "0.5"])
    assert victim_run.returncode == 0, victim_run.stderr  # its own 0700 folder: fine
    assert folder.stat().st_uid == victim.uid and (folder.stat().st_mode & 0o777) == 0o700
    folder.chmod(0o777)
    r = victim.run([PY, "-m", "nst_core", "status"])
    assert r.returncode == 1 and f"the socket folder {folder} is writable by others (mode 0777" in r.stderr
    # A safe folder the user may not write in is a plain error too, not a traceback.
    r = victim.run([PY, "-m", "nst_core", "serve", "--socket", str(people["base"] / "nst.sock")])
    assert r.returncode == 2 and f"cannot listen on {people['base']}/nst.sock: Permission denied" in r.stderr, \
        r.stderr


def test_a_socket_group_the_service_user_is_not_in_is_exit_2_with_the_fix(people):
    user, group = people["member"], people["lonely"]
    fix = (f"add user {user.name} to group {group} (usermod -aG {group} {user.name}), or set "
           f"SupplementaryGroups={group} in the unit")
    sock = user.home / "svc" / "nst.sock"
    r = user.run([PY, "-m", "nst_core", "serve", "--socket", str(sock), "--group", group,
                  "--device", "cpu"])
    assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, r.stderr
    work = user.home / "daemon"
    work.mkdir()
    (work / "inbox").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(work / "style.png")
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "settings": {"journal": str(work / "journal.sqlite"), "socket": str(work / "nst.sock"),
                     "socket_group": group},
        "defaults": {**FAST},
        "rules": [{"rule": "r", "watch": str(work / "inbox"), "output": str(work / "out"),
                   "style": str(work / "style.png")}]}))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(work)], check=True)
    for args in (["--check-config"], []):  # the check, and a start as systemd would make it
        r = user.run([PY, "-m", "daemon.main", "--config", str(cfg), *args])
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert f"settings.socket_group: this process runs as user {user.name}, which is not in group {group}" \
            in r.stderr and fix in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A group the user is in is fine.
    r = people["service"].run([PY, "-c", "from nst_core.service.access import socket_group_problem as p;"
                               f"print(p({people['group']!r}))"])
    assert r.stdout.strip() == "None", r.stderr
