"""Asynchronous jobs (docs/architecture.md §17) through real gunicorn servers sharing one SQLite store: submit,
follow, fetch, cancel, idempotency, keys, and nothing lost when a worker or the whole server is SIGKILLed."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import sqlite3
import time

import pytest
import requests
from PIL import Image

from tests.conftest import API_KEY, Receiver, Server, wait_for

JOB = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 7}
WEBHOOK_SECRET = "whsec_" + "dGVzdC1zZWNyZXQtb2YtdGhlLXdlYmhvb2tzLTAxMjM0"  # a test's own, never a real secret
SLOW_JOB = {"prompt": "a slow blue square", "num_inference_steps": 50, "seed": 3}  # seconds on 2 CPUs
FINISHED = ("succeeded", "failed", "canceled")


def submit(server: Server, body: dict, **headers: str) -> requests.Response:
    return server.post("/v1/jobs", json=body, headers=headers)


def finished(server: Server, job_id: str, deadline_s: float = 120, **headers: str) -> dict:
    """The job once it has finished; a 503 meanwhile (its store restarting, tests/test_fleet.py) is waited out."""

    def done() -> dict | None:
        response = server.get(f"/v1/jobs/{job_id}", headers=headers)
        job = response.json() if response.status_code == 200 else {}
        return job if job.get("status") in FINISHED else None

    return wait_for(done, deadline_s, f"job {job_id} to finish", interval=0.1)


@pytest.fixture(scope="module")
def jobs_server(model_cache, tmp_path_factory):
    from tests.conftest import running_server

    with running_server(
        model_cache,
        tmp_path_factory.mktemp("jobs-server"),
        WEB_CONCURRENCY="1",
        WEBHOOK_SECRET=WEBHOOK_SECRET,
        WEBHOOK_ALLOW_PRIVATE="1",  # the receivers here are on loopback: tests never send anywhere else
        WEBHOOK_RETRY_SCHEDULE="0.2,0.2,0.2",
    ) as server:
        yield server


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(*statuses: int) -> Receiver:
        made.append(Receiver(WEBHOOK_SECRET, *statuses))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_a_job_is_stored_before_the_202_runs_and_serves_its_image(jobs_server):
    answer = submit(jobs_server, JOB)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job" and job["status"] in ("queued", "running") and job["request"] == JOB
    assert len(job["id"]) >= 4 + 24  # "job_" + 144 random bits in base64
    done = finished(jobs_server, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1 and done["completed_at"] >= done["started_at"] >= done["created_at"]
    assert done["expires_at"] == pytest.approx(done["created_at"] + 86400)
    (image,) = done["output"]["images"]
    assert image["seed"] == 7 and image["url"] == f"/v1/jobs/{job['id']}/images/0"
    fetched = jobs_server.get(image["url"])
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (done["output"]["width"], done["output"]["height"])
    # The same request answered at once draws the same picture.
    direct = jobs_server.post("/generate", json=JOB, headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(direct.content)).tobytes() == Image.open(io.BytesIO(fetched.content)).tobytes()
    assert jobs_server.get(f"/v1/jobs/{job['id']}/images/1").status_code == 404


def test_a_job_that_fails_as_it_runs_is_failed_with_the_error_and_counted(jobs_server):
    """A PNG whose header is sound but whose pixels are cut short passes the check at submit (headers only,
    docs/architecture.md §15) and fails when its worker decodes it: the job fails with that error."""
    import base64

    picture = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(picture, format="PNG")
    truncated = base64.b64encode(picture.getvalue()[:-40]).decode("ascii")
    job = submit(jobs_server, {**JOB, "image": truncated, "strength": 0.5})
    assert job.status_code == 202, job.text
    done = finished(jobs_server, job.json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_image", done
    metrics = jobs_server.metrics()
    assert metrics.value("honest_diffusion_jobs", status="failed") >= 1
    assert metrics.value("honest_diffusion_jobs", status="succeeded") >= 1
    assert metrics.value("honest_diffusion_job_store_up") == 1


def test_a_bad_field_is_refused_as_generate_refuses_it_and_nothing_is_stored(jobs_server):
    before = jobs_server.get("/v1/jobs?limit=100").json()["data"]
    answer = submit(jobs_server, {**JOB, "num_inference_steps": 10_000})
    direct = jobs_server.post("/generate", json={**JOB, "num_inference_steps": 10_000})
    assert answer.status_code == 422 and answer.json() == direct.json()
    assert answer.json()["error"]["field"] == "num_inference_steps"
    assert jobs_server.post("/v1/jobs", data="{", headers={"Content-Type": "application/json"}).status_code == 400
    assert jobs_server.get("/v1/jobs?limit=100").json()["data"] == before
    unknown = jobs_server.get("/v1/jobs/job_nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"


def test_an_idempotency_key_makes_one_job_even_when_sent_at_once_and_refuses_another_body(jobs_server):
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: submit(jobs_server, {**JOB, "seed": 11}, **key), range(8)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    job_id = answers[0].json()["id"]
    finished(jobs_server, job_id)
    again = submit(jobs_server, {**JOB, "seed": 11}, **key)
    assert again.status_code == 200 and again.json()["id"] == job_id and again.json()["status"] == "succeeded"
    assert again.headers["Idempotent-Replayed"] == "true"
    other = submit(jobs_server, {**JOB, "seed": 12}, **key)
    assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key", other.text
    assert submit(jobs_server, JOB, **{"Idempotency-Key": ""}).status_code == 422


def test_prefer_wait_answers_the_finished_job_and_respond_async_turns_generate_into_a_job(jobs_server):
    waited = submit(jobs_server, {**JOB, "seed": 21}, Prefer="wait=60")
    assert waited.status_code == 200 and waited.json()["status"] == "succeeded", waited.text
    assert waited.headers["Preference-Applied"] == "wait=60"
    deferred = jobs_server.post("/generate", json={**JOB, "seed": 22}, headers={"Prefer": "respond-async"})
    assert deferred.status_code == 202 and deferred.headers["Preference-Applied"] == "respond-async"
    assert finished(jobs_server, deferred.json()["id"])["output"]["images"][0]["seed"] == 22
    bad = submit(jobs_server, JOB, Prefer="wait=soon")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Prefer"


def test_cancel_stops_a_running_job_between_steps_and_a_queued_one_at_once(jobs_server):
    running = submit(jobs_server, SLOW_JOB).json()
    wait_for(
        lambda: (jobs_server.get(f"/v1/jobs/{running['id']}").json().get("progress") or {}).get("step", 0) >= 1,
        60,
        "the slow job to take a step",
    )
    queued = [submit(jobs_server, {**SLOW_JOB, "seed": seed}).json() for seed in range(40, 46)]
    last = queued[-1]
    canceled = jobs_server.post(f"/v1/jobs/{last['id']}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "canceled"
    stopping = jobs_server.post(f"/v1/jobs/{running['id']}/cancel")
    assert stopping.status_code == 200
    done = finished(jobs_server, running["id"], 60)
    assert done["status"] == "canceled", done
    for job in queued[:-1]:
        jobs_server.post(f"/v1/jobs/{job['id']}/cancel")
    again = jobs_server.post(f"/v1/jobs/{last['id']}/cancel").json()
    assert again["status"] == "canceled" and again["completed_at"] == canceled["completed_at"]  # idempotent


def test_server_sent_events_follow_a_job_and_resume_after_the_last_event_seen(jobs_server):
    job = submit(jobs_server, {**JOB, "num_inference_steps": 4, "seed": 31}).json()
    with requests.get(jobs_server.url + f"/v1/jobs/{job['id']}/events", stream=True, timeout=60) as stream:
        lines = [line for line in stream.iter_lines(decode_unicode=True) if line]
    names = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    ids = [int(line.split(": ", 1)[1]) for line in lines if line.startswith("id: ")]
    assert names[-1] == "succeeded" and ids == sorted(ids), lines
    again = requests.get(
        jobs_server.url + f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(ids[-1])}, timeout=30
    )
    assert again.status_code == 200 and again.text == ""  # nothing after the last event seen


def test_clients_following_jobs_never_take_the_threads_the_probes_need(jobs_server):
    """THREADS 16, MAX_ONGOING 4, MAX_QUEUED 8: two threads may wait on jobs for clients, two stay free for the
    probes. A third event stream is a 503, a third long poll answers at once, and /readyz answers."""
    job = submit(jobs_server, {**SLOW_JOB, "num_inference_steps": 100, "seed": 71}).json()
    url = jobs_server.url + f"/v1/jobs/{job['id']}/events"
    streams = [requests.get(url, stream=True, timeout=60) for _ in range(2)]
    try:
        assert [stream.status_code for stream in streams] == [200, 200]
        third = requests.get(url, timeout=10)
        assert third.status_code == 503 and third.json()["error"]["code"] == "followers_full", third.text
        assert third.headers["Retry-After"] == "1"
        polled = jobs_server.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}, timeout=10)
        assert polled.status_code == 200 and "Preference-Applied" not in polled.headers  # declined: answered at once
        assert jobs_server.get("/readyz").status_code == 200
    finally:
        jobs_server.post(f"/v1/jobs/{job['id']}/cancel")
        for stream in streams:
            stream.close()
    finished(jobs_server, job["id"], 60)
    wait_for(lambda: requests.get(url, timeout=10).status_code == 200, 30, "the places to be given back")


def test_a_job_is_visible_only_to_the_key_that_made_it(keyed_server):
    server, mine = keyed_server, {"Authorization": f"Bearer {API_KEY}"}
    job = submit(server, JOB, **mine).json()
    assert finished(server, job["id"], **mine)["status"] == "succeeded"
    theirs = {"X-API-Key": "second-key"}
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/images/0"):
        assert server.get(path, headers=theirs).status_code == 404
    assert server.post(f"/v1/jobs/{job['id']}/cancel", headers=theirs).status_code == 404
    assert job["id"] not in {listed["id"] for listed in server.get("/v1/jobs", headers=theirs).json()["data"]}
    assert server.get(f"/v1/jobs/{job['id']}").status_code == 401


def noise_png(side: int) -> str:
    """A PNG of random pixels (it does not compress), in base64: a large request body to store."""
    import base64
    import random

    picture = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    data = io.BytesIO()
    picture.save(data, format="PNG")
    return base64.b64encode(data.getvalue()).decode("ascii")


@pytest.mark.slow  # a server of its own
def test_a_full_store_refuses_submits_with_503_and_a_job_past_its_retention_answers_410(start_server, tmp_path):
    server = start_server(WEB_CONCURRENCY="1", JOB_STORE_MAX_MB="1", JOB_TTL="12")
    server.wait_ready()
    big = {**JOB, "image": noise_png(256), "strength": 0.5}  # about 260 kB stored per job
    answers = []
    for seed in range(10):
        answers.append(submit(server, {**big, "seed": seed}))
        if answers[-1].status_code != 202:
            break
    refused = answers[-1]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "job_store_unavailable", refused.text
    assert refused.headers["Retry-After"] == "5" and 3 <= len(answers) <= 6
    assert server.get("/readyz").status_code == 200
    accepted = [answer.json()["id"] for answer in answers if answer.status_code == 202]
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        stored = {row[0] for row in db.execute("SELECT id FROM jobs")}
    assert set(accepted) <= stored  # every 202 was committed
    done = finished(server, accepted[0])
    assert done["status"] == "succeeded" and done["output"]["edit"]["mode"] == "image", done
    # Past JOB_TTL: 410, never a 404 or a false "done".
    wait_for(lambda: server.get(f"/v1/jobs/{accepted[0]}").status_code == 410, 60, "the job to expire")
    answer = server.get(f"/v1/jobs/{accepted[0]}/images/0")
    assert answer.status_code == 410 and answer.json()["error"]["code"] == "job_expired"


@pytest.mark.slow
def test_a_job_whose_worker_is_sigkilled_runs_again_as_attempt_2(start_server):
    server = start_server(WEB_CONCURRENCY="2", MASTER_PREIMPORT="1")
    server.wait_ready()
    job = submit(server, {**SLOW_JOB, "num_inference_steps": 30}).json()
    wait_for(
        lambda: (lambda j: j if j["status"] == "running" and (j.get("progress") or {}).get("step") else None)(
            server.get(f"/v1/jobs/{job['id']}").json()
        ),
        60,
        "the job to run",
    )
    pids = {w["pid"] for w in server.workers()}
    busy = [w["pid"] for w in server.workers() if w["in_flight"]]
    assert busy, server.workers()
    os.kill(busy[0], signal.SIGKILL)
    done = finished(server, job["id"], 180)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert done["output"]["worker"]["pid"] in pids | {w["pid"] for w in server.workers()}
    assert done["output"]["worker"]["pid"] != busy[0]


@pytest.mark.slow
def test_a_job_that_outlives_its_last_attempt_fails_naming_the_deaths_and_a_sigterm_counts_no_attempt(start_server):
    server = start_server(WEB_CONCURRENCY="1", JOB_MAX_ATTEMPTS="1", GRACEFUL_TIMEOUT="1")
    server.wait_ready()
    job = submit(server, SLOW_JOB).json()
    wait_for(lambda: server.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 60, "the job to run")
    (worker,) = server.workers()
    os.kill(worker["pid"], signal.SIGKILL)
    done = finished(server, job["id"], 60)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
    assert f"worker pid {worker['pid']} died" in done["error"]["message"]

    # SIGTERM (a deploy) is not a death: the job it cut short is queued again without counting an attempt,
    # so even with JOB_MAX_ATTEMPTS=1 the next start runs it.
    server.wait_ready()
    cut = submit(server, {**SLOW_JOB, "seed": 4}).json()
    waiting = submit(server, {**JOB, "seed": 5}).json()
    wait_for(lambda: server.get(f"/v1/jobs/{cut['id']}").json()["status"] == "running", 60, "the job to run")
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)
    again = start_server(WEB_CONCURRENCY="1", JOB_MAX_ATTEMPTS="1")
    again.wait_ready()
    for job in (cut, waiting):
        done = finished(again, job["id"], 120)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done


@pytest.mark.slow
def test_twenty_jobs_in_flight_all_complete_after_the_whole_server_is_sigkilled_and_started_again(start_server):
    first = start_server(WEB_CONCURRENCY="2")
    first.wait_ready()
    ids = [submit(first, {**JOB, "seed": seed}).json()["id"] for seed in range(20)]
    wait_for(lambda: any(first.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids), 60, "a job to run")
    for pid in [first.proc.pid, *first.children()]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in first.children()), 30, "workers gone")
    second = start_server(WEB_CONCURRENCY="2")
    second.wait_ready()
    done = [finished(second, job_id, 300) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * 20, [(j["status"], j.get("error")) for j in done]
    assert any(job["attempt"] == 2 for job in done)  # the ones running at the kill ran again
    for job in done:
        assert second.get(job["output"]["images"][0]["url"]).status_code == 200


def test_webhooks_are_signed_retried_under_one_id_and_verified_by_the_standard_package(jobs_server, receiver):
    hook = receiver(503)  # the first delivery fails: it is sent again, under the same webhook-id
    body = {**JOB, "seed": 51, "webhook": hook.url, "webhook_events_filter": ["start", "progress", "completed"]}
    job = submit(jobs_server, body).json()
    assert job["webhook"] == hook.url and job["webhook_events_filter"] == ["start", "progress", "completed"]
    assert "webhook" not in job["request"]
    finished(jobs_server, job["id"])
    events = wait_for(
        lambda: (lambda got: got if sum(e["answered"] == 200 for e in got) >= 4 else None)(hook.events()),
        30,
        "start (retried), two progress events and completed to be delivered",
    )
    delivered = [event for event in events if event["answered"] == 200]
    assert sorted(event["type"] for event in delivered) == [
        "job.completed", "job.progress", "job.progress", "job.start"
    ], events  # fmt: skip
    refused = events[0]
    assert refused["answered"] == 503 and refused["type"] == "job.start"
    retried = [event for event in delivered if event["id"] == refused["id"]]
    assert retried == [{**refused, "answered": 200}]  # the same id and the same signed body
    assert len({event["id"] for event in delivered}) == 4
    completed = next(event for event in delivered if event["type"] == "job.completed")
    assert completed["data"]["status"] == "succeeded" and completed["data"]["id"] == job["id"]
    assert completed["data"]["output"]["images"][0]["url"] == f"/v1/jobs/{job['id']}/images/0"
    assert jobs_server.metrics().value("honest_diffusion_webhook_deliveries_total", outcome="retried") >= 1


def test_a_receiver_that_answers_410_is_not_sent_to_again_and_one_that_is_down_is_retried(jobs_server, receiver):
    def failed() -> float:
        return jobs_server.metrics().value("honest_diffusion_webhook_deliveries_total", outcome="failed")

    before = failed()
    gone = receiver(410)
    finished(jobs_server, submit(jobs_server, {**JOB, "seed": 52, "webhook": gone.url}).json()["id"])
    down = receiver()
    url = down.url
    down.close()  # nothing listens there now: connection refused, tried again 3 times 0.2 s apart
    finished(jobs_server, submit(jobs_server, {**JOB, "seed": 53, "webhook": url}).json()["id"])
    wait_for(lambda: failed() >= before + 2, 30, "the 410 and the last retry to fail for good")
    assert len(gone.got) == 1  # 410: never again
    assert jobs_server.metrics().value("honest_diffusion_webhook_deliveries_total", outcome="retried") >= 3


@pytest.mark.slow  # a server of its own
def test_a_webhook_to_a_private_or_odd_address_is_refused_at_submit(start_server):
    server = start_server(WEB_CONCURRENCY="1", WEBHOOK_SECRET=WEBHOOK_SECRET)
    server.wait_ready()
    for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]:9/", "ftp://127.0.0.1/x",
                "http://user:pw@127.0.0.1/", "not a url"):  # fmt: skip
        answer = submit(server, {**JOB, "webhook": url})
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "webhook", (url, answer.text)
    filtered = submit(server, {**JOB, "webhook": "http://127.0.0.1:9/", "webhook_events_filter": ["done"]})
    assert filtered.status_code == 422 and filtered.json()["error"]["field"] == "webhook_events_filter"
    assert server.get("/v1/jobs").json()["data"] == []


def test_the_operator_lists_shows_and_cancels_jobs_with_the_command(jobs_server):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "honest-diffusion"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), "jobs", *args, "--url", jobs_server.url], capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    queued = submit(jobs_server, {**SLOW_JOB, "seed": 61}).json()
    behind = submit(jobs_server, {**SLOW_JOB, "seed": 62}).json()
    listed = cli("list", "--limit", "5")
    assert listed.returncode == 0 and listed.stdout.startswith("ID"), listed.stderr
    assert behind["id"] in listed.stdout
    shown = cli("show", behind["id"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == behind["id"]
    for job in (behind, queued):
        canceled = cli("cancel", job["id"])
        assert canceled.returncode == 0 and json.loads(canceled.stdout)["status"] in ("canceled", "running")
    finished(jobs_server, queued["id"], 60)
    missing = cli("show", "job_nothing")
    assert missing.returncode == 1 and "404 job_not_found" in missing.stderr
    assert cli("cancel").returncode == 2  # an id is needed
