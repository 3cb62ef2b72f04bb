"""The durable job store: one SQLite file in WAL mode, written through one connection under a lock.

A job is committed before the server answers 202, its images and its ``succeeded`` status in one transaction (so a
job is never delivered twice with different images), and webhook deliveries are an outbox in the same file. On start,
:meth:`JobStore.recover` puts queued and running jobs back in the queue (running ones were cut off by a crash; their
seeds are recorded, so the re-run gives the same images).

>>> import tempfile, os
>>> s = JobStore(os.path.join(tempfile.mkdtemp(), "jobs.sqlite"))
>>> job = s.create({"prompt": "a red circle", "seed": 1, "n": 1}); job["status"]
'queued'
>>> [j["id"] for j in s.recover()[0]] == [job["id"]]
True
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from diffaccel.engines.serving.schemas import JobStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    idem_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    metrics TEXT,
    webhook TEXT,
    webhook_events TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    status TEXT NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, next_at);
CREATE TABLE IF NOT EXISTS health (k TEXT PRIMARY KEY, at REAL NOT NULL);
"""
COLUMNS = ("id", "idem_key", "request", "status", "created", "started", "finished", "attempts", "error", "metrics",
           "webhook", "webhook_events")


def request_hash(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class IdempotencyConflict(Exception):
    """An idempotency key reused with a different request body."""


class JobStore:
    """Jobs, their images and webhook deliveries in one SQLite file (WAL). Thread-safe; rows come back as dicts."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: a commit survives a killed process
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def _rows(self, sql, args=()) -> list:
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [self._decode(dict(zip(names, row))) for row in cur.fetchall()]

    @staticmethod
    def _decode(row: dict) -> dict:
        for k in ("request", "metrics", "webhook_events"):
            if k in row and row[k] is not None:
                row[k] = json.loads(row[k])
        return row

    # ---- jobs ----------------------------------------------------------------------------------------------
    def create(self, request: dict, idem_key: "str | None" = None, webhook: "str | None" = None,
               webhook_events=None, fingerprint: "dict | None" = None) -> dict:
        """Commit a queued job and return it; with ``idem_key``, return the job already made with that key (and
        ``replayed``: True), or raise :class:`IdempotencyConflict` if its ``fingerprint`` (the body as the client
        sent it; default ``request``) differs."""
        h = request_hash({"request": request if fingerprint is None else fingerprint, "webhook": webhook,
                          "events": webhook_events})

        def insert(db):
            if idem_key is not None:
                row = db.execute("SELECT id, request_hash FROM jobs WHERE idem_key = ?", (idem_key,)).fetchone()
                if row is not None:
                    if row[1] != h:
                        raise IdempotencyConflict(idem_key)
                    return row[0], True
            job_id = uuid.uuid4().hex
            db.execute("INSERT INTO jobs (id, idem_key, request_hash, request, status, created, webhook, "
                       "webhook_events) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, idem_key, h, json.dumps(request), JobStatus.QUEUED.value, time.time(), webhook,
                        None if webhook_events is None else json.dumps(list(webhook_events))))
            return job_id, False

        job_id, replayed = self._tx(insert)
        return dict(self.get(job_id), replayed=replayed)

    def get(self, job_id: str) -> "dict | None":
        rows = self._rows(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, status: "str | None" = None, limit: int = 100) -> list:
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return self._rows(f"SELECT {', '.join(COLUMNS)} FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                          (*args, limit))

    def mark_running(self, job_ids) -> None:
        now = time.time()
        self._tx(lambda db: db.executemany(
            "UPDATE jobs SET status = ?, started = ?, attempts = attempts + 1 WHERE id = ? AND status = ?",
            [(JobStatus.RUNNING.value, now, j, JobStatus.QUEUED.value) for j in job_ids]))

    def finish(self, job_id: str, status: JobStatus, images=(), error: "str | None" = None,
               metrics: "dict | None" = None, deliveries=()) -> bool:
        """Move a queued or running job to a terminal status with its images (``(seed, png bytes)``) and queue its
        webhook ``deliveries`` (``(delivery id, url, body)``), all in one transaction. False (and nothing written)
        if the job had already ended."""
        def write(db):
            cur = db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, metrics = ? WHERE id = ? AND "
                             "status IN (?, ?)", (status.value, time.time(), error,
                                                  None if metrics is None else json.dumps(metrics), job_id,
                                                  JobStatus.QUEUED.value, JobStatus.RUNNING.value))
            if cur.rowcount != 1:
                return False
            db.executemany("INSERT INTO images (job_id, idx, seed, png) VALUES (?, ?, ?, ?)",
                           [(job_id, i, seed, png) for i, (seed, png) in enumerate(images)])
            self._queue_deliveries(db, job_id, deliveries)
            return True

        return self._tx(write)

    def images(self, job_id: str) -> list:
        """[(index, seed)] of a job's images."""
        with self._lock:
            return self._db.execute("SELECT idx, seed FROM images WHERE job_id = ? ORDER BY idx",
                                    (job_id,)).fetchall()

    def outputs(self, job_id: str) -> list:
        """[(index, seed, PNG bytes)] of a job's images, in one query (the synchronous answer's)."""
        with self._lock:
            return self._db.execute("SELECT idx, seed, png FROM images WHERE job_id = ? ORDER BY idx",
                                    (job_id,)).fetchall()

    def image(self, job_id: str, index: int) -> "bytes | None":
        with self._lock:
            row = self._db.execute("SELECT png FROM images WHERE job_id = ? AND idx = ?", (job_id, index)).fetchone()
        return None if row is None else row[0]

    def recover(self, max_attempts: "int | None" = None) -> "tuple[list, list]":
        """After a restart: (jobs to run again, oldest first: queued ones and running ones whose worker died, which go
        back to queued; suspects: running jobs the server already died running ``max_attempts`` times, left running
        for the caller to fail, so a job that kills the process is not run forever)."""
        def requeue(db):
            suspects = []
            if max_attempts is not None:
                suspects = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = ? AND attempts >= ?",
                                                     (JobStatus.RUNNING.value, max_attempts))]
            db.executemany("UPDATE jobs SET status = ? WHERE id = ? AND status = ?",
                           [(JobStatus.QUEUED.value, j, JobStatus.RUNNING.value)
                            for j in (r[0] for r in db.execute("SELECT id FROM jobs WHERE status = ?",
                                                              (JobStatus.RUNNING.value,)).fetchall())
                            if j not in suspects])
            return suspects

        suspects = self._tx(requeue)
        rows = self._rows(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE status = ? ORDER BY seq",
                          (JobStatus.QUEUED.value,))
        return rows, [self.get(j) for j in suspects]

    def writable(self, timeout_s: float = 0.5) -> "str | None":
        """None when the store takes a write within ``timeout_s``, else why not (one line): readiness checks this,
        on a connection of its own, so a locked or read-only file answers in half a second, not the 30 s a job's
        write may wait."""
        try:
            db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
            try:
                db.execute("INSERT OR REPLACE INTO health (k, at) VALUES ('probe', ?)", (time.time(),))
            finally:
                db.close()
        except (sqlite3.Error, OSError) as e:
            return f"the job store cannot be written ({type(e).__name__}: {e})"
        return None

    def counts(self) -> dict:
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    # ---- webhook outbox ------------------------------------------------------------------------------------
    @staticmethod
    def _queue_deliveries(db, job_id, deliveries) -> None:
        db.executemany("INSERT OR IGNORE INTO deliveries (id, job_id, url, body, next_at, status) VALUES "
                       "(?, ?, ?, ?, ?, 'pending')", [(d, job_id, url, body, time.time())
                                                      for d, url, body in deliveries])

    def add_deliveries(self, job_id: str, deliveries) -> None:
        self._tx(lambda db: self._queue_deliveries(db, job_id, deliveries))

    def due_deliveries(self, now: float, limit: int = 16) -> list:
        return self._rows("SELECT id, job_id, url, body, attempts FROM deliveries WHERE status = 'pending' AND "
                          "next_at <= ? ORDER BY next_at LIMIT ?", (now, limit))

    def next_delivery_at(self) -> "float | None":
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM deliveries WHERE status = 'pending'").fetchone()
        return row[0]

    def delivery_result(self, delivery_id: str, ok: bool, error: "str | None", next_at: "float | None") -> None:
        status = "delivered" if ok else "pending" if next_at is not None else "failed"
        self._tx(lambda db: db.execute(
            "UPDATE deliveries SET attempts = attempts + 1, status = ?, last_error = ?, next_at = ? WHERE id = ?",
            (status, error, next_at if next_at is not None else time.time(), delivery_id)))

    def deliveries(self, job_id: str) -> list:
        return self._rows("SELECT id, url, attempts, status, last_error FROM deliveries WHERE job_id = ? "
                          "ORDER BY rowid", (job_id,))
