"""The OpenAI-compatible API driven by the official ``openai`` package, against a real gunicorn server."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import threading

import openai
import pytest
import requests
from flask import Flask
from PIL import Image

from tests.conftest import API_KEY, ROOT, wait_for
from webapp import errors

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


def client(server, key: str | None = API_KEY, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", **options)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_images_generate_with_n_and_extra_body(keyed_server):
    result = client(keyed_server).images.generate(
        prompt="a lighthouse at dusk",
        n=2,
        size="96x64",
        extra_body={"seed": 7, "num_inference_steps": 2, "guidance_scale": 5.0, "negative_prompt": "fog"},
    )
    assert len(result.data) == 2
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]
    assert result.size == "96x64" and result.output_format == "png"
    for item in result.data:
        image = decoded(item.b64_json)
        assert (image.format, image.size) == ("PNG", (96, 64))
    assert result.created > 0


def test_the_same_seed_gives_the_same_image_as_generate(keyed_server):
    request = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 99}
    via_openai = client(keyed_server).images.generate(prompt=request["prompt"], extra_body={**request})
    native = keyed_server.post("/generate", json=request, headers={"Authorization": f"Bearer {API_KEY}"})
    assert base64.b64decode(via_openai.data[0].b64_json) == base64.b64decode(native.json()["images"][0]["png_base64"])


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_compression(keyed_server, output_format, pil_format):
    sizes = []
    for quality in (100, 10):
        result = client(keyed_server).images.generate(
            prompt="a field of flowers",
            size="auto",
            output_format=output_format,
            output_compression=quality,
            extra_body={"seed": 3, "num_inference_steps": 2},
        )
        image = decoded(result.data[0].b64_json)
        assert (image.format, image.size) == (pil_format, (64, 64))
        sizes.append(len(result.data[0].b64_json))
    assert sizes[1] < sizes[0], "lower output_compression must give a smaller file"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "65x64"}, "size"),
        ({"size": "2048x2048"}, "size"),
        ({"size": "1024x1024"}, "size"),  # OpenAI's usual size: past the tiny model's MAX_IMAGE_SIZE of 256
        ({"size": "large"}, "size"),
        ({"n": 50}, "n"),
        ({"quality": "hd"}, "quality"),
        ({"style": "vivid"}, "style"),
        ({"response_format": "bytes"}, "response_format"),
        ({"response_format": "url", "stream": True}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),  # with png, which is lossless
        ({"partial_images": 2}, "partial_images"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"extra_body": {"sampler": "euler"}}, "sampler"),
    ],
)
def test_a_bad_param_raises_bad_request_naming_it(keyed_server, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client(keyed_server, max_retries=0).images.generate(prompt="a boat", **fields)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert param in caught.value.message


def test_response_format_url_answers_urls_to_the_stored_images_for_the_same_key(keyed_server):
    """The images are kept as a finished job (docs/architecture.md §17): the URL serves the same picture as
    b64_json for the same seed, to the key that asked and nobody else."""
    by_url = client(keyed_server).images.generate(
        prompt="a red circle", response_format="url", extra_body={"seed": 5, "num_inference_steps": 2}
    )
    inline = client(keyed_server).images.generate(
        prompt="a red circle", extra_body={"seed": 5, "num_inference_steps": 2}
    )
    url = by_url.data[0].url
    assert url.startswith(keyed_server.url + "/v1/jobs/job_") and by_url.data[0].b64_json is None
    fetched = requests.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert decoded(base64.b64encode(fetched.content).decode()).tobytes() == decoded(inline.data[0].b64_json).tobytes()
    assert requests.get(url, headers={"X-API-Key": "second-key"}, timeout=10).status_code == 404
    job = requests.get(url.rsplit("/images/", 1)[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert job.json()["status"] == "succeeded" and job.json()["request"]["prompt"] == "a red circle"


def test_prefer_respond_async_makes_an_openai_request_a_job(keyed_server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Prefer": "respond-async"}
    body = {"prompt": "a red circle", "n": 2, "seed": 9, "num_inference_steps": 2}
    answer = requests.post(keyed_server.url + "/v1/images/generations", json=body, headers=headers, timeout=30)
    assert answer.status_code == 202 and answer.headers["Location"].startswith("/v1/jobs/job_"), answer.text
    job = wait_for(
        lambda: (lambda j: j if j["status"] == "succeeded" else None)(
            requests.get(keyed_server.url + answer.headers["Location"], headers=headers, timeout=10).json()
        ),
        60,
        "the job to finish",
    )
    assert [image["seed"] for image in job["output"]["images"]] == [9, 10]
    refused = requests.post(
        keyed_server.url + "/v1/images/generations", json={**body, "stream": True}, headers=headers, timeout=30
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"


def test_a_bad_timeout_header_is_a_bad_request_naming_it(keyed_server):
    """Under /v1/ a bad X-Request-Timeout is OpenAI's 400, as docs/api.md says (it was a 422 before)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client(keyed_server, max_retries=0).images.generate(
            prompt="a boat", extra_headers={"X-Request-Timeout": "soon"}
        )
    assert caught.value.status_code == 400 and caught.value.param == "X-Request-Timeout"


def test_another_model_is_not_found(keyed_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(keyed_server).images.generate(prompt="a boat", model="dall-e-3")
    assert caught.value.code == errors.MODEL_NOT_FOUND
    assert caught.value.param == "model"


def test_models_list_names_the_served_model_and_generate_takes_it(keyed_server):
    models = client(keyed_server).models.list()
    # The served model, then the embedded model's LoRA adapter (LORA_DIR defaults to its folder).
    assert [model.id for model in models.data] == ["builtin:scenes-64", "night"]
    assert models.data[1].model_extra["parent"] == "builtin:scenes-64"
    assert models.data[0].object == "model" and models.data[0].created > 0
    assert client(keyed_server).models.retrieve("builtin:scenes-64").id == "builtin:scenes-64"
    result = client(keyed_server).images.generate(
        prompt="a boat", model=models.data[0].id, extra_body={"num_inference_steps": 1}
    )
    assert len(result.data) == 1


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_a_wrong_or_missing_key_raises_authentication_error(keyed_server, key):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(keyed_server, key=key).images.generate(prompt="a boat")
    assert caught.value.status_code == 401
    assert caught.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, key=key).models.list()


def test_streaming_yields_one_completed_event_per_image(keyed_server):
    events = list(
        client(keyed_server).images.generate(
            prompt="two boats", n=2, stream=True, extra_body={"seed": 5, "num_inference_steps": 3}
        )
    )
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [event.model_extra["seed"] for event in events] == [5, 6]
    assert {decoded(event.b64_json).size for event in events} == {(64, 64)}


def test_a_stream_refused_before_it_starts_raises_like_any_call(keyed_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client(keyed_server).images.generate(prompt="a boat", size="1x1", stream=True)
    assert caught.value.param == "size"


def test_the_sdk_rides_out_a_loading_server_through_retry_after(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(
        WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:gated", GATE_FILE=str(gate), API_KEYS=API_KEY
    )
    wait_for(lambda: server.get("/healthz").status_code == 200, 120, "the port to answer")
    raw = server.post("/v1/images/generations", json={"prompt": "a boat"}, headers={"X-API-Key": API_KEY})
    assert raw.status_code == 503 and raw.json()["error"]["code"] == errors.NOT_READY
    assert 0 < int(raw.headers["Retry-After"]) <= errors.OPENAI_MAX_RETRY_AFTER_S
    # The SDK's own retries (each waits Retry-After) carry the call over the load: the gate opens only
    # once the SDK too has been refused (a second 503 in the access log).

    def refusals() -> int:
        return sum("path=/v1/images/generations status=503" in line for line in server.log_lines())

    def open_gate_after_a_refusal() -> None:
        wait_for(lambda: refusals() >= 2, 60, "a 503 to the SDK")
        gate.touch()

    opener = threading.Thread(target=open_gate_after_a_refusal)
    opener.start()
    result = client(server, max_retries=30, timeout=60).images.generate(
        prompt="a boat", extra_body={"num_inference_steps": 1}
    )
    opener.join()
    assert len(result.data) == 1
    assert refusals() >= 2, "the SDK was refused while loading and retried"


def test_retry_after_under_v1_is_capped_where_the_sdk_still_honours_it():
    app = Flask(__name__)
    with app.test_request_context("/v1/images/generations"):
        response = errors.error_response(errors.OVERLOADED, "full", headers={"Retry-After": "900"})
        assert response.headers["Retry-After"] == str(errors.OPENAI_MAX_RETRY_AFTER_S)
        assert response.get_json()["error"]["type"] == "server_error"
    with app.test_request_context("/generate"):
        response = errors.error_response(errors.OVERLOADED, "full", headers={"Retry-After": "900"})
        assert response.headers["Retry-After"] == "900"
        assert response.get_json()["error"]["code"] == errors.OVERLOADED


def test_probes_and_metrics_need_no_key(keyed_server):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert keyed_server.get(path).status_code == 200, path


def docs_example(number: int, server) -> str:
    """The docs' OpenAI example ``number`` (0: generations, 1: edits), pointed at ``server``."""
    example = re.findall(r"```python\n(.+?)\n```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)[number]
    return example.replace("http://localhost:8080", server.url).replace('"your-key"', repr(API_KEY))


def test_the_edit_example_runs_as_written(keyed_server, tmp_path):
    from tests.test_edits import RED_CIRCLE, background_mask
    from webapp.model import scenes

    RED_CIRCLE.save(tmp_path / "circle.png")
    (tmp_path / "background.png").write_bytes(background_mask(alpha=True))
    code = docs_example(1, keyed_server)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "edited.png") as image:
        verdict = scenes.analyze(image)
    assert (verdict.background, verdict.colour) == ("green", "red")


def test_the_readme_example_runs_as_written(keyed_server, tmp_path):
    code = docs_example(0, keyed_server)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "lighthouse.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (64, 64))  # auto: the tiny model's native size
