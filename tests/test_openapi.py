"""/openapi.json: a valid OpenAPI 3.1 document of every route, with this server's limits, and
schemathesis (a property-based API tester nobody on this project wrote) checking a real server's
answers against it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from tests.conftest import API_KEY, running_server
from webapp.api.openapi import openapi_path
from webapp.app import create_app
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board
from webapp.runtime import Runtime
from webapp.settings import Settings

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# What "no answer contradicts the document" means here: no 5xx, every status, content type, header and
# body as documented, invalid data refused, and no protected route answering without its key. Left out:
# positive_data_acceptance, since a few rules are not JSON Schema (a size's sides within limits, a quality
# given with lossless png, a prompt of blanks) and are refused with a documented 400/422.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
]
LIMITS = {"MAX_IMAGES": "2", "MAX_STEPS": "3", "DEFAULT_STEPS": "2", "MAX_IMAGE_SIZE": "128", "MAX_PROMPT_CHARS": "300"}


@pytest.fixture(scope="module")
def small_server(model_cache, tmp_path_factory):
    """One worker with small limits (so every generation schemathesis asks for is quick) and a key."""
    with running_server(
        model_cache, tmp_path_factory.mktemp("openapi"), WEB_CONCURRENCY="1", API_KEYS=API_KEY, **LIMITS
    ) as server:
        yield server


@pytest.fixture(scope="module")
def document(small_server):
    response = small_server.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_of_the_app_is_in_the_document(document, tmp_path):
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    try:  # an app with a runtime whose engine never started: only its URL map is read
        app = create_app(Runtime(Settings.from_env({}), board, Lifecycle(board, 0), None))
    finally:
        board.remove()
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in document["paths"][openapi_path(rule.rule)], (method, rule.rule)


def test_limits_are_the_running_configuration(document):
    schemas = document["components"]["schemas"]
    generate, openai = schemas["GenerateRequest"]["properties"], schemas["CreateImageRequest"]["properties"]

    def maximum(prop):
        return next(option["maximum"] for option in prop["anyOf"] if "maximum" in option)

    assert maximum(generate["num_images"]) == maximum(openai["n"]) == 2
    assert maximum(generate["num_inference_steps"]) == maximum(openai["num_inference_steps"]) == 3
    assert maximum(generate["width"]) == 128
    assert generate["prompt"]["maxLength"] == 300
    assert schemas["GenerateRequest"]["additionalProperties"] is False


def test_routes_that_generate_say_they_need_a_key_and_probes_do_not(document):
    secured = {
        (path, method) for path, item in document["paths"].items() for method, op in item.items() if "security" in op
    }
    assert secured == {
        ("/generate", "post"),
        ("/generate/stream", "post"),
        ("/v1/images/generations", "post"),
        ("/v1/images/edits", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/demo", "post"),
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/jobs/{job_id}/events", "get"),
        ("/v1/jobs/{job_id}/images/{n}", "get"),
    }


def test_schemathesis_finds_no_answer_that_contradicts_the_document(small_server, tmp_path):
    pids = {worker["pid"] for worker in small_server.workers()}
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{small_server.url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "12",
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--exclude-path-regex",
        "^/static/",  # Flask's own file route: its answers are the files
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    print(result.stdout[-1500:])
    assert "generated" in result.stdout and " passed" in result.stdout
    assert small_server.get("/readyz").status_code == 200, "no client input may change a probe"
    assert {worker["pid"] for worker in small_server.workers()} == pids, "no client input may kill a worker"
