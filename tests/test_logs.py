"""LOG_FORMAT=json on a real server: every line is one JSON object, with request ids and worker fields."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Server, running_server, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


@pytest.fixture(scope="module")
def json_server(model_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("json-logs")
    overrides = dict(WEB_CONCURRENCY="1", LOG_FORMAT="json", LOG_PROBES="1", MODEL_LOADER="tests.loaders:faulty")
    with running_server(model_cache, workdir, **overrides) as server:
        yield server


def events(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log_lines()]


def test_every_line_is_one_json_object_with_the_common_fields(json_server):
    assert json_server.post("/generate", json={"prompt": "sick"}).status_code == 500  # a traceback too
    lines = wait_for(
        lambda: [e for e in events(json_server) if e["event"] == "generate_failed"], 10, "the failure's log line"
    )
    for event in events(json_server):  # json.loads of each line would raise on anything else
        assert {"ts", "level", "event", "logger", "pid"} <= event.keys(), event
    (failed,) = lines
    assert failed["level"] == "error" and failed["slot"] == 0
    assert "Traceback" in failed["exception"] and "the device failed this call" in failed["exception"]


def test_worker_lifecycle_lines_name_slot_pid_and_state(json_server):
    pid = json_server.workers()[0]["pid"]
    states = [e["state"] for e in events(json_server) if e["event"] == "state" and e["pid"] == pid]
    assert states[:3] == ["LOADING", "WARMING", "READY"]
    assert all(e["slot"] == 0 for e in events(json_server) if e["event"] == "state")
    assert {e["level"] for e in events(json_server) if e["event"] == "state"} == {"info"}  # error: FAILED/UNHEALTHY
    (started,) = [e for e in events(json_server) if e["event"] == "worker_started"]
    assert started["pid"] == pid and started["state"] == "STARTING"


def test_the_request_id_is_on_the_access_line_and_on_app_lines_logged_for_the_request(json_server):
    given = "order-7f3a"
    response = json_server.post("/generate", json={"prompt": "sick"}, headers={"X-Request-ID": given})
    assert response.status_code == 500 and response.headers["X-Request-ID"] == given

    def logged():
        mine = [e for e in events(json_server) if e.get("request_id") == given]
        return mine if {"request", "generate_error"} <= {e["event"] for e in mine} else None

    mine = wait_for(logged, 10, "the request's lines")
    (access,) = [e for e in mine if e["event"] == "request"]
    assert access["logger"] == "gunicorn.access"
    assert (access["method"], access["path"], access["status"]) == ("POST", "/generate", 500)
    assert access["duration_ms"] >= 0


def test_probes_are_logged_when_log_probes_is_set(json_server):
    json_server.get("/readyz", headers={"X-Request-ID": "probe-1"})
    line = wait_for(
        lambda: [e for e in events(json_server) if e.get("request_id") == "probe-1"], 10, "the probe's access line"
    )
    assert line[0]["path"] == "/readyz"


def test_every_probe_route_is_left_out_of_the_access_log_by_default(keyed_server):
    """The health routes mark their requests as probes (one owner: webapp.api.health); before, the access log
    kept its own list of paths, which missed /v2/models/<name>/ready, so KServe's model probe filled the log."""
    probes = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/builtin:scenes-64/ready"]
    for index, path in enumerate(probes):
        assert keyed_server.get(path, headers={"X-Request-ID": f"probe-{index}"}).status_code == 200, path
    keyed_server.get("/openapi.json", headers={"X-Request-ID": "not-a-probe"})
    wait_for(lambda: any("not-a-probe" in line for line in keyed_server.log_lines()) or None, 10, "its access line")
    logged = "\n".join(keyed_server.log_lines())
    assert not [path for index, path in enumerate(probes) if f"probe-{index}" in logged]
