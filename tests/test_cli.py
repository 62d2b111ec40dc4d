"""``honest-diffusion``, the console script pyproject.toml declares, run as an operator would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import API_KEY, ROOT, free_port

SCRIPT = Path(sys.executable).parent / "honest-diffusion"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), "the console script is installed by `pip install -e .` (requirements-dev.txt)"
    environ = {key: value for key, value in os.environ.items() if key not in ("API_KEYS", "PORT")}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env={**environ, **(env or {})}, cwd=ROOT
    )


def test_status_of_a_ready_server_exits_0_with_a_row_per_worker(ready_server):
    result = cli("status", "--url", ready_server.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ready: ")
    assert lines[1].split()[:3] == ["SLOT", "STATE", "PID"]
    assert [line.split()[1] for line in lines[2:]] == ["READY", "READY"]
    as_json = json.loads(cli("status", "--url", ready_server.url, "--json").stdout)
    assert as_json["status"] == "ready" and len(as_json["workers"]) == 2


def test_status_of_a_loading_server_exits_1_and_wait_rides_it_out(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:gated", GATE_FILE=str(gate))
    result = cli("status", "--url", server.url, "--wait", "3")  # the port answers; the model cannot load yet
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("not_ready: ")
    assert result.stdout.splitlines()[2].split()[1] in ("STARTING", "LOADING")
    gate.touch()
    assert cli("status", "--url", server.url, "--wait", "120").returncode == 0


def test_status_of_nothing_listening_exits_2():
    result = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "unreachable" in result.stderr


def test_config_shows_each_value_and_its_source_with_keys_redacted():
    result = cli("config", "--json", env={"PORT": "9001", "API_KEYS": "do-not-print-me", "WEB_CONCURRENCY": "3"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["PORT"] == {"value": "9001", "source": "environment"}
    assert shown["THREADS"] == {"value": "16", "source": "default"}
    assert shown["API_KEYS"] == {"value": "(set, redacted)", "source": "environment"}
    assert shown["WEB_CONCURRENCY"]["value"] == "3"
    assert "do-not-print-me" not in result.stdout + result.stderr
    table = cli("config", env={"API_KEYS": "do-not-print-me"}).stdout
    assert "do-not-print-me" not in table and "(set, redacted)" in table
    # A job store's URL carries its password: shown with the password redacted, the rest as set.
    store = cli("config", "--json", env={"JOB_STORE": "redis://:do-not-print-me@redis.internal:6379/0"})
    assert json.loads(store.stdout)["JOB_STORE"]["value"] == "redis://:(redacted)@redis.internal:6379/0"
    assert "do-not-print-me" not in store.stdout + store.stderr


def test_config_refuses_a_bad_value_with_the_servers_own_message(start_server):
    result = cli("config", env={"MAX_QUEUED": "lots"})
    assert result.returncode == 1
    server = start_server(MAX_QUEUED="lots")
    assert server.proc.wait(timeout=120) != 0
    assert result.stderr.strip() in server.log_tail()
    assert result.stderr.startswith("configuration error: MAX_QUEUED='lots' is invalid")


def test_generate_writes_the_image_in_the_asked_format(keyed_server, tmp_path):
    output = tmp_path / "boat.jpeg"
    result = cli(
        "generate", "a boat", "--url", keyed_server.url, "--api-key", API_KEY, "--format", "jpeg", "--steps", "2",
        "-o", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert (image.format, image.size) == ("JPEG", (64, 64))
    refused = cli("generate", "a boat", "--url", keyed_server.url, "--api-key", "wrong", "-o", str(output))
    assert refused.returncode == 1 and "invalid_api_key" in refused.stderr


def test_generate_edits_a_file_given_by_its_path(keyed_server, tmp_path):
    from webapp.model import scenes

    source, output = tmp_path / "circle.png", tmp_path / "blue.png"
    scenes.render(scenes.Scene("circle", "red", "white")).save(source)
    result = cli(
        "generate", "a blue circle on a white background", "--url", keyed_server.url, "--api-key", API_KEY,
        "--image", str(source), "--strength", "0.5", "--seed", "1", "-o", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert scenes.analyze(image) == scenes.Verdict("white", "blue", "circle")
    missing = cli("generate", "x", "--url", keyed_server.url, "--image", str(tmp_path / "nowhere.png"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
