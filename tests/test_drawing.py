"""The default model draws what it is asked (issue 15): a real one-worker server on the trained embedded
model, its images judged by webapp.model.scenes.analyze. These are the tests that fail when a prompt is ignored,
classifier-free guidance breaks, a batch mixes up its seeds or prompts, or the VAE's scaling is wrong.

Every image here uses the server's defaults (steps, guidance, size) and seed 7, which training never saw
(its batches come from seeded scene generators, not from image seeds). The model draws 96.0 % of
bench/quality.py's scenes right on all three counts (each shape at least 90 %); these prompts, one or more
of each shape, are ones it draws right at seed 7: the tests then fail on what the server does wrong
(ignoring the prompt, mixing a batch), deterministically.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.conftest import Server, running_server
from webapp.model import scenes

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

SEED = 7
FOUR = (
    "a red circle on a white background",
    "a white square on a green background",
    "a yellow triangle on a black background",
    "an orange circle on a purple background",
)


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory):
    """One worker on the default MODEL_ID, so requests sent together can share one pipeline call
    (BATCH_WAIT_MS gathers them)."""
    with running_server(
        model_cache, tmp_path_factory.mktemp("drawing"), WEB_CONCURRENCY="1", BATCH_WAIT_MS="500"
    ) as server:
        yield server


def drawn(server: Server, prompt: str) -> tuple[scenes.Verdict, Image.Image, dict]:
    response = server.post("/generate", json={"prompt": prompt, "seed": SEED})
    assert response.status_code == 200, response.text
    body = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
    return scenes.analyze(image), image, body


def test_the_server_draws_a_red_circle_on_a_white_background(server):
    verdict, image, body = drawn(server, "a red circle on a white background")
    assert image.size == (body["width"], body["height"]) == (64, 64)
    assert verdict == scenes.Verdict(background="white", colour="red", shape="circle")


def test_the_default_guidance_is_the_embedded_models_own_and_a_request_may_set_another(server):
    """docs/models.md: this model draws its shapes best at 4.0 (bench/quality.py), not SD's 7.5. (The prompt
    a new user tried on the demo, which drew a blue blob before.)"""
    verdict, _, body = drawn(server, "a blue square on a yellow background")
    assert verdict == scenes.Verdict(background="yellow", colour="blue", shape="square")
    assert body["guidance_scale"] == 4.0
    response = server.post("/generate", json={"prompt": "a blue square", "seed": SEED, "guidance_scale": 7.5})
    assert response.status_code == 200 and response.json()["guidance_scale"] == 7.5


def test_a_different_prompt_draws_a_different_scene(server):
    verdict, _, _ = drawn(server, "a white square on a green background")
    assert verdict == scenes.Verdict(background="green", colour="white", shape="square")
    assert verdict != drawn(server, "a red circle on a white background")[0]


def test_a_batch_of_four_prompts_gives_each_its_own_scene_and_the_seed_draws_the_same_alone(server):
    alone = {prompt: drawn(server, prompt) for prompt in FOUR}
    for prompt, (verdict, _, _) in alone.items():
        assert verdict == scenes.parse(prompt), prompt
    # Which requests one pipeline call takes is the scheduler's choice within BATCH_WAIT_MS: the rounds
    # repeat until all four shared one.
    for _ in range(5):
        with ThreadPoolExecutor(len(FOUR)) as pool:
            together = list(pool.map(lambda prompt: drawn(server, prompt), FOUR))
        if all(body["batch"]["jobs"] == len(FOUR) for _, _, body in together):
            break
    else:
        raise AssertionError("the four requests never shared one pipeline call in 5 rounds")
    for prompt, (verdict, image, _) in zip(FOUR, together, strict=True):
        assert verdict == scenes.parse(prompt), f"{prompt!r} drew {verdict} in a batch"
        assert verdict == alone[prompt][0]
        # The same seed alone and batched: one torch.Generator per image, so at most a level of rounding.
        pairs = zip(image.getdata(), alone[prompt][1].getdata(), strict=True)
        assert max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True)) <= 2


def test_edits_in_one_batch_each_keep_their_own_input(server):
    """Two image-to-image requests that share a pipeline call: each result is drawn from its own input, with
    the same prompt for both, so a batch that mixed up its inputs would swap the scenes."""
    inputs = [scenes.Scene("circle", "red", "white"), scenes.Scene("triangle", "yellow", "black")]

    def edited(scene: scenes.Scene) -> tuple[scenes.Verdict, dict]:
        buffer = io.BytesIO()
        scenes.render(scene).save(buffer, format="PNG")
        payload = {
            "prompt": "a shape",
            "seed": SEED,
            "strength": 0.3,
            "image": base64.b64encode(buffer.getvalue()).decode(),
        }
        response = server.post("/generate", json=payload)
        assert response.status_code == 200, response.text
        body = response.json()
        return scenes.analyze(Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))), body

    for _ in range(5):
        with ThreadPoolExecutor(len(inputs)) as pool:
            together = list(pool.map(edited, inputs))
        if all(body["batch"]["jobs"] == len(inputs) for _, body in together):
            break
    else:
        raise AssertionError("the two edits never shared one pipeline call in 5 rounds")
    # Background and shape tell the two inputs apart (a colour may drift at this strength with a vague prompt).
    assert [(verdict.background, verdict.shape) for verdict, _ in together] == [
        ("white", "circle"),
        ("black", "triangle"),
    ]
