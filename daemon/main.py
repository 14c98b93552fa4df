"""`nst-daemon`: the hot-folder daemon, run by systemd (Type=notify-reload) or by hand.

    nst-daemon --config FILE                 run
    nst-daemon --config FILE --check-config  validate; print what each rule would do (exit 0, or 2)
    nst-daemon --config FILE --dry-run       list the files it would process now
    nst-daemon --units-dir                   the folder with the systemd units and their README

One process: rules and watchers, the journal, one folder worker per device, and the local job
service socket, all on one shared `Scheduler`, so GIMP's interactive jobs run before folder
(batch) jobs on the same warm engine. With `settings.cluster` (or --cluster) the devices are the
GPUs of a Ray cluster, and the daemon stays the one owner of the folders and the journal. Logs go to stdout with journald's <N> level prefixes.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from nst_core.errors import NSTError

from .config import ConfigError, journal_problem, load_config
from .rules import Config, Rule
from .decide import DUPLICATE, FINISH, LATER, RUN, decide, waits_elsewhere
from .folderlock import FolderLocks, live_holders
from .journal import Identity, Job, Journal, instance_alive, instance_lock_path
from .names import show
from .logs import setup_logging
from .notify import Notifier
from .report import describe, dry_run
from .safefs import LinkRefused
from .watch import Settler, Watcher, scan
from .inputs import finish_input, folder_problem, move_duplicate
from .jobs import FolderContext, Item, JobQueue, OutputNames, Running, RuleBlocks, Stats
from .worker import FolderWorker, StyleCache

log = logging.getLogger("nst-daemon")

# ---- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """Everything the running daemon holds: rules and watchers, the journal, the engine and socket, and
    its folder workers, to which it hands only a `FolderContext`."""

    def __init__(self, config: Config, *, instance: str = "main", devices=None, socket="config", env=None,
                 cluster: str | None = None):
        self.config = config
        self.cluster = cluster or config.settings.cluster
        self.env = os.environ if env is None else env
        self.owner = instance
        self.devices = tuple(devices) if devices else config.settings.devices
        self.socket_path = config.settings.socket_path(self.env) if socket == "config" else socket
        self.notifier = Notifier(self.env)
        self.queue = JobQueue()
        self.settler = Settler(config.settings.settle, config.settings.incomplete_timeout)
        self.stats = Stats()
        self.running: dict[int, Running] = {}
        self.stopping = threading.Event()
        self.stop_deadline = math.inf
        self.names = OutputNames()
        self.blocks = RuleBlocks(self.queue, lambda: self.config.settings.scan_interval, self.changed)
        self.styles = StyleCache()
        self.journal: Journal | None = None
        self.scheduler = None
        self.server = None
        self.watcher: Watcher | None = None
        self.workers: list[FolderWorker] = []
        self.context: FolderContext | None = None
        self._wake = threading.Event()
        self._reload_requested = False
        self._stop_requested = False
        self._later: set[Path] = set()
        self._lock_fd: int | None = None
        self.locks: FolderLocks | None = None
        self._reload_error: str | None = None  # the last reload's errors, until one succeeds
        self._status_dirty = True
        self._last_status = ""
        self._config_sig = _file_sig(config.path)

    # -- what the folder workers are told --
    def changed(self) -> None:
        self._status_dirty = True

    def look_again(self, path: Path, delay: float = 0.0, st: os.stat_result | None = None) -> None:
        """Settle the file at `path` again (its rule found anew), after `delay` seconds unless it
        changes from `st` before."""
        owner = self.config.owner(path)
        if owner is None:
            return
        if delay or st is not None:
            self.settler.defer(path, owner[0].name, owner[1], delay, st)
        else:
            self.settler.add(path, owner[0].name, owner[1])
        self._wake.set()

    def trust_ctime(self, root: Path) -> bool:
        """Whether file change times under `root` are in our clock (not a network folder's)."""
        return self.watcher is None or self.watcher.modes.get(root) != "polled"

    def folder_context(self) -> FolderContext:
        """What the folder workers (and the moving of inputs) may use; the journal and scheduler must be open."""
        return FolderContext(
            journal=self.journal, queue=self.queue, scheduler=self.scheduler, settler=self.settler,
            stats=self.stats, names=self.names, blocks=self.blocks, running=self.running, owner=self.owner,
            stopping=self.stopping, config=lambda: self.config, styles=self.styles,
            stop_deadline=lambda: self.stop_deadline, trust_ctime=self.trust_ctime, look_again=self.look_again,
            changed=self.changed)

    # -- lifecycle --
    def start(self) -> None:
        """Open the journal, recover, start the engine, the socket, the watchers and the workers."""
        from nst_core.service.scheduler import Scheduler
        from nst_core.service.server import ServiceServer

        s = self.config.settings
        jpath = s.journal_path(self.env)
        self._open_journal(jpath)
        self.locks = FolderLocks(jpath, self.owner, self.socket_path)
        self._lock_folders(self.config)
        self.recover()
        self.journal.forget_stale({(r.name, r.version) for r in self.config.rules})
        self.scheduler = Scheduler(devices=self.devices, cluster=self.cluster, cluster_resource=s.cluster_resource)
        self.scheduler.on_change = self.changed
        self.scheduler.start()
        if self.socket_path is not None:
            self.server = ServiceServer(str(self.socket_path), self.scheduler,
                                        mode=0o660 if s.socket_group else 0o600, group=s.socket_group,
                                        owns_scheduler=False)
            self.server.start()
        self._start_watching()
        self.context = self.folder_context()
        self.add_folder_workers()
        self.scan_all()
        self._last_scan = time.monotonic()
        log.info("ready: %d rule(s), devices %s, journal %s, socket %s", len(self.config.rules),
                 f"of the Ray cluster at {self.cluster}" if self.cluster else ", ".join(self.scheduler.devices),
                 jpath, self.socket_path or "off")
        self.notifier.ready(self.status_text())

    def add_folder_workers(self) -> None:
        """One folder worker per device; a cluster's grow as its GPUs join (one left idle costs nothing)."""
        while len(self.workers) < max(1, len(self.scheduler.devices)) and not self.stopping.is_set():
            w = FolderWorker(self.context, len(self.workers))
            self.workers.append(w)
            w.start()

    def _open_journal(self, jpath: Path) -> None:
        """The instance lock, then the journal; NSTError (exit 2, no restart) where the path cannot hold one."""
        why = journal_problem(jpath)
        if why:
            raise NSTError(f"journal {why}")
        try:
            self._lock_instance(jpath)
            self.journal = Journal(jpath)
        except (OSError, sqlite3.Error) as e:
            raise NSTError(f"journal {jpath}: cannot open it ({getattr(e, 'strerror', None) or e})") from None

    def _lock_folders(self, config: Config) -> list[Path]:
        """Hold every watched folder (FolderBusy if a daemon with another journal watches one); the new ones."""
        new: list[Path] = []
        try:
            for rule in config.rules:
                for root in rule.watch:
                    try:
                        if rule.create and not root.exists():
                            root.mkdir(parents=True, exist_ok=True)
                            log.info("rule %s: created %s", rule.name, root)
                        if not root.is_dir() or root in self.locks.held:
                            continue
                        warning = self.locks.acquire(root)
                    except OSError as e:
                        raise NSTError(f"rule {rule.name}: {root}: {e.strerror or e}") from None
                    if warning:
                        log.warning("rule %s: %s", rule.name, warning)
                    elif root in self.locks.held:
                        new.append(root)
        except NSTError:
            for root in new:
                self.locks.release(root)
            raise
        return new

    def _lock_instance(self, jpath: Path) -> None:
        jpath.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(instance_lock_path(jpath, self.owner), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NSTError(f"another nst-daemon (instance {self.owner!r}) is using the journal {jpath}; "
                           "run one per instance name (--instance)") from None
        self._lock_fd = fd

    def mine(self, job: Job) -> bool:
        """Whether this process may finish what `job`'s owner left (itself, or an instance not running)."""
        return job.owner in (None, self.owner) or not instance_alive(self.journal.path, job.owner)

    def recover(self) -> None:
        """Jobs that were running when their process died: done if their output is there, else queued again."""
        for job in self.journal.running():
            if not self.mine(job):
                continue
            out = Path(job.out_path) if job.out_path else None
            now = Identity.at(out) if out else None
            if now is not None and now != job.out_prior:
                self.journal.done(job.id, out, note="output found after a restart")
                log.info("%s: its output %s was written before the daemon stopped; done", job.in_path, out)
            else:
                self.journal.requeue(job.id, count_attempt=True)
                log.warning("%s: was running when the daemon stopped (attempt %d); queued again",
                            job.in_path, job.attempts)
            if out is not None:
                from nst_core.outputs import temporary_files

                for tmp in temporary_files(out):
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass

    def _start_watching(self) -> None:
        for rule in self.config.rules:
            for root in rule.watch:
                if rule.create and not root.exists():
                    root.mkdir(parents=True, exist_ok=True)
                    log.info("rule %s: created %s", rule.name, root)
        self.watcher = Watcher(self.config, self._on_event, self._on_dir, self.config.settings.poll_interval,
                               on_write=self.settler.writing, on_lost=self._on_lost)
        self.watcher.start()
        for root, mode in self.watcher.modes.items():
            log.info("watching %s (%s)", root, mode)

    def _on_event(self, path: Path) -> None:
        owner = self.config.owner(path)
        if owner is not None:
            self.settler.add(path, owner[0].name, owner[1])
            self._wake.set()

    def _on_lost(self) -> None:
        self.settler.events_lost()
        self._last_scan = -math.inf  # events were lost: scan now
        self._wake.set()

    def _on_dir(self, path: Path) -> None:
        for rule in self.config.rules:
            for root in rule.watch:
                if rule.recursive and (path == root or root in path.parents):
                    for p in scan(rule, path if path != root else root):
                        if rule.accepts(root, p):
                            self.settler.add(p, rule.name, root)
        self._wake.set()

    def scan_all(self) -> None:
        t0, n = time.perf_counter(), 0
        self.blocks.expire()
        later, self._later = self._later, set()
        for p in later:
            self.look_again(p)
        for rule in self.config.rules:
            if rule.name in self.blocks:
                continue
            for root in rule.watch:
                if not root.is_dir():
                    log.warning("rule %s: watched folder %s is missing", rule.name, root)
                    continue
                for p in scan(rule, root):
                    self.settler.add(p, rule.name, root)
                    n += 1
        self.stats.add("scan", time.perf_counter() - t0, n)
        self._wake.set()

    def consider(self, path: Path, st: os.stat_result) -> None:
        """A settled file: find or create its job, then queue it, finish it, or leave it."""
        owner = self.config.owner(path)
        if owner is None:
            return
        rule, root = owner
        if rule.name in self.blocks:
            return
        ident = Identity.of(st)
        job = self.journal.job_for(path, st, rule.name, rule.version, create=True, stats=self.stats)
        item = Item(job.id, path, rule.name, rule.version, root)
        d = decide(job, path, ident, keep_inputs=rule.keep_inputs, ours=self.mine, elsewhere=waits_elsewhere(path),
                   here=lambda j: self.queue.in_flight(j.id) or j.owner == self.owner)
        if d.action == RUN:
            if d.retry:
                self.journal.retry(job.id, path, ident, d.retry)
            self.queue.put(item)
            self.changed()
        elif d.action == LATER:
            self._later.add(path)
        elif d.action == FINISH:
            finish_input(self.context, job, item, rule, ok=job.state == "done")
        elif d.action == DUPLICATE:
            self._duplicate(job, item, rule)

    def _duplicate(self, job: Job, item: Item, rule: Rule) -> None:
        try:
            dest = move_duplicate(item, rule)
            log.info("%s: same content as %s, already done (%s); moved to %s", item.path, job.in_path,
                     job.out_path or job.note, dest)
        except LinkRefused as e:
            self.blocks.block(rule.name, folder_problem(e.path, e).message)
        except OSError as e:
            log.error("%s: cannot move it to %s: %s", item.path, rule.processed_dir(item.root), e)

    def serve(self) -> None:
        """The main loop: signals, settled files, scans, reloads, watchdog and status, until stopped."""
        s = self.config.settings
        last_ready = last_status = last_wd = last_cfg = 0.0
        while not self._stop_requested:
            self._wake.wait(0.25)
            self._wake.clear()
            now = time.monotonic()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
                s = self.config.settings
            if self._stop_requested:
                break
            if now - last_ready >= min(0.25, max(0.02, s.settle / 8)):
                last_ready = now
                for path, pending, st in self.settler.ready(self.trust_ctime):
                    try:
                        self.consider(path, st)
                    except Exception:
                        log.exception("%s: cannot queue it", path)
            if now - self._last_scan >= s.scan_interval:
                self._last_scan = now
                self.scan_all()
            if s.reload_on_change and now - last_cfg >= 1.0:
                last_cfg = now
                sig = _file_sig(self.config.path)
                if sig != self._config_sig and sig is not None:
                    log.info("%s changed; reloading", self.config.path)
                    self.reload()
                    s = self.config.settings
            wd = self.notifier.watchdog_interval
            if wd and now - last_wd >= wd / 3:
                last_wd = now
                if self.healthy():
                    self.notifier.watchdog()
            if (self._status_dirty or now - last_status >= 5) and now - last_status >= 1.0:
                last_status = now
                if self.cluster:
                    self.add_folder_workers()
                self._status_dirty = False
                text = self.status_text()
                if text != self._last_status:
                    self._last_status = text
                    self.notifier.status(text)

    def healthy(self) -> bool:
        """Idle, or every running job made progress within stall_timeout (feeds systemd's watchdog); a
        job still waiting for a device (a cluster with no worker) is not stalled."""
        now = time.monotonic()
        limit = self.config.settings.stall_timeout
        return all(now - r.last_progress < limit for r in list(self.running.values()) if r.device is not None)

    def status_text(self) -> str:
        running = [f"{show(r.item.path.name)} ({r.item.rule}) step {r.step}/{r.total}" for r in list(self.running.values())]
        c = self.stats.counts
        text = f"{len(self.queue)} queued, {len(self.settler)} settling; "
        text += ("running " + ", ".join(running)) if running else "idle"
        text += f"; {c.get('done', 0)} done, {c.get('failed', 0)} failed since start"
        if self.cluster:
            text += "; " + self.cluster_text()
        if blocked := self.blocks.items():
            text += "; waiting: " + "; ".join(f"{k}: {m}" for k, m in blocked)
        if self._reload_error:
            text = f"reload failed, old rules in use: {self._reload_error} | " + text
        return text

    def cluster_text(self) -> str:
        """The cluster's workers and what each does (a folder file, a socket job, or idle)."""
        st = self.scheduler.status()
        files = {r.device: show(r.item.path.name) for r in list(self.running.values()) if r.device}
        workers = [f"{w['device']} " + (files.get(w["device"]) or ("running a job from " + (w["running"]["client"] or "?"))
                                        if w["running"] else "idle") for w in st["workers"]]
        if not workers:
            return f"waiting for cluster workers (no node of {self.cluster} offers {self.scheduler.cluster_resource})"
        return f"cluster: {', '.join(workers)}"

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def reload(self) -> bool:
        """Read the config again; on any error keep the running rules (and say so in STATUS until a
        reload succeeds). Returns whether it changed."""
        self.notifier.reloading()
        path = self.config.path
        self._config_sig = _file_sig(path)
        taken: list[Path] = []
        try:
            new = load_config(path)
            if self.locks is not None:
                taken = self._lock_folders(new)
        except (ConfigError, NSTError) as e:
            return self._reload_failed(path, e.message)
        except Exception as e:  # noqa: BLE001 - a reload must never end the daemon
            log.exception("reload of %s: unexpected error", path)
            return self._reload_failed(path, f"internal error: {type(e).__name__}: {e}")
        self._reload_error = None
        old = self.config
        fixed = ("devices", "journal", "socket", "socket_group", "cluster", "cluster_resource")
        kept = {k: getattr(old.settings, k) for k in fixed}
        moved = [k for k in fixed if getattr(new.settings, k) != kept[k]]
        if moved:
            log.warning("reload: %s change(s) need a restart; keeping the values in use", ", ".join(moved))
        new = dataclasses.replace(new, settings=dataclasses.replace(new.settings, **kept))
        if self.watcher is not None:
            self.watcher.stop()
        self.config = new
        if self.locks is not None:
            watched = {root for r in new.rules for root in r.watch}
            for root in [r for r in self.locks.held if r not in watched]:
                self.locks.release(root)
        logging.getLogger().setLevel(new.settings.log_level.upper())
        self.settler.settle = new.settings.settle
        self.settler.patience = new.settings.incomplete_timeout
        self.settler.clear()
        versions = {r.name: (r.version, r.watch) for r in new.rules}
        gone = self.queue.drop(lambda i: versions.get(i.rule, (None,))[0] == i.version and i.root in versions[i.rule][1])
        for item in gone:
            self.journal.forget(item.job_id)
        self.blocks.clear()
        self._start_watching()
        self.scan_all()
        self._last_scan = time.monotonic()
        names_old = {r.name: r.version for r in old.rules}
        changes = [f"{r.name} ({'new' if r.name not in names_old else 'changed' if names_old[r.name] != r.version else 'same'})"
                   for r in new.rules]
        log.info("reloaded %s: %s", path, ", ".join(changes) + (f"; now also watching {', '.join(map(str, taken))}"
                                                                if taken else ""))
        self.notifier.ready(self.status_text())
        self.changed()
        return True

    def _reload_failed(self, path: Path, message: str) -> bool:
        log.error("reload of %s failed; keeping the rules in use:\n%s", path, message)
        first = message.splitlines()[0] if message else "unknown error"
        more = message.count("\n")
        self._reload_error = first + (f" (and {more} more problem{'s' if more > 1 else ''}: see the log)" if more else "")
        self._last_status = ""
        self.notifier.ready(self.status_text())
        self.changed()
        return False

    def shutdown(self) -> None:
        """Stop: no new jobs; the running ones finish within stop_timeout or go back to the queue."""
        s = self.config.settings
        self.stopping.set()
        self.stop_deadline = time.monotonic() + s.stop_timeout
        busy = [show(r.item.path.name) for r in list(self.running.values())]
        self.notifier.stopping(f"stopping; {'finishing ' + ', '.join(busy) if busy else 'idle'}")
        log.info("stopping%s", f" (finishing {', '.join(busy)}, at most {s.stop_timeout:g}s)" if busy else "")
        if self.watcher is not None:
            self.watcher.stop()
        self.queue.close()
        if self.server is not None:
            self.server.stop(timeout=5)
        for w in self.workers:
            w.join(s.stop_timeout + 15)
        if self.scheduler is not None:
            self.scheduler.stop(cancel_running=True, timeout=10)
        if self.journal is not None:
            self.journal.close()
        if self.locks is not None:
            self.locks.release_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        c = self.stats.counts
        log.info("stopped (%d done, %d failed since start)", c.get("done", 0), c.get("failed", 0))

    def run(self) -> int:
        """start, serve until SIGTERM/SIGINT (SIGHUP reloads), shut down; the exit status."""
        # Plain stores only: the handler runs in the main thread, which may hold the lock of `_wake`
        # (inside its wait), so `_wake.set()` here could deadlock; serve() looks every 0.25 s.
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop_requested", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "_stop_requested", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        try:
            self.start()
        except NSTError as e:
            log.error("cannot start: %s", e.message)
            self.shutdown()
            return 2
        try:
            self.serve()
        finally:
            self.shutdown()
        return 0


def _file_sig(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# ---- the command -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nst-daemon", description="Neural Style hot-folder daemon: stylises the "
                                "images dropped into watched folders by the rules of a YAML file.")
    p.add_argument("--config", "-c", default=os.environ.get("NST_DAEMON_CONFIG"),
                   help="the rule file (default: $NST_DAEMON_CONFIG)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check-config", action="store_true",
                      help="validate the file and print what each rule would do (exit 0, or 2 with the errors)")
    what.add_argument("--dry-run", action="store_true",
                      help="list the files it would process now, and exit (it reads the journal of the daemon that "
                           "watches each folder now, found by its lock file there, else its own)")
    what.add_argument("--units-dir", action="store_true",
                      help="print the folder that holds the systemd units, their README and studio.yaml (an example "
                           "rule file for /etc/nst-daemon/config.yaml), and exit")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="with --check-config: print nothing when the file is valid (the unit's ExecReload= uses this)")
    p.add_argument("--device", help="override settings.device: auto, cpu, cuda:N (comma-separated for several)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="override settings.cluster: run the jobs on the GPUs of the Ray cluster whose head is at "
                        "ADDRESS (auto, or HOST:PORT); needs the [cluster] extra")
    p.add_argument("--instance", default="main",
                   help="this process's name in the journal (one per GPU with the template unit; default main)")
    p.add_argument("--socket", help="override settings.socket (a path, or 'none' for no job service socket)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override settings.log_level")
    return p


def main(argv=None) -> int:
    from nst_core.runtime import prepare_process

    prepare_process()  # before anything loads torch
    for stream in (sys.stdout, sys.stderr):  # names that are not UTF-8 print as \xNN, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    if args.units_dir:
        print(Path(__file__).resolve().parent / "systemd")
        return 0
    if not args.config:
        print("nst-daemon: give the rule file with --config FILE (or $NST_DAEMON_CONFIG)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e.message, file=sys.stderr)
        return 2
    if args.check_config:
        if not args.quiet:
            print(describe(config, running=live_holders([root for r in config.rules for root in r.watch])))
        return 0
    if args.dry_run:
        return dry_run(config)
    setup_logging(args.log_level or config.settings.log_level)
    devices = None
    if args.device:
        devices = tuple(d.strip() for d in args.device.split(",") if d.strip())
        from nst_core.params import StyleParams

        try:
            for d in devices:
                StyleParams.from_mapping({"device": d})
        except NSTError as e:
            print(f"nst-daemon: --device: {e.message}", file=sys.stderr)
            return 2
    if args.cluster:
        from nst_core.service.cluster import check_address

        why = check_address(args.cluster)
        if why:
            print(f"nst-daemon: --cluster: {why}", file=sys.stderr)
            return 2
    socket = "config"
    if args.socket:
        socket = None if args.socket == "none" else Path(args.socket).absolute()
    return Daemon(config, instance=args.instance, devices=devices, socket=socket, cluster=args.cluster).run()


if __name__ == "__main__":
    sys.exit(main())
