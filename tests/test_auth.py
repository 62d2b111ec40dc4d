"""API keys: which routes need one, the two ways to send it, a rotated key file, and keys kept out of
the logs. Real gunicorn servers; the demo's key field is in tests/test_demo.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import requests

from tests.conftest import API_KEY, wait_for
from webapp.api import auth
from webapp.settings import Settings, SettingsError

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

GENERATE = {"prompt": "a boat", "num_inference_steps": 1}


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/generate", {"json": GENERATE}),
        ("post", "/generate/stream", {"json": GENERATE}),
        ("post", "/v1/images/generations", {"json": GENERATE}),
        ("get", "/v1/models", {}),
        ("post", "/demo", {"data": {"prompt": "a boat"}}),
    ],
)
def test_every_route_that_generates_needs_a_key(keyed_server, method, path, kwargs):
    response = getattr(requests, method)(keyed_server.url + path, timeout=30, **kwargs)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if path == "/demo":
        assert response.headers["Content-Type"].startswith("text/html")
        assert "this route needs an API key" in response.text
    elif path.startswith("/v1/"):
        assert response.json()["error"]["type"] == "authentication_error"
    else:
        assert response.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}, {"Authorization": "bearer second-key"}],
)
def test_a_key_goes_in_authorization_bearer_or_x_api_key(keyed_server, headers):
    response = keyed_server.post("/generate", json=GENERATE, headers=headers)
    assert response.status_code == 200, response.text


def test_a_wrong_key_is_refused_before_the_body_is_judged(keyed_server):
    response = keyed_server.post("/generate", data=b"not json", headers={"X-API-Key": "nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_no_javascript_form_takes_the_key_as_a_field(keyed_server):
    response = requests.post(keyed_server.url + "/demo", data={**GENERATE, "api_key": API_KEY}, timeout=60)
    assert response.status_code == 200
    assert "data:image/png;base64," in response.text
    assert API_KEY not in response.text, "the page must not echo the key back"


def test_probes_stay_open_and_true_after_a_burst_of_refusals(keyed_server):
    for _ in range(20):
        assert keyed_server.post("/generate", json=GENERATE, headers={"X-API-Key": "guess"}).status_code == 401
    assert keyed_server.get("/healthz").status_code == 200
    assert keyed_server.get("/readyz").status_code == 200
    assert keyed_server.get("/metrics").status_code == 200


def test_keys_never_reach_the_log_and_their_fingerprints_do(keyed_server):
    """A fingerprint is a keyed hash with the server's own secret: the operator finds which key it is by its
    position in api_keys_set; someone holding the logs cannot test a guess against it (before this change it
    was sha256(key)[:8], which anyone could compute)."""
    keyed_server.post("/generate", json=GENERATE, headers={"X-API-Key": API_KEY})
    keyed_server.post("/generate", json=GENERATE, headers={"X-API-Key": "a-wrong-guess"})
    log = "\n".join(keyed_server.log_lines())
    assert API_KEY not in log and "second-key" not in log and "a-wrong-guess" not in log
    announced = next(line for line in log.splitlines() if "event=api_keys_set" in line)
    first = announced.split("fingerprints=")[1].strip("[]'\" ").split("'")[0]
    assert len(first) == 12 and f"key={first}" in log
    refused = next(line for line in log.splitlines() if "reason='unknown key'" in line or "unknown key" in line)
    for guess in (API_KEY, "a-wrong-guess"):
        unsalted = hashlib.sha256(guess.encode()).hexdigest()
        assert unsalted[:8] not in log and unsalted[:12] not in log
        assert auth.fingerprint(guess) not in log  # this process's secret is not the server's
    assert "key=" in refused


def test_brief_probes_show_the_verdict_alone_and_a_key_sees_every_row(start_server):
    """PROBE_DETAIL=brief: an open probe gets the verdict and a reason with no pid, device, model or error
    text; a request with a valid key, and the operator's command given one, still get every row."""
    server = start_server(WEB_CONCURRENCY="1", API_KEYS=API_KEY, PROBE_DETAIL="brief")
    wait_for(lambda: server.get("/healthz").status_code == 200 or None, 120, "/healthz 200")
    wait_for(lambda: requests.get(server.url + "/readyz", timeout=5).status_code == 200 or None, 120, "ready")
    for path in ("/readyz", "/healthz"):
        open_body = requests.get(server.url + path, timeout=5).json()
        assert "workers" not in open_body and open_body["detail"] == "brief", open_body
        told = {"job_store"} if path == "/readyz" else set()  # the store's state beside the verdict: no detail
        assert set(open_body) == {"status", "reason", "policy", "required_ready", "detail"} | told
        keyed = requests.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json()
        pid = keyed["workers"][0]["pid"]
        assert pid and str(pid) not in json.dumps(open_body)
        wrong = requests.get(server.url + path, headers={"X-API-Key": "guess"}, timeout=5).json()
        assert "workers" not in wrong
    command = [sys.executable, "-m", "webapp.tools.cli", "status", "--url", server.url]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "API_KEYS": ""})
    assert shown.returncode == 0 and "PROBE_DETAIL=brief" in shown.stdout, shown.stdout + shown.stderr
    keyed = {**os.environ, "HONEST_DIFFUSION_API_KEY": API_KEY}
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, env=keyed)
    assert shown.returncode == 0 and str(pid) in shown.stdout, shown.stdout + shown.stderr


def test_a_rotated_key_file_takes_effect_without_a_restart(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# mounted secret\nold-key\n\n")
    server = start_server(WEB_CONCURRENCY="1", API_KEYS_FILE=str(keys))
    server.wait_ready()
    pid = server.workers()[0]["pid"]
    assert server.post("/generate", json=GENERATE, headers={"X-API-Key": "old-key"}).status_code == 200
    keys.write_text("new-key-with-another-length\n")
    wait_for(
        lambda: server.post("/generate", json=GENERATE, headers={"X-API-Key": "old-key"}).status_code == 401,
        30,
        "the old key to be refused",
    )
    assert (
        server.post("/generate", json=GENERATE, headers={"X-API-Key": "new-key-with-another-length"}).status_code == 200
    )
    assert server.workers()[0]["pid"] == pid, "no restart was needed"


def test_an_unreadable_key_file_stops_the_server_from_starting(start_server, tmp_path):
    server = start_server(API_KEYS_FILE=str(tmp_path / "missing"))
    assert server.proc.wait(timeout=120) != 0
    assert "API_KEYS_FILE=" in server.log_tail() and "cannot read it" in server.log_tail()


def test_an_open_server_on_a_public_address_is_warned_about():
    assert auth.open_warning(Settings.from_env({"HOST": "0.0.0.0"})) is not None
    assert auth.open_warning(Settings.from_env({"HOST": "::"})) is not None
    assert auth.open_warning(Settings.from_env({"HOST": "127.0.0.1"})) is None
    assert auth.open_warning(Settings.from_env({"HOST": "0.0.0.0", "API_KEYS": "k"})) is None


def test_the_key_is_redacted_from_a_settings_error_and_repr():
    settings = Settings.from_env({"API_KEYS": "very-secret"})
    assert "very-secret" not in repr(settings)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"API_KEYS": "very-secret", "PORT": "0"})
    assert "very-secret" not in str(caught.value)
