"""What careless and hostile clients send, against a real two-worker server on the real tiny pipeline: none
of it reaches a 500, fails another client's job, or changes what the probes say (issue 12)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Server, running_server, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory):
    """Two workers on the real pipeline; "ordinary" makes it fail for that request alone (tests.loaders).
    BATCH_WAIT_MS lets requests sent together share one pipeline call."""
    workdir = tmp_path_factory.mktemp("hostile")
    faulty = dict(MODEL_LOADER="tests.loaders:faulty", BATCH_WAIT_MS="400", MAX_CONSECUTIVE_FAILURES="3")
    with running_server(model_cache, workdir, **faulty) as server:
        yield server


def pids(server: Server) -> dict[int, int]:
    status, body = server.readyz()
    assert status == 200, body
    return {w["slot"]: w["pid"] for w in body["workers"]}


SMALL = {"num_inference_steps": 2, "seed": 5}


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_a_422_naming_the_field(server, field):
    body = {"prompt": "a fox", **SMALL, field: "a\ud800b"}  # requests sends it as the JSON escape \ud800
    response = server.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and "surrogate U+D800" in error["message"]


def test_twelve_bad_prompts_in_a_row_leave_both_workers_serving(server):
    before = pids(server)
    statuses = [server.post("/generate", json={"prompt": "a\udfffb", **SMALL}).status_code for _ in range(12)]
    assert statuses == [422] * 12
    # The pipeline itself failing on one request's input is charged to that request, never to the worker.
    rejected = [server.post("/generate", json={"prompt": "ordinary", **SMALL}) for _ in range(12)]
    assert {r.status_code for r in rejected} == {422}, [r.text for r in rejected]
    assert {r.json()["error"]["code"] for r in rejected} == {"rejected_by_model"}
    assert server.get("/healthz").status_code == 200
    assert pids(server) == before
    assert all(w["state"] == "READY" for w in server.workers())


def test_one_bad_job_sharing_a_batch_fails_alone(server):
    bodies = [{"prompt": f"valid {i}", **SMALL} for i in range(6)]
    bodies.insert(3, {"prompt": "ordinary", **SMALL})
    splits_before = sum("batch_failed_retrying_alone" in line for line in server.log_lines())
    # Which worker takes which connection is the kernel's choice: the bad job nearly always lands in a batch
    # with valid ones (BATCH_WAIT_MS gathers them), and the rounds repeat until one did.
    for _ in range(5):
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: server.post("/generate", json=body), bodies))
        statuses = [a.status_code for a in answers]
        assert statuses == [200, 200, 200, 422, 200, 200, 200], [a.text for a in answers]
        if sum("batch_failed_retrying_alone" in line for line in server.log_lines()) > splits_before:
            return  # the bad job did share a pipeline call with valid ones, and that call was split
    raise AssertionError("the bad job never shared a batch in 5 rounds")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "guidance_scale": 10**300}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": -(10**300)}, "guidance_scale"),
        ({"prompt": "x", "timeout_s": 10**300}, "timeout_s"),
        ({"prompt": "x", "timeout_s": "5"}, "timeout_s"),
        ({"prompt": "x", "timeout_s": [5]}, "timeout_s"),
        ({"prompt": "x", "timeout_s": 0}, "timeout_s"),
        ({"prompt": "x", "guidance_scale": 1e308 * 10}, "guidance_scale"),  # json.dumps writes Infinity: 400
    ],
)
def test_huge_numbers_and_wrong_types_are_4xx(server, body, field):
    response = server.post("/generate", data=json.dumps(body), headers={"Content-Type": "application/json"})
    error = response.json()["error"]
    if response.status_code == 400:
        assert error["code"] == "bad_json"
    else:
        assert response.status_code == 422, response.text
        assert error["field"] == field and error["message"].startswith(field)
        assert len(error["message"]) < 200  # a 300-digit number is not echoed whole


def test_json_nested_thousands_deep_is_a_400(server):
    depth = 20_000  # 40 kB: within MAX_BODY_BYTES
    data = b'{"prompt": "x", "seed": ' + b"[" * depth + b"]" * depth + b"}"
    response = server.post("/generate", data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_json"


def test_no_accept_header_means_any_type(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"prompt": "no accept", **SMALL})
    connection.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    assert response.status == 200, payload
    assert response.getheader("Content-Type") == "application/json"
    assert len(json.loads(payload)["images"]) == 1


def test_a_405_says_which_methods_are_allowed(server):
    response = server.get("/generate")
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert response.json()["error"]["code"] == "method_not_allowed"


def raw_request(server: Server, request_line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_path_cannot_forge_a_log_line(server):
    marker = f"forged{time.monotonic_ns()}"
    answer = raw_request(server, f"GET /nope%0d%0a%0d{marker}=1%1b[2J%e2%80%a8x".encode())
    assert answer.startswith(b"HTTP/1.1 404")
    raw = wait_for(
        lambda: (lambda data: data if marker.encode() in data else None)(server.log_path.read_bytes()),
        10,
        "the access line",
    )
    (line,) = [line for line in raw.split(b"\n") if marker.encode() in line]
    # WSGI hands the path over as latin-1, so the UTF-8 bytes of U+2028 arrive as C1 controls (\x80).
    assert not any(code in line for code in (b"\r", b"\x1b", b"\xc2\x80"))
    assert all(escaped in line for escaped in (b"\\x0d", b"\\x1b", b"\\x80"))


def test_a_disconnected_stream_stops_its_job(server):
    before = server.metrics().value("honest_diffusion_generation_duration_seconds_count", outcome="interrupted")
    body = {"prompt": "nobody will watch", "num_inference_steps": 100, "seed": 1}
    response = requests.post(server.url + "/generate/stream", json=body, stream=True, timeout=30)
    assert response.status_code == 200
    for line in response.iter_lines():
        if line.startswith(b"data:") and b'"step": 2,' in line:
            break
    response.close()  # the client goes away after two steps of a hundred

    def interrupted():
        value = server.metrics().value("honest_diffusion_generation_duration_seconds_count", outcome="interrupted")
        return value > before

    wait_for(interrupted, 60, "the abandoned stream's batch to be interrupted")
    assert any("stream_abandoned" in line for line in server.log_lines())


def test_the_stream_reports_every_step(server):
    body = {"prompt": "each step", "num_inference_steps": 7, "seed": 3}
    response = requests.post(server.url + "/generate/stream", json=body, stream=True, timeout=60)
    events = []
    name = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
    assert events[0] == ("queued", {"total": 7})
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4, 5, 6, 7]
    assert events[-1][0] == "done"


def test_a_size_the_embedded_model_cannot_draw_in_time_is_refused_not_run(server):
    """512x512 was allowed (MAX_IMAGE_SIZE 1024): one step of two such images took 41 s on this machine,
    the next one passed STALL_TIMEOUT, and a client's request turned the worker UNHEALTHY. The tiny model's
    limit is now 256 (docs/architecture.md §7)."""
    before = pids(server)
    body = {"prompt": "a boat", "width": 512, "height": 512, "num_images": 2}
    response = server.post("/generate", json=body, timeout=120)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "width" and "from 64 to 256" in response.json()["error"]["message"]
    assert server.get("/readyz").status_code == 200
    assert pids(server) == before
