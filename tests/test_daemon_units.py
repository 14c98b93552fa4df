"""sd_notify over real datagram sockets, the journal on a real SQLite file, mount detection (settle: test_daemon_settle)."""

import os
import socket
import sqlite3
import time


from daemon.journal import Identity, Journal
from daemon.notify import Notifier
from daemon.watch import fs_type, network_fs, parse_mountinfo
from daemon.logs import JournaldFormatter


def _listen(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_notify_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = _listen(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready("3 queued")
    assert s.recv(4096) == b"READY=1\nSTATUS=3 queued\n"
    assert n.status("line one\nline two")
    assert s.recv(4096) == b"STATUS=line one line two\n"  # one datagram line per field
    n.close()
    s.close()


def test_notify_to_an_abstract_socket_with_reloading_and_watchdog():
    name = f"nst-test-{os.getpid()}"
    s = _listen(b"\0" + name.encode())
    n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 3.0
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    fields = dict(line.split("=", 1) for line in s.recv(4096).decode().splitlines())
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1" and before <= int(fields["MONOTONIC_USEC"]) <= after
    assert n.watchdog() and s.recv(4096) == b"WATCHDOG=1\n"
    assert n.stopping() and s.recv(4096) == b"STOPPING=1\n"
    s.close()


def test_notify_is_silent_without_systemd_and_for_another_pids_watchdog():
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # the watchdog is meant for another process


def test_journald_prefixes_every_line():
    import logging

    f = JournaldFormatter()
    rec = logging.LogRecord("nst-daemon", logging.WARNING, __file__, 1, "a\nb", (), None)
    assert f.format(rec) == "<4>a\n<4>b"
    rec = logging.LogRecord("nst-daemon", logging.ERROR, __file__, 1, "bad", (), None)
    assert f.format(rec) == "<3>bad"
    rec = logging.LogRecord("nst_core.service", logging.INFO, __file__, 1, "hi", (), None)
    assert f.format(rec) == "<6>service: hi"


def _ident(path):
    return Identity.of(os.lstat(path))


def test_journal_is_wal_with_full_sync_and_keyed_by_hash_rule_version(tmp_path):
    f = tmp_path / "in.jpg"
    f.write_bytes(b"x")
    j = Journal(tmp_path / "state" / "j.sqlite")
    a = j.add("h1", "r", "v1", f, _ident(f))
    assert a.state == "queued" and a.attempts == 0
    assert j.add("h1", "r", "v1", f, _ident(f)).id == a.id  # the same key is the same job
    assert j.add("h1", "r", "v2", f, _ident(f)).id != a.id  # a new rule version is a new job
    assert j.add("h1", "other", "v1", f, _ident(f)).id != a.id
    assert j.by_input(f, _ident(f)).content_hash == "h1"
    j.close()
    con = sqlite3.connect(tmp_path / "state" / "j.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    j = Journal(tmp_path / "state" / "j.sqlite")
    assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    j.close()


def test_journal_claim_is_exclusive_between_processes_and_counts_attempts(tmp_path):
    f = tmp_path / "in.jpg"
    f.write_bytes(b"x")
    j1 = Journal(tmp_path / "j.sqlite")
    j2 = Journal(tmp_path / "j.sqlite")  # a second connection, as a second daemon instance has
    job = j1.add("h", "r", "v", f, _ident(f))
    got = j1.claim(job.id, "gpu0")
    assert got.state == "running" and got.attempts == 1 and got.owner == "gpu0"
    assert j2.claim(job.id, "gpu1") is None
    j1.requeue(job.id)  # a clean stop does not count the attempt
    assert j2.get(job.id).attempts == 0 and j2.get(job.id).state == "queued"
    j2.claim(job.id, "gpu1")
    j2.requeue(job.id, count_attempt=True)  # a crash does
    assert j1.get(job.id).attempts == 1
    j1.claim(job.id, "gpu0")
    j1.set_output(job.id, tmp_path / "out.png", None)
    assert j2.running()[0].out_path == str(tmp_path / "out.png")
    j1.done(job.id, tmp_path / "out.png")
    assert j2.counts()["done"] == 1
    j1.close()
    j2.close()


def test_mountinfo_parsing_and_network_detection():
    text = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "30 27 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "41 30 0:50 / /srv/studio rw - nfs4 server:/export rw\n"
        "42 41 0:51 / /srv/studio/local\\040disk rw - ext4 /dev/sdb1 rw\n"
        "43 30 0:52 / /mnt/share rw - cifs //nas/share rw\n"
        "44 30 0:53 / /home/ann/remote rw - fuse.sshfs ann@host: rw\n"
    )
    assert ("/srv/studio/local disk", "ext4") in parse_mountinfo(text)
    assert fs_type("/srv/studio/inbox", text) == "nfs4"
    assert fs_type("/srv/studio/local disk/inbox", text) == "ext4"
    assert fs_type("/srv/studiox", text) == "ext4"
    assert fs_type("/mnt/share/a", text) == "cifs" and fs_type("/home/ann/remote", text) == "fuse.sshfs"
    assert all(network_fs(t) for t in ("nfs", "nfs4", "cifs", "smb3", "9p", "fuse.sshfs", "sshfs"))
    assert not any(network_fs(t) for t in ("ext4", "xfs", "btrfs", "tmpfs", "overlay"))
    assert fs_type("/proc/self") == "proc"  # the real /proc/self/mountinfo


def test_watchdog_is_fed_only_while_idle_or_progressing(tmp_path):
    from pathlib import Path

    from daemon.main import Daemon
    from daemon.jobs import Item, Running
    from daemon_util import make_config
    from daemon.config import load_config

    cfg = load_config(make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}],
                                  settings={"stall_timeout": 5}))
    d = Daemon(cfg, env={})
    assert d.healthy()  # idle
    now = time.monotonic()
    d.running[0] = Running(Item(1, Path("x.png"), "r", "v", tmp_path), now - 60, now - 60)
    assert d.healthy()  # still waiting for a device (a cluster with no worker yet): no stall
    d.running[0].device, d.running[0].last_progress = "cpu", now - 1
    assert d.healthy()  # progress a second ago
    d.running[0].last_progress = now - 6
    assert not d.healthy()  # stalled longer than stall_timeout: systemd's watchdog will fire
    assert "running x.png (r) step 0/0" in d.status_text()


def _cli(*args, env=None):
    import subprocess
    import sys

    from daemon_util import REPO

    return subprocess.run([sys.executable, "-m", "daemon.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_units_dir_holds_the_units_their_readme_and_a_studio_rule_file_that_loads(tmp_path):
    from pathlib import Path

    from daemon.config import load_config
    from daemon_util import write_image

    r = _cli("--units-dir")
    assert r.returncode == 0, r.stderr
    units = Path(r.stdout.strip())
    assert {"nst-daemon.service", "nst-daemon@.service", "README.md", "studio.yaml"} <= {p.name for p in units.iterdir()}
    # studio.yaml as the README installs it, with /srv/studio made here: valid as shipped.
    studio = tmp_path / "srv" / "studio"
    for d in ("inbox", "out", "styles"):
        (studio / d).mkdir(parents=True)
    write_image(studio / "styles" / "painting.jpg", 1, (64, 48), fmt="JPEG")
    cfg = tmp_path / "etc" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text((units / "studio.yaml").read_text().replace("/srv/studio", str(studio)))
    rule = load_config(cfg).rules[0]
    assert rule.watch == (studio / "inbox",) and rule.styles == (studio / "styles" / "painting.jpg",)
    assert rule.output == studio / "out" and rule.params.weights == "imagenet"


def test_check_config_quiet_prints_nothing_for_a_good_file_and_the_errors_for_a_bad_one(tmp_path):
    from daemon_util import make_config

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}])
    ok = _cli("--config", str(cfg), "--check-config", "--quiet")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    cfg.write_text(cfg.read_text().replace("output: out", "output: out\n  colour: blue"))
    bad = _cli("--config", str(cfg), "--check-config", "--quiet")
    assert bad.returncode == 2 and bad.stdout == "" and ": rules.r.colour: unknown key" in bad.stderr


def test_folder_workers_reach_the_daemon_only_through_their_context_and_modules_import_no_private_names():
    """The folder worker and the moving of inputs use a FolderContext (typed fields), never the
    Daemon; no daemon or nst_core module imports another one's _private names."""
    import ast
    import dataclasses
    import inspect
    from pathlib import Path

    from daemon import inputs, worker
    from daemon.jobs import FolderContext

    fields = {f.name for f in dataclasses.fields(FolderContext)}
    used = set()
    for module in (worker, inputs):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute):
                base = node.value
                if (isinstance(base, ast.Name) and base.id == "ctx") or (
                        isinstance(base, ast.Attribute) and base.attr == "ctx"):
                    used.add(node.attr)
    assert used and used <= fields, used - fields
    assert all(FolderContext.__annotations__[f] for f in fields)  # every field typed
    root = Path(__file__).resolve().parents[1]
    private = []
    for path in [*root.glob("daemon/*.py"), *root.glob("nst_core/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(("daemon", "nst_core"))):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_the_daemons_modules_and_the_engines_import_each_other_without_a_circle():
    """Counting imports inside functions too (config.py used to import watch.py lazily, and
    watch.py imported config.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    edges: dict[str, set[str]] = {}
    for path in [*root.glob("daemon/*.py"), *root.glob("nst_core/**/*.py")]:
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(0, node.level - 1)):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
                for alias in node.names:  # "from . import x" names a module
                    deps.add(f"{target}.{alias.name}" if not node.module else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
    modules = set(edges)
    graph = {m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")} for m, deps in edges.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, trail: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle.extend(trail[trail.index(d):] + [m, d] if d in trail else [m, d])
                return True
            if d not in state and visit(d, trail + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), " → ".join(cycle)
