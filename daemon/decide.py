"""What to do with a file that has settled: one pure function, for the running daemon and --dry-run.

The daemon finds the file's job in the journal (by the file itself, else by its content hash under
the rule's version), asks `decide`, and does what the `Decision` says; `--dry-run` asks the same
function about the same job and prints the answer. The questions whose answers need the world
(another process, another file) come as callables, so the decision is tested without files;
`waits_elsewhere` is the real answer to one of them, for both callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .journal import Identity, Job

RUN = "run"              # queue the job (after `retry`, where set)
LATER = "later"          # look at the file again at the next scan: its job is another file's or process's now
NOTHING = "nothing"      # nothing to do for this file now
FINISH = "finish"        # a leftover of a job that ended (a crash before the input moved): move it on
DUPLICATE = "duplicate"  # the same content is done already: move this file to processed/


@dataclass(frozen=True)
class Decision:
    action: str
    state: str  # the job's state as found: new (no job yet), queued, running, done or failed
    retry: str | None = None  # RUN: requeue the job from this state first, for this file

    @property
    def processes(self) -> bool:
        """Whether the file is to be stylised (here, or by the process that has its job): what
        --dry-run lists and counts."""
        return self.action in (RUN, LATER)


def decide(job: Job | None, path: Path, ident: Identity, *, keep_inputs: bool,
           ours: Callable[[Job], bool], elsewhere: Callable[[Job], bool],
           here: Callable[[Job], bool]) -> Decision:
    """The decision for the settled file at `path` (`ident`), given its job as found (None: none
    yet) and the rule's keep_inputs.

    ours(job): whether this process may finish what the job's owner left (itself, or an instance
    that is not running); elsewhere(job): whether the job's own input, under another name, still
    waits; here(job): whether the job runs in this process.
    """
    if job is None:
        return Decision(RUN, "new")
    same = job.same_input(path, ident)
    if job.state == "queued":
        if same:
            return Decision(RUN, "queued")
        if elsewhere(job):
            return Decision(LATER, "queued")  # the same content waits under another name
        return Decision(RUN, "queued", retry="queued")  # renamed before it ran
    if job.state == "running":
        return Decision(NOTHING if here(job) else LATER, "running")  # else another instance runs it
    if job.state == "done":
        if same:
            return Decision(FINISH if ours(job) else NOTHING, "done")
        return Decision(NOTHING if keep_inputs else DUPLICATE, "done")
    if same:  # failed
        return Decision(FINISH if not keep_inputs and ours(job) else NOTHING, "failed")
    return Decision(RUN, "failed", retry="failed")  # dropped again: try again


def waits_elsewhere(path: Path) -> Callable[[Job], bool]:
    """decide()'s `elsewhere` for the file at `path`: the job's own input is another file, still there."""
    return lambda job: job.in_path != str(path) and Identity.at(job.in_path) is not None
