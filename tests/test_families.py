"""Every family an operator deploys, served end to end: tiny random-weight SDXL, SD3 and FLUX pipelines
built offline from the real diffusers and transformers classes (a T5 tokenizer from a vocabulary list, no
hub), saved with ``save_pretrained`` and served with ``MODEL_ID=<folder>`` through real gunicorn, as an
operator would. Each server reads the model's profile: its native size, its side multiple, the fields it
takes. And a checkpoint whose output is NaN never turns ready."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from tests.conftest import Server, server_env, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

MAX_IMAGE_SIZE = 128
# What each tiny build is (see webapp.model.tiny_model.build_family): its pipeline class, native side, multiple.
# FLUX's native 256 is above MAX_IMAGE_SIZE, so a request without a size gets the largest square within it.
EXPECTED = {
    "sdxl": ("StableDiffusionXLPipeline", 64, 8, 64),
    "sd3": ("StableDiffusion3Pipeline", 64, 4, 64),
    "flux": ("FluxPipeline", 256, 4, 128),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from webapp.model.tiny_model import build_family  # torch: imported when the test runs, not at collection

    root = tmp_path_factory.mktemp("families")
    built = {}
    for family in EXPECTED:
        build_family(family).save_pretrained(root / family)
        built[family] = root / family
    return built


@pytest.fixture(scope="module")
def servers(folders, model_cache, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """A one-worker server per family, all started at once so that their starts overlap (each is mostly
    one process importing on one core), READY, and stopped by pid when the module ends."""
    started: dict[str, Server] = {}
    try:
        for family in EXPECTED:
            workdir = tmp_path_factory.mktemp(f"serve-{family}")
            env = server_env(
                model_cache,
                workdir,
                WEB_CONCURRENCY="1",
                MODEL_ID=str(folders[family]),
                MAX_IMAGE_SIZE=str(MAX_IMAGE_SIZE),
                MAX_ONGOING="4",
                MAX_BATCH_SIZE="4",
            )
            started[family] = Server(env, workdir / "gunicorn.log")
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module", params=list(EXPECTED))
def served(request, servers) -> tuple[str, Server]:
    return request.param, servers[request.param]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_ready_with_the_profile_read_from_the_model(served):
    family, server = served
    pipeline, native, multiple, _ = EXPECTED[family]
    (worker,) = server.workers()
    assert worker["model"] == f"{family} {pipeline} {native}x{native}/{multiple} float32"
    (entry,) = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert entry["profile"]["native_size"] == f"{native}x{native}" and entry["profile"]["size_multiple"] == multiple


def test_a_request_without_a_size_gets_the_native_size_within_max_image_size(served):
    family, server = served
    side = EXPECTED[family][3]
    response = server.post("/generate", json={"prompt": "a red circle", "num_inference_steps": 2, "seed": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (side, side)
    assert pixels(body["images"][0]["png_base64"]).shape == (side, side, 3)


def test_a_side_off_the_models_multiple_or_past_the_limit_is_refused_naming_it(served):
    family, server = served
    multiple = EXPECTED[family][2]
    off = server.post("/generate", json={"prompt": "x", "width": 64 + multiple // 2, "height": 64})
    assert off.status_code == 422 and off.json()["error"]["field"] == "width"
    assert f"multiple of {multiple} (the {family} model's side multiple)" in off.json()["error"]["message"]
    big = server.post("/generate", json={"prompt": "x", "width": 64, "height": MAX_IMAGE_SIZE + multiple})
    assert big.status_code == 422 and big.json()["error"]["field"] == "height"
    schema = server.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"type": "integer", "minimum": 64, "maximum": MAX_IMAGE_SIZE, "multipleOf": multiple} in schema["width"][
        "anyOf"
    ]
    assert ("negative_prompt" in schema) is (family != "flux")


def test_a_seed_draws_the_same_image_in_a_batch_and_alone(served):
    _, server = served
    asked = {"prompt": "a blue square", "num_inference_steps": 2, "width": 64, "height": 64}
    together = server.post("/generate", json={**asked, "seed": 11, "num_images": 3}).json()
    assert together["batch"]["images"] == 3
    alone = server.post("/generate", json={**asked, "seed": 12}).json()
    assert alone["batch"]["images"] == 1
    difference = np.abs(pixels(together["images"][1]["png_base64"]) - pixels(alone["images"][0]["png_base64"]))
    assert difference.max() <= 1, "one torch.Generator per image: at most a level of float rounding"
    assert np.abs(pixels(together["images"][0]["png_base64"]) - pixels(alone["images"][0]["png_base64"])).max() > 8


def test_progress_events_and_a_deadline_that_interrupts_the_run(served):
    _, server = served
    with requests.post(
        server.url + "/generate/stream", json={"prompt": "x", "num_inference_steps": 3, "width": 64}, stream=True
    ) as response:
        events = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("event:")]
    assert events == ["event: queued"] + ["event: progress"] * 3 + ["event: done"]
    before = server.metrics().value("honest_diffusion_generation_duration_seconds_count", outcome="interrupted")
    late = server.post("/generate", json={"prompt": "x", "num_inference_steps": 100, "timeout_s": 0.3})
    assert late.status_code == 504, late.text
    wait_for(
        lambda: (
            server.metrics().value("honest_diffusion_generation_duration_seconds_count", outcome="interrupted") > before
        ),
        60,
        "the late job's run to be interrupted between two steps",
    )


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_to_image_and_inpainting_from_the_same_load(served):
    """Both edit modes on every family, from pipelines built with from_pipe, offered only when they drew at
    load (the tiny SD3 cannot inpaint, and says so by name): the answer's size is the input's,
    its progress counts the steps the family's own schedule runs (SD3 and FLUX round the skipped steps down,
    SDXL the run ones: 3 steps at strength 0.5 run 2 and 1), and the inpainted pixels outside the mask stay
    closer to the input than those inside it."""
    family, server = served
    side = 64
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side // 2, side))  # repaint the left half
    asked = {"prompt": "a red circle", "num_inference_steps": 3, "seed": 4, "image": png_base64(picture)}
    expected_steps = 2 if family in ("sd3", "flux") else 1
    with requests.post(server.url + "/generate/stream", json={**asked, "strength": 0.5}, stream=True) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("event:")]
    assert lines == ["event: queued"] + ["event: progress"] * expected_steps + ["event: done"], lines
    image_to_image = server.post("/generate", json={**asked, "strength": 0.5})
    assert image_to_image.status_code == 200, image_to_image.text
    body = image_to_image.json()
    assert (body["width"], body["height"]) == (side, side)
    assert body["edit"] == {"mode": "image", "strength": 0.5, "denoising_steps": expected_steps, "input_size": "64x64"}
    inpainted = server.post("/generate", json={**asked, "mask": png_base64(mask), "strength": 0.9})
    (entry,) = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
    if family == "sd3":  # diffusers' SD3 inpainting wants SD3's 16 latent channels; the tiny build has 4
        assert entry["profile"]["edits"] == ["image"]
        assert inpainted.status_code == 422 and inpainted.json()["error"]["field"] == "mask", inpainted.text
        assert "edit_mode_unavailable" in inpainted.json()["error"]["message"]
        return
    assert entry["profile"]["edits"] == ["image", "inpaint"]
    assert inpainted.status_code == 200, inpainted.text
    assert inpainted.json()["edit"]["mode"] == "inpaint"
    change = np.abs(pixels(inpainted.json()["images"][0]["png_base64"]) - np.asarray(picture, dtype=np.int16))
    assert change[:, : side // 2].mean() > change[:, side // 2 :].mean()


def test_the_openai_route_answers_through_the_official_client(served):
    family, server = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    result = client.images.generate(prompt="a green triangle", n=2, extra_body={"num_inference_steps": 2})
    side = EXPECTED[family][3]
    assert result.size == f"{side}x{side}" and len(result.data) == 2
    if family == "flux":
        with pytest.raises(openai.BadRequestError, match="negative_prompt"):
            client.images.generate(prompt="x", extra_body={"negative_prompt": "blur"})


def test_a_checkpoint_that_draws_nan_never_turns_ready_and_says_why(start_server, tmp_path):
    from webapp.model.tiny_model import build_pipeline

    folder = tmp_path / "nan-model"
    pipe = build_pipeline()
    for value in pipe.vae.decoder.parameters():
        value.data.fill_(float("nan"))
    pipe.save_pretrained(folder)
    server = start_server(WEB_CONCURRENCY="1", MODEL_ID=str(folder))

    def failed() -> dict | None:
        server.check_running()
        status, body = server.readyz()
        assert status == 503, "a model that draws NaN was declared ready"
        return body if body["workers"][0]["state"] == "FAILED" else None

    body = wait_for(failed, 240, "the worker to be FAILED")
    error = body["workers"][0]["error"]
    assert "warm-up image is not finite" in error and "NaN" in error, error
    assert body["workers"][0]["attempt"] == 1, "a model that draws NaN is not retried"
    assert server.get("/healthz").status_code == 503
