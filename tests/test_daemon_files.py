"""Files the daemon must not mishandle: links, slow writers, full or read-only folders, odd names.

Each test does the hostile or unlucky thing for real against the daemon as a subprocess: real
symbolic links, a real writer process that pauses mid-file, real full and read-only tmpfs mounts
(as root), names of 255 bytes and names that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from daemon_util import (Daemon, NotifyListener, files, image_bytes, journal_rows, make_config, sidecar, wait_until,
                         write_image)

ROOT = os.geteuid() == 0


def _no_dac_prefix() -> list[str]:
    """Run the daemon without root's power to read any file (as the unit's User=nst has none)."""
    if not ROOT:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is needed to run the daemon without CAP_DAC_OVERRIDE as root")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", readonly: bool = False):
    """A real tmpfs mounted at `path` (root only), unmounted afterwards."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777" + (",ro" if readonly else ""),
                        "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` until a write fails for lack of space; returns the filler."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _lines_are_journald_records(text: str) -> None:
    bad = [line for line in text.splitlines() if not re.match(r"<[0-7]>", line)]
    assert not bad, bad


# ---- 9.1: links --------------------------------------------------------------------------------------


def test_symlinked_processed_and_failed_folders_are_never_followed(tmp_path):
    """`ln -s /var/lib/nst-daemon inbox/processed`: nothing goes there; the rule waits and says why."""
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"}],
                      settings={"settle": 0.2, "scan_interval": 1, "incomplete_timeout": 0.5})
    inbox, state, secret = tmp_path / "inbox", tmp_path / "state", tmp_path / "secret"
    state.mkdir()
    secret.mkdir()
    os.symlink(state, inbox / "processed")  # the daemon's own state folder, as in the issue
    os.symlink(secret, inbox / "failed")
    good = write_image(inbox / "good.png", 1)
    good_bytes = good.read_bytes()
    (inbox / "broken.png").write_text("not an image")
    listener = NotifyListener()
    try:
        with Daemon(cfg, env={"NOTIFY_SOCKET": listener.name}) as d:
            d.start()
            line = d.wait_log("is a symbolic link")
            assert re.search(r"<3>rule r: .*/inbox/(processed|failed) is a symbolic link.*its files wait", line), line
            listener.wait_for("STATUS", "is a symbolic link")
            time.sleep(2.5)  # two scans later: still nothing written through the links
            assert sorted(p.name for p in state.iterdir() if not p.name.startswith("journal.sqlite")) == []
            assert list(secret.iterdir()) == []
            assert good.exists() and (inbox / "broken.png").exists()  # the inputs wait in the inbox
            # The admin removes the links: real folders are made, the files end where they belong.
            os.unlink(inbox / "processed")
            os.unlink(inbox / "failed")
            wait_until(lambda: (inbox / "processed" / "good.png").exists()
                       and (inbox / "failed" / "broken.png.error.json").exists(), 30, "the files moved")
            assert d.stop() == 0
    finally:
        listener.close()
    assert (inbox / "processed" / "good.png").read_bytes() == good_bytes
    assert not (inbox / "processed").is_symlink() and not (inbox / "failed").is_symlink()
    assert [p.name for p in files(tmp_path / "out")] == ["good_r.png"]  # not run twice
    assert list(secret.iterdir()) == []


def test_symlinked_subfolder_of_processed_is_not_followed(tmp_path):
    """A recursive rule moves inbox/sub/x.png to processed/sub/x.png: processed/sub must not be a link."""
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out", "recursive": True}],
                      settings={"settle": 0.2, "scan_interval": 1})
    inbox, secret = tmp_path / "inbox", tmp_path / "secret"
    secret.mkdir()
    (inbox / "processed").mkdir()
    os.symlink(secret, inbox / "processed" / "sub")
    write_image(inbox / "sub" / "x.png", 1)
    with Daemon(cfg) as d:
        d.start()
        d.wait_log("processed/sub is a symbolic link")
        assert (inbox / "sub" / "x.png").exists() and list(secret.iterdir()) == []
        assert d.stop() == 0


def test_a_symlinked_input_is_refused_and_nothing_is_read_through_it(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"}],
                      settings={"settle": 0.2, "incomplete_timeout": 0.5})
    inbox = tmp_path / "inbox"
    real = write_image(inbox / "sub" / "real.png", 1)  # inside the watched folder (not taken: not recursive)
    os.symlink(real, inbox / "link.png")
    write_image(inbox / "plain.png", 2)
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: (inbox / "failed" / "link.png.error.json").exists()
                   and (inbox / "processed" / "plain.png").exists(), 60, "both inputs to end")
        assert d.stop() == 0
    side = sidecar(inbox / "failed" / "link.png")
    assert "is a symbolic link" in side["message"] and side["error"]["kind"] == "image"
    assert (inbox / "failed" / "link.png").is_symlink()  # the link itself moved, never its target
    assert real.exists()
    assert [p.name for p in files(tmp_path / "out")] == ["plain_r.png"]


def test_processed_on_another_file_system_is_reached_without_links_too(tmp_path):
    """processed/ on another file system: the move is a copy (no link followed), then the input goes."""
    with tmpfs(tmp_path / "archive", "4m") as archive:
        cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out", "processed": str(archive / "done"),
                                      "recursive": True}], settings={"settle": 0.2})
        src = write_image(tmp_path / "inbox" / "sub" / "a.png", 1)
        data, mtime = src.read_bytes(), src.stat().st_mtime_ns
        with Daemon(cfg) as d:
            d.start()
            wait_until(lambda: (archive / "done" / "sub" / "a.png").exists() and not src.exists(), 60, "the move")
            assert d.stop() == 0
        moved = archive / "done" / "sub" / "a.png"
        assert moved.read_bytes() == data and moved.stat().st_mtime_ns == mtime
        assert not [p for p in (archive / "done" / "sub").iterdir() if p.name != "a.png"]


# ---- 9.8: a writer that pauses longer than settle --------------------------------------------------

_WRITER = r"""
import sys
path, half = sys.argv[1], int(sys.argv[2])
data = sys.stdin.buffer.read(int(sys.argv[3]))
with open(path, "wb") as f:
    f.write(data[:half])
    f.flush()
    print("paused", flush=True)
    sys.stdin.readline()          # held open, half written, until the test says go
    f.write(data[half:])
print("done", flush=True)
"""


def test_a_writer_pausing_longer_than_settle_is_waited_for_not_failed(tmp_path):
    patience = 2.0
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"}],
                      settings={"settle": 0.2, "incomplete_timeout": patience})
    inbox = tmp_path / "inbox"
    data = image_bytes(1, (64, 48))
    with Daemon(cfg) as d:
        d.start()
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(inbox / "slow.png"), str(len(data) // 2),
                                   str(len(data))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        try:
            writer.stdin.write(data)
            writer.stdin.flush()
            assert writer.stdout.readline() == b"paused\n"
            paused = time.monotonic()
            # The daemon takes the settled half file, cannot decode it, sees it open for writing: it waits,
            # past the patience (which applies only to files nobody writes to any more).
            d.wait_log("slow.png: cannot be decoded yet and is open for writing")
            wait_until(lambda: time.monotonic() - paused > 2 * patience
                       and d.text.count("slow.png: cannot be decoded yet and is open for writing") >= 3,
                       60, "the daemon to look at the paused file a few times, past the patience")
            assert not (inbox / "failed").exists() and (inbox / "slow.png").exists()
            writer.stdin.write(b"go\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == b"done\n"
        finally:
            writer.kill()
            writer.wait()
        # And a file that stays half written once closed does fail, after the patience.
        good = image_bytes(2, (64, 48))
        (inbox / "cut.png").write_bytes(good[: len(good) // 2])
        wait_until(lambda: (inbox / "processed" / "slow.png").exists()
                   and (inbox / "failed" / "cut.png.error.json").exists(), 60, "both files to end")
        assert d.stop() == 0
    assert (inbox / "processed" / "slow.png").read_bytes() == data  # the whole file, where it belongs
    assert [p.name for p in files(tmp_path / "out")] == ["slow_r.png"]
    with Image.open(tmp_path / "out" / "slow_r.png") as im:
        im.load()
    assert "truncated" in sidecar(inbox / "failed" / "cut.png")["message"]
    assert not (inbox / "failed" / "slow.png").exists()


# ---- 9.9: machine problems make files wait; failed/ back to the inbox retries ---------------------


def test_a_full_or_read_only_output_folder_blocks_the_rule_and_files_wait(tmp_path):
    full, ro = tmp_path / "out-full", tmp_path / "out-ro"
    with tmpfs(full, "256k"), tmpfs(ro, "1m", readonly=True):
        filler = _fill(full)
        cfg = make_config(tmp_path, [{"rule": "full", "watch": "in-full", "output": "out-full"},
                                     {"rule": "ro", "watch": "in-ro", "output": "out-ro"}],
                          settings={"settle": 0.2, "scan_interval": 1})
        write_image(tmp_path / "in-full" / "a.png", 1, (64, 64))
        write_image(tmp_path / "in-ro" / "b.png", 2, (64, 64))
        listener = NotifyListener()
        try:
            with Daemon(cfg, env={"NOTIFY_SOCKET": listener.name}) as d:
                d.start()
                d.wait_log("rule full: the output folder")
                d.wait_log("rule ro: cannot write in")
                status = listener.wait_for("STATUS", "waiting:")["STATUS"]
                listener.wait_for("STATUS", "Read-only file system")
                assert "full: the output folder" in status or "ro: cannot write in" in status
                time.sleep(2.5)  # two more scans: still waiting, nothing failed
                for inbox in ("in-full", "in-ro"):
                    assert not (tmp_path / inbox / "failed").exists(), inbox
                assert (tmp_path / "in-full" / "a.png").exists() and (tmp_path / "in-ro" / "b.png").exists()
                # The machine is fixed: the files go through, under the names they would have had.
                filler.unlink()
                subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
                wait_until(lambda: files(tmp_path / "in-full" / "processed") and files(tmp_path / "in-ro" / "processed"),
                           60, "both inputs processed")
                assert d.stop() == 0
        finally:
            listener.close()
        assert [p.name for p in files(full)] == ["a_full.png"]  # no spurious -1 from the wait
        assert [p.name for p in files(ro)] == ["b_ro.png"]
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert [(r["state"], r["attempts"]) for r in rows] == [("done", 1), ("done", 1)]


def test_a_write_that_fails_for_lack_of_space_after_the_engine_ran_is_a_folder_problem(tmp_path):
    """The check before the engine can be outrun (another writer fills the disk): the write's own failure
    must also count as the folder's problem, not the input's."""
    from nst_core.images import load_image

    from daemon.jobs import OutputNames
    from daemon.worker import FolderProblem, FolderWorker, machine_problem

    with tmpfs(tmp_path / "full", "64k") as folder:
        _fill(folder)
        picture = load_image(write_image(tmp_path / "p.png", 1, (200, 200)))
        worker = FolderWorker(SimpleNamespace(names=OutputNames()), 0)
        worker._out_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(FolderProblem) as e:
                worker.write(None, None, SimpleNamespace(on_collision="number"), picture, folder / "p_r.png", {})
        finally:
            worker._release()
        assert "No space left on device" in e.value.message and machine_problem(e.value)
        assert [p.name for p in folder.iterdir()] == ["filler.bin"]  # no temporary file left


def test_a_file_moved_back_from_failed_is_retried_and_its_stale_error_file_goes(tmp_path):
    from daemon.config import file_hash, load_config
    from daemon.journal import Identity, Journal

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"},
                                 {"rule": "keep", "watch": "in-keep", "output": "out-keep", "keep_inputs": True}],
                      settings={"settle": 0.2, "incomplete_timeout": 0.5, "max_attempts": 2})
    inbox, keep = tmp_path / "inbox", tmp_path / "in-keep"
    # x.png and z.png: jobs the daemon died in max_attempts times (a crash, the OOM killer), as the
    # journal holds them; they fail at start with their bytes unchanged.
    version = load_config(cfg).rule("r").version
    j = Journal(tmp_path / "state" / "journal.sqlite")
    for i, name in enumerate(("x.png", "z.png")):
        src = write_image(inbox / name, i)
        job = j.add(file_hash(src), "r", version, src, Identity.at(src))
        for _ in range(2):
            j.claim(job.id, "main")
            j.requeue(job.id, count_attempt=True)
    j.close()
    with Daemon(cfg, prefix=_no_dac_prefix()) as d:
        d.start()
        os.chmod(write_image(keep / "y.png", 3), 0)  # unreadable: fails, and stays where it is
        wait_until(lambda: all((inbox / "failed" / f"{n}.png.error.json").exists() for n in "xz")
                   and (keep / "failed" / "y.png.error.json").exists(), 60, "all three to fail")
        assert "gave up after 2 attempts" in sidecar(inbox / "failed" / "x.png")["message"]
        # The user moves them back unchanged (identity and all; z.png under a new name) ...
        os.rename(inbox / "failed" / "x.png", inbox / "x.png")
        os.rename(inbox / "failed" / "z.png", inbox / "z-again.png")
        os.chmod(keep / "y.png", 0o644)
        os.utime(keep / "y.png")  # ... and fixes the kept one (kept inputs are retried when they change)
        wait_until(lambda: len(files(tmp_path / "out")) == 2 and files(tmp_path / "out-keep"), 60, "all retried")
        wait_until(lambda: len(files(inbox / "processed")) == 2, 30, "x.png and z-again.png moved to processed")
        assert d.stop() == 0
    assert files(inbox / "failed") == []  # the error files of the earlier attempts are gone
    assert not (keep / "failed" / "y.png.error.json").exists() and (keep / "y.png").exists()
    assert [p.name for p in files(tmp_path / "out")] == ["x_r.png", "z-again_r.png"]
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert [r["state"] for r in rows if r["rule"] == "r"] == ["done", "done"]  # the same two jobs, retried
    # y.png could not be read, so its failed job has a key of its own; the readable file is a new job.
    assert sorted(r["state"] for r in rows if r["rule"] == "keep") == ["done", "failed"]


# ---- 9.10: names ------------------------------------------------------------------------------------


def test_long_and_odd_names_are_processed_and_logged_on_one_line(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"}],
                      settings={"settle": 0.2, "incomplete_timeout": 0.5})
    inbox = tmp_path / "inbox"
    names = {
        "utf8": "é" * 120 + ".png",            # 244 bytes: the output name (246) leaves no room for '.tmp' suffixes
        "max": "x" * 251 + ".png",             # 255 bytes: the output name would be 257
        "latin1": os.fsdecode(b"caf\xe9 cr\xe8me.png"),  # not UTF-8
        "newline": "two\nlines.png",
        "forged": "a\n<3>forged record.png",
    }
    broken = "y" * 251 + ".png"                # fails: its error file name would be 266 bytes
    (inbox / "processed").mkdir(parents=True)
    write_image(inbox / "processed" / names["max"], 50)  # taken: the input is moved as ...-1.png, fitted
    with Daemon(cfg) as d:
        d.start()
        for i, name in enumerate(names.values()):
            write_image(inbox / name, i)
        (inbox / broken).write_text("not an image")
        wait_until(lambda: len(files(tmp_path / "out")) == len(names) and len(files(inbox / "failed")) == 2,
                   90, "every input to end")
        time.sleep(0.5)
        assert d.stop() == 0
        log = d.text
    _lines_are_journald_records(log)
    assert "Traceback" not in log and "cannot queue it" not in log
    assert "a\\n<3>forged record.png" in log and "\n<3>forged" not in log
    assert "caf\\xe9 cr\\xe8me.png" in log and "two\\nlines.png" in log
    out = sorted(os.listdir(os.fsencode(str(tmp_path / "out"))))
    assert len(out) == len(names) and all(len(n) <= 255 for n in out)
    assert os.fsencode(names["latin1"].replace(".png", "_r.png")) in out
    assert os.fsencode(names["utf8"].replace(".png", "_r.png")) in out
    assert any(n.startswith(b"x" * 200) and n.endswith(b".png") for n in out)
    for n in out:
        with Image.open(os.fsdecode(os.fsencode(str(tmp_path / "out")) + b"/" + n)) as im:
            im.load()
    moved = sorted(p.name for p in files(inbox / "processed"))
    assert len(moved) == len(names) + 1 and all(len(os.fsencode(n)) <= 255 for n in moved)
    assert any(n.endswith("-1.png") and n.startswith("x" * 200) for n in moved)
    side = [p for p in files(inbox / "failed") if p.name.endswith(".error.json")]
    assert len(side) == 1 and len(os.fsencode(side[0].name)) <= 255
    assert (inbox / "failed" / broken).exists()
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert sorted(r["state"] for r in rows) == ["done"] * len(names) + ["failed"]
    assert sorted(p.name for p in inbox.iterdir()) == ["failed", "processed"]


def test_dry_run_prints_names_that_are_not_utf8(tmp_path):
    from daemon_util import REPO

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}])
    write_image(tmp_path / "in" / os.fsdecode(b"caf\xe9.png"), 1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict"}  # as in a UTF-8 locale
    r = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, errors="strict", timeout=120)
    assert r.returncode == 0 and "1 file(s) to process" in r.stdout, r.stderr
    assert "would process" in r.stdout and "caf\\" in r.stdout


def test_the_journal_keeps_names_that_are_not_utf8(tmp_path):
    from daemon.journal import Identity, Journal

    f = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png"))
    f.write_bytes(b"x")
    j = Journal(tmp_path / "j.sqlite")
    job = j.add("h", "r", "v", f, Identity.at(f))
    assert job.in_path == str(f)
    assert j.by_input(f, Identity.at(f)).id == job.id
    j.moved(job.id, tmp_path / "processed" / f.name)
    assert j.get(job.id).in_path == str(tmp_path / "processed" / f.name)
    j.close()


def test_a_journal_of_schema_1_gains_the_sidecar_column(tmp_path):
    import sqlite3

    from daemon.journal import Journal

    db = tmp_path / "j.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, content_hash TEXT NOT NULL, rule TEXT NOT NULL,
            rule_version TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT,
            in_path TEXT NOT NULL, in_dev INTEGER, in_ino INTEGER, in_size INTEGER, in_mtime_ns INTEGER,
            out_path TEXT, out_prior TEXT, dest_path TEXT, note TEXT, error TEXT, created REAL NOT NULL,
            updated REAL NOT NULL, UNIQUE (content_hash, rule, rule_version));
        INSERT INTO jobs (content_hash, rule, rule_version, state, in_path, created, updated)
            VALUES ('h', 'r', 'v', 'failed', '/in/a.png', 0, 0);
        PRAGMA user_version = 1;
    """)
    con.close()
    j = Journal(db)
    job = j.get(1)  # the one row
    assert job.sidecar is None and job.in_path == "/in/a.png"
    j.set_sidecar(job.id, "/in/failed/a.png.error.json")
    assert j.get(job.id).sidecar == "/in/failed/a.png.error.json"
    j.close()


def test_log_records_show_any_name_on_one_line():
    from daemon.logs import JournaldFormatter

    f = JournaldFormatter()
    name = Path(os.fsdecode(b"/in/a\n<3>forged \xff.png"))
    rec = logging.LogRecord("nst-daemon", logging.INFO, __file__, 1, "%s: done in %.1f s", (name, 2.0), None)
    assert f.format(rec) == "<6>/in/a\\n<3>forged \\xff.png: done in 2.0 s"
    rec = logging.LogRecord("nst-daemon", logging.ERROR, __file__, 1, "problems:\n%s\n%s", ("one", "two"), None)
    assert f.format(rec) == "<3>problems:\n<3>one\n<3>two"  # the message's own lines stay lines


def test_names_are_shortened_to_the_limit_at_a_character_boundary():
    from daemon.names import fit_name, numbered

    long = "é" * 130 + ".png"
    a, b = fit_name(long), fit_name("é" * 129 + "è.png")
    for n in (a, b):
        assert len(n.encode()) <= 255 and n.endswith(".png") and n.startswith("é" * 100)
    assert a != b  # names that differ only past the cut stay different
    assert fit_name("short.png") == "short.png" and fit_name("a.png", suffix=".error.json") == "a.png.error.json"
    assert len(fit_name("x" * 255, suffix=".error.json").encode()) == 255
    assert numbered("a.png", 0) == "a.png" and numbered("a.png", 2) == "a-2.png"
    n = numbered("x" * 251 + ".png", 12)
    assert len(n.encode()) <= 255 and n.endswith("-12.png")


# ---- 8.4: output names and stops -----------------------------------------------------------------


def test_a_failed_job_gives_its_output_name_back(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out", "min_input_side": 1}],
                      settings={"settle": 0.2})
    inbox = tmp_path / "inbox"
    with Daemon(cfg) as d:
        d.start()
        write_image(inbox / "a.png", 1, (400, 4))  # its name chosen, then the engine refuses it: 32×1 is too small
        wait_until(lambda: (inbox / "failed" / "a.png.error.json").exists(), 60, "a.png to fail")
        write_image(inbox / "a.png", 2, (40, 30))
        wait_until(lambda: (inbox / "processed" / "a.png").exists(), 60, "the second a.png")
        assert d.stop() == 0
    assert [p.name for p in files(tmp_path / "out")] == ["a_r.png"]  # not a_r-1.png


def test_stop_cancels_at_once_a_job_that_cannot_finish_within_stop_timeout(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "params": {"iterations": 1_000_000}}],
                      settings={"stop_timeout": 600, "settle": 0.2})
    db = tmp_path / "state" / "journal.sqlite"
    with Daemon(cfg) as d:
        d.start()
        write_image(tmp_path / "in" / "a.png", 1)
        wait_until(lambda: journal_rows(db) and journal_rows(db)[0]["state"] == "running", 60, "running")
        assert d.stop(timeout=120) == 0  # not the 600 s of stop_timeout
        assert "cannot finish within stop_timeout" in d.text and "queued again" in d.text
    row = journal_rows(db)[0]
    assert row["state"] == "queued" and row["attempts"] == 0
    assert (tmp_path / "in" / "a.png").exists() and not files(tmp_path / "out")
