"""Real gunicorn servers through their load: probes during loading, retries, and a load that cannot succeed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Server, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

OIP_FALSE = 400  # the Open Inference Protocol: 200 is true, a 4xx false (Triton answers 400)


def oip(server: Server) -> dict[str, int]:
    """The Open Inference Protocol health routes' statuses, for the served model under both its names."""
    name = server.get("/v1/models").json()["data"][0]["id"]
    return {
        "live": server.get("/v2/health/live").status_code,
        "ready": server.get("/v2/health/ready").status_code,
        "model": server.get(f"/v2/models/{name}/ready").status_code,
        "other model": server.get("/v2/models/not-this-one/ready").status_code,
    }


def test_probes_answer_while_loading_and_readyz_turns_200_only_when_every_worker_is_ready(start_server, tmp_path):
    gate = tmp_path / "open-the-gate"
    server = start_server(MODEL_LOADER="tests.loaders:gated", GATE_FILE=str(gate))

    health = wait_for(lambda: server.get("/healthz"), 60, "the port to answer")
    assert health.status_code == 200
    assert health.headers["Cache-Control"] == "no-store"

    def both_loading():
        status, body = server.readyz()
        states = [w["state"] for w in body["workers"]]
        return (status, body) if states == ["LOADING", "LOADING"] else None

    status, body = wait_for(both_loading, 60, "both workers to report LOADING")
    assert status == 503
    assert body["status"] == "not_ready"
    assert "0 of 2 required workers ready" in body["reason"]
    assert all(w["attempt"] == 1 and w["pid"] > 0 for w in body["workers"])

    refused = server.post("/generate", json={"prompt": "too early"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "not_ready"
    assert int(refused.headers["Retry-After"]) >= 1

    # Still loading: every probe stays 503; nothing flips early. KServe's aliases say the same.
    for _ in range(5):
        assert server.get("/readyz").status_code == 503
        assert server.get("/healthz").status_code == 200
    assert oip(server) == {"live": 200, "ready": OIP_FALSE, "model": OIP_FALSE, "other model": 404}
    answer = server.get("/v2/health/ready").json()
    assert answer["ready"] is False and "0 of 2 required workers ready" in answer["reason"]

    gate.touch()
    body = server.wait_ready()
    assert [w["state"] for w in body["workers"]] == ["READY", "READY"]
    assert all(w["device"] == "cpu" for w in body["workers"])
    assert server.get("/healthz").status_code == 200
    assert oip(server) == {"live": 200, "ready": 200, "model": 200, "other model": 404}
    assert server.get("/v2/health/ready").json() == {"ready": True}


def test_transient_failures_are_retried_and_the_attempts_stay_visible(start_server):
    server = start_server(WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:flaky", FLAKY_FAILURES="2")
    body = server.wait_ready()
    (worker,) = body["workers"]
    assert worker["state"] == "READY"
    assert worker["attempt"] == 3
    assert worker["max_attempts"] == 5
    assert "ConnectionError: simulated hub outage on attempt 2" in worker["error"]
    assert server.log_tail(200).count("event=load_retry") == 2
    metrics = server.metrics()
    assert metrics.value("honest_diffusion_load_attempts_total", outcome="error") == 2
    assert metrics.value("honest_diffusion_load_attempts_total", outcome="ok") == 1
    assert metrics.value("honest_diffusion_load_duration_seconds_count", outcome="ready") == 1


def test_a_permanent_failure_ends_failed_without_retrying_and_the_master_stays_up(start_server, tmp_path):
    missing = Path(tmp_path) / "no-such-model"
    server = start_server(WEB_CONCURRENCY="1", MODEL_ID=str(missing), SERVED_MODEL_NAME="the-missing-one")

    def failed():
        server.check_running()
        status, body = server.readyz()
        return (status, body) if body["workers"] and body["workers"][0]["state"] == "FAILED" else None

    status, body = wait_for(failed, 240, "the worker to report FAILED")
    (worker,) = body["workers"]
    assert status == 503
    assert worker["attempt"] == 1, "a permanent error must not be retried"
    assert worker["error"] == f"permanent error on attempt 1: FileNotFoundError: MODEL_ID {missing} is not a folder"

    health = server.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "dead"
    assert "FAILED" in health.json()["reason"]
    assert oip(server) == {"live": OIP_FALSE, "ready": OIP_FALSE, "model": OIP_FALSE, "other model": 404}
    assert "FAILED" in server.get("/v2/health/live").json()["reason"]
    # The board is written before the transition's log line (webapp/board/lifecycle.py), by the engine thread at
    # ENGINE_NICE: on a busy host /readyz can say FAILED a moment before the line is in the log.
    failed_lines = wait_for(
        lambda: [line for line in server.log_lines() if "event=state" in line and "state=FAILED" in line],
        30,
        "the FAILED transition's log line",
    )
    assert all("level=error" in line for line in failed_lines), failed_lines
    metrics = server.metrics()  # a FAILED worker still answers the scrape, and says so
    assert metrics.value("honest_diffusion_load_duration_seconds_count", outcome="failed") == 1
    assert metrics.value("honest_diffusion_worker_state", slot="0", state="FAILED") == 1
    assert metrics.value("honest_diffusion_alive") == 0

    # The master did not halt, and the failed worker keeps answering (and keeps refusing work).
    server.check_running()
    assert server.post("/generate", json={"prompt": "x"}).status_code == 503
    assert server.get("/readyz").status_code == 503
