"""Two replicas, one queue (docs/architecture.md §18): two real gunicorn servers on this machine sharing one
real Redis (Debian's redis-server, on a free loopback port, append-only, started here and stopped by pid).
A job submitted to one is followed, fetched and canceled through the other; either runs it; a replica's
worker or the whole replica SIGKILLed, and Redis restarted, lose no job that got a 202."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import Receiver, RedisServer, Server, running_server, wait_for
from tests.test_jobs import WEBHOOK_SECRET, finished, submit

pytestmark = pytest.mark.slow  # servers of its own, to break (the fast lane is -m 'not slow')
SLOW = {"prompt": "a slow green triangle", "num_inference_steps": 20}
LEASE_S = 3


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"))
    yield server
    server.stop()


def replica(name: str, redis_store: RedisServer, model_cache, tmp_path_factory, **env: str):
    return running_server(
        model_cache,
        tmp_path_factory.mktemp(f"replica-{name}"),
        WEB_CONCURRENCY="1",
        MAX_ONGOING="1",  # one job at a time each: the queue outlasts a replica's capacity
        JOB_STORE=redis_store.url,
        REPLICA_NAME=name,
        JOB_LEASE_SECONDS=str(LEASE_S),
        WEBHOOK_SECRET=WEBHOOK_SECRET,
        WEBHOOK_ALLOW_PRIVATE="1",  # the receiver is on loopback: tests never send anywhere else
        WEBHOOK_RETRY_SCHEDULE="0.2,0.2,0.2",
        **env,
    )


@pytest.fixture(scope="module")
def fleet(redis_store, model_cache, tmp_path_factory):
    with (
        replica("a", redis_store, model_cache, tmp_path_factory) as a,
        replica("b", redis_store, model_cache, tmp_path_factory) as b,
    ):
        yield a, b


def worker_pid(server: Server) -> int:
    (worker,) = server.workers()
    return worker["pid"]


def test_a_job_submitted_to_one_replica_is_followed_fetched_and_canceled_through_the_other(fleet):
    a, b = fleet
    hook = Receiver(WEBHOOK_SECRET, 503)  # the first delivery fails: one replica or the other sends it again
    hooked = {**SLOW, "seed": 0, "webhook": hook.url, "webhook_events_filter": ["completed"]}
    ids = [submit(a, hooked).json()["id"], *(submit(a, {**SLOW, "seed": seed}).json()["id"] for seed in (1, 2))]
    last = b.get(f"/v1/jobs/{ids[-1]}").json()
    assert last["status"] == "queued", last  # one job at a time on each replica: the third waits
    canceled = b.post(f"/v1/jobs/{ids[-1]}/cancel").json()
    assert canceled["status"] == "canceled", canceled
    done = [finished(b, job_id, 180) for job_id in ids[:2]]
    assert [job["status"] for job in done] == ["succeeded", "succeeded"], done
    # The idle replica took work from the busy one: both ran one of the jobs A was given.
    assert {job["output"]["worker"]["pid"] for job in done} == {worker_pid(a), worker_pid(b)}, done
    image = b.get(done[0]["output"]["images"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert a.get(f"/v1/jobs/{ids[-1]}").json()["status"] == "canceled"
    # The shared outbox: each delivery attempt made by one replica, the retry under the same webhook-id.
    try:
        wait_for(lambda: len(hook.got) >= 2, 30, "the webhook to be sent again after its 503")
        events = hook.events()
        assert [(e["type"], e["data"]["id"], e["answered"]) for e in events] == [
            ("job.completed", ids[0], 503),
            ("job.completed", ids[0], 200),
        ], events
        assert events[0]["id"] == events[1]["id"]
    finally:
        hook.close()


def test_redis_down_refuses_submits_and_polls_with_503_keeps_generate_and_ready_and_loses_no_job(fleet, redis_store):
    a, b = fleet
    ids = [submit(a, {**SLOW, "seed": 10 + seed}).json()["id"] for seed in range(4)]
    wait_for(lambda: any(a.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids), 60, "a job to run")
    redis_store.stop()  # SIGTERM: Redis writes its append-only file and exits
    try:
        refused = submit(a, SLOW)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "job_store_unavailable"
        assert refused.headers["Retry-After"].isdigit()
        polled = b.get(f"/v1/jobs/{ids[0]}")
        assert polled.status_code == 503 and polled.headers["Retry-After"].isdigit()
        drawn = a.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2})
        assert drawn.status_code == 200, drawn.text  # the synchronous route needs no store
        wait_for(lambda: a.get("/readyz").json()["job_store"] == "unavailable", 30, "/readyz to say the store is down")
        ready = a.get("/readyz")
        assert ready.status_code == 200 and "job_store_error" in ready.json(), ready.json()
    finally:
        redis_store.start()  # the same folder: what it appended is loaded again
    done = [finished(b, job_id, 300) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * 4, [(j["status"], j.get("error")) for j in done]
    wait_for(lambda: a.get("/readyz").json().get("job_store") == "up", 30, "/readyz to say the job store is up")


def test_a_job_whose_replica_s_worker_is_sigkilled_completes(fleet):
    a, b = fleet
    ids = [submit(a, {**SLOW, "seed": 20 + seed}).json()["id"] for seed in range(2)]
    wait_for(lambda: a.workers()[0]["in_flight"] > 0, 60, "replica a's worker to run a job")
    victim = worker_pid(a)
    os.kill(victim, signal.SIGKILL)
    done = [finished(b, job_id, 300) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded", "succeeded"], done
    assert victim not in {job["output"]["worker"]["pid"] for job in done}
    assert sorted(job["attempt"] for job in done) == [1, 2], done  # the one it ran, as its next attempt
    a.wait_ready()


def test_the_queued_jobs_of_a_replica_killed_whole_run_on_the_other(fleet):
    a, b = fleet
    ids = [submit(a, {**SLOW, "seed": 30 + seed}).json()["id"] for seed in range(4)]
    wait_for(lambda: a.workers()[0]["in_flight"] > 0, 60, "replica a's worker to run a job")
    for pid in [a.proc.pid, *a.children()]:
        os.kill(pid, signal.SIGKILL)  # the whole replica, master included: nobody releases its jobs
    a.proc.wait(timeout=30)
    done = [finished(b, job_id, 300) for job_id in ids]  # A's running job once its lease lapses (LEASE_S)
    assert [job["status"] for job in done] == ["succeeded"] * 4, [(j["status"], j.get("error")) for j in done]
    assert {job["output"]["worker"]["pid"] for job in done} == {worker_pid(b)}
