"""The request's declaration: every derived view (validation, JSON Schema, demo form) follows FIELDS and
the limits in settings. Pure: no server."""

from __future__ import annotations

import pytest

from webapp.api.fields import FIELDS
from webapp.api.forms import form_fields
from webapp.api.params import parse, timeout_from_header
from webapp.api.schema import model_of
from webapp.errors import InvalidRequest
from webapp.model.profile import Limits, profile
from webapp.settings import Settings


def generate_schema(limits):
    """The JSON Schema of a /generate body under ``limits``, as /openapi.json carries it."""
    return model_of("GenerateRequest", FIELDS, limits).model_json_schema()


SETTINGS = Settings.from_env({"MAX_STEPS": "30", "DEFAULT_STEPS": "10", "MAX_IMAGES": "2"})
# The limits a request meets once an SD 1.x model of native size 64x64 is loaded.
LIMITS = Limits.of(SETTINGS, profile("StableDiffusionPipeline", (64, 64), 8, None, "float32"))


def test_the_json_schema_has_every_declared_field_with_the_limits_of_the_settings():
    schema = generate_schema(Limits.before_load(SETTINGS))
    assert list(schema["properties"]) == [field.name for field in FIELDS]
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    steps = schema["properties"]["num_inference_steps"]
    assert steps["default"] == 10 and {"minimum": 1, "maximum": 30, "type": "integer"} in steps["anyOf"]
    width = next(part for part in schema["properties"]["width"]["anyOf"] if part.get("type") == "integer")
    assert width["multipleOf"] == 8


def test_the_demo_form_has_the_declared_number_fields_with_their_limits():
    rows = {row["name"]: row for row in form_fields(Limits.before_load(SETTINGS))}
    assert list(rows) == [field.name for field in FIELDS if field.demo]
    assert (rows["num_inference_steps"]["max"], rows["num_inference_steps"]["default"]) == (30, 10)
    assert rows["width"]["step"] == 8 and rows["guidance_scale"]["kind"] == "number"


@pytest.mark.parametrize(
    ("payload", "field", "says"),
    [
        ({"prompt": "x", "num_inference_steps": 31}, "num_inference_steps", "from 1 to 30, got 31"),
        ({"prompt": "x", "num_images": 2.0}, "num_images", "must be an integer from 1 to 2, got float"),
        ({"prompt": "x", "guidance_scale": 10**300}, "guidance_scale", "from 0 to 30, got 1000"),
        ({"prompt": "x", "width": 65}, "width", "multiple of 8"),
        ({"prompt": "x\ud800"}, "prompt", "lone surrogate U+D800 at character 1"),
        ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
        ({"prompt": None}, "prompt", "is required"),
        ({"prompt": "x", "timeout_s": 121}, "timeout_s", "at most REQUEST_TIMEOUT=120 s"),
    ],
)
def test_a_bad_field_is_named_with_its_limit(payload, field, says):
    with pytest.raises(InvalidRequest) as refused:
        parse(payload, LIMITS)
    assert refused.value.status == 422 and refused.value.field == field
    assert refused.value.message.startswith(field) and says in refused.value.message


def test_defaults_come_from_settings_and_the_model():
    tall = Limits.of(SETTINGS, profile("StableDiffusionPipeline", (96, 128), 8, None, "float32"))
    params = parse({"prompt": "x", "seed": 2**32 - 1, "num_images": 2}, tall)
    assert (params.num_inference_steps, params.width, params.height) == (10, 96, 128)
    assert params.seeds == (2**32 - 1, 0)


def test_the_timeout_header_has_the_limits_of_timeout_s():
    assert timeout_from_header("2.5", LIMITS) == 2.5
    for text in ("0", "121", "nan", "soon"):
        with pytest.raises(InvalidRequest):
            timeout_from_header(text, LIMITS)
