"""The model profile folded into the request limits, pure: the size a request gets by default, the side
multiple, the fields a model does not take, and DTYPE=auto per family. The same behaviours are checked on
real tiny SDXL, SD3 and FLUX pipelines under gunicorn in test_families.py."""

from __future__ import annotations

import pytest

from webapp import errors
from webapp.api.fields import FIELDS
from webapp.api.openai.protocol import parse as parse_openai
from webapp.api.params import parse
from webapp.api.schema import model_of
from webapp.errors import InvalidRequest
from webapp.model.profile import CannotServe, Limits, choose_dtype, family_of, profile
from webapp.settings import Settings


def generate_schema(limits):
    """The JSON Schema of a /generate body under ``limits``, as /openapi.json carries it."""
    return model_of("GenerateRequest", FIELDS, limits).model_json_schema()


SETTINGS = Settings.from_env({"MODEL_ID": "/models/any", "MAX_IMAGE_SIZE": "256"})
FLUX_DEV = profile("FluxPipeline", (1024, 1024), 16, None, "bfloat16", guidance_embeds=True)
FLUX_SCHNELL = profile("FluxPipeline", (1024, 1024), 16, None, "bfloat16", guidance_embeds=False)
SD3 = profile("StableDiffusion3Pipeline", (1024, 1024), 16, 3072, "bfloat16")


def test_a_request_without_a_size_gets_the_largest_of_the_native_shape_within_max_image_size():
    limits = Limits.of(SETTINGS, FLUX_DEV)
    params = parse({"prompt": "x"}, limits)
    assert (params.width, params.height) == (256, 256)
    assert Limits.of(Settings.from_env({"MODEL_ID": "/m"}), FLUX_DEV).default_size == (1024, 1024)
    wide = profile("StableDiffusionXLPipeline", (1536, 640), 8, None, "float16")
    assert Limits.of(SETTINGS, wide).default_size == (256, 104)


def test_a_side_off_the_models_multiple_is_refused_naming_the_field_and_the_multiple():
    limits = Limits.of(Settings.from_env({"MODEL_ID": "/m"}), FLUX_DEV)
    with pytest.raises(InvalidRequest) as refused:
        parse({"prompt": "x", "width": 1000, "height": 1024}, limits)
    assert refused.value.field == "width" and "multiple of 16 (the flux model's side multiple)" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused_openai:
        parse_openai({"prompt": "x", "size": "1000x1000"}, limits)
    answered = errors.status_for(refused_openai.value.status, errors.OPENAI_PREFIX)  # as the route answers it
    assert answered == 400 and "multiple of 16" in refused_openai.value.message
    schema = generate_schema(limits)["properties"]["width"]
    assert {"type": "integer", "minimum": 64, "maximum": 1024, "multipleOf": 16} in schema["anyOf"]
    assert schema["default"] == 1024


def test_the_models_own_largest_side_bounds_max_image_size():
    limits = Limits.of(Settings.from_env({"MODEL_ID": "/m", "MAX_IMAGE_SIZE": "4096"}), SD3)
    assert (limits.max_image_size, limits.size_multiple) == (3072, 16)


def test_flux_refuses_a_negative_prompt_and_schnell_a_guidance_scale_by_name():
    dev = Limits.of(SETTINGS, FLUX_DEV)
    with pytest.raises(InvalidRequest) as refused:
        parse({"prompt": "x", "negative_prompt": "blur"}, dev)
    assert refused.value.field == "negative_prompt" and "true classifier-free guidance" in str(refused.value)
    assert "negative_prompt" not in generate_schema(dev)["properties"]
    assert parse({"prompt": "x", "negative_prompt": None}, dev).negative_prompt is None  # null is absent
    schnell = Limits.of(SETTINGS, FLUX_SCHNELL)
    with pytest.raises(InvalidRequest) as refused:
        parse({"prompt": "x", "guidance_scale": 3.5}, schnell)
    assert refused.value.field == "guidance_scale"
    params = parse({"prompt": "x"}, schnell)
    assert (params.num_inference_steps, params.guidance_scale) == (4, 0.0)


def test_defaults_are_the_families_unless_the_operator_set_them():
    assert Limits.of(SETTINGS, SD3).default_steps == 28
    assert Limits.of(SETTINGS, FLUX_DEV).default_guidance == 3.5
    mine = Settings.from_env({"MODEL_ID": "/m", "DEFAULT_STEPS": "4", "DEFAULT_GUIDANCE": "0"})
    limits = Limits.of(mine, FLUX_DEV)
    assert (limits.default_steps, limits.default_guidance) == (4, 0.0)


def test_settings_that_leave_no_size_to_draw_cannot_serve():
    tiny_max = Settings.from_env({"MODEL_ID": "/m", "MIN_IMAGE_SIZE": "64", "MAX_IMAGE_SIZE": "64"})
    coarse = profile("OtherPipeline", (128, 128), 48, None, "float32")
    with pytest.raises(CannotServe, match="no image size fits"):
        Limits.of(tiny_max, coarse)


@pytest.mark.parametrize(
    ("pipeline", "device", "setting", "expected"),
    [
        ("FluxPipeline", "cuda:0", "auto", "bfloat16"),
        ("StableDiffusion3Pipeline", "cuda:1", "auto", "bfloat16"),
        ("StableDiffusionXLPipeline", "cuda:0", "auto", "float16"),
        ("StableDiffusionPipeline", "cuda:0", "auto", "float16"),
        ("FluxPipeline", "cpu", "auto", "float32"),
        ("FluxPipeline", "cuda:0", "float16", "float16"),  # an explicit DTYPE always wins
    ],
)
def test_dtype_auto_suits_the_family_on_a_gpu_and_is_float32_on_the_cpu(pipeline, device, setting, expected):
    # No CUDA device here: the choice is a pure function of the family and the device's name.
    assert choose_dtype(setting, device, family_of(pipeline)) == expected
