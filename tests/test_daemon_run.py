"""The daemon as a real subprocess with real files, real inotify events and real signals."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from daemon_util import (Daemon, NotifyListener, files, image_bytes, journal_rows, make_config, sidecar, wait_until,
                         write_image)


# ---- many files at once ------------------------------------------------------------------------


def _drop(inbox: Path, staging: Path, i: int, rng: random.Random) -> str:
    """Drop one image the way real clients do: slowly in chunks, moved in, or under a temporary name."""
    name = f"img{i:04d}.png"
    data = image_bytes(i, (24 + i % 17, 20 + i % 13))
    kind = i % 3
    if kind == 0:  # copied slowly in chunks, under its final name
        with open(inbox / name, "wb") as f:
            for k in range(0, len(data), len(data) // 3 + 1):
                f.write(data[k:k + len(data) // 3 + 1])
                f.flush()
                time.sleep(rng.uniform(0.05, 0.25))
    elif kind == 1:  # written elsewhere on the same file system, then moved in
        tmp = staging / name
        tmp.write_bytes(data)
        os.rename(tmp, inbox / name)
    else:  # written under a temporary name (browser, rsync, Office), then renamed
        tmp = inbox / (name + (".part", ".crdownload", ".tmp")[i % 9 // 3])
        with open(tmp, "wb") as f:
            for k in range(0, len(data), len(data) // 2 + 1):
                f.write(data[k:k + len(data) // 2 + 1])
                f.flush()
                time.sleep(rng.uniform(0.1, 0.6))  # may exceed `settle`: a temporary name is never taken
        os.rename(tmp, inbox / name)
    return name


class PartialWatch(threading.Thread):
    """Opens every visible file in the output folder as soon as it appears: none may be partial."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.bad, self.seen, self.stop = folder, [], set(), False

    def run(self):
        while not self.stop:
            for p in files(self.folder):
                if p.name in self.seen:
                    continue
                try:
                    with Image.open(p) as im:
                        im.load()
                    self.seen.add(p.name)
                except FileNotFoundError:
                    pass
                except Exception as e:  # noqa: BLE001 - any decode problem is a partial output
                    self.bad.append(f"{p.name}: {e}")
                    self.seen.add(p.name)
            time.sleep(0.02)


def run_drop(tmp_path, n: int, workers: int, timeout: float):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"}], settings={"settle": 1.0})
    inbox, out, staging = tmp_path / "inbox", tmp_path / "out", tmp_path / "staging"
    staging.mkdir()
    (inbox / ".hidden.png").write_bytes(image_bytes(99_999))
    (inbox / "left.png.part").write_bytes(image_bytes(99_998))  # never renamed: never taken
    out.mkdir()
    watch = PartialWatch(out)
    watch.start()
    with Daemon(cfg) as d:
        d.start()
        rng = random.Random(4)
        with ThreadPoolExecutor(workers) as pool:
            names = list(pool.map(lambda i: _drop(inbox, staging, i, random.Random(rng.random())), range(n)))
        wait_until(lambda: len(files(out)) >= n and not files(inbox, "img*"), timeout, f"{n} outputs")
        time.sleep(1.5)  # a second scan or event would show up now as an extra output
        assert d.stop() == 0
    watch.stop = True
    watch.join()
    outputs = sorted(p.name for p in files(out))
    assert outputs == sorted(n.replace(".png", "_r.png") for n in names)  # exactly once, never numbered -1
    assert sorted(p.name for p in files(inbox / "processed")) == sorted(names)
    assert not (inbox / "failed").exists()
    assert watch.bad == [] and len(watch.seen) == n
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [".hidden.png", "left.png.part"]
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert len(rows) == n and all(r["state"] == "done" and r["attempts"] == 1 for r in rows)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_files_dropped_at_once_are_each_processed_once(tmp_path):
    run_drop(tmp_path, 30, 10, 150)


@pytest.mark.slow
def test_500_files_dropped_at_once_are_each_processed_once(tmp_path):
    run_drop(tmp_path, 500, 32, 1500)


# ---- bad inputs ----------------------------------------------------------------------------------


def _png_with_size(width: int, height: int) -> bytes:
    """A real PNG header claiming a huge picture, with a little compressed data (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_INPUTS = {
    "empty.png": "empty",
    "truncated.png": "truncated",
    "not-an-image.jpg": "not an image",
    "bomb.png": "too large",
    "tiny.png": "only 1×1 pixels",
    "unreadable.png": "permission denied",
    "escape.png": "is a symbolic link",
}


def test_bad_inputs_each_fail_alone_with_a_clear_reason(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "inbox", "output": "out"},
                                 {"rule": "polled", "watch": "net", "output": "out-net", "poll": True},
                                 {"rule": "noweights", "watch": "in-w", "output": "out-w",
                                  "params": {"weights": str(tmp_path / "missing" / "vgg19.pth")}}],
                      settings={"settle": 0.3, "poll_interval": 0.5, "incomplete_timeout": 1})
    inbox = tmp_path / "inbox"
    outside = write_image(tmp_path / "outside" / "secret.png", 5)
    prefix = []
    if os.geteuid() == 0:  # root reads any file: drop the capability, as the unit's User=nst has none
        if not shutil.which("setpriv"):
            pytest.skip("setpriv is needed to run the daemon without CAP_DAC_OVERRIDE as root")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    with Daemon(cfg, prefix=prefix) as d:
        d.start()
        assert "watching " + str(tmp_path / "net") + " (polled)" in d.text
        write_image(inbox / "good1.png", 1)
        (inbox / "empty.png").write_bytes(b"")
        good = image_bytes(2, (64, 64))
        (inbox / "truncated.png").write_bytes(good[: len(good) // 2])
        (inbox / "not-an-image.jpg").write_text("Dear studio, this is a letter, not a photo.\n")
        (inbox / "bomb.png").write_bytes(_png_with_size(100_000, 100_000))
        write_image(inbox / "tiny.png", 3, (1, 1))
        write_image(inbox / "unreadable.png", 4)
        os.chmod(inbox / "unreadable.png", 0)
        os.symlink(outside, inbox / "escape.png")
        write_image(inbox / "good2.png", 6)
        write_image(tmp_path / "net" / "remote.png", 7)
        write_image(tmp_path / "in-w" / "waits.png", 8)
        failed = inbox / "failed"
        wait_until(lambda: len(list(failed.glob("*.error.json"))) == len(BAD_INPUTS)
                   and len(files(tmp_path / "out")) == 2 and files(tmp_path / "out-net"), 120, "every input to end")
        for name, words in BAD_INPUTS.items():
            assert os.path.lexists(failed / name), name
            side = sidecar(failed / name)
            assert words in side["message"] and side["rule"] == "r" and side["input"] == str(inbox / name), side
            assert side["error"]["kind"] == "image" and name in side["message"]
        assert (failed / "escape.png").is_symlink() and outside.exists()  # the link moved, its target untouched
        assert sorted(p.name for p in files(tmp_path / "out")) == ["good1_r.png", "good2_r.png"]
        assert sorted(p.name for p in files(inbox / "processed")) == ["good1.png", "good2.png"]
        assert [p.name for p in files(tmp_path / "out-net")] == ["remote_polled.png"]
        # Missing weights are the machine's problem, not the file's: it waits (and says why) instead of failing.
        d.wait_log("rule noweights:")
        assert "its files wait" in d.wait_log("rule noweights:") and "<3>rule noweights" in d.text
        assert (tmp_path / "in-w" / "waits.png").exists() and not (tmp_path / "in-w" / "failed").exists()
        assert d.proc.poll() is None  # still running
        assert d.text.count("<4>") >= len(BAD_INPUTS)  # each failure logged as a warning
        assert d.stop() == 0


# ---- reload, sd_notify, watchdog, stop ----------------------------------------------------------


def test_notify_reload_keeps_old_rules_on_error_and_stops_cleanly(tmp_path):
    rules = [{"rule": "a", "watch": "in-a", "output": "out-a"}]
    sock = tmp_path / "nst.sock"
    cfg = make_config(tmp_path, rules, settings={"socket": str(sock)})
    listener = NotifyListener()
    env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "1000000"}
    try:
        with Daemon(cfg, env=env) as d:
            d.start(wait_ready=False)
            ready = listener.wait_for("READY", "1", timeout=120)
            # READY=1 only once the journal and the job service socket are there.
            assert sock.is_socket() and (tmp_path / "state" / "journal.sqlite").exists()
            d.wait_log("ready:", timeout=10)
            assert "queued" in ready["STATUS"] and "idle" in ready["STATUS"]
            listener.wait_for("WATCHDOG", "1", after=len(listener.messages))  # fed while idle
            write_image(tmp_path / "in-a" / "x.png", 1)
            wait_until(lambda: files(tmp_path / "out-a"), 60, "the first output")
            listener.wait_for("STATUS", "1 done")

            # A good reload: a new rule appears; RELOADING=1 with MONOTONIC_USEC, then READY=1.
            make_config(tmp_path, rules + [{"rule": "b", "watch": "in-b", "output": "out-b"}],
                        settings={"socket": str(sock)})
            mark = len(listener.messages)
            t_sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            m = listener.wait_for("RELOADING", "1", after=mark)
            assert int(m["MONOTONIC_USEC"]) >= t_sent
            listener.wait_for("READY", "1", after=mark)
            d.wait_log("reloaded")
            write_image(tmp_path / "in-b" / "y.png", 2)
            wait_until(lambda: files(tmp_path / "out-b"), 60, "an output of the new rule")

            # A bad reload: the error names file, line and key; the old rules keep working.
            good_text = cfg.read_text()
            cfg.write_text(good_text.replace("output: out-b", "output: out-b\n  colour: blue"))
            line_no = next(i for i, l in enumerate(cfg.read_text().splitlines(), 1) if "colour" in l)
            start = len(d.lines)
            mark = len(listener.messages)
            d.signal(signal.SIGHUP)
            d.wait_log("keeping the rules in use", start=start)
            assert f"{cfg}:{line_no}:3: rules.b.colour: unknown key" in d.text
            listener.wait_for("READY", "1", after=mark)
            write_image(tmp_path / "in-b" / "z.png", 3)
            wait_until(lambda: len(files(tmp_path / "out-b")) == 2, 60, "the old rule b still working")
            assert d.proc.poll() is None

            # reload_on_change: editing the file is enough.
            make_config(tmp_path, rules, settings={"reload_on_change": True, "socket": str(sock)})
            d.signal(signal.SIGHUP)
            d.wait_log("reloaded", start=start)
            start = len(d.lines)
            make_config(tmp_path, rules + [{"rule": "c", "watch": "in-c", "output": "out-c"}],
                        settings={"reload_on_change": True, "socket": str(sock)})
            d.wait_log("changed; reloading", start=start, timeout=30)
            d.wait_log("c (new)", start=start)

            mark = len(listener.messages)
            assert d.stop() == 0
            listener.wait_for("STOPPING", "1", after=mark)
    finally:
        listener.close()


def test_sigterm_requeues_a_long_job_within_stop_timeout_and_a_restart_runs_it_again(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "params": {"iterations": 100000}}],
                      settings={"stop_timeout": 1})
    db = tmp_path / "state" / "journal.sqlite"
    with Daemon(cfg) as d:
        d.start()
        write_image(tmp_path / "in" / "a.png", 1)
        d.wait_log("job j1 queued")
        wait_until(lambda: journal_rows(db) and journal_rows(db)[0]["state"] == "running", 30, "running")
        t = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t < 15  # stop_timeout 1 s, then cancelled within one optimiser step
        assert "cancelling it" in d.text and "queued again" in d.text
    row = journal_rows(db)[0]
    assert row["state"] == "queued" and row["attempts"] == 0  # a clean stop is not an attempt
    assert (tmp_path / "in" / "a.png").exists() and not files(tmp_path / "out")
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: journal_rows(db)[0]["state"] == "running", 30, "the job running again")
        assert journal_rows(db)[0]["attempts"] == 1
        assert d.stop() == 0


# ---- GIMP's jobs before folder jobs ---------------------------------------------------------------


def test_socket_jobs_run_before_queued_folder_jobs_and_sigterm_finishes_the_current_one(tmp_path):
    from nst_core.service.client import ServiceClient

    sock = tmp_path / "run" / "nst.sock"
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "params": {"iterations": 60}},
                                 {"rule": "fin", "watch": "in2", "output": "out2", "params": {"iterations": 400}}],
                      settings={"socket": str(sock), "settle": 0.2, "stop_timeout": 60})
    with Daemon(cfg) as d:
        d.start()
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        for i in range(6):
            write_image(tmp_path / "in" / f"f{i}.png", i)
        d.wait_log("job j1 queued")
        client = ServiceClient(str(sock), timeout=120, client_name="test-gimp")
        content = write_image(tmp_path / "gimp.png", 50)
        result = client.run_job(content, [tmp_path / "styles" / "style.png"],
                                {"size": 32, "iterations": 2, "weights": "random"})
        done_when_gimp_finished = len(files(tmp_path / "out"))
        assert result.width == 32 or result.height == 32
        assert done_when_gimp_finished <= 2, d.text  # it overtook the folder jobs still waiting
        wait_until(lambda: len(files(tmp_path / "in" / "processed")) == 6, 120, "all folder jobs")
        # SIGTERM in the middle of a job that can finish within stop_timeout: it finishes.
        db = tmp_path / "state" / "journal.sqlite"
        write_image(tmp_path / "in2" / "last.png", 99)
        wait_until(lambda: any(r["rule"] == "fin" and r["state"] == "running" for r in journal_rows(db)), 30, "running")
        assert d.stop() == 0
        assert "finishing last.png" in d.text
    assert not sock.exists()
    assert [p.name for p in files(tmp_path / "out2")] == ["last_fin.png"]
    assert (tmp_path / "in2" / "processed" / "last.png").exists()
    assert [r["state"] for r in journal_rows(db)] == ["done"] * 7


# ---- kill -9 at random moments ------------------------------------------------------------------


def _job_seconds(lines: list[str]) -> list[float]:
    return [float(m) for m in re.findall(r"job j\d+ done in ([\d.]+) s", "\n".join(lines))]


def run_kill9(tmp_path, n: int, kills: int, seed: int):
    """Kill -9 the daemon `kills` times at moments chosen from its own progress, then let it finish.

    Each run is killed once its k-th job (k random, 0 to 2) has started, after a random fraction
    (0 to 1.5) of a job's duration as measured in the earlier runs: in the middle of the engine, the
    write, the journal update or the moves, whatever the machine's speed. About k + 1 jobs finish per
    run, so the kills are spread over the whole batch instead of running out when a fast machine
    finishes it early.
    """
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "params": {"iterations": 8}}],
                      settings={"settle": 0.2, "max_attempts": 1000})
    inbox, out = tmp_path / "in", tmp_path / "out"
    names = [write_image(inbox / f"k{i:03d}.png", 1000 + i, (30 + i % 7, 30)).name for i in range(n)]
    rng = random.Random(seed)
    killed, log, seconds = 0, [], []
    for _ in range(kills):
        with Daemon(cfg) as d:
            d.start()
            k = rng.randint(0, 2)
            if k:  # until this process's k-th job has started (or nothing is left to start)
                wait_until(lambda: any(f"job j{k} queued" in x for x in list(d.lines)) or not files(inbox, "k*"),
                           120, f"job j{k} to start")
            typical = statistics.median(seconds) if seconds else 0.05
            time.sleep(rng.uniform(0, 1.5) * typical)
            d.kill9()
            killed += 1
            log += d.lines
            seconds += _job_seconds(d.lines)
        if not files(inbox, "k*"):
            break
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: not files(inbox, "k*"), 60 + 3 * n, "every input to be taken")
        time.sleep(1.0)
        assert d.stop() == 0
        log += d.lines
    rerun = sum("was running when the daemon stopped" in x for x in log)
    found = sum("written before the daemon stopped" in x for x in log)
    print(f"{killed} kills: {rerun} running jobs queued again, {found} outputs found done after a restart")
    # Every input ends in exactly one output (or one failure sidecar): never twice, never lost.
    outputs = [p.name for p in files(out)]
    processed = [p.name for p in files(inbox / "processed")]
    failed = [p.name for p in files(inbox / "failed") if not p.name.endswith(".error.json")]
    assert sorted(processed + failed) == sorted(names)
    assert sorted(outputs) == sorted(x.replace(".png", "_r.png") for x in processed)
    assert all(len(list((inbox / "failed").glob(x + ".error.json"))) == 1 for x in failed)
    for p in files(out):
        with Image.open(p) as im:
            im.load()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temporary files cleaned up
    rows = journal_rows(tmp_path / "state" / "journal.sqlite")
    assert len(rows) == n and all(r["state"] in ("done", "failed") for r in rows)
    return killed, rerun + found


def test_kill9_at_random_moments_never_loses_or_doubles_a_file(tmp_path):
    killed, interrupted = run_kill9(tmp_path, 10, 3, seed=1)
    assert killed >= 1


@pytest.mark.slow
def test_kill9_at_random_moments_during_60_jobs(tmp_path):
    killed, interrupted = run_kill9(tmp_path, 60, 20, seed=2)
    assert killed >= 10 and interrupted >= 3  # kills spread over the batch, several in the middle of a job


# ---- dry run ---------------------------------------------------------------------------------------


def test_dry_run_lists_what_it_would_do_and_touches_nothing(tmp_path):
    import subprocess
    import sys

    from daemon_util import REPO

    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out"}])
    for i in range(3):
        write_image(tmp_path / "in" / f"p{i}.png", i)
    (tmp_path / "in" / "skip.txt").write_text("not taken by the include globs")
    (tmp_path / "out").mkdir()
    write_image(tmp_path / "out" / "p0_r.png", 9)
    r = subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(cfg), "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"would process {tmp_path / 'in' / 'p1.png'} → {tmp_path / 'out' / 'p1_r.png'}" in r.stdout
    assert "p0_r.png (exists: written as p0_r-1.png)" in r.stdout
    assert "3 file(s) to process" in r.stdout and "skip.txt" not in r.stdout
    assert len(files(tmp_path / "in")) == 4 and not (tmp_path / "state").exists()


# ---- the window between the output's rename and the journal's "done" ---------------------------


def test_restart_after_a_crash_at_each_point_of_the_write(tmp_path):
    """The journal and files exactly as a kill -9 leaves them at three points of a job, then a restart.

    (The same run checks the skip and number collision policies and max_attempts.)

    after: the output was renamed into place, the journal not yet updated → done, no second output.
    before: killed while writing (save_image's temporary file is there) → cleaned, run again.
    overwrite: an older output sat at the name and was not yet replaced → run again, replaced.
    """
    from daemon.config import file_hash, load_config
    from daemon.journal import Identity, Journal
    from nst_core.images import load_image, save_image
    from nst_core.outputs import temporary_name

    cases = ("after", "before", "overwrite")
    cfg = make_config(tmp_path, [{"rule": c, "watch": f"in-{c}", "output": f"out-{c}",
                                  "on_collision": "overwrite" if c == "overwrite" else "number"}
                                 for c in cases + ("poison",)]
                      + [{"rule": "skip", "watch": "in-skip", "output": "out-skip", "on_collision": "skip"},
                         {"rule": "number", "watch": "in-number", "output": "out-number"}],
                      settings={"max_attempts": 3})
    rules = {r.name: r for r in load_config(cfg).rules}
    j = Journal(tmp_path / "state" / "journal.sqlite")
    targets = {}
    for i, c in enumerate(cases):
        src = write_image(tmp_path / f"in-{c}" / "a.png", i)
        job = j.add(file_hash(src), c, rules[c].version, src, Identity.at(src))
        j.claim(job.id, "main")
        target = targets[c] = tmp_path / f"out-{c}" / f"a_{c}.png"
        target.parent.mkdir()
        if c == "after":
            j.set_output(job.id, target, None)  # recorded before writing: the name was free
            save_image(load_image(tmp_path / "styles" / "style.png"), target)  # in place; then the kill
        elif c == "before":
            j.set_output(job.id, target, None)
            (target.parent / temporary_name(target)).write_bytes(b"\x89PNG half")  # save_image's temp name
        else:
            old = write_image(target, 77)  # an output of an earlier input with the same name
            j.set_output(job.id, target, Identity.at(old))
    # A job the daemon died in three times (max_attempts) fails instead of killing it a fourth time.
    src = write_image(tmp_path / "in-poison" / "a.png", 9)
    job = j.add(file_hash(src), "poison", rules["poison"].version, src, Identity.at(src))
    for _ in range(3):
        j.claim(job.id, "main")
        j.requeue(job.id, count_attempt=True)
    j.close()
    # And the collision policies, with an output of an earlier input already at the name.
    for c in ("skip", "number"):
        write_image(tmp_path / f"out-{c}" / f"a_{c}.png", 50)
        write_image(tmp_path / f"in-{c}" / "a.png", 51)
    earlier = (tmp_path / "out-skip" / "a_skip.png").read_bytes()
    kept = targets["after"].stat().st_ino
    old_bytes = targets["overwrite"].read_bytes()
    with Daemon(cfg) as d:
        d.start()
        wait_until(lambda: all(files(tmp_path / f"in-{c}" / "processed") for c in cases)
                   and files(tmp_path / "in-poison" / "failed") and files(tmp_path / "in-skip" / "processed")
                   and files(tmp_path / "in-number" / "processed"), 90, "every job to end")
        assert f"{tmp_path / 'in-after' / 'a.png'}: its output {targets['after']} was written before" in d.text
        assert f"{tmp_path / 'in-before' / 'a.png'}: was running when the daemon stopped (attempt 1)" in d.text
        assert f"{tmp_path / 'in-overwrite' / 'a.png'}: was running when the daemon stopped" in d.text
        assert d.stop() == 0
    for c in cases:
        assert [p.name for p in (tmp_path / f"out-{c}").iterdir()] == [f"a_{c}.png"], c  # one output, no temp
    assert targets["after"].stat().st_ino == kept  # not written twice
    assert targets["overwrite"].read_bytes() != old_bytes
    side = sidecar(tmp_path / "in-poison" / "failed" / "a.png")
    assert side["error"]["kind"] == "crashed" and "gave up after 3 attempts" in side["message"]
    assert side["attempts"] == 3 and not files(tmp_path / "out-poison")
    assert [p.name for p in files(tmp_path / "out-skip")] == ["a_skip.png"]
    assert (tmp_path / "out-skip" / "a_skip.png").read_bytes() == earlier  # skip: left alone
    assert [p.name for p in files(tmp_path / "out-number")] == ["a_number-1.png", "a_number.png"]
    rows = {r["rule"]: (r["state"], r["attempts"]) for r in journal_rows(tmp_path / "state" / "journal.sqlite")}
    assert rows == {"after": ("done", 1), "before": ("done", 2), "overwrite": ("done", 2), "poison": ("failed", 3),
                    "skip": ("done", 1), "number": ("done", 1)}


# ---- outputs: the same metadata as nst stylize and the service, no input overwritten ---------------


def test_outputs_carry_the_common_metadata_and_never_replace_a_style_image(tmp_path):
    """The daemon writes the keys `nst stylize` and the service write (nst:params, nst:weights,
    nst:note, Software) and its own as nst:rule, nst:rule-version, nst:source; an output named like
    a style image that sits in the output folder fails its input instead of replacing the style."""
    cfg = make_config(tmp_path, [{"rule": "r", "watch": "in", "output": "out", "style": "out/look.png",
                                  "name": "{stem}.png", "on_collision": "overwrite"}])
    style = write_image(tmp_path / "out" / "look.png", 77, (48, 48))
    before = style.read_bytes()
    with Daemon(cfg) as d:
        d.start()
        write_image(tmp_path / "in" / "photo.png", 1)
        write_image(tmp_path / "in" / "look.png", 2)
        wait_until(lambda: files(tmp_path / "in" / "processed") and files(tmp_path / "in" / "failed", "*.png"), 60,
                   "one input done, one failed")
        assert d.stop() == 0
    assert style.read_bytes() == before
    error = sidecar(tmp_path / "in" / "failed" / "look.png")
    assert error["error"]["kind"] == "image" and "is one of the input images" in error["message"]
    assert str(style) in error["message"]
    with Image.open(tmp_path / "out" / "photo.png") as im:
        text = dict(im.text)
    from daemon.config import load_config

    rule = load_config(cfg).rules[0]
    assert json.loads(text["nst:params"])["size"] == 32 and "random" in text["nst:weights"]
    assert "random" in text["nst:note"] and text["Software"].startswith("neural-style") and "nst-daemon" in text["Software"]
    assert (text["nst:rule"], text["nst:rule-version"], text["nst:source"]) == ("r", rule.version, "photo.png")
    assert not [k for k in text if k.startswith("nst-")]


# ---- full resolution -----------------------------------------------------------------------------


def test_a_rule_with_size_original_writes_the_input_at_its_own_size(tmp_path):
    cfg = make_config(tmp_path, [{"rule": "full", "watch": "in", "output": "out",
                                  "params": {"size": "original", "tile": 32}}], settings={"settle": 0.2})
    with Daemon(cfg) as d:
        d.start()
        write_image(tmp_path / "in" / "big.png", 7, (90, 61))
        wait_until(lambda: files(tmp_path / "out"), 120, "the output")
        assert d.stop() == 0
    (out,) = files(tmp_path / "out")
    with Image.open(out) as im:
        assert im.size == (90, 61)  # the default size (32 in these tests) would give 32×22
        assert json.loads(im.text["nst:params"])["size"] == 90  # the size it ran at
