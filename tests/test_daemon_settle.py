"""When a file is taken, and how long one that does not decode waits: the Settler on a clock of our own.

Real files (their sizes, inodes and change times come from the kernel); the clocks are injected,
so no test depends on sleeping the right amount on a busy machine.
"""

import os
from pathlib import Path

from daemon.watch import MAX_RETRY_DELAY, WRITER_SILENCE, Settler


class Clock:
    """A monotonic clock that moves only when told; `wall` is the time file times are in, on the same scale."""

    def __init__(self, wall_at_start: float):
        self.t = 1000.0
        self._offset = wall_at_start - self.t

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self._offset

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _file(tmp_path, name="a.jpg", data=b"1") -> Path:
    f = tmp_path / name
    f.write_bytes(data)
    return f


def _settler(f: Path, settle=2.0, patience=10.0, age=0.0):
    """A Settler whose wall clock says `f` was last changed `age` seconds ago."""
    st = os.stat(f)
    clock = Clock(max(st.st_mtime, st.st_ctime) + age)
    return Settler(settle, patience, clock=clock, wall=clock.wall), clock


def test_a_file_is_taken_once_unchanged_for_settle_seconds(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f)
    s.add(f, "r", tmp_path)
    assert s.ready() == []  # just written
    clock.advance(1.9)
    with open(f, "ab") as h:
        h.write(b"2")  # still growing: the wait starts again
    assert s.ready() == []
    clock.advance(1.99)
    assert s.ready() == []
    clock.advance(0.01)
    ready = s.ready()
    assert [p for p, _, _ in ready] == [f] and ready[0][2].st_size == 2
    assert len(s) == 0


def test_an_old_file_is_taken_on_first_sight_except_on_network_folders(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, age=100)
    s.add(f, "r", tmp_path)
    assert [p for p, _, _ in s.ready()] == [f]  # its change time is older than settle
    s.add(f, "r", tmp_path)
    assert s.ready(trust_ctime=lambda root: False) == []  # another machine's clock: look twice
    clock.advance(1.99)
    assert s.ready(trust_ctime=lambda root: False) == []
    clock.advance(0.01)
    assert [p for p, _, _ in s.ready(trust_ctime=lambda root: False)] == [f]


def test_vanished_files_and_folders_are_dropped(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f)
    s.add(tmp_path / "gone.jpg", "r", tmp_path)
    (tmp_path / "sub").mkdir()
    s.add(tmp_path / "sub", "r", tmp_path)
    assert s.ready() == [] and len(s) == 0


def test_a_deferred_file_is_looked_at_after_its_delay_or_as_soon_as_it_changes(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f)
    s.defer(f, "r", tmp_path, 5.0, os.lstat(f))
    clock.advance(4.9)
    assert s.ready() == []
    clock.advance(0.1)
    assert [p for p, _, _ in s.ready()] == [f]

    g = _file(tmp_path, "b.jpg")
    s.defer(g, "r", tmp_path, 30.0, os.lstat(g))
    clock.advance(1)
    with open(g, "ab") as h:
        h.write(b"more")
    assert s.ready() == []  # changed: settles again from now, not after 30 s
    clock.advance(2)
    assert [p for p, _, _ in s.ready()] == [g]


def test_an_undecodable_file_waits_with_back_off_until_unchanged_for_patience(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0)
    st = os.lstat(f)
    waits = []
    while (w := s.unfinished(f, st)) is not None:
        waits.append(w)
        clock.advance(w)
    assert waits == [1.0, 2.0, 4.0, 3.0]  # doubling, the last one up to the patience
    assert clock.t - 1000.0 == 10.0


def test_a_change_starts_the_patience_again(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0)
    look = lambda: s.unfinished(f, os.lstat(f), trust_ctime=False)  # noqa: E731 (the append's ctime is real time)
    look()
    clock.advance(9)
    with open(f, "ab") as h:
        h.write(b"more")  # the writer went on
    assert look() is not None
    clock.advance(9.9)
    assert look() is not None
    clock.advance(0.1)
    assert look() is None


def test_a_file_open_for_writing_waits_past_the_patience_until_closed(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0)
    st = os.lstat(f)
    s.writing(f, True)  # inotify: written to, not closed
    waited = 0.0
    for _ in range(20):
        w = s.unfinished(f, st)
        assert w is not None and w <= MAX_RETRY_DELAY
        clock.advance(w)
        waited += w
    assert waited > 10 * 10.0 and s.open_for_writing(f)
    s.writing(f, False)  # closed after writing
    assert s.unfinished(f, st) is None  # and unchanged for longer than the patience: it fails


def test_a_writer_silent_for_an_hour_is_taken_as_gone(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0)
    s.writing(f, True)
    clock.advance(WRITER_SILENCE)
    assert not s.open_for_writing(f)
    assert s.unfinished(f, os.lstat(f)) is None


def test_lost_events_forget_which_files_are_open(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0)
    s.writing(f, True)
    s.events_lost()
    assert not s.open_for_writing(f)


def test_the_change_time_says_how_long_a_file_is_unchanged_except_on_network_folders(tmp_path):
    f = _file(tmp_path)
    s, clock = _settler(f, settle=1.0, patience=10.0, age=3600)
    assert s.unfinished(f, os.lstat(f)) is None  # broken, and untouched for an hour: fails at once
    s2, clock2 = _settler(f, settle=1.0, patience=10.0, age=3600)
    assert s2.unfinished(f, os.lstat(f), trust_ctime=False) == 1.0  # unknown clock: wait the patience
    clock2.advance(10)
    assert s2.unfinished(f, os.lstat(f), trust_ctime=False) is None
