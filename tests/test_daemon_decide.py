"""daemon.decide: what the daemon (and --dry-run) does with a settled file, in every state of its
job, without files, processes or a journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.decide import DUPLICATE, FINISH, LATER, NOTHING, RUN, decide
from daemon.journal import Identity, Job

HERE = Path("/in/photo.png")
IDENT = Identity(1, 100, 2048, 5)


def job(state: str, same: bool = True, owner: str | None = "main") -> Job:
    path, ident = (HERE, IDENT) if same else (Path("/in/other.png"), Identity(1, 101, 2048, 6))
    return Job(7, "c0ffee", "r", "v1", state, 1, owner, str(path), ident, None, None, None, None, None)


def ask(j, keep_inputs=False, ours=True, elsewhere=False, here=False):
    return decide(j, HERE, IDENT, keep_inputs=keep_inputs, ours=lambda _: ours, elsewhere=lambda _: elsewhere,
                  here=lambda _: here)


@pytest.mark.parametrize("j, kwargs, action, retry", [
    (None, {}, RUN, None),                                              # new: its job is made queued
    (job("queued"), {}, RUN, None),
    (job("queued", same=False), {}, RUN, "queued"),                     # renamed before it ran
    (job("queued", same=False), {"elsewhere": True}, LATER, None),      # its twin waits under another name
    (job("running"), {"here": True}, NOTHING, None),
    (job("running"), {"here": False}, LATER, None),                     # another instance runs it
    (job("done"), {}, FINISH, None),                                    # left by a crash before the move
    (job("done"), {"ours": False}, NOTHING, None),                      # a live instance will move it
    (job("done", same=False), {}, DUPLICATE, None),
    (job("done", same=False), {"keep_inputs": True}, NOTHING, None),
    (job("failed"), {}, FINISH, None),
    (job("failed"), {"keep_inputs": True}, NOTHING, None),
    (job("failed"), {"ours": False}, NOTHING, None),
    (job("failed", same=False), {}, RUN, "failed"),                     # dropped again: tried again
])
def test_every_state_of_the_job_decides_one_thing(j, kwargs, action, retry):
    d = ask(j, **kwargs)
    assert (d.action, d.retry) == (action, retry)
    assert d.state == (j.state if j else "new")
    assert d.processes == (action in (RUN, LATER))


def test_only_the_questions_that_matter_are_asked():
    """The callables touch the world (a lock file, another file): a file whose job is queued for it
    asks none of them; a done one asks only whether it is ours."""
    asked = []

    def q(name):
        return lambda _: asked.append(name) or True

    decide(job("queued"), HERE, IDENT, keep_inputs=False, ours=q("ours"), elsewhere=q("elsewhere"), here=q("here"))
    assert asked == []
    decide(job("done"), HERE, IDENT, keep_inputs=False, ours=q("ours"), elsewhere=q("elsewhere"), here=q("here"))
    assert asked == ["ours"]
