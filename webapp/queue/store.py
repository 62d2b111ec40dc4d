"""The job store: every asynchronous job, its images and its lease, in one SQLite file in WAL mode
(docs/architecture.md §17). The one writer of a job's row: routes, the workers' claimers and the master's
hooks all ask this module, and each change is one transaction.

A job's life, each step one ``UPDATE`` guarded by the status it leaves (so two processes never both move it):

    submit            -> queued            committed before the 202 is sent
    claim             queued -> running    only a READY worker with room claims; attempt + 1, lease set
    renew             running              the claimer renews its leases every third of JOB_LEASE_SECONDS
    succeed / fail    running -> done      by the lease's holder only
    release           running -> queued    the holder died (the master saw it, the lease lapsed, or the
                                           container restarted); failed after JOB_MAX_ATTEMPTS instead
    cancel            queued -> canceled at once; running: flagged, the holder stops between steps

Times are Unix seconds (leases are compared across processes and restarts). Each connection belongs to
one process and one thread: a forked worker opens its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webapp import errors
from webapp.queue import outbox
from webapp.settings import Settings

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")
BUSY_TIMEOUT_MS = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    route TEXT NOT NULL,
    request TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    step INTEGER,
    total_steps INTEGER,
    error_code TEXT,
    error_message TEXT,
    output TEXT,
    deaths TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL DEFAULT 1,
    swept INTEGER NOT NULL DEFAULT 0,
    webhook TEXT,
    webhook_events TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    payload TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempt INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_at);
"""
WEBHOOK_EVENTS = ("start", "progress", "completed")  # a job's webhook_events_filter picks among these


class StoreUnavailable(Exception):
    """The store cannot take a write now: full (JOB_STORE_MAX_MB), unwritable, or locked for too long."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key already names a job made from another body."""


@dataclass(frozen=True)
class StoredJob:
    """One row of the store, as read."""

    id: str
    owner: str
    status: str
    route: str
    request: dict[str, Any]
    created_at: float
    started_at: float | None
    completed_at: float | None
    expires_at: float
    attempt: int
    lease_owner: str | None
    lease_until: float | None
    cancel_requested: bool
    step: int | None
    total_steps: int | None
    error_code: str | None
    error_message: str | None
    output: dict[str, Any] | None
    deaths: list[str]
    version: int
    swept: bool
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ()
    queue_position: int | None = field(default=None)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def expired(self, now: float) -> bool:
        return self.swept or now >= self.expires_at


def request_hash(route: str, request: object) -> str:
    """What an Idempotency-Key is compared by: the route and the body, canonically encoded."""
    canonical = json.dumps([route, request], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def new_id() -> str:
    """An unguessable job id: 144 random bits."""
    return "job_" + secrets.token_urlsafe(18)


def lease_owner(settings: Settings, pid: int) -> str:
    """The name a worker's leases carry: this replica (REPLICA_NAME) and the worker's pid (the
    master releases a dead worker's jobs by it)."""
    return f"{settings.replica_name}/{pid}"


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///`` URL (JOB_STORE, checked by the settings)."""
    return Path(url.removeprefix("sqlite:///"))


class JobStore:
    """The jobs in ``settings.job_store``. Cheap to make; the file and its tables are created on first use."""

    def __init__(self, settings: Settings) -> None:
        self.path = sqlite_path(settings.job_store)
        self.ttl = settings.job_ttl
        self.lease_s = settings.job_lease_seconds
        self.max_attempts = settings.job_max_attempts
        self.max_bytes = settings.job_store_max_mb * 1024 * 1024
        self.outbox = outbox.Outbox(self)
        self._local = threading.local()

    def exists(self) -> bool:
        """Whether the store's file is there: a claimer waits for the first submit to make it, so a server
        that never takes a job writes nothing."""
        return self.path.exists()

    # -- connections ----------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection in this process (a forked child never uses its parent's)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process crash
            db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"job store {self.path} cannot be opened: {exc}") from exc
        self._local.held = (os.getpid(), db)
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue for the lock instead of failing midway)."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"job store {self.path} cannot be written: {exc}") from exc
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK")
            raise
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"job store {self.path} cannot be written: {exc}") from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        try:
            return self._connection().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"job store {self.path} cannot be read: {exc}") from exc

    # -- clients' side ----------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        route: str,
        request: dict[str, Any],
        idempotency_key: str | None = None,
        webhook: str | None = None,
        webhook_events: tuple[str, ...] = (),
    ) -> tuple[StoredJob, bool]:
        """Store a queued job and commit it; return it and whether it is new. With an ``idempotency_key``
        the same owner's earlier job made from the same body is returned instead (IdempotencyConflict when
        its body differs); two submits racing with one key make one job (the key is unique per owner)."""
        digest = request_hash(route, [request, webhook, sorted(webhook_events)])
        events = "," + ",".join(webhook_events) + "," if webhook else ""
        now = time.time()
        for _ in range(2):  # a racing submit with the same key may commit between the look and the insert
            with self.transaction() as db:
                if idempotency_key is not None:
                    row = db.execute(
                        "SELECT id, request_hash FROM jobs WHERE owner = ? AND idempotency_key = ?",
                        (owner, idempotency_key),
                    ).fetchone()
                    if row is not None:
                        if row["request_hash"] != digest:
                            raise IdempotencyConflict(row["id"])
                        existing = self.get(row["id"])
                        assert existing is not None
                        return existing, False
                self._check_room(db)
                job_id = new_id()
                try:
                    db.execute(
                        "INSERT INTO jobs (id, owner, status, route, request, request_hash, idempotency_key, "
                        "created_at, expires_at, webhook, webhook_events) "
                        "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job_id,
                            owner,
                            route,
                            json.dumps(request),
                            digest,
                            idempotency_key,
                            now,
                            now + self.ttl,
                            webhook,
                            events,
                        ),
                    )
                except sqlite3.IntegrityError:
                    continue
            made = self.get(job_id)
            assert made is not None
            return made, True
        raise StoreUnavailable("an Idempotency-Key was being claimed by two submits at once; send it again")

    def record(
        self,
        job_id: str,
        owner: str,
        route: str,
        request: dict[str, Any],
        output: dict[str, Any],
        images: list[tuple[str, bytes]],
    ) -> None:
        """Keep a request that was answered at once as a succeeded job with its images (their URLs are its
        answer: OpenAI's ``response_format: "url"``); StoreUnavailable when full, as a submit."""
        now = time.time()
        with self.transaction() as db:
            self._check_room(db)
            db.execute(
                "INSERT INTO jobs (id, owner, status, route, request, request_hash, created_at, started_at, "
                "completed_at, expires_at, attempt, output) VALUES (?, ?, 'succeeded', ?, ?, '', ?, ?, ?, ?, 1, ?)",
                (job_id, owner, route, json.dumps(request), now, now, now, now + self.ttl, json.dumps(output)),
            )
            db.executemany(
                "INSERT INTO images (job_id, n, media_type, data) VALUES (?, ?, ?, ?)",
                [(job_id, n, media_type, data) for n, (media_type, data) in enumerate(images)],
            )

    def _check_room(self, db: sqlite3.Connection) -> None:
        """StoreUnavailable when the store holds JOB_STORE_MAX_MB already (only new jobs are held to it: the
        running ones may still write their images)."""
        used = db.execute(
            "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count, pragma_freelist_count, "
            "pragma_page_size"
        ).fetchone()[0]
        if used >= self.max_bytes:
            raise StoreUnavailable(f"job store {self.path} is full: {used} bytes of JOB_STORE_MAX_MB")

    def get(self, job_id: str) -> StoredJob | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", job_id)
        if not rows:
            return None
        job = _job(rows[0])
        if job.status == "queued":
            ahead = self.query("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", rows[0]["seq"])
            job = _with_position(job, ahead[0][0])
        return job

    def list(self, owner: str | None, limit: int = 20, status: str | None = None) -> list[StoredJob]:
        """The newest jobs first, of ``owner`` (everyone's when None)."""
        where, args = ["swept = 0"], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        return [_job(row) for row in self.query(sql, *args, limit)]

    def image(self, job_id: str, n: int) -> tuple[str, bytes] | None:
        rows = self.query("SELECT media_type, data FROM images WHERE job_id = ? AND n = ?", job_id, n)
        return (rows[0]["media_type"], bytes(rows[0]["data"])) if rows else None

    def cancel(self, job_id: str) -> StoredJob | None:
        """Cancel: a queued job at once, a running one flagged for its holder (it stops between steps), a
        finished one unchanged. Idempotent."""
        now = time.time()
        with self.transaction() as db:
            canceled = db.execute(
                "UPDATE jobs SET status = 'canceled', completed_at = ?, version = version + 1, error_code = ?, "
                "error_message = 'canceled while queued' WHERE id = ? AND status = 'queued' RETURNING id",
                (now, errors.CANCELED.code, job_id),
            ).fetchone()
            if canceled is not None:
                outbox.announce(db, job_id, "completed", now)
            db.execute(
                "UPDATE jobs SET cancel_requested = 1, version = version + 1 WHERE id = ? AND status = 'running' "
                "AND cancel_requested = 0",
                (job_id,),
            )
        return self.get(job_id)

    # -- workers' side ----------------------------------------------------------------------------------

    def claim(self, lease_owner: str) -> StoredJob | None:
        """The oldest queued job, now running under ``lease_owner``'s lease (attempt + 1), or None. A read
        looks first, so an idle poll takes no write lock."""
        if not self.query("SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1"):
            return None
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = ?, lease_until = ?, "
                "started_at = ?, step = 0, total_steps = NULL, version = version + 1 "
                "WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) RETURNING *",
                (lease_owner, now + self.lease_s, now),
            ).fetchone()
            if row is not None:
                outbox.announce(db, row["id"], "start", now)
        return _job(row) if row is not None else None

    def renew(self, lease_owner: str, job_ids: list[str]) -> list[str]:
        """Extend the leases ``lease_owner`` holds on ``job_ids`` (the jobs it runs: any other job under its
        name lapses); the ids of those a client asked to cancel."""
        marks = ",".join("?" * len(job_ids))
        with self.transaction() as db:
            rows = db.execute(
                f"UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND status = 'running' AND id IN ({marks}) "
                "RETURNING id, cancel_requested",
                (time.time() + self.lease_s, lease_owner, *job_ids),
            ).fetchall()
        return [row["id"] for row in rows if row["cancel_requested"]]

    def progress(self, job_id: str, lease_owner: str, step: int, total: int) -> bool:
        """Record a finished denoising step; False when the job was asked to cancel (or is no longer
        this holder's)."""
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, version = version + 1 "
                "WHERE id = ? AND lease_owner = ? AND status = 'running' RETURNING cancel_requested",
                (step, total, job_id, lease_owner),
            ).fetchone()
            if row is not None:
                outbox.announce(db, job_id, "progress", time.time())
        return row is not None and not row["cancel_requested"]

    def succeed(self, job_id: str, lease_owner: str, output: dict[str, Any], images: list[tuple[str, bytes]]) -> bool:
        """The job's images and output, in one transaction with its status; False if the lease was lost
        (the job went back to the queue: another attempt owns it now, and these images are dropped)."""
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'succeeded', completed_at = ?, output = ?, lease_owner = NULL, "
                "lease_until = NULL, version = version + 1 WHERE id = ? AND lease_owner = ? AND status = 'running' "
                "RETURNING id",
                (time.time(), json.dumps(output), job_id, lease_owner),
            ).fetchone()
            if row is None:
                return False
            outbox.announce(db, job_id, "completed", time.time())
            db.executemany(
                "INSERT OR REPLACE INTO images (job_id, n, media_type, data) VALUES (?, ?, ?, ?)",
                [(job_id, n, media_type, data) for n, (media_type, data) in enumerate(images)],
            )
        return True

    def finish(self, job_id: str, lease_owner: str, status: str, code: str, message: str) -> bool:
        """The job failed (or was canceled) with ``code`` and ``message``; False if the lease was lost."""
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, error_code = ?, error_message = ?, lease_owner = NULL, "
                "lease_until = NULL, version = version + 1 WHERE id = ? AND lease_owner = ? AND status = 'running' "
                "RETURNING id",
                (status, time.time(), code, message, job_id, lease_owner),
            ).fetchone()
            if row is not None:
                outbox.announce(db, job_id, "completed", time.time())
        return row is not None

    def requeue(self, lease_owner: str | None = None, job_id: str | None = None) -> int:
        """Give back, queued again where they were and the attempt not counted, the running jobs of
        ``lease_owner`` (None: anyone's, the whole server stopped) as it stops on purpose (SIGTERM, past its
        graceful timeout: a deploy is not the job's fault), or just ``job_id``, claimed but not started (its
        worker stopped being READY or filled up since the claim)."""
        where, args = ("lease_owner = ?", (lease_owner,)) if lease_owner is not None else ("1 = 1", ())
        if job_id is not None:
            where, args = f"{where} AND id = ?", (*args, job_id)
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET status = 'queued', attempt = attempt - 1, lease_owner = NULL, lease_until = NULL, "
                f"step = NULL, version = version + 1 WHERE {where} AND status = 'running' RETURNING id",
                args,
            ).fetchall()
        return len(rows)

    def release(self, reason: str, lease_owner: str | None = None, expired_before: float | None = None) -> int:
        """Put back in the queue the running jobs of a dead holder: those of ``lease_owner``, or those whose
        lease ended before ``expired_before``, or (neither given) every running job (the container
        restarted). A job that has had JOB_MAX_ATTEMPTS is failed instead, naming every death. Returns how
        many were released."""
        if lease_owner is not None:
            where, args = "lease_owner = ?", (lease_owner,)
        elif expired_before is not None:
            where, args = "lease_until < ?", (expired_before,)
        else:
            where, args = "1 = 1", ()
        now = time.time()
        with self.transaction() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status = 'running' AND {where}", args).fetchall()
            for row in rows:
                deaths = [*json.loads(row["deaths"]), f"attempt {row['attempt']}: {reason}"]
                if row["cancel_requested"]:
                    status, code, message = "canceled", errors.CANCELED, "canceled while running; its worker died"
                elif row["attempt"] >= self.max_attempts:
                    status, code = "failed", errors.WORKER_LOST
                    message = f"the worker died on each of {row['attempt']} attempts: " + "; ".join(deaths)
                else:
                    status, code, message = "queued", None, None
                db.execute(
                    "UPDATE jobs SET status = ?, error_code = ?, error_message = ?, deaths = ?, lease_owner = NULL, "
                    "lease_until = NULL, step = NULL, total_steps = NULL, version = version + 1, "
                    "completed_at = CASE WHEN ? = 'queued' THEN NULL ELSE ? END WHERE id = ? AND status = 'running'",
                    (status, code, message, json.dumps(deaths), status, now, row["id"]),
                )
                if status != "queued":
                    outbox.announce(db, row["id"], "completed", now)
        return len(rows)

    # -- housekeeping -----------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Drop the images and bodies of finished jobs past their retention, keeping a row that says so
        (410, not 404) for one more JOB_TTL; rows older than that go."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            expired = db.execute(
                "UPDATE jobs SET swept = 1, request = '{}', output = NULL, version = version + 1 "
                f"WHERE swept = 0 AND expires_at <= ? AND status IN {FINISHED} RETURNING id",
                (now,),
            ).fetchall()
            db.executemany("DELETE FROM images WHERE job_id = ?", [(row["id"],) for row in expired])
            db.execute("DELETE FROM jobs WHERE swept = 1 AND expires_at <= ?", (now - self.ttl,))
            db.execute(
                "DELETE FROM deliveries WHERE status IN ('delivered', 'failed') AND created_at <= ?", (now - self.ttl,)
            )
        return len(expired)

    def counts(self) -> tuple[dict[str, int], float]:
        """Jobs by status (the swept ones apart), and the age in seconds of the oldest queued job (0 when none)."""
        rows = self.query("SELECT status, COUNT(*) AS n FROM jobs WHERE swept = 0 GROUP BY status")
        by_status = dict.fromkeys(STATUSES, 0) | {row["status"]: row["n"] for row in rows}
        oldest = self.query("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'")[0][0]
        return by_status, (max(0.0, time.time() - oldest) if oldest is not None else 0.0)


def _job(row: sqlite3.Row) -> StoredJob:
    return StoredJob(
        id=row["id"],
        owner=row["owner"],
        status=row["status"],
        route=row["route"],
        request=json.loads(row["request"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
        attempt=row["attempt"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        cancel_requested=bool(row["cancel_requested"]),
        step=row["step"],
        total_steps=row["total_steps"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        output=json.loads(row["output"]) if row["output"] else None,
        deaths=json.loads(row["deaths"]),
        version=row["version"],
        swept=bool(row["swept"]),
        webhook=row["webhook"],
        webhook_events=tuple(event for event in row["webhook_events"].split(",") if event),
    )


def _with_position(job: StoredJob, ahead: int) -> StoredJob:
    return StoredJob(**{**job.__dict__, "queue_position": ahead})
