"""Slow and idle clients against a real two-worker server: they cannot take the threads the probes need
(webapp/server/gthread.py), they are cut off at CLIENT_TIMEOUT, and well-behaved clients see no difference."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import Server, running_server, wait_for
from webapp.settings import Settings

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

CLIENT_TIMEOUT = 4
HEAD = b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("slow-clients")
    with running_server(model_cache, workdir, CLIENT_TIMEOUT=str(CLIENT_TIMEOUT), THREADS="16") as server:
        yield server


def connect(server: Server, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    if first:
        sock.sendall(first)
    return sock


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def held_connections(server: Server, each: int) -> list[socket.socket]:
    """``each`` connections of every slow kind: half their headers, a body short of its Content-Length,
    and nothing at all. 40 of one kind took every thread of both workers before webapp/server/gthread.py."""
    body = json.dumps({"prompt": "slow"}).encode()
    kinds = [
        HEAD[:30],
        HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5],
        b"",
    ]
    return [connect(server, first) for first in kinds for _ in range(each)]


def test_probes_answer_at_once_while_slow_and_idle_clients_hold_connections(server):
    held = held_connections(server, 40)
    try:
        # The kernel queues connections in order, so every held one reaches a worker before these probes.
        for _ in range(20):
            for path in ("/healthz", "/readyz"):
                assert server.get(path, timeout=2).status_code == 200
        ok = server.post("/generate", json={"prompt": "between the slow ones", "num_inference_steps": 1}, timeout=30)
        assert ok.status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_a_request_that_does_not_arrive_in_time_gets_a_408_and_an_idle_one_is_closed(server):
    partial_head = connect(server, HEAD[:30])
    short_body = connect(server, HEAD + b"Content-Length: 100\r\n\r\n{")
    idle = connect(server)
    started = time.monotonic()
    for sock in (partial_head, short_body):
        data = answer(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data
        assert json.loads(body)["error"]["code"] == "request_timeout"
    assert answer(idle) == b""
    waited = time.monotonic() - started
    assert waited >= CLIENT_TIMEOUT - 1, "closed before CLIENT_TIMEOUT"
    for sock in (partial_head, short_body, idle):
        sock.close()
    assert server.metrics().value("honest_diffusion_client_timeouts_total") >= 2


def test_a_408_under_v1_is_in_openais_error_shape(server):
    sock = connect(server, b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Length: 50\r\n\r\n{")
    head, _, body = answer(sock).partition(b"\r\n\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    error = json.loads(body)["error"]
    assert (error["code"], error["type"], error["param"]) == ("request_timeout", "invalid_request_error", None)


def test_a_request_sent_a_byte_at_a_time_is_answered(server):
    sock = connect(server)
    for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n":
        sock.sendall(bytes([byte]))
    data = answer(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 200"), data


def test_pipelined_and_kept_alive_requests_are_each_answered(server):
    probe = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    sock = connect(server, probe + probe + b"GET /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    data = answer(sock)
    sock.close()
    assert data.count(b"HTTP/1.1 200") == 3, data


def test_expect_100_continue_is_answered_before_the_body_is_sent(server):
    body = json.dumps({"prompt": "continue", "num_inference_steps": 1}).encode()
    head = HEAD + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
    sock = connect(server, head)
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(body)
    data = answer(sock)
    sock.close()
    assert b"HTTP/1.1 200" in data, data


def test_a_body_declared_too_large_is_refused_at_once_and_never_drained(server):
    sock = connect(server, HEAD + b"Content-Length: 100000000\r\n\r\n{")
    data = answer(sock)  # the server closes after its answer: it does not wait for 100 MB
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_each_route_buffers_at_most_its_own_limit(server):
    """A body over MAX_BODY_BYTES is refused from its header on a route that takes no images, so no
    connection holds more than that in the event loop; a route that takes images waits for its whole body."""
    settings = Settings.from_env({})
    size = settings.max_body_bytes + 1000
    head = f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    sock = connect(server, HEAD.replace(b"/generate", b"/v1/images/generations") + head)
    data = answer(sock)  # answered although none of the body was sent
    sock.close()
    assert data.startswith(b"HTTP/1.1 413"), data
    body = b'{"prompt": "' + b"x" * (size - 14) + b'"}'
    sock = connect(server, HEAD + head + body)
    data = answer(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 422") and b"prompt: must be at most" in data, data[:300]


def test_headers_that_cannot_be_parsed_get_the_json_error_shape(server):
    sock = connect(server, b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    data = answer(sock)
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_a_stopping_worker_sends_a_half_arrived_request_elsewhere_instead_of_waiting_for_it(start_server):
    server = start_server(WEB_CONCURRENCY="1", CLIENT_TIMEOUT="120", GRACEFUL_TIMEOUT="60")
    server.wait_ready()
    sock = connect(server, HEAD[:30])
    assert server.get("/healthz").status_code == 200  # the worker has taken the half request by now
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    data = answer(sock)
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, data
    assert json.loads(body)["error"]["code"] == "not_ready"
    server.proc.wait(timeout=60)
    # Neither CLIENT_TIMEOUT (120 s) nor GRACEFUL_TIMEOUT (60 s) was waited out for it.
    assert time.monotonic() - stopped < 30


def test_a_client_that_never_reads_its_answers_frees_the_thread_after_client_timeout(server):
    """Thousands of pipelined probes whose answers (megabytes) the client never reads: once the kernel's
    buffers are full the thread's send blocks, and CLIENT_TIMEOUT ends it instead of never."""
    errors_before = sum("Socket error processing request" in line for line in server.log_lines())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect, so the window stays small
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    pending = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n" * 20_000
    try:
        with contextlib.suppress(BlockingIOError):
            while pending:
                pending = pending[sock.send(pending) :]

        def gave_up():
            lines = [line for line in server.log_lines() if "Socket error processing request" in line]
            return lines[errors_before:]

        (line, *_) = wait_for(gave_up, 120, "the blocked thread's send to time out")
        assert "Resource temporarily unavailable" in line  # EAGAIN: SO_SNDTIMEO, not a closed socket
        assert server.get("/healthz", timeout=2).status_code == 200
    finally:
        sock.close()


def test_kept_alive_and_chunked_requests_pass_through_whole(server):
    with requests.Session() as session:  # one connection, kept alive between requests
        for _ in range(3):
            assert session.get(server.url + "/healthz", timeout=10).status_code == 200

    def chunks():
        yield b'{"prompt": "sent in '
        yield b'pieces", "num_inference_steps": 1}'

    response = requests.post(
        server.url + "/generate", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1
