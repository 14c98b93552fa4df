"""What the daemon would do, for people: `nst-daemon --check-config` (`describe`) and `--dry-run`.

Both read the configuration and the folders, and the dry run the journal, and change nothing. The
dry run asks `decide` about each file, as the running daemon does.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from nst_core.errors import NSTError

from .rules import Config, Rule
from .decide import DUPLICATE, FINISH, decide, waits_elsewhere
from .folderlock import live_holders
from .journal import Identity, Journal, instance_alive
from .watch import fs_type, network_fs, scan
from .worker import free_name



def _devices(s) -> str:
    if s.cluster:
        return f"one per {s.cluster_resource} of the Ray cluster at {s.cluster}"
    return ", ".join(s.devices)


def describe(config: Config, env=None, running=()) -> str:
    """What each rule would do, for people (nst-daemon --check-config). `running`: the live
    daemons (folderlock.Holder) that watch the rules' folders now, whose journal and socket are
    the service's even where this process would use others (run by hand, not under systemd)."""
    env = os.environ if env is None else env
    s = config.settings
    sock = s.socket_path(env)
    by_hand = "" if s.journal is not None or env.get("STATE_DIRECTORY") else \
        " (as run now, by hand; under systemd: $STATE_DIRECTORY/journal.sqlite)"
    lines = [f"config {config.path}: {len(config.rules)} rule(s), valid",
             f"  devices: {_devices(s)}; journal: {s.journal_path(env)}{by_hand}",
             f"  job service socket: {sock if sock else 'off'}"
             + (f" (group {s.socket_group}, 0660)" if sock and s.socket_group else " (0600)" if sock else ""),
             f"  scan every {s.scan_interval:g}s; settle {s.settle:g}s; max attempts {s.max_attempts}; "
             f"reload on change: {'yes' if s.reload_on_change else 'no (SIGHUP)'}"]
    groups: dict = {}
    for h in running:
        groups.setdefault((h.pid, h.user, h.journal, h.socket), []).append(str(h.path.parent))
    for (pid, user, journal, socket), folders in groups.items():
        lines.append(f"  running now: nst-daemon pid {pid}" + (f" (user {user})" if user else "")
                     + f", journal {journal}, socket {socket or 'off'}; watching {', '.join(folders)}")
    if not running:
        lines.append("  running now: no nst-daemon watches these folders")
    for r in config.rules:
        lines.append(f"rule {r.name} (version {r.version}):")
        for d in r.watch:
            fst = fs_type(d)
            how = "polled" if r.poll == "always" or (r.poll == "auto" and network_fs(fst)) else "inotify events"
            state = "" if d.exists() else " (will be created)"
            lines.append(f"  watches {d}{state}{' recursively' if r.recursive else ''} [{fst}, {how}]")
        lines.append(f"  takes {', '.join(r.include)}" + (f" except {', '.join(r.exclude)}" if r.exclude else ""))
        lines.append(f"  style {', '.join(str(p) for p in r.styles) or '(none)'}")
        lines.append(f"  params {r.describe_params()}")
        example = r.output_name(Path("photo.jpg"))
        lines.append(f"  writes {r.output / example} for photo.jpg (on collision: {r.on_collision})")
        if r.keep_inputs:
            lines.append(f"  leaves inputs in place; failures get a sidecar in {r.failed_dir(r.watch[0])}")
        else:
            lines.append(f"  then moves inputs to {r.processed_dir(r.watch[0])}, failures to {r.failed_dir(r.watch[0])}")
    return "\n".join(lines)


def dry_run(config: Config, env=None) -> int:
    """Print what the daemon would do with the files that are there now; touches nothing.

    The journal read is, per watched folder, that of the live daemon that watches it (found by its
    lock file: the service's, when this runs by hand), else the one this process would use."""
    own = config.settings.journal_path(env)
    journals: dict[str, Journal | None] = {}

    def journal_for(root: Path) -> Journal | None:
        live = [h for h in live_holders([root]) if h.journal]
        path = live[0].journal if live else str(own)
        if path not in journals:
            whose = (f"the journal of the running {live[0].describe().split(' with the journal')[0]}" if live
                     else "no nst-daemon watches this folder now; the journal it would use run as now")
            if not os.path.exists(path):
                print(f"journal {path} ({whose}): none yet")
                journals[path] = None
            else:
                try:
                    journals[path] = Journal(path, readonly=True)
                    journals[path].get(0)  # reads the file now: a permission problem shows here
                except (OSError, sqlite3.Error) as e:
                    raise NSTError(f"cannot read {whose}, {path} ({e}); run this as the daemon's user "
                                   f"(for example: sudo -u {(live[0].user if live else None) or 'nst'} "
                                   f"nst-daemon --config {config.path} --dry-run)") from None
                print(f"journal {path} ({whose})")
        return journals[path]

    n = 0
    try:
        for rule in config.rules:
            for root in rule.watch:
                if not root.is_dir():
                    print(f"rule {rule.name}: {root} does not exist{' (created at start)' if rule.create else ''}")
                    continue
                journal = journal_for(root)
                for p in scan(rule, root):
                    n += _dry_run_file(rule, root, p, journal)
    except NSTError as e:
        print(f"nst-daemon: {e.message}", file=sys.stderr)
        return 2
    finally:
        for j in journals.values():
            if j is not None:
                j.close()
    print(f"{n} file(s) to process")
    return 0


def _dry_run_file(rule: Rule, root: Path, p: Path, journal: Journal | None) -> int:
    """Print what the daemon would do with `p`; 1 if it would stylise it."""
    try:
        st = os.lstat(p)
    except OSError:
        return 0
    job = journal.job_for(p, st, rule.name, rule.version) if journal else None
    d = decide(job, p, Identity.of(st), keep_inputs=rule.keep_inputs, elsewhere=waits_elsewhere(p),
               ours=lambda j: j.owner is None or not instance_alive(journal.path, j.owner), here=lambda j: False)
    if d.processes:
        target = rule.output / rule.output_name(p)
        note = ""
        if os.path.lexists(target):
            note = {"overwrite": " (exists: overwritten)", "skip": " (exists: skipped)",
                    "number": f" (exists: written as {free_name(target, set()).name})"}[rule.on_collision]
        print(f"rule {rule.name}: would process {p} → {target}{note}")
        return 1
    if d.state == "done":
        print(f"rule {rule.name}: {p}: done already"
              + (f" (would move it to {rule.processed_dir(root)})" if d.action in (FINISH, DUPLICATE) else ""))
    else:
        print(f"rule {rule.name}: {p}: failed already ({(job.error or {}).get('message', '')})")
    return 0
