"""Runtime faults injected for real into real gunicorn servers: the probes' answers, in order, with deadlines.

Each test prints what it measured (run pytest with -s to see the lines starting with "measured:").
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import process_state, wait_for


@pytest.fixture
def start_server(start_server):
    """Most of this module's servers replace workers, so their masters pre-import the model code, as by
    default (tests/conftest.py turns it off for the rest); the two that replace none turn it off again."""
    return functools.partial(start_server, MASTER_PREIMPORT="1")


pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

LONG_JOB = {"prompt": "a long one", "num_inference_steps": 100, "seed": 3}  # about 4 s on one CPU thread


def measured(name: str, seconds: float) -> None:
    print(f"measured: {name} = {seconds * 1000:.1f} ms")


class Background:
    """Send one request on a thread and keep what came back (a response or the exception)."""

    def __init__(self, server, body, timeout=120):
        self.result: requests.Response | Exception | None = None
        self.finished_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(server, body, timeout), daemon=True)
        self.thread.start()

    def _run(self, server, body, timeout):
        try:
            self.result = server.post("/generate", json=body, timeout=timeout)
        except requests.RequestException as exc:
            self.result = exc
        self.finished_at = time.monotonic()

    def wait(self, deadline_s):
        self.thread.join(deadline_s)
        assert not self.thread.is_alive(), f"the request was still hanging after {deadline_s} s"
        return self.result


def in_flight(server):
    _status, body = server.readyz()
    return any(w["in_flight"] for w in body["workers"])


def test_a_request_in_flight_on_a_killed_worker_fails_fast_and_the_slot_heals(start_server):
    server = start_server(WEB_CONCURRENCY="1")
    (worker,) = server.wait_ready()["workers"]
    request = Background(server, LONG_JOB)
    wait_for(lambda: in_flight(server), 60, "the long generation to start")

    killed = time.monotonic()
    os.kill(worker["pid"], signal.SIGKILL)
    result = request.wait(30)
    assert isinstance(result, requests.ConnectionError), result
    measured("SIGKILL to the in-flight request's connection error", request.finished_at - killed)

    body = server.wait_ready()
    assert body["workers"][0]["pid"] != worker["pid"]
    measured("SIGKILL to /readyz 200 again (one worker)", time.monotonic() - killed)


def test_a_frozen_worker_goes_stale_on_readyz_and_recovers_after_sigcont(start_server, tmp_path):
    # A board left by a crashed master in the same folder must be removed at start, never trusted.
    stale = tmp_path / "honest-diffusion-leftover"
    stale.mkdir()
    (stale / "board").write_bytes(b"HDBOARD1" + bytes(100))
    (stale / "master.lock").touch()  # its master's lock file, which nobody holds any more
    server = start_server(HEARTBEAT_INTERVAL="0.2", HEARTBEAT_TIMEOUT="1.5", WORKER_TIMEOUT="600", MASTER_PREIMPORT="0")
    body = server.wait_ready()
    assert not stale.exists()
    assert "event=stale_board_removed" in server.log_tail(200)

    frozen, other = body["workers"]
    stopped = time.monotonic()
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        _status, body = wait_for(
            lambda: (lambda r: r if r[0] == 503 else None)(server.readyz()), 10, "/readyz to see the frozen worker"
        )
        flipped = time.monotonic()
        row = next(w for w in body["workers"] if w["slot"] == frozen["slot"])
        age = float(row["problem"].split("heartbeat ")[1].split(" s old")[0])
        assert age >= 1.5 and "(limit 1.5 s)" in row["problem"], row["problem"]  # shown to 0.1 s
        measured("SIGSTOP to /readyz 503 (HEARTBEAT_TIMEOUT=1.5 s)", flipped - stopped)
        assert server.get("/healthz").status_code == 200, "a frozen worker can still recover: no restart"
        # /metrics (answered by the other worker, the frozen one cannot) keeps the recorded state apart
        # from whether to believe it.
        metrics = server.metrics()
        slot = str(frozen["slot"])
        assert metrics.value("honest_diffusion_worker_state", slot=slot, state="READY") == 1
        assert metrics.value("honest_diffusion_worker_untrusted", slot=slot) == 1
        assert metrics.value("honest_diffusion_worker_untrusted", slot=str(other["slot"])) == 0
        assert metrics.value("honest_diffusion_worker_heartbeat_age_seconds", slot=slot) >= 1.5
        assert metrics.value("honest_diffusion_ready") == 0
    finally:
        os.kill(frozen["pid"], signal.SIGCONT)
    resumed = time.monotonic()
    body = server.wait_ready(30)
    measured("SIGCONT to /readyz 200", time.monotonic() - resumed)
    assert {w["pid"] for w in body["workers"]} == {frozen["pid"], other["pid"]}


def test_a_stalled_step_makes_the_worker_unhealthy_and_it_is_replaced(start_server):
    # Two workers: the stalled one stops accepting connections as soon as it starts to exit, so it is
    # the other one that reports the stall on /healthz until gunicorn has replaced it.
    server = start_server(
        WEB_CONCURRENCY="2", MODEL_LOADER="tests.loaders:faulty", STALL_TIMEOUT="1.5", HEARTBEAT_INTERVAL="0.2"
    )
    pids_before = {w["pid"] for w in server.wait_ready()["workers"]}
    started = time.monotonic()
    request = Background(server, {"prompt": "stall", "num_inference_steps": 5})

    def unhealthy():
        response = server.get("/healthz")
        return response.json() if response.status_code == 503 else None  # a 503 Response is falsy

    health = wait_for(unhealthy, 30, "/healthz to report the stall")
    measured("stall start to /healthz 503 (STALL_TIMEOUT=1.5 s)", time.monotonic() - started)
    assert "stalled" in health["reason"]
    assert server.get("/readyz").status_code == 503

    result = request.wait(30)
    assert isinstance(result, requests.Response), result
    assert result.status_code == 503
    assert result.json()["error"]["code"] == "worker_unhealthy"
    assert "Retry-After" in result.headers

    stalled = {w["pid"] for w in health["workers"] if w["state"] == "UNHEALTHY" or "stalled" in w.get("problem", "")}
    assert len(stalled) == 1 and stalled <= pids_before, health["workers"]
    body = server.wait_ready()
    pids_after = {w["pid"] for w in body["workers"] if w["state"] == "READY"}
    assert len(pids_after) == 2 and pids_before - stalled <= pids_after and not stalled & pids_after
    assert server.get("/healthz").status_code == 200
    measured("stall start to /readyz 200 with a new worker", time.monotonic() - started)


def test_ordinary_errors_change_nothing_but_fatal_ones_and_failure_streaks_replace_the_worker(start_server):
    server = start_server(WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:faulty", MAX_CONSECUTIVE_FAILURES="3")
    (worker,) = server.wait_ready()["workers"]

    # The pipeline fails on one request's input while the worker's canary passes: that request gets a 422.
    for _ in range(2):
        failed = server.post("/generate", json={"prompt": "ordinary", "num_inference_steps": 1})
        assert failed.status_code == 422
        assert failed.json()["error"]["code"] == "rejected_by_model"
        assert "Traceback" not in failed.text and "this prompt broke" not in failed.text
    assert server.post("/generate", json={"prompt": "fine", "num_inference_steps": 1}).status_code == 200
    assert server.post("/generate", json={"prompt": "ordinary", "num_inference_steps": 1}).status_code == 422
    status, body = server.readyz()
    assert status == 200 and body["workers"][0]["pid"] == worker["pid"], "ordinary errors changed the worker"
    assert body["workers"][0]["failed"] == 3

    # A fatal device error: this request gets a 500, the worker says UNHEALTHY, exits and is replaced.
    fatal = server.post("/generate", json={"prompt": "fatal", "num_inference_steps": 1})
    assert fatal.status_code == 500
    assert fatal.json()["error"]["code"] == "internal_error"
    body = server.wait_ready()
    replacement = body["workers"][0]["pid"]
    assert replacement != worker["pid"]
    assert "fatal device error: RuntimeError: CUDA error: an illegal memory access" in server.log_tail(400)

    # MAX_CONSECUTIVE_FAILURES failures of the worker itself (its canary fails too) make it UNHEALTHY.
    for _ in range(3):
        sick = server.post("/generate", json={"prompt": "sick", "num_inference_steps": 1})
        assert sick.status_code == 500
        assert sick.json()["error"]["code"] == "internal_error"
        assert sick.headers["X-Request-ID"] in sick.json()["error"]["message"]
    body = wait_for(
        lambda: (lambda b: b if b["workers"][0]["pid"] not in (replacement, 0) else None)(server.readyz()[1]),
        60,
        "the failing worker to be replaced",
    )
    after_sick = server.wait_ready()["workers"][0]["pid"]
    assert "3 generations failed in a row" in server.log_tail(400)

    # NaN pixels are never sent as a (black) picture: a 500 non_finite_output, counted like the worker's own
    # failures, so MAX_CONSECUTIVE_FAILURES of them make it UNHEALTHY.
    for _ in range(3):
        nan = server.post(
            "/generate", json={"prompt": "nan", "num_inference_steps": 1}, headers={"Accept": "image/png"}
        )
        assert nan.status_code == 500 and nan.headers["Content-Type"] == "application/json"
        assert nan.json()["error"]["code"] == "non_finite_output" and "NaN" in nan.json()["error"]["message"]
    wait_for(
        lambda: (lambda b: b if b["workers"][0]["pid"] not in (after_sick, 0) else None)(server.readyz()[1]),
        60,
        "the worker drawing NaN to be replaced",
    )
    server.wait_ready()
    assert "3 generations failed in a row; last: the model drew 1 of 1 image(s) with non-finite" in server.log_tail(400)


def test_a_slot_that_crashes_while_loading_backs_off_and_then_fails_liveness(start_server):
    server = start_server(
        WEB_CONCURRENCY="1",
        MODEL_LOADER="tests.crash_loader:crash",
        RESPAWN_BACKOFF_INITIAL="0.5",
        RESPAWN_BACKOFF_MAX="4",
        CRASH_LOOP_LIMIT="3",
    )
    backoffs_seen: set[str] = set()

    def crash_loop_reported():
        server.check_running()
        for row in server.workers():
            # A worker waiting out its backoff shows it on the board: STARTING, a retry time, the reason.
            if row["state"] == "STARTING" and row.get("next_retry_in_s") and "respawn backoff" in row.get("error", ""):
                backoffs_seen.add(row["error"].split(" after ")[0])
        health = server.get("/healthz")
        return health.json() if health.status_code == 503 else None  # a 503 Response is falsy

    started = time.monotonic()
    health = wait_for(crash_loop_reported, 120, "/healthz to report the crash loop", interval=0.02)
    elapsed = time.monotonic() - started
    assert "crash loop" in health["reason"]
    assert health["workers"][0]["crashes"] >= 3
    # The first load starts at once; the second waits 0.5 s and the third 1 s before loading (and dying).
    assert {"respawn backoff 0.5 s", "respawn backoff 1 s"} <= backoffs_seen, backoffs_seen
    boots = server.log_tail(2000).count("Booting worker with pid")
    assert boots <= 4, f"{boots} workers spawned before the crash loop was reported: no backoff"
    assert server.get("/readyz").status_code == 503
    server.check_running()
    measured("start to crash loop on /healthz (3 crashes, backoff 0.5 s then 1 s)", elapsed)


def test_sigterm_drains_readyz_at_once_finishes_work_in_flight_and_removes_the_board(start_server, tmp_path):
    server = start_server(GRACEFUL_TIMEOUT="120", MASTER_PREIMPORT="0")  # longer than LONG_JOB, which must finish
    server.wait_ready()
    request = Background(server, LONG_JOB)
    wait_for(lambda: in_flight(server), 60, "the long generation to start")
    boards = list(Path(tmp_path).glob("honest-diffusion-*"))
    assert len(boards) == 1

    terminated = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    def probe():
        sent = time.monotonic()
        try:
            return sent, requests.get(server.url + "/readyz", timeout=1).status_code
        except (requests.ConnectionError, requests.Timeout):
            # Draining workers stop accepting while their listening socket stays open, so a new
            # connection is refused or waits unanswered: to a probe, both mean "not ready".
            return sent, "no answer"

    sent, first = wait_for(lambda: (lambda p: p if p[1] != 200 else None)(probe()), 3, "/readyz to stop saying 200")
    assert first in (503, "no answer")
    measured(f"SIGTERM to sending the first /readyz that gets no 200 ({first})", sent - terminated)
    later = [probe()[1] for _ in range(5)]
    assert 200 not in later, later

    result = request.wait(60)
    assert isinstance(result, requests.Response) and result.status_code == 200, result
    assert server.proc.wait(timeout=60) == 0
    assert not boards[0].exists(), "the board must be removed at exit"
    for pid in server.seen_pids:
        assert process_state(pid) == ""


def test_sighup_reload_is_503_while_the_new_workers_load_then_200(start_server):
    server = start_server()
    old = {w["pid"] for w in server.wait_ready()["workers"]}
    server.proc.send_signal(signal.SIGHUP)
    statuses = []

    def reloaded():
        status, body = server.readyz()
        statuses.append(status)
        pids = {w["pid"] for w in body["workers"] if w["state"] == "READY"}
        return body if status == 200 and pids and not pids & old else None

    body = wait_for(reloaded, 240, "the new generation of workers to be READY")
    assert 503 in statuses, "readiness never dipped while the new workers loaded"
    assert len([w for w in body["workers"] if w["state"] == "READY"]) == 2
    assert all(w["state"] in ("READY", "DEAD") for w in body["workers"])
