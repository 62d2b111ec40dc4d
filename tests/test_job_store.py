"""The job store's contract (docs/architecture.md §17, §18), one suite run against both stores: SQLite in a
temporary folder, and Redis (Debian's redis-server on a free loopback port, started here and stopped by pid).
Nothing is skipped for either: what routes, claimers, deliverers and hooks rely on holds for both."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from tests.conftest import RedisServer, wait_for
from webapp import errors
from webapp.queue import Store, open_store
from webapp.queue.store import IdempotencyConflict, StoreUnavailable, lease_owner
from webapp.settings import Settings

BODY = {"prompt": "a red circle", "num_inference_steps": 2}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # bytes of every value survive the trip


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(kind: str, tmp_path) -> Callable[..., Store]:
    """A store of this test's kind, with settings ``overrides``; and ``make.down()`` makes it unreachable."""
    if kind == "redis":
        server = RedisServer(tmp_path / "redis")
        url = server.url
    else:
        url = f"sqlite:///{tmp_path}/jobs.sqlite3"

    def store(**overrides: str) -> Store:
        return open_store(Settings.from_env({"JOB_STORE": url, "REPLICA_NAME": "replica-a", **overrides}))

    def down() -> Store:
        if kind == "redis":
            server.stop()
            return store()
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the store's folder should be")
        return open_store(Settings.from_env({"JOB_STORE": f"sqlite:///{blocker}/jobs.sqlite3"}))

    store.down = down  # type: ignore[attr-defined]
    yield store
    if kind == "redis":
        server.stop()


@pytest.fixture
def store(make) -> Store:
    return make()


def test_a_submit_is_queued_in_order_listed_newest_first_and_one_owner_sees_its_own(store):
    first, new = store.submit("alice", "generate", BODY)
    second, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    theirs, _ = store.submit("bob", "generate", {**BODY, "seed": 3})
    assert new and first.status == "queued" and first.attempt == 0 and first.request == BODY
    assert store.get(first.id).queue_position == 0
    assert store.get(second.id).queue_position == 1
    assert store.get(theirs.id).queue_position == 2
    assert [job.id for job in store.list("alice")] == [second.id, first.id]
    assert [job.id for job in store.list(None, limit=2)] == [theirs.id, second.id]
    assert store.list("alice", status="running") == []
    assert store.get("job_unknown") is None


def test_an_idempotency_key_gives_the_same_job_for_the_same_body_and_refuses_another(store):
    job, new = store.submit("alice", "generate", BODY, idempotency_key="key-1")
    again, again_new = store.submit("alice", "generate", BODY, idempotency_key="key-1")
    assert new and not again_new and again.id == job.id
    other, _ = store.submit("bob", "generate", BODY, idempotency_key="key-1")  # keys are per owner
    assert other.id != job.id
    with pytest.raises(IdempotencyConflict):
        store.submit("alice", "generate", {**BODY, "seed": 9}, idempotency_key="key-1")


def test_claim_runs_the_oldest_under_a_lease_and_only_its_holder_ends_it_with_its_images(store):
    first, _ = store.submit("alice", "generate", BODY)
    second, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    running = store.claim("replica-a/1")
    assert running.id == first.id and running.status == "running" and running.attempt == 1
    assert running.lease_owner == "replica-a/1" and running.lease_until > time.time()
    assert store.claim("replica-a/2").id == second.id
    assert store.claim("replica-a/3") is None

    assert store.progress(first.id, "replica-a/1", 1, 2)
    assert not store.progress(first.id, "replica-a/2", 1, 2)  # not its holder
    assert store.get(first.id).step == 1 and store.get(first.id).total_steps == 2
    assert not store.succeed(first.id, "replica-a/2", {"images": 1}, [("image/png", PNG)])
    assert store.succeed(first.id, "replica-a/1", {"images": 1}, [("image/png", PNG)])
    done = store.get(first.id)
    assert done.status == "succeeded" and done.output == {"images": 1} and done.completed_at is not None
    assert store.image(first.id, 0) == ("image/png", PNG) and store.image(first.id, 1) is None
    assert not store.succeed(first.id, "replica-a/1", {"images": 1}, [])  # ended once

    assert store.finish(second.id, "replica-a/2", "failed", str(errors.INTERNAL), "it broke")
    failed = store.get(second.id)
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", str(errors.INTERNAL), "it broke")


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one_for_its_holder(store):
    queued, _ = store.submit("alice", "generate", BODY)
    running, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    assert store.cancel(queued.id).status == "canceled"  # first in line: gone from the queue
    assert store.claim("replica-a/1").id == running.id
    assert store.claim("replica-a/1") is None  # the canceled one is never claimed
    flagged = store.cancel(running.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.renew("replica-a/1", [running.id]) == [running.id]
    assert not store.progress(running.id, "replica-a/1", 1, 2)
    assert store.finish(running.id, "replica-a/1", "canceled", str(errors.CANCELED), "canceled while running")
    assert store.get(running.id).status == "canceled"
    assert store.cancel(running.id).status == "canceled"  # idempotent


def test_a_job_given_back_uncounted_is_claimed_first_and_a_death_counts_until_the_last_attempt(make):
    store = make(JOB_MAX_ATTEMPTS="2")
    job, _ = store.submit("alice", "generate", BODY)
    later, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    assert store.claim("replica-a/1").id == job.id
    assert store.requeue("replica-a/1", job.id) == 1  # claimed but not started: the attempt is not counted
    assert store.get(job.id).status == "queued" and store.get(job.id).attempt == 0
    assert store.claim("replica-a/2").id == job.id  # still ahead of the later one
    assert store.release("worker pid 2 died", lease_owner="replica-a/2") == 1
    released = store.get(job.id)
    assert released.status == "queued" and released.deaths == ["attempt 1: worker pid 2 died"]
    again = store.claim("replica-a/3")
    assert again.id == job.id and again.attempt == 2
    assert store.release("worker pid 3 died", lease_owner="replica-a/3") == 1
    lost = store.get(job.id)
    assert lost.status == "failed" and lost.error_code == str(errors.WORKER_LOST)
    assert "worker pid 2 died" in lost.error_message and "worker pid 3 died" in lost.error_message
    assert store.claim("replica-a/4").id == later.id


def test_the_replica_gives_back_every_worker_s_jobs_at_a_stop_and_releases_them_at_a_start(make):
    store = make(JOB_MAX_ATTEMPTS="3")
    jobs = [store.submit("alice", "generate", {**BODY, "seed": n})[0] for n in range(2)]
    settings = Settings.from_env({"REPLICA_NAME": "replica-a"})
    assert store.claim(lease_owner(settings, 11)).id == jobs[0].id
    assert store.claim(lease_owner(settings, 12)).id == jobs[1].id
    assert store.requeue() == 2  # the server stopped on purpose: nothing counted
    assert [store.get(job.id).attempt for job in jobs] == [0, 0]
    store.claim(lease_owner(settings, 13))
    store.claim(lease_owner(settings, 14))
    assert store.release("the container stopped while it ran") == 2  # the next start: deaths
    assert [store.get(job.id).deaths for job in jobs] == [["attempt 1: the container stopped while it ran"]] * 2


def test_a_lease_renewed_holds_and_one_its_holder_does_not_renew_goes_to_another_as_the_next_attempt(make):
    store = make(JOB_LEASE_SECONDS="1")
    other = make(JOB_LEASE_SECONDS="1", REPLICA_NAME="replica-b")  # another replica's store: its own connections
    kept, _ = store.submit("alice", "generate", BODY)
    lost, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    assert store.claim("replica-a/1").id == kept.id
    assert store.claim("replica-a/1").id == lost.id  # as if this claim's answer never reached its worker

    def taken_over() -> object:
        other.release("its lease ran out (the worker stopped renewing it)", expired_before=time.time())
        return other.claim("replica-b/1")  # as a claimer's loop does: release the lapsed, then claim

    taken = []
    renewed_until = time.monotonic() + 2.5  # over twice the lease, renewed every third of it
    while time.monotonic() < renewed_until:
        assert store.renew("replica-a/1", [kept.id]) == []  # only what the worker knows it runs
        if taken:  # its new holder renews it too
            assert other.renew("replica-b/1", [lost.id]) == []
        else:
            taken += [job for job in [taken_over()] if job is not None]
        time.sleep(0.3)
    assert [(job.id, job.attempt, job.lease_owner) for job in taken] == [(lost.id, 2, "replica-b/1")]
    assert "lease ran out" in store.get(lost.id).deaths[0]
    assert store.get(kept.id).lease_owner == "replica-a/1" and store.get(kept.id).attempt == 1
    assert not store.succeed(lost.id, "replica-a/1", {}, [])  # the old holder lost it
    assert store.succeed(lost.id, "replica-b/1", {}, [])
    assert store.succeed(kept.id, "replica-a/1", {}, [])


def test_a_lapsed_lease_is_put_back_in_the_queue_by_any_replica_as_a_death_and_claimed_first(make):
    store = make(JOB_LEASE_SECONDS="1")
    other = make(JOB_LEASE_SECONDS="1", REPLICA_NAME="replica-b")
    job, _ = store.submit("alice", "generate", BODY)
    later, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    assert store.claim("replica-a/1").id == job.id
    reason = "its lease ran out (the worker stopped renewing it)"
    assert other.release(reason, expired_before=time.time()) == 0  # renewed or not, it has not lapsed yet
    assert wait_for(lambda: other.release(reason, expired_before=time.time()), 10, "the lease to lapse") == 1
    lapsed = other.get(job.id)
    assert lapsed.status == "queued" and lapsed.lease_owner is None and reason in lapsed.deaths[0]
    assert other.claim("replica-b/1").id == job.id  # ahead of the later job
    assert other.get(job.id).attempt == 2 and other.get(later.id).status == "queued"


def test_a_finished_job_past_its_retention_is_swept_to_a_tombstone_and_counted_no_more(store):
    job, _ = store.submit("alice", "generate", BODY)
    waiting, _ = store.submit("alice", "generate", {**BODY, "seed": 2})
    store.claim("replica-a/1")
    store.succeed(job.id, "replica-a/1", {"images": 1}, [("image/png", PNG)])
    by_status, oldest = store.counts()
    assert by_status["succeeded"] == 1 and by_status["queued"] == 1 and oldest >= 0
    assert store.sweep() == 0
    assert store.sweep(now=time.time() + 86400 + 1) == 1
    swept = store.get(job.id)
    assert swept.swept and swept.expired(time.time()) and swept.output is None and swept.request == {}
    assert store.image(job.id, 0) is None
    assert store.counts()[0]["succeeded"] == 0
    assert [j.id for j in store.list("alice")] == [waiting.id]


def test_the_outbox_queues_each_event_the_filter_takes_and_leases_each_delivery_to_one_deliverer(store):
    hook = "http://127.0.0.1:9/hook"
    job, _ = store.submit("alice", "generate", BODY, webhook=hook, webhook_events=("start", "completed"))
    quiet, _ = store.submit("alice", "generate", {**BODY, "seed": 2})  # no webhook: no deliveries
    store.claim("replica-a/1")
    store.progress(job.id, "replica-a/1", 1, 2)  # not in its filter
    delivery = store.outbox.claim(30)
    assert (delivery["job_id"], delivery["event"], delivery["url"], delivery["attempt"]) == (job.id, "start", hook, 1)
    assert delivery["payload"] is None
    assert store.outbox.claim(30) is None  # leased: no other deliverer gets it
    store.outbox.keep_payload(delivery["id"], '{"type": "job.start"}')
    store.outbox.later(delivery["id"], 0, "receiver answered 503")
    again = store.outbox.claim(30)
    assert again["id"] == delivery["id"] and again["attempt"] == 2 and again["payload"] == '{"type": "job.start"}'
    store.outbox.ended(again["id"], "delivered")
    assert store.outbox.claim(30) is None
    store.succeed(job.id, "replica-a/1", {}, [])
    completed = store.outbox.claim(30)
    assert completed["event"] == "completed" and completed["id"] != delivery["id"]
    store.outbox.ended(completed["id"], "failed", "receiver answered 410")
    assert [(d["event"], d["status"]) for d in store.outbox.of_job(job.id)] == [
        ("start", "delivered"),
        ("completed", "failed"),
    ]
    assert store.outbox.of_job(quiet.id) == []


def test_a_store_that_cannot_be_reached_says_so_and_nothing_is_half_written(make):
    broken = make.down()
    with pytest.raises(StoreUnavailable):
        broken.submit("alice", "generate", BODY)
    with pytest.raises(StoreUnavailable):
        broken.claim(f"replica-a/{os.getpid()}")


def test_redis_keeps_no_listing_of_a_swept_job_and_no_key_of_a_finished_one_past_its_tombstone(tmp_path):
    """Beside the contract: Redis's own housekeeping. Nothing a job leaves grows without bound: its ids go
    from the listings at the sweep, and its hash and images carry their expiry."""
    server = RedisServer(tmp_path / "redis")
    try:
        store = open_store(Settings.from_env({"JOB_STORE": server.url, "JOB_TTL": "60"}))
        job, _ = store.submit("alice", "generate", BODY, idempotency_key="k")
        store.claim("replica-a/1")
        store.succeed(job.id, "replica-a/1", {}, [("image/png", PNG)])
        client = server.client()
        prefix = "honest-diffusion:"
        assert client.zscore(prefix + "jobs", job.id) is not None
        assert 0 < client.ttl(f"{prefix}img:{job.id}:0") <= 61  # EXPIREAT a whole second
        assert 60 < client.ttl(f"{prefix}job:{job.id}") <= 121  # the 410 tombstone outlives the job by JOB_TTL
        assert 0 < client.ttl(f"{prefix}idem:alice:k") <= 60
        assert store.sweep(now=time.time() + 61) == 1
        assert client.zscore(prefix + "jobs", job.id) is None
        assert client.zscore(prefix + "owner:alice", job.id) is None
        assert client.xlen(store.stream) == 0 and client.exists(f"{prefix}img:{job.id}:0") == 0
    finally:
        server.stop()
