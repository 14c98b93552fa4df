"""The job journal: a local SQLite file (WAL, synchronous=FULL) that survives crashes and kill -9.

One row per job, keyed by (content hash, rule, rule version): queued → running → done | failed,
with the number of attempts. Before a job writes its output, the row records the output path
and what was at that path before (`out_prior`); after a crash, an output at the recorded path
that is not that prior file is the job's own finished output, so the job is done and is not run
into a second output. The input's identity (device, inode, size, mtime) is recorded too, so a
restart can tell a leftover input (finish moving it) from a new file with the same content.
Once the input is moved to processed/ or failed/, `in_path` follows it there, so the same file put
back into the inbox is an input again. Paths are stored as text, or as the raw bytes (a blob) where
a name is not valid UTF-8.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
STATES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL,
    rule TEXT NOT NULL,
    rule_version TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    in_path TEXT NOT NULL,
    in_dev INTEGER, in_ino INTEGER, in_size INTEGER, in_mtime_ns INTEGER,
    out_path TEXT,
    out_prior TEXT,
    dest_path TEXT,
    sidecar TEXT,
    note TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (content_hash, rule, rule_version)
);
CREATE INDEX IF NOT EXISTS jobs_input ON jobs (in_path, in_ino, in_size, in_mtime_ns);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, owner);
"""


@dataclass(frozen=True)
class Identity:
    """Which file a path held: enough to tell "the same file" from "another file at that name"."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def at(cls, path) -> "Identity | None":
        try:
            return cls.of(os.lstat(path))
        except OSError:
            return None

    def to_json(self) -> str:
        return json.dumps([self.dev, self.ino, self.size, self.mtime_ns])

    @classmethod
    def from_json(cls, text: str | None) -> "Identity | None":
        return None if not text else cls(*json.loads(text))


@dataclass(frozen=True)
class Job:
    id: int
    content_hash: str
    rule: str
    rule_version: str
    state: str
    attempts: int
    owner: str | None
    in_path: str
    input: Identity
    out_path: str | None
    out_prior: Identity | None
    dest_path: str | None
    note: str | None
    error: dict | None
    sidecar: str | None = None  # the error file written for an earlier failure of this job

    @classmethod
    def _from_row(cls, r: sqlite3.Row) -> "Job":
        return cls(r["id"], r["content_hash"], r["rule"], r["rule_version"], r["state"], r["attempts"], r["owner"],
                   _path(r["in_path"]), Identity(r["in_dev"], r["in_ino"], r["in_size"], r["in_mtime_ns"]),
                   _path(r["out_path"]), Identity.from_json(r["out_prior"]), _path(r["dest_path"]), r["note"],
                   json.loads(r["error"]) if r["error"] else None,
                   _path(r["sidecar"]) if "sidecar" in r.keys() else None)

    def same_input(self, path, ident: Identity | None) -> bool:
        return ident is not None and str(path) == self.in_path and ident == self.input


class Journal:
    """Thread-safe access to the journal file (one connection, serialised by a lock)."""

    def __init__(self, path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                       isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._tx():
                for statement in _statements(_SCHEMA):
                    self._db.execute(statement)
                v = self._db.execute("PRAGMA user_version").fetchone()[0]
                if v > SCHEMA_VERSION:
                    raise RuntimeError(f"{self.path}: journal schema {v} is newer than this daemon ({SCHEMA_VERSION})")
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
                if "sidecar" not in columns:  # schema 1
                    self._db.execute("ALTER TABLE jobs ADD COLUMN sidecar TEXT")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- plumbing --
    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, t, v, tb):
            self.db.execute("COMMIT" if t is None else "ROLLBACK")

    def _tx(self):
        return Journal._Tx(self._db)

    def _one(self, sql: str, args=()) -> Job | None:
        with self._lock:
            r = self._db.execute(sql, args).fetchone()
        return None if r is None else Job._from_row(r)

    def _all(self, sql: str, args=()) -> list[Job]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Job._from_row(r) for r in rows]

    def _update(self, job_id: int, where_state: str | None = None, **cols) -> bool:
        cols["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in cols)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?" + (" AND state = ?" if where_state else "")
        args = list(cols.values()) + [job_id] + ([where_state] if where_state else [])
        with self._lock:
            return self._db.execute(sql, args).rowcount == 1

    # -- queries --
    def get(self, job_id: int) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def find(self, content_hash: str, rule: str, version: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE content_hash = ? AND rule = ? AND rule_version = ?",
                         (content_hash, rule, version))

    def by_input(self, path, ident: Identity) -> Job | None:
        """The newest job whose input was this very file (saves hashing it again)."""
        return self._one("SELECT * FROM jobs WHERE in_path = ? AND in_ino = ? AND in_size = ? AND in_mtime_ns = ? "
                         "AND in_dev = ? ORDER BY id DESC LIMIT 1",
                         (_db(path), ident.ino, ident.size, ident.mtime_ns, ident.dev))

    def job_for(self, path, st: os.stat_result, rule: str, version: str, *, create: bool = False,
                stats=None) -> Job | None:
        """The job of the file at `path` (`st`) under this rule version: the one made for this very
        file, else the one for its content (hashed only then); with `create`, a new queued one where
        there is none. `stats` (daemon.worker.Stats) gets the time spent on the journal and hashing."""
        ident = Identity.of(st)
        t0 = time.perf_counter()
        job = self.by_input(path, ident)
        if job is not None and (job.rule != rule or job.rule_version != version):
            job = None
        if stats is not None:
            stats.add("journal", time.perf_counter() - t0, 0)
        if job is None:
            t0 = time.perf_counter()
            key = content_key(path, st)
            if stats is not None:
                stats.add("hash", time.perf_counter() - t0)
            t0 = time.perf_counter()
            job = self.find(key, rule, version)
            if job is None and create:
                job = self.add(key, rule, version, path, ident)
            if stats is not None:
                stats.add("journal", time.perf_counter() - t0)
        return job

    def running(self) -> list[Job]:
        return self._all("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r[0]: r[1] for r in rows}

    # -- transitions --
    def add(self, content_hash: str, rule: str, version: str, path, ident: Identity) -> Job:
        """The job for this content under this rule version, created (queued) if new."""
        now = time.time()
        with self._lock, self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (content_hash, rule, rule_version, state, in_path, in_dev, in_ino, "
                "in_size, in_mtime_ns, created, updated) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (content_hash, rule, version, _db(path), ident.dev, ident.ino, ident.size, ident.mtime_ns, now, now))
            r = db.execute("SELECT * FROM jobs WHERE content_hash = ? AND rule = ? AND rule_version = ?",
                           (content_hash, rule, version)).fetchone()
        return Job._from_row(r)

    def retry(self, job_id: int, path, ident: Identity, from_state: str) -> bool:
        """A new file with the content of a failed job: queue the job again, attempts reset."""
        return self._update(job_id, from_state, state="queued", attempts=0, owner=None, in_path=_db(path),
                            in_dev=ident.dev, in_ino=ident.ino, in_size=ident.size, in_mtime_ns=ident.mtime_ns,
                            out_path=None, out_prior=None, dest_path=None, error=None, note=None)

    def claim(self, job_id: int, owner: str) -> Job | None:
        """queued → running (attempts + 1) unless another process took it first."""
        with self._lock:
            taken = self._db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, attempts = attempts + 1, updated = ? "
                "WHERE id = ? AND state = 'queued'", (owner, time.time(), job_id)).rowcount == 1
        return self.get(job_id) if taken else None

    def give_up(self, job_id: int, error: dict) -> bool:
        """queued → failed without another run (a job the daemon kept dying in)."""
        return self._update(job_id, "queued", state="failed", error=json.dumps(error))

    def set_output(self, job_id: int, out_path, prior: Identity | None) -> None:
        """Record where the output goes (and what was there) before writing it."""
        self._update(job_id, "running", out_path=_db(out_path), out_prior=prior.to_json() if prior else None)

    def requeue(self, job_id: int, count_attempt: bool = False) -> None:
        """running → queued (a stop or a changed input); the attempt is not counted unless asked."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, out_path = NULL, out_prior = NULL, "
                f"attempts = MAX(0, attempts{'' if count_attempt else ' - 1'}), updated = ? "
                "WHERE id = ? AND state = 'running'", (time.time(), job_id))

    def done(self, job_id: int, out_path, note: str | None = None) -> None:
        self._update(job_id, None, state="done", out_path=_db(out_path), note=note)

    def failed(self, job_id: int, error: dict) -> None:
        self._update(job_id, None, state="failed", error=json.dumps(error))

    def set_dest(self, job_id: int, dest) -> None:
        """Where the input is being moved (processed/ or failed/), decided once."""
        self._update(job_id, None, dest_path=_db(dest))

    def moved(self, job_id: int, dest) -> None:
        """The input is now at `dest` (processed/ or failed/): the same file back in the inbox is new input."""
        self._update(job_id, None, in_path=_db(dest))

    def set_sidecar(self, job_id: int, path) -> None:
        """The error file written for this job's failure (None: removed)."""
        self._update(job_id, None, sidecar=_db(path))

    def forget_stale(self, current: set[tuple[str, str]]) -> int:
        """Delete queued jobs of rule versions no longer in the config (they are found again by scans)."""
        with self._lock:
            rows = self._db.execute("SELECT id, rule, rule_version FROM jobs WHERE state = 'queued'").fetchall()
            stale = [r[0] for r in rows if (r[1], r[2]) not in current]
            for job_id in stale:
                self._db.execute("DELETE FROM jobs WHERE id = ? AND state = 'queued'", (job_id,))
        return len(stale)

    def forget(self, job_id: int) -> None:
        """Delete a queued job (its file vanished, or its rule changed before it ran)."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ? AND state = 'queued'", (job_id,))


def content_key(path, st: os.stat_result) -> str:
    """The content hash that keys a job (links and unreadable files get keys of their own).

    The file is read without following a link (a link swapped in after `st` is not read through)."""
    if stat.S_ISLNK(st.st_mode):
        try:
            return "link:" + hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
        except OSError:
            pass
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                now = os.fstat(fd)
                if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    h = hashlib.sha256()
                    with os.fdopen(fd, "rb", closefd=False) as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    return h.hexdigest()
            except OSError:
                pass
            finally:
                os.close(fd)
    return f"unreadable:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def instance_lock_path(jpath, owner: str) -> Path:
    """The lock file a daemon instance (`owner`) holds beside its journal while it runs."""
    jpath = Path(jpath)
    return jpath.with_name(f"{jpath.name}.{owner}.lock")


def instance_alive(jpath, owner: str) -> bool:
    """Whether a daemon instance holds its lock on this journal (flock: released when a process dies)."""
    try:
        fd = os.open(instance_lock_path(jpath, owner), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _db(path):
    """A path as stored: text, or its bytes where it is not valid UTF-8."""
    if path is None:
        return None
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def _path(value) -> str | None:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
