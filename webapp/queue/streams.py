"""The job store for a fleet: Redis, with the queue a Redis Stream per model and a consumer group its workers
read (docs/architecture.md §18). Same contract as the SQLite store (``webapp.queue.store``), so routes,
claimers, deliverers and hooks do not know which they ask.

Every change of a job is one Lua script (``webapp.queue.lua``), run atomically by Redis, guarded by the
status it leaves and the lease it holds, exactly as the SQLite store's guarded UPDATEs:

    submit            one script: the job's hash, SET NX of its Idempotency-Key (with the job's TTL), and
                      XADD of its id to ``queue:<model>``; committed before the 202 is sent
    claim             XAUTOCLAIM first (an entry idle past the lease: its holder died, or it was given back),
                      then XREADGROUP ``>``; then the take script: queued -> running, attempt + 1
    lapse             at each renew, entries idle past the lease (XPENDING IDLE) are given back as deaths
    renew             the take's lease is the entry's idle time in the group: XCLAIM (JUSTID, min-idle 0) by
                      its holder resets it every third of JOB_LEASE_SECONDS
    succeed / fail    by the lease's holder only; XACK and XDEL of the entry, the images beside the job
    release / requeue the entry goes to the ``given-back`` consumer, idle for ever, so the next XAUTOCLAIM of
                      any replica takes it first

Keys (``honest-diffusion:`` and then): ``job:<id>`` (a hash; it expires JOB_TTL after the job's own expiry:
the 410 tombstone), ``img:<id>:<n>`` (expires with the job), ``idem:<owner>:<key>``, ``jobs`` and
``owner:<owner>`` (listings, by submit order), ``s:<model>:<status>`` (the jobs of each status: for counts,
queue positions and the sweep), ``held:<lease owner>`` (what a worker runs), ``queue:<model>`` (the stream),
``delivery:<id>`` and ``deliveries`` (the webhook outbox, by due time), ``job:<id>:deliveries``. Keys are
built inside the scripts: one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from webapp.queue.lua import GIVEN_BACK, GROUP, SCRIPTS
from webapp.queue.store import STATUSES, IdempotencyConflict, StoredJob, StoreUnavailable, new_id, request_hash
from webapp.settings import Settings

PREFIX = "honest-diffusion:"
# Redis's answers that mean "not now" (a restart loading its data, a full memory, a failed disk), not a bug here.
UNAVAILABLE_REPLIES = ("LOADING ", "OOM ", "MISCONF ", "READONLY ", "MASTERDOWN ", "BUSY ", "NOREPLICAS ")


def _decoded(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, Any]:
    """A hash as Redis gives it (HGETALL: a dict from redis-py, a flat list of pairs from a script), as text."""
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    return {key.decode(): value.decode() for key, value in pairs}


def _job(fields: dict[str, str], queue_position: int | None = None) -> StoredJob:
    def number(name: str, kind: type) -> Any:
        value = fields.get(name)
        return kind(value) if value not in (None, "") else None

    return StoredJob(
        id=fields["id"],
        owner=fields["owner"],
        status=fields["status"],
        route=fields["route"],
        request=json.loads(fields.get("request") or "{}"),
        created_at=float(fields["created_at"]),
        started_at=number("started_at", float),
        completed_at=number("completed_at", float),
        expires_at=float(fields["expires_at"]),
        attempt=int(fields.get("attempt", 0)),
        lease_owner=fields.get("lease_owner"),
        lease_until=number("lease_until", float),
        cancel_requested=fields.get("cancel_requested") == "1",
        step=number("step", int),
        total_steps=number("total_steps", int),
        error_code=fields.get("error_code"),
        error_message=fields.get("error_message"),
        output=json.loads(fields["output"]) if fields.get("output") else None,
        deaths=json.loads(fields.get("deaths") or "[]"),
        version=int(fields.get("version", 1)),
        swept=fields.get("swept") == "1",
        webhook=fields.get("webhook"),
        webhook_events=tuple(event for event in fields.get("webhook_events", "").split(",") if event),
        queue_position=queue_position,
    )


class RedisJobStore:
    """The jobs in the Redis at ``settings.job_store`` (redis:// or rediss://), this server's model's queue a
    stream of its own. Cheap to make; a connection is opened on first use, one pool per process."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.job_store
        self.ttl = settings.job_ttl
        self.lease_s = settings.job_lease_seconds
        self.max_attempts = settings.job_max_attempts
        self.queue = settings.model_name
        self.replica = settings.replica_name
        self.stream = f"{PREFIX}queue:{self.queue}"
        self.client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        self.outbox = RedisOutbox(self)
        self._group_made = False
        self._scripts = {name: self.client.register_script(source) for name, source in SCRIPTS.items()}

    def describe(self) -> str:
        """Where the store is, without the password."""
        parsed = self.client.connection_pool.connection_kwargs
        return f"redis://{parsed.get('host', '?')}:{parsed.get('port', '?')}/{parsed.get('db', 0)}"

    def exists(self) -> bool:
        """Always: a shared store is there whether or not this server took a job."""
        return True

    # -- Redis calls ------------------------------------------------------------------------------------

    def _call(self, what: str, command: Any) -> Any:
        """Run ``command()``; StoreUnavailable when Redis cannot answer now (down, loading, full)."""
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"job store {self.describe()} cannot {what}: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"job store {self.describe()} cannot {what}: {exc}") from exc
            raise

    def _run(self, name: str, *args: Any, now: float | None = None) -> Any:
        """Run script ``name`` with the shared arguments (the prefix, a nonce, now, JOB_TTL) and ``args``."""
        argv = [PREFIX, secrets.token_urlsafe(12), repr(time.time() if now is None else now), self.ttl, *args]
        return self._call("be written", lambda: self._scripts[name](keys=[], args=argv))

    def _ensure_group(self) -> None:
        """The consumer group of this model's stream, made with the stream if neither is there yet."""
        if self._group_made:
            return
        try:
            self._call("be written", lambda: self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True))
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_made = True

    def _fields(self, job_id: str) -> dict[str, str] | None:
        raw = self._call("be read", lambda: self.client.hgetall(PREFIX + "job:" + job_id))
        return _decoded(raw) if raw else None

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
        """As the SQLite store's submit: stored and queued before it returns; with an ``idempotency_key``
        the owner's earlier job from the same body instead (the key is SET NX, with the job's TTL)."""
        self._ensure_group()
        digest = request_hash(route, [request, webhook, sorted(webhook_events)])
        events = "," + ",".join(webhook_events) + "," if webhook else ""
        expires_at = time.time() + self.ttl
        kind, job_id = self._run(
            "submit", new_id(), owner, route, json.dumps(request), digest, idempotency_key or "", repr(expires_at),
            webhook or "", events, self.queue,
        )  # fmt: skip
        job_id = job_id.decode()
        if kind == b"conflict":
            raise IdempotencyConflict(job_id)
        job = self.get(job_id)
        assert job is not None
        return job, kind == b"new"

    def record(
        self,
        job_id: str,
        owner: str,
        route: str,
        request: dict[str, Any],
        output: dict[str, Any],
        images: list[tuple[str, bytes]],
    ) -> None:
        """Keep a request answered at once as a succeeded job with its images (OpenAI's url answers)."""
        flat = [part for media_type, data in images for part in (media_type, data)]
        expires_at = time.time() + self.ttl
        self._run("record", job_id, owner, route, json.dumps(request), json.dumps(output), repr(expires_at),
                  self.queue, *flat)  # fmt: skip

    def get(self, job_id: str) -> StoredJob | None:
        fields = self._fields(job_id)
        if fields is None:
            return None
        position = None
        if fields["status"] == "queued":
            rank = self._call("be read", lambda: self.client.zrank(f"{PREFIX}s:{fields['queue']}:queued", job_id))
            position = rank if rank is not None else 0
        return _job(fields, position)

    def list(self, owner: str | None, limit: int = 20, status: str | None = None) -> list[StoredJob]:
        """The newest jobs first, of ``owner`` (everyone's when None); ids whose job expired are dropped
        from the listing as they are met."""
        index = f"{PREFIX}owner:{owner}" if owner is not None else f"{PREFIX}jobs"
        found: list[StoredJob] = []
        start = 0
        while len(found) < limit:
            ids = self._call("be read", lambda s=start: self.client.zrevrange(index, s, s + 99))
            if not ids:
                break
            start += len(ids)
            pipe = self.client.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(PREFIX + "job:" + raw_id.decode())
            gone = []
            for raw_id, raw in zip(ids, self._call("be read", pipe.execute), strict=True):
                if not raw:
                    gone.append(raw_id)
                    continue
                job = _job(_decoded(raw))
                if not job.swept and (status is None or job.status == status):
                    found.append(job)
            if gone:
                self._call("be written", lambda g=gone: self.client.zrem(index, *g))
                start -= len(gone)
        return found[:limit]

    def image(self, job_id: str, n: int) -> tuple[str, bytes] | None:
        media_type, data = self._call(
            "be read", lambda: self.client.hmget(f"{PREFIX}img:{job_id}:{n}", "media_type", "data")
        )
        return (media_type.decode(), data) if media_type is not None else None

    def cancel(self, job_id: str) -> StoredJob | None:
        """As the SQLite store's: a queued job canceled at once (its entry removed), a running one flagged."""
        self._run("cancel", job_id)
        return self.get(job_id)

    # -- workers' side ----------------------------------------------------------------------------------

    def claim(self, lease_owner: str) -> StoredJob | None:
        """The oldest entry given back or idle past its lease (XAUTOCLAIM), else the next new one
        (XREADGROUP), taken under ``lease_owner``'s lease; None when there is none."""
        self._ensure_group()
        lease_ms = int(self.lease_s * 1000)
        for _ in range(8):  # entries of jobs canceled or expired meanwhile are dropped as they are met
            try:
                reply = self._call(
                    "be read",
                    lambda: self.client.xautoclaim(self.stream, GROUP, lease_owner, lease_ms, "0-0", count=1),
                )
                entries = reply[1]
                if not entries:
                    read = self._call(
                        "be read",
                        lambda: self.client.xreadgroup(GROUP, lease_owner, {self.stream: ">"}, count=1),
                    )
                    entries = read[0][1] if read else []
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_made = False  # Redis lost it (started empty): made again, and looked at next time
                self._ensure_group()
                return None
            if not entries:
                return None
            entry_id, fields = entries[0]
            if not fields:  # the entry was deleted after it was delivered
                continue
            taken = self._run(
                "take", fields[b"job"].decode(), entry_id.decode(), lease_owner, repr(time.time() + self.lease_s),
                self.max_attempts, "its lease ran out (the worker stopped renewing it)",
            )  # fmt: skip
            if taken:
                return _job(_decoded(taken))
        return None

    def renew(self, lease_owner: str, job_ids: list[str]) -> list[str]:
        """Extend the leases ``lease_owner`` holds on ``job_ids`` (their entries' idle time starts again; any
        other job under its name lapses); the ids of those a client asked to cancel."""
        if not job_ids:
            return []
        until = repr(time.time() + self.lease_s)
        return [raw.decode() for raw in self._run("renew", lease_owner, until, *job_ids)]

    def progress(self, job_id: str, lease_owner: str, step: int, total: int) -> bool:
        return self._run("progress", job_id, lease_owner, step, total) == 0

    def succeed(self, job_id: str, lease_owner: str, output: dict[str, Any], images: list[tuple[str, bytes]]) -> bool:
        flat = [part for media_type, data in images for part in (media_type, data)]
        return self._run("end", job_id, lease_owner, "succeeded", "", "", json.dumps(output), *flat) == 1

    def finish(self, job_id: str, lease_owner: str, status: str, code: str, message: str) -> bool:
        return self._run("end", job_id, lease_owner, status, code, message, "") == 1

    def requeue(self, lease_owner: str | None = None, job_id: str | None = None) -> int:
        """Give back uncounted the running jobs of ``lease_owner`` (None: of every worker of this replica,
        the server stopped), or just ``job_id``: first in line for the next claim of any replica."""
        return sum(
            self._run("give_back", owner, job_id or "", 0, "", self.max_attempts, self.queue)
            for owner in self._owners(lease_owner)
        )

    def release(self, reason: str, lease_owner: str | None = None, expired_before: float | None = None) -> int:
        """A dead holder's jobs, as deaths: those of ``lease_owner``, those whose lease lapsed (``expired_before``:
        their entries idle in the group past JOB_LEASE_SECONDS, found with XPENDING), or (neither given) those of
        every worker of this replica (it restarted). A job given back is claimed first by any replica."""
        if expired_before is not None:
            self._ensure_group()
            lease_ms = int(self.lease_s * 1000)
            lapsed = self._call(
                "be read",
                lambda: self.client.xpending_range(self.stream, GROUP, "-", "+", 100, idle=lease_ms),
            )
            entries = [row["message_id"].decode() for row in lapsed if row["consumer"].decode() != GIVEN_BACK]
            if not entries:
                return 0
            return self._run("lapse", self.queue, lease_ms, self.max_attempts, reason, *entries)
        return sum(
            self._run("give_back", owner, "", 1, reason, self.max_attempts, self.queue)
            for owner in self._owners(lease_owner)
        )

    def _owners(self, lease_owner: str | None) -> list[str]:
        """``lease_owner``, or every lease owner of this replica that holds a job (``<replica>/<pid>``)."""
        if lease_owner is not None:
            return [lease_owner]
        pattern = f"{PREFIX}held:{self.replica}/*"
        keys = self._call("be read", lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        return [key.decode().removeprefix(PREFIX + "held:") for key in keys]

    # -- housekeeping -----------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        return self._run("sweep", self.queue, now=now)

    def counts(self) -> tuple[dict[str, int], float]:
        """This model's jobs by status (the swept ones apart), and the age of its oldest queued job."""
        pipe = self.client.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(f"{PREFIX}s:{self.queue}:{status}")
        pipe.zrange(f"{PREFIX}s:{self.queue}:queued", 0, 0)
        *sizes, oldest = self._call("be read", pipe.execute)
        by_status = dict(zip(STATUSES, sizes, strict=True))
        if not oldest:
            return by_status, 0.0
        created = self._call("be read", lambda: self.client.hget(PREFIX + "job:" + oldest[0].decode(), "created_at"))
        return by_status, (max(0.0, time.time() - float(created)) if created else 0.0)


class RedisOutbox:
    """The webhook deliveries in Redis: the oldest due one leased to one deliverer of any replica."""

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store

    def claim(self, lease_s: float) -> dict[str, Any] | None:
        taken = self.store._run("delivery_claim", lease_s)
        if not taken:
            return None
        fields = _decoded(taken)
        return {**fields, "attempt": int(fields["attempt"]), "payload": fields.get("payload")}

    def keep_payload(self, delivery_id: str, payload: str) -> None:
        key = f"{PREFIX}delivery:{delivery_id}"
        self.store._call("be written", lambda: self.store.client.hsetnx(key, "payload", payload))

    def ended(self, delivery_id: str, status: str, error: str | None = None) -> None:
        self.store._run("delivery_end", delivery_id, status, error or "", "")

    def later(self, delivery_id: str, delay_s: float, error: str) -> None:
        self.store._run("delivery_end", delivery_id, "pending", error, repr(time.time() + delay_s))

    def of_job(self, job_id: str) -> list[dict[str, Any]]:
        ids = self.store._call("be read", lambda: self.store.client.lrange(f"{PREFIX}job:{job_id}:deliveries", 0, -1))
        pipe = self.store.client.pipeline(transaction=False)
        for raw in ids:
            pipe.hgetall(f"{PREFIX}delivery:{raw.decode()}")
        return [_decoded(raw) for raw in self.store._call("be read", pipe.execute) if raw]


__all__ = ["RedisJobStore", "RedisOutbox"]
