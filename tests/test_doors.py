"""The doors edits opened, held shut (issue 33): upload bombs through both edit routes at once cannot move a
probe or the worker's memory, and every route of the app is refused past its own body limit with a 413.
Real gunicorn, real HTTP. The figures of the same burst are bench/uploads.py's."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import rss_mb, wait_for
from webapp.api import bodies
from webapp.app import create_app
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board
from webapp.runtime import Runtime
from webapp.settings import Settings

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

CLIENTS = 40
PIXELS = 4096 * 4096  # an operator's raised limit (the old default): each bomb decodes to 50 MB of pixels


def bomb() -> bytes:
    """About 58 kB of PNG that declares 4096x4095 pixels, just under PIXELS, and decodes to every one."""
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4095), (200, 30, 30)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def send(url: str, index: int, data: bytes) -> requests.Response:
    """One edit of the bomb: even clients through /generate (base64 in JSON), odd through /v1/images/edits."""
    if index % 2 == 0:
        body = {"prompt": "a blue circle", "image": base64.b64encode(data).decode(), "width": 64, "height": 64}
        return requests.post(url + "/generate", json={**body, "num_inference_steps": 2}, timeout=120)
    fields = {"prompt": "a blue circle", "size": "64x64", "num_inference_steps": "2"}
    return requests.post(
        url + "/v1/images/edits", data=fields, files={"image": ("b.png", data, "image/png")}, timeout=120
    )


def test_upload_bombs_through_both_routes_move_no_probe_and_hold_the_memory(start_server):
    """40 bombs at once, half through each edit route, with /readyz probed all along: before this change the
    uploads were decoded on the request threads before admission (40 at once), a probe went unanswered for
    5 s and the worker grew by 1.5 GB. Now: each is answered 200 or 503 with Retry-After (a shed one is
    refused from its header), no probe fails, and the worker stays within 300 MB of its idle size."""
    server = start_server(WEB_CONCURRENCY="1", MAX_UPLOAD_PIXELS=str(PIXELS))
    body = server.wait_ready()
    pid = body["workers"][0]["pid"]
    data = bomb()
    assert send(server.url, 0, data).status_code == 200  # one alone first: its allocations are not the burst's
    idle = rss_mb(pid)
    peak, failed, probes = [idle], [], []
    done = threading.Event()

    def probe() -> None:
        with requests.Session() as session:
            while not done.is_set():
                try:
                    status = session.get(server.url + "/readyz", timeout=5).status_code
                except requests.RequestException as exc:
                    status = repr(exc)
                probes.append(status)
                if status != 200:
                    failed.append(status)
                peak.append(rss_mb(pid))
                time.sleep(0.02)

    watcher = threading.Thread(target=probe)
    watcher.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda index: send(server.url, index, data), range(CLIENTS)))
    finally:
        done.set()
        watcher.join(30)
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 503}, [answer.text for answer in answers if answer.status_code not in (200, 503)]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all("Retry-After" in answer.headers for answer in answers if answer.status_code == 503)
    assert probes and not failed, failed
    assert max(peak) - idle < 300, f"idle {idle:.0f} MB, peak {max(peak):.0f} MB"
    assert server.workers()[0]["pid"] == pid


def declared_body(url: str, method: str, path: str, length: int) -> tuple[int, str]:
    """Send headers declaring a body of ``length`` bytes and none of it; the status and the body answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


def url_rules(settings: Settings, folder: Path) -> tuple[list[tuple[str, list[str]]], bodies.BodyLimits]:
    """Every rule of the real app (``create_app``) and the methods it takes, and its body limits, read from a
    worker's app built without an engine: the map is the same whatever the model."""
    board = Board.create(folder, capacity=1, expected_workers=1)
    try:
        flask_app = create_app(Runtime(settings, board, Lifecycle(board, 0), None))
        rules = [
            (rule.rule, sorted(rule.methods - {"HEAD", "OPTIONS"}))
            for rule in flask_app.url_map.iter_rules()
            if rule.endpoint != "static"
        ]
        return rules, bodies.of(flask_app)
    finally:
        board.remove()


def test_every_route_in_the_url_map_is_refused_past_its_own_limit(ready_server, tmp_path):
    """Each rule of the app, each method it takes, a body declared one byte over its route's limit
    (``webapp.api.bodies``): a 413 payload_too_large, read from the header alone. A route added later is
    in the map, so it cannot be left out. Before this change POST /demo took a 200 kB form whole and
    answered 422 (Flask's limit was the upload routes' 22 MB for every route)."""
    settings = Settings.from_env({})
    rules, limit = url_rules(settings, tmp_path)
    assert "/demo" in {rule for rule, _ in rules} and len(rules) > 10
    assert limit.upload_paths == {"/generate", "/generate/stream", "/v1/images/edits", "/v1/jobs"}
    for rule, methods in rules:
        path = rule.replace("<path:model>", "any").replace("<path:name>", "any")
        for method in methods:
            status, text = declared_body(ready_server.url, method, path, limit(path) + 1)
            assert status == 413 and "payload_too_large" in text, (method, path, status, text)
    form = requests.post(ready_server.url + "/demo", data={"prompt": "x" * 200_000}, timeout=30)
    assert form.status_code == 413, form.text[:300]
    wait_for(lambda: ready_server.get("/readyz").status_code == 200 or None, 10, "/readyz 200 after all that")


def test_every_error_the_app_answers_by_itself_carries_a_declared_code(tmp_path):
    """404, 405 and the 413 of the body limit, answered by the app rather than a route, each with a code
    declared in webapp.errors (before, not_found and method_not_allowed were made from werkzeug's names and
    appeared in no table)."""
    from webapp import errors

    declared = {code.code for code in errors.CODES}
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    try:
        client = create_app(Runtime(Settings.from_env({}), board, Lifecycle(board, 0), None)).test_client()
        answers = [
            client.get("/no-such-route"),
            client.get("/generate"),
            client.post("/healthz", data=b"x" * 70_000),
            client.post("/v1/no-such-route"),
        ]
    finally:
        board.remove()
    codes = [(answer.status_code, (answer.json["error"].get("code") if answer.json else None)) for answer in answers]
    assert codes == [
        (404, "not_found"),
        (405, "method_not_allowed"),
        (413, "payload_too_large"),
        (404, "not_found"),
    ], codes
    assert {code for _, code in codes} <= declared


PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/any/ready")


def test_every_error_on_every_route_carries_a_declared_code_at_its_declared_status(tmp_path):
    """Each rule and method of the real app, sent an empty body, a body of the wrong type, broken JSON and an
    object, in process: every error answer names a code declared in webapp.errors, with the status that code
    declares (a 422 as OpenAI's 400 under /v1/, ``errors.status_for``). No route may make up a code or a
    status of its own (before, /v1/ answered a bad X-Request-Timeout with 422)."""
    from webapp import errors

    declared = {str(code): code for code in errors.CODES}
    rules, _ = url_rules(Settings.from_env({}), tmp_path)
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    seen: set[tuple[str, int]] = set()
    try:
        client = create_app(Runtime(Settings.from_env({}), board, Lifecycle(board, 0), None)).test_client()
        bodies_ = [
            {},
            {"data": b"x", "content_type": "text/plain"},
            {"data": b"{", "content_type": "application/json"},
            {"json": {"prompt": "x"}, "headers": {"X-Request-Timeout": "soon"}},
            {"data": b"--x--", "content_type": "multipart/form-data"},
        ]
        for rule, methods in rules:
            path = rule.replace("<path:model>", "any").replace("<path:name>", "any")
            for method in [*methods, "PATCH"]:
                for body in bodies_:
                    answer = client.open(path, method=method, **body)
                    if answer.status_code < 400:
                        continue
                    if answer.mimetype == "text/html":  # the demo's page, its error shown in the form
                        assert path in ("/", "/demo"), (method, path, answer.status_code)
                        continue
                    if "error" not in answer.json:  # a probe's verdict (the server is not ready), not an error
                        assert path in PROBES, (method, path, answer.status_code, answer.json)
                        continue
                    code = declared.get(answer.json["error"]["code"])
                    assert code is not None, (method, path, answer.json)
                    own = answer.status_code if code.status is None else code.status
                    assert answer.status_code == errors.status_for(own, path), (method, path, answer.json)
                    seen.add((str(code), answer.status_code))
    finally:
        board.remove()
    assert {"method_not_allowed", "unsupported_media_type", "bad_json", "bad_multipart", "not_ready"} <= {
        code for code, _ in seen
    }, seen
