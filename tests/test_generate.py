"""/generate on a READY two-worker server: images, determinism, and every bad input we could think of."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from webapp.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def test_png_of_the_requested_size(ready_server):
    response = ready_server.post(
        "/generate",
        json={"prompt": "a lighthouse", "width": 96, "height": 64, "num_inference_steps": 2, "seed": 1},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Seed"] == "1"
    assert png_size(response.content) == (96, 64)


def test_the_same_seed_gives_the_same_bytes(ready_server):
    request = {"prompt": "a red fox", "num_inference_steps": 3, "seed": 1234}
    first, second = (
        ready_server.post("/generate", json=request, headers={"Accept": "image/png"}).content for _ in range(2)
    )
    other = ready_server.post("/generate", json={**request, "seed": 1235}, headers={"Accept": "image/png"}).content
    assert first == second
    assert first != other


def test_json_response_carries_one_png_per_seed_and_timings(ready_server):
    response = ready_server.post(
        "/generate", json={"prompt": "two boats", "num_images": 2, "seed": 10, "num_inference_steps": 2}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["seed"] for image in body["images"]] == [10, 11]
    sizes = {png_size(base64.b64decode(image["png_base64"])) for image in body["images"]}
    assert sizes == {(64, 64)}
    assert body["timings"]["generate_ms"] > 0
    assert body["timings"]["total_ms"] >= body["timings"]["generate_ms"]
    assert body["worker"]["slot"] in (0, 1)


BAD_JSON_BODIES = [
    # (body, expected status, expected code, expected field)
    ({}, 422, "missing_field", "prompt"),
    ({"prompt": ""}, 422, "invalid_field", "prompt"),
    ({"prompt": "   "}, 422, "invalid_field", "prompt"),
    ({"prompt": 42}, 422, "invalid_field", "prompt"),
    ({"prompt": "x" * 2001}, 422, "invalid_field", "prompt"),
    ({"prompt": "x", "negative_prompt": ["no"]}, 422, "invalid_field", "negative_prompt"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "invalid_field", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 101}, 422, "invalid_field", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, 422, "invalid_field", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": "3"}, 422, "invalid_field", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": True}, 422, "invalid_field", "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "invalid_field", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 31}, 422, "invalid_field", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "high"}, 422, "invalid_field", "guidance_scale"),
    ({"prompt": "x", "width": 100}, 422, "invalid_field", "width"),
    ({"prompt": "x", "width": 32}, 422, "invalid_field", "width"),
    ({"prompt": "x", "height": 100000}, 422, "invalid_field", "height"),
    ({"prompt": "x", "height": -64}, 422, "invalid_field", "height"),
    ({"prompt": "x", "seed": -1}, 422, "invalid_field", "seed"),
    ({"prompt": "x", "seed": 2**32}, 422, "invalid_field", "seed"),
    ({"prompt": "x", "seed": "lucky"}, 422, "invalid_field", "seed"),
    ({"prompt": "x", "num_images": 0}, 422, "invalid_field", "num_images"),
    ({"prompt": "x", "num_images": 5}, 422, "invalid_field", "num_images"),
    ({"prompt": "x", "steps": 3}, 422, "unknown_field", "steps"),
    (["prompt", "x"], 422, "invalid_body", None),
    ("a prompt", 422, "invalid_body", None),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_JSON_BODIES)
def test_bad_fields_get_a_4xx_naming_the_field(ready_server, body, status, code, field):
    response = ready_server.post("/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["field"] == field
    if field:
        assert error["message"].startswith(field)


def raw_post(server, data: bytes, content_type: str | None, **headers: str):
    if content_type:
        headers["Content-Type"] = content_type
    return server.post("/generate", data=data, headers=headers)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b'{"prompt": "x"', "application/json", 400, "bad_json"),
        (b"prompt=x", "application/json", 400, "bad_json"),
        (b'{"prompt": "x", "guidance_scale": NaN}', "application/json", 400, "bad_json"),
        (b'{"prompt": "x", "seed": Infinity}', "application/json", 400, "bad_json"),
        (b'{"prompt": "\xff\xfe"}', "application/json", 400, "bad_json"),
        (b"", "application/json", 400, "bad_json"),
        (b"null", "application/json", 422, "invalid_body"),
        (b'{"prompt": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"prompt": "x"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"prompt": "x"}', None, 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies_get_a_4xx(ready_server, data, content_type, status, code):
    response = raw_post(ready_server, data, content_type)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


# /generate takes an image and a mask in base64 on top of MAX_BODY_BYTES (Settings.max_upload_body_bytes).
BODY_LIMIT = Settings.from_env({}).max_upload_body_bytes


def test_a_body_over_the_route_limit_is_refused(ready_server):
    response = raw_post(ready_server, b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}', "application/json")
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"
    assert str(BODY_LIMIT) in response.json()["error"]["message"]


def test_an_oversized_chunked_body_is_refused(ready_server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 2**20 + 1):
            yield b"x" * 2**20
        yield b'"}'

    response = ready_server.post("/generate", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_png_for_several_images_is_not_acceptable(ready_server):
    response = ready_server.post("/generate", json={"prompt": "x", "num_images": 2}, headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert response.json()["error"]["field"] == "num_images"


def test_an_unsupported_accept_is_not_acceptable(ready_server):
    response = ready_server.post("/generate", json={"prompt": "x"}, headers={"Accept": "text/html"})
    assert response.status_code == 406


@pytest.mark.parametrize(
    ("media", "pil_format"), [("image/jpeg", "JPEG"), ("image/webp", "WEBP"), ("image/png", "PNG")]
)
def test_accept_picks_the_image_format(ready_server, media, pil_format):
    response = ready_server.post(
        "/generate", json={"prompt": "a fox", "num_inference_steps": 2, "seed": 4}, headers={"Accept": media}
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == media
    with Image.open(io.BytesIO(response.content)) as image:
        assert (image.format, image.size) == (pil_format, (64, 64))


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_format_in_json_and_its_quality(ready_server, output_format):
    sizes = []
    for quality in (100, 5):
        body = {"prompt": "a fox", "num_inference_steps": 2, "seed": 4, "output_format": output_format}
        response = ready_server.post("/generate", json={**body, "output_compression": quality})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["output_format"] == output_format
        data = base64.b64decode(answer["images"][0][f"{output_format}_base64"])
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == output_format.upper()
        sizes.append(len(data))
    assert sizes[1] < sizes[0]


def test_accept_and_output_format_that_disagree_are_not_acceptable(ready_server):
    response = ready_server.post(
        "/generate", json={"prompt": "x", "output_format": "png"}, headers={"Accept": "image/jpeg"}
    )
    assert response.status_code == 406
    assert response.json()["error"]["field"] == "output_format"


def test_a_quality_for_lossless_png_is_refused_not_ignored(ready_server):
    response = ready_server.post("/generate", json={"prompt": "x", "output_compression": 50})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "output_compression"


def test_null_for_an_optional_field_means_its_default(ready_server):
    response = ready_server.post("/generate", json={"prompt": "x", "num_inference_steps": None, "num_images": None})
    assert response.status_code == 200, response.text
    assert response.json()["num_inference_steps"] == 20


def test_wrong_method_and_unknown_path_answer_in_json(ready_server):
    assert ready_server.get("/generate").status_code == 405
    missing = ready_server.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_a_request_id_is_echoed_or_made(ready_server):
    given = ready_server.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = ready_server.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(made.headers["X-Request-ID"]) == 32


def test_after_all_the_bad_input_the_same_workers_still_serve(ready_server):
    before = {w["slot"]: w["pid"] for w in ready_server.workers()}
    for body, *_ in BAD_JSON_BODIES:
        assert ready_server.post("/generate", json=body).status_code == 422
    ok = ready_server.post("/generate", json={"prompt": "still here", "num_inference_steps": 1})
    assert ok.status_code == 200
    status, body = ready_server.readyz()
    assert status == 200
    assert {w["slot"]: w["pid"] for w in body["workers"]} == before
    assert all(w["state"] == "READY" for w in body["workers"])
