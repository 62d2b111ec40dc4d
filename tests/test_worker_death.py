"""A worker killed at runtime: /readyz turns 503 on the very next probe, and 200 once it is replaced."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import process_state, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


def test_sigkill_of_a_worker_flips_readyz_at_once_and_back_after_the_replacement_loads(start_server):
    server = start_server()
    body = server.wait_ready()
    victim = body["workers"][0]
    survivor = body["workers"][1]

    os.kill(victim["pid"], signal.SIGKILL)
    # Wait only for the kernel to finish killing it (zombie or reaped), not for gunicorn to notice.
    wait_for(lambda: process_state(victim["pid"]) in ("", "Z"), 10, "the kernel to kill the worker", 0.001)

    status, body = server.readyz()
    assert status == 503, body
    assert body["status"] == "not_ready"
    assert server.get("/healthz").status_code == 200, "a dead worker is replaced, not a reason to restart"

    body = server.wait_ready()
    rows = {w["slot"]: w for w in body["workers"]}
    assert rows[victim["slot"]]["pid"] != victim["pid"]
    assert rows[victim["slot"]]["state"] == "READY"
    assert rows[survivor["slot"]]["pid"] == survivor["pid"]
