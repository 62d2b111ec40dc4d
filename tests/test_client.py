"""The retrying client: against a tiny scripted HTTP server (to count tries), and against a real server
that is still loading."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, wait_for
from tests.test_generate import png_size
from webapp.tools.client import Client, GenerationError

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


class Scripted:
    """A loopback HTTP server answering /generate with a fixed script of (status, headers) replies."""

    def __init__(self, script):
        self.script = list(script)
        self.tries: list[float] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.tries.append(time.monotonic())
                status, headers = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                body = json.dumps({"error": {"code": "x", "message": f"scripted {status}", "field": None}}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(Scripted(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_a_4xx_is_never_retried(scripted):
    server = scripted([(422, {})])
    with pytest.raises(GenerationError) as caught:
        Client(server.url, deadline=30, backoff_initial=0.01).generate({"prompt": "x"})
    assert caught.value.response.status_code == 422
    assert len(server.tries) == 1


def test_a_500_is_not_retried(scripted):
    server = scripted([(500, {})])
    with pytest.raises(GenerationError):
        Client(server.url, deadline=30, backoff_initial=0.01).generate({"prompt": "x"})
    assert len(server.tries) == 1


def test_503_502_504_are_retried_until_success(scripted):
    server = scripted([(503, {"Retry-After": "0"}), (502, {}), (504, {}), (200, {})])
    response = Client(server.url, deadline=30, backoff_initial=0.01, backoff_max=0.05).generate({"prompt": "x"})
    assert response.status_code == 200
    assert len(server.tries) == 4


def test_retry_after_is_honoured(scripted):
    server = scripted([(503, {"Retry-After": "1"}), (200, {})])
    Client(server.url, deadline=30, backoff_initial=0.01, backoff_max=0.05).generate({"prompt": "x"})
    assert server.tries[1] - server.tries[0] >= 1.0


def test_the_overall_deadline_ends_the_retries(scripted):
    server = scripted([(503, {"Retry-After": "0"})])
    started = time.monotonic()
    with pytest.raises(GenerationError, match="gave up within 1 s: HTTP 503") as caught:
        Client(server.url, deadline=1, backoff_initial=0.05, backoff_max=0.2).generate({"prompt": "x"})
    assert caught.value.response.status_code == 503
    assert time.monotonic() - started < 10
    assert len(server.tries) >= 2


def test_connection_errors_are_retried_within_the_deadline():
    client = Client("http://127.0.0.1:9", deadline=1, backoff_initial=0.05, backoff_max=0.2)
    with pytest.raises(GenerationError, match="gave up"):
        client.generate({"prompt": "x"})


def test_the_command_line_waits_for_a_loading_server_and_writes_the_image(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:gated", GATE_FILE=str(gate))
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "webapp.tools.client", "a harbour", "-o", str(out), "--url", server.url]
    client = subprocess.Popen([*command, "--width", "96", "--steps", "2", "--deadline", "240"], cwd=ROOT)
    try:
        # Let the client be refused at least once while the model loads, then let the load finish.
        def refused_once():
            server.check_running()
            return "method=POST path=/generate status=503" in server.log_tail(400)

        wait_for(refused_once, 120, "the client's first try to be refused with 503")
        gate.touch()
        assert client.wait(timeout=240) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
    assert png_size(out.read_bytes()) == (96, 64)
