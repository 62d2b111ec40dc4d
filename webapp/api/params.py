"""The fields of a generation request, declared once, and their validation (docs/architecture.md §6).

``FIELDS`` holds one declaration per field: its kind, meaning, default and bounds (taken from settings).
Everything else is derived from it: the pydantic model that validates a request (``request_model``), its
JSON Schema (``request_schema``), the demo's form, the client's flags and the README's request table.
A bad request raises ``InvalidRequest`` naming the field and the limit; nothing is clamped, and an unknown
field is an error rather than silently dropped. Integers are compared exactly (never converted to float:
one with hundreds of digits would overflow), and a client's value is shown cut short in a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from webapp import errors
from webapp.api import images, uploads
from webapp.errors import InvalidRequest
from webapp.model import adapters
from webapp.model.request import DEFAULT_STRENGTH, GenerationParams, edit_steps
from webapp.settings import Settings, base64_chars

SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1; image i of a request uses (seed + i) % 2**32
TIMEOUT_HEADER = "X-Request-Timeout"
# JSON Schema patterns for text: no NUL, and (when required) at least one character that is not blank.
TEXT_PATTERN = {False: "^[^\\u0000]*$", True: "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"}

# The document's form of ``validate``'s rule that a quality comes with a lossy format.
LOSSY_ONLY: dict[str, Any] = {
    "if": {"required": ["output_compression"], "properties": {"output_compression": {"type": "integer"}}},
    "then": {"required": ["output_format"], "properties": {"output_format": {"enum": list(images.LOSSY)}}},
}

Bound = Callable[[Settings], float] | float | None


@dataclass(frozen=True)
class RequestField:
    """One field of a request. ``low``/``high`` are bounds (a length for text), fixed or read from settings;
    ``default`` likewise (None: absent means what ``meaning`` says); ``flag`` names the client's option."""

    name: str
    # image: a file, base64 in JSON; adapters: a list of LoRA adapters by name, each with a scale
    kind: Literal["text", "integer", "number", "choice", "boolean", "image", "adapters"]
    label: str
    meaning: str
    default: Bound = None
    low: Bound = None
    high: Bound = None
    multiple_of: Bound = None  # sides: the loaded model's multiple (Settings.size_multiple)
    required: bool = False
    low_exclusive: bool = False
    demo: bool = True  # shown as a field of the demo's form
    flag: str | None = None  # the client's command-line option, when it has one
    choices: tuple[str, ...] = ()  # the values a choice takes
    pattern: str | None = None  # a regular expression text must match (checked again by its parser)
    # Whether the loaded model takes this field, and why not when it does not: a field a model would ignore
    # is left out of its schema and refused by name, never dropped silently.
    applies: Callable[[Settings], bool] | None = None
    not_taken: str = ""

    def bounds(self, settings: Settings) -> tuple[float | None, float | None]:
        return _resolve(self.low, settings), _resolve(self.high, settings)

    def multiple(self, settings: Settings) -> int | None:
        return _resolve(self.multiple_of, settings)

    def taken(self, settings: Settings) -> bool:
        return self.applies is None or self.applies(settings)

    def default_for(self, settings: Settings) -> Any:
        return _resolve(self.default, settings)


def _resolve(value: Bound, settings: Settings) -> Any:
    return value(settings) if callable(value) else value


DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]{1,32};base64,", re.IGNORECASE)
DATA_URL_ROOM = 48  # the longest prefix DATA_URL takes, allowed on top of the base64 itself


def _upload_chars(settings: Settings) -> int:
    return base64_chars(settings.max_upload_bytes) + DATA_URL_ROOM


def _side(name: str, axis: int) -> RequestField:
    """The ``width`` (axis 0) or ``height`` (axis 1) field: bounded by the loaded model's limits, on its side
    multiple, and its native size (within MAX_IMAGE_SIZE) when absent."""
    return RequestField(
        name,
        "integer",
        name.capitalize(),
        f"Image {name} in pixels, a multiple of the model's side multiple (the model's native size, within "
        "MAX_IMAGE_SIZE, when absent).",
        default=lambda settings: settings.default_size[axis] if settings.default_size else None,
        low=attrgetter("min_image_size"),
        high=attrgetter("max_image_size"),
        multiple_of=attrgetter("size_multiple"),
        flag=name,
    )


mode_names = {"image": "image-to-image", "inpaint": "inpainting"}
FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "prompt", "text", "Prompt", "What to draw.", high=attrgetter("max_prompt_chars"), required=True, demo=False
    ),
    RequestField(
        "negative_prompt",
        "text",
        "Negative prompt",
        "What to steer away from (none when absent).",
        high=attrgetter("max_prompt_chars"),
        demo=False,
        flag="negative",
        applies=attrgetter("takes_negative_prompt"),
        not_taken="FluxPipeline applies a negative prompt only through true classifier-free guidance, which "
        "this server does not run",
    ),
    RequestField(
        "num_inference_steps",
        "integer",
        "Steps",
        "Denoising steps.",
        default=attrgetter("default_steps"),
        low=1,
        high=attrgetter("max_steps"),
        flag="steps",
    ),
    RequestField(
        "guidance_scale",
        "number",
        "Guidance",
        "Classifier-free guidance scale.",
        default=attrgetter("default_guidance"),
        low=0,
        high=attrgetter("max_guidance"),
        flag="guidance",
        applies=attrgetter("takes_guidance"),
        not_taken="the model has no guidance input (FLUX.1-schnell is distilled without one)",
    ),
    *(_side(name, axis) for axis, name in enumerate(("width", "height"))),
    RequestField(
        "num_images", "integer", "Images", "Images to generate.", default=1, low=1, high=attrgetter("max_images")
    ),
    RequestField(
        "seed",
        "integer",
        "Seed",
        "Seed of the first image; image i uses seed + i (random when absent).",
        low=0,
        high=SEED_LIMIT - 1,
        flag="seed",
    ),
    RequestField(
        "image",
        "image",
        "Image",
        "An image to edit, PNG, JPEG or WebP, in base64 (a data: URL too): image-to-image, or inpainting with "
        "a mask. Drawn at width x height when given (resized to it), else at its own size (docs/api.md, Edits).",
        high=_upload_chars,
        demo=False,
        flag="image",
        applies=attrgetter("edit_modes"),
        not_taken="no edit pipeline of it drew at load (the worker's log says why: edit_mode_unavailable)",
    ),
    RequestField(
        "mask",
        "image",
        "Mask",
        "With an image, where to repaint: its transparent pixels, or white ones in a mask without alpha; the "
        "image's size.",
        high=_upload_chars,
        demo=False,
        flag="mask",
        applies=lambda settings: "inpaint" in settings.edit_modes,
        not_taken="its inpainting pipeline did not draw at load (the worker's log says why: edit_mode_unavailable)",
    ),
    RequestField(
        "strength",
        "number",
        "Strength",
        "With an image, how much to change it: near 0 keeps it, 1 redraws it; the last strength x steps of the "
        "schedule run ("
        + ", ".join(f"{value:g} for {mode_names[mode]}" for mode, value in DEFAULT_STRENGTH.items())
        + " when absent).",
        low=0,
        low_exclusive=True,
        high=1,
        demo=False,
        flag="strength",
        applies=attrgetter("edit_modes"),
        not_taken="no edit pipeline of it drew at load (the worker's log says why: edit_mode_unavailable)",
    ),
    RequestField(
        "loras",
        "adapters",
        "LoRA adapters",
        "LoRA adapters to draw with, by name from LORA_DIR (GET /v1/models lists them), each with a scale "
        '(1 when absent): [{"name": "night", "scale": 0.8}]. None when absent.',
        low=lambda settings: -settings.max_lora_scale,
        high=attrgetter("max_lora_scale"),
        demo=False,
        applies=lambda settings: settings.lora_dir is not None,
        not_taken="LORA_DIR is not set",
    ),
    RequestField(
        "output_format",
        "choice",
        "Format",
        "Encoding of the images: png (lossless), jpeg or webp.",
        default="png",
        choices=tuple(images.FORMATS),
        demo=False,
        flag="format",
    ),
    RequestField(
        "output_compression",
        "integer",
        "Quality",
        "jpeg and webp quality, as OpenAI's API takes it: 100 keeps the most detail, lower is smaller "
        "(refused with png, which is lossless).",
        default=images.DEFAULT_QUALITY,
        low=0,
        high=100,
        demo=False,
        flag="quality",
    ),
    RequestField(
        "timeout_s",
        "number",
        "Timeout",
        "Seconds this request may wait for its images, at most REQUEST_TIMEOUT (REQUEST_TIMEOUT when absent).",
        low=0,
        low_exclusive=True,
        high=attrgetter("request_timeout"),
        demo=False,
    ),
)
BY_NAME = {field.name: field for field in FIELDS}


def _clean_text(value: str | None) -> str | None:
    """Text a tokenizer can take: no NUL, and valid Unicode (JSON's \\ud800 escapes decode to lone
    surrogates, which no tokenizer takes)."""
    if value is None:
        return None
    if "\x00" in value:
        raise PydanticCustomError("text", "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = f"U+{ord(value[exc.start]):04X}"
        message = "must be valid Unicode text: a lone surrogate {bad} at character {at}"
        raise PydanticCustomError("text", message, {"bad": bad, "at": exc.start}) from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("text", "must not be empty")
    return value


def _annotation(field: RequestField, settings: Settings) -> Any:
    low, high = field.bounds(settings)
    if field.kind == "choice":
        return Literal[field.choices] | None  # type: ignore[valid-type]
    if field.kind == "boolean":
        return bool | None
    if field.kind == "adapters":
        scale = Annotated[float, Field(ge=low, le=high, allow_inf_nan=False)]
        item = create_model(
            "Lora",
            __config__=ConfigDict(strict=True, extra="forbid"),
            name=(Annotated[str, Field(pattern=adapters.NAME.pattern, description="An adapter in LORA_DIR")], ...),
            scale=(scale, 1.0),
        )
        return Annotated[list[item], Field(max_length=settings.max_loras)] | None  # type: ignore[valid-type]
    if field.kind == "image":
        encoded = {"contentEncoding": "base64", "contentMediaType": "image/*"}
        return Annotated[str, Field(max_length=int(high), json_schema_extra=encoded)] | None  # type: ignore[arg-type]
    if field.kind == "text":
        checks: list[Any] = [Field(max_length=int(high))] if high is not None else []
        if field.pattern:
            checks.append(Field(pattern=field.pattern))
        checks.append(AfterValidator(_clean_text))
        if field.required:
            checks.append(AfterValidator(_not_blank))
        if not field.pattern:  # the document says what _clean_text and _not_blank check
            checks.append(Field(json_schema_extra={"pattern": TEXT_PATTERN[field.required]}))
        text = Annotated[str, *checks]
        return text if field.required else text | None
    constraints: dict[str, Any] = {"le": high, "multiple_of": field.multiple(settings)}
    constraints["gt" if field.low_exclusive else "ge"] = low
    if field.kind == "number":
        constraints["allow_inf_nan"] = False
    base = int if field.kind == "integer" else float
    number = Annotated[base, Field(**{key: value for key, value in constraints.items() if value is not None})]
    return number if field.required else number | None


@lru_cache(maxsize=16)
def model_of(title: str, fields: tuple[RequestField, ...], settings: Settings) -> type[BaseModel]:
    """The pydantic model of a body made of ``fields`` under ``settings`` (strict: a JSON integer for an
    integer, a JSON number for a number; unknown fields refused)."""
    definitions: dict[str, Any] = {}
    for field in _taken(fields, settings):
        default = ... if field.required else field.default_for(settings)
        definitions[field.name] = (_annotation(field, settings), Field(default, description=field.meaning))
    names = {field.name for field in _taken(fields, settings)}
    extra = LOSSY_ONLY if {"output_format", "output_compression"} <= names else None
    config = ConfigDict(strict=True, extra="forbid", title=title, json_schema_extra=extra)
    return create_model(title, __config__=config, **definitions)


def _taken(fields: tuple[RequestField, ...], settings: Settings) -> tuple[RequestField, ...]:
    """The ``fields`` the model under ``settings`` takes."""
    return tuple(field for field in fields if field.taken(settings))


def request_model(settings: Settings) -> type[BaseModel]:
    """The model of a /generate request under ``settings``."""
    return model_of("GenerateRequest", FIELDS, settings)


def request_schema(settings: Settings) -> dict[str, Any]:
    """The JSON Schema of a /generate request body under ``settings``."""
    return request_model(settings).model_json_schema()


def _shown(value: object) -> str:
    """A client's value for an error message, cut short: an integer may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _limits(field: RequestField, settings: Settings) -> str:
    low, high = field.bounds(settings)
    if field.name == "timeout_s":
        return f"more than 0 and at most REQUEST_TIMEOUT={_number(high)} s"
    if field.low_exclusive:
        return f"more than {_number(low)} and at most {_number(high)}"
    return f"from {_number(low)} to {_number(high)}"


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(422, errors.INVALID_FIELD, f"{field}: {message}", field)


def _explain(error: Any, fields: dict[str, RequestField], settings: Settings) -> InvalidRequest:
    """Our 422 for pydantic's first error: the field, what it takes, and what it got."""
    name, kind, value = str(error["loc"][0]), error["type"], error.get("input")
    nested = len(error["loc"]) > 1  # inside a field's value (an adapter's keys): that field explains it
    if nested and fields[name].kind == "adapters":
        return _explain_adapters(error, fields[name], settings)
    if kind == "extra_forbidden" and name in fields:  # declared, but not taken by the loaded model
        family = settings.model_family or "loaded"
        return _invalid(name, f"the {family} model served here does not take it: {fields[name].not_taken}")
    if kind == "extra_forbidden":
        accepted = ", ".join(name for name, field in fields.items() if field.taken(settings))
        return InvalidRequest(422, errors.UNKNOWN_FIELD, f"{name}: unknown field (accepted: {accepted})", name)
    if kind == "missing" or (value is None and fields[name].required):
        return InvalidRequest(422, errors.MISSING_FIELD, f"{name}: is required", name)
    field = fields[name]
    if field.kind == "choice":
        shown = ", ".join(field.choices)
        return _invalid(name, f"must be one of {shown}, got {_shown(value)}. {field.meaning}")
    if field.kind == "boolean":
        return _invalid(name, f"must be true or false, got {_shown(value)}")
    if field.kind == "adapters":
        return _explain_adapters(error, field, settings)
    if field.kind == "image" and kind == "string_too_long":
        message = (
            f"{name}: is {len(value)} characters of base64; the limit is MAX_UPLOAD_BYTES="
            f"{settings.max_upload_bytes} bytes ({error['ctx']['max_length']} characters)"
        )
        return InvalidRequest(413, errors.PAYLOAD_TOO_LARGE, message, name)
    if field.kind == "image":
        return _invalid(name, f"must be a base64 string (an image file), got {type(value).__name__}")
    if field.kind == "text":
        if kind == "string_too_long":
            return _invalid(name, f"must be at most {error['ctx']['max_length']} characters, got {len(value)}")
        if kind == "text":
            return _invalid(name, error["msg"])
        if kind == "string_pattern_mismatch":
            return _invalid(name, f"{field.meaning} Got {_shown(value)}")
        if isinstance(value, str):  # pydantic-core refuses a lone surrogate before our check sees it
            try:
                _clean_text(value)
            except PydanticCustomError as problem:
                return _invalid(name, problem.message())
        return _invalid(name, f"must be a string, got {type(value).__name__}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    what = "an integer" if field.kind == "integer" else "a number"
    if kind == "multiple_of":
        family = f" (the {settings.model_family} model's side multiple)" if settings.model_family else ""
        return _invalid(name, f"must be a multiple of {field.multiple(settings)}{family}, got {value}")
    if (field.kind == "integer" and not integer) or not number:
        return _invalid(name, f"must be {what} {_limits(field, settings)}, got {type(value).__name__}")
    return _invalid(name, f"must be {_limits(field, settings)}, got {_shown(value)}")


def _explain_adapters(error: Any, field: RequestField, settings: Settings) -> InvalidRequest:
    """Our 422 for a problem inside ``loras``, with where in it (``loras[0].scale``)."""
    name, kind, value = field.name, error["type"], error.get("input")
    where = name + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
    if kind == "too_long":
        return _invalid(name, f"at most MAX_LORAS={settings.max_loras} adapters, got {len(value)}")
    if kind == "missing":
        return _invalid(name, f"{where} is required")
    if kind == "extra_forbidden":
        return _invalid(name, f"{where}: unknown key (an adapter takes name and scale)")
    if kind == "string_pattern_mismatch":
        return _invalid(name, f"{where} must be an adapter's name (letters, digits, . _ -), got {_shown(value)}")
    if where.endswith(".scale"):
        return _invalid(name, f"{where} must be a number {_limits(field, settings)}, got {_shown(value)}")
    return _invalid(name, f"{where}: must be a list of {{name, scale}} objects, got {_shown(value)}")


def validate(title: str, fields: tuple[RequestField, ...], payload: object, settings: Settings) -> dict[str, Any]:
    """A decoded JSON body checked against ``fields``: every field's value (its default when absent or
    null), or InvalidRequest (422) for the first problem, an unknown field before any other."""
    if not isinstance(payload, dict):
        message = f"the body must be a JSON object, got {type(payload).__name__}"
        raise InvalidRequest(422, errors.INVALID_BODY, message)
    refused = {field.name for field in fields if not field.taken(settings)}
    payload = {key: value for key, value in payload.items() if not (key in refused and value is None)}
    try:
        request = model_of(title, fields, settings).model_validate(payload)
    except ValidationError as exc:
        found = exc.errors()
        first = next((error for error in found if error["type"] == "extra_forbidden"), found[0])
        raise _explain(first, {field.name: field for field in fields}, settings) from None
    values = request.model_dump()
    for field in _taken(fields, settings):  # null means absent, as for an optional field anywhere in JSON APIs
        if values[field.name] is None and field.default is not None:
            values[field.name] = field.default_for(settings)
    given = {name for name in request.model_fields_set if payload.get(name) is not None}
    if "output_compression" in given and values.get("output_format") not in images.LOSSY:
        lossy = " and ".join(images.LOSSY)
        raise _invalid("output_compression", f"applies to {lossy} only; {values.get('output_format')} is lossless")
    return values


INTEGER_TEXT = re.compile(r"^[+-]?[0-9]+$")


def form_value(field: RequestField, raw: str) -> Any:
    """A form field's text as the JSON value its declaration takes, for ``validate`` to check like any body's:
    digits as an integer, a finite number as a float, true/false as a boolean; what does not read as its kind
    is left as text, which ``validate`` then refuses naming the field. Empty text means absent (None)."""
    if raw == "":
        return None
    if field.kind in ("integer", "number"):
        if INTEGER_TEXT.match(raw.strip()) and len(raw) <= 64:  # int() refuses thousands of digits itself
            return int(raw)
        try:
            number = float(raw)
        except ValueError:
            return raw
        return number if math.isfinite(number) else raw
    if field.kind == "boolean":
        return {"true": True, "false": False}.get(raw.strip().lower(), raw)
    if field.kind == "adapters":  # a form carries a list as its JSON text
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def seeds_from(first: int | None, count: int) -> tuple[int, ...]:
    """One seed per image: ``first`` (random when None), then first + 1, ... modulo 2**32."""
    first_seed = secrets.randbelow(SEED_LIMIT) if first is None else first
    return tuple((first_seed + i) % SEED_LIMIT for i in range(count))


def generation_values(values: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What the model is asked for, from validated ``values`` under a loaded model's ``settings``
    (``Engine.limits``): a field it does not take is absent (its default: no negative prompt, the model's
    guidance), and an absent size is the default one."""
    assert settings.default_size is not None, "requests are parsed against a loaded model's limits"
    return {
        "prompt": values["prompt"],
        "negative_prompt": values.get("negative_prompt"),
        "num_inference_steps": values["num_inference_steps"],
        "guidance_scale": float(values.get("guidance_scale", settings.default_guidance) or 0.0),
        "width": values.get("width") or settings.default_size[0],
        "height": values.get("height") or settings.default_size[1],
    }


def decoded(name: str, text: str | None) -> bytes | None:
    """An image field's base64 (a data: URL's too) as the file's bytes; 422 naming ``name`` when it is not
    base64."""
    if text is None:
        return None
    try:
        return base64.b64decode(DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError):
        message = "is not valid base64 (RFC 4648, padded; a data:image/...;base64, URL is taken)"
        raise _refuse_image(name, message) from None


def _refuse_image(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(422, errors.INVALID_IMAGE, f"{name}: {message}", name)


def edit_values(
    image: bytes | None,
    mask: bytes | None,
    strength: float | None,
    size: tuple[int, int] | None,
    steps: int,
    settings: Settings,
) -> dict[str, Any]:
    """The edit's part of ``GenerationParams`` (empty for text-to-image): the input image and mask as an
    ``Upload`` whose headers are checked (``uploads.inspect``; decoded, at ``size`` or the input's own when
    None, once its job holds a place: ``jobs.admit``), the strength (its mode's default when None) and the
    denoising steps that strength runs, which must be at least one."""
    if image is None:
        if mask is not None:
            raise _invalid("mask", "needs an image to repaint (image)")
        if strength is not None:
            raise _invalid("strength", "applies to edits only: give an image")
        return {}
    mode = "image" if mask is None else "inpaint"
    if mode not in settings.edit_modes:  # the model inpaints but cannot do image-to-image alone
        family = settings.model_family or "loaded"
        raise _invalid("mask", f"is required: the {family} model served here only inpaints (docs/api.md, Edits)")
    upload = uploads.inspect(image, mask, size, settings)
    strength = DEFAULT_STRENGTH[mode] if strength is None else strength
    run = edit_steps(steps, strength, settings.model_family)
    if run < 1:
        message = (
            f"{strength:g} of {steps} steps runs no denoising step; ask for at least {1 / steps:.3g} "
            "(1 / num_inference_steps), or for more steps"
        )
        raise _invalid("strength", message)
    return {"upload": upload, "strength": strength, "denoising_steps": run}


def adapters_of(asked: list[dict[str, Any]] | None, settings: Settings) -> tuple[tuple[str, float], ...]:
    """A request's validated ``loras`` as (name, scale) pairs, each name one LORA_DIR lists now (read at this
    request: an adapter dropped into the folder is usable without a restart), none twice; 422 naming
    ``loras`` otherwise."""
    if not asked:
        return ()
    found = adapters.listing(settings.lora_dir)
    names = [item["name"] for item in asked]
    for index, name in enumerate(names):
        if name not in found:
            listed = ", ".join(found) or "none"
            raise _invalid("loras", f"loras[{index}].name: no adapter {name!r} in LORA_DIR (listed: {listed})")
        if names.index(name) != index:
            raise _invalid("loras", f"loras[{index}].name: {name!r} is named twice")
        if found[name].problem:
            raise _invalid("loras", f"loras[{index}].name: adapter {name!r} is refused: {found[name].problem}")
    return tuple((item["name"], float(item["scale"])) for item in asked)


def parse(payload: object, settings: Settings) -> GenerationParams:
    """Validate a decoded /generate body against a loaded model's ``settings`` (``Engine.limits``); an image's
    header is checked here, on the request's thread, and its pixels decoded once admitted (``jobs.admit``)."""
    values = validate("GenerateRequest", FIELDS, payload, settings)
    asked = generation_values(values, settings)
    sized = isinstance(payload, dict) and any(payload.get(side) is not None for side in ("width", "height"))
    image, mask = decoded("image", values.get("image")), decoded("mask", values.get("mask"))
    size = (asked["width"], asked["height"]) if sized else None
    edit = edit_values(image, mask, values.get("strength"), size, asked["num_inference_steps"], settings)
    return GenerationParams(
        **{**asked, **edit},
        seeds=seeds_from(values["seed"], values["num_images"]),
        timeout_s=values["timeout_s"],
        output_format=values["output_format"],
        output_compression=values["output_compression"],
        loras=adapters_of(values.get("loras"), settings),
    )


def timeout_from_header(text: str | None, settings: Settings) -> float | None:
    """The X-Request-Timeout header: a header is text, so a number written as text is the only form; its
    limits are timeout_s's."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(TIMEOUT_HEADER, f"must be a number of seconds, got {_shown(text)}") from None
    field = BY_NAME["timeout_s"]
    if not math.isfinite(value) or not 0 < value <= settings.request_timeout:
        raise _invalid(TIMEOUT_HEADER, f"must be {_limits(field, settings)}, got {_shown(text)}")
    return value


def form_fields(settings: Settings) -> list[dict[str, Any]]:
    """The demo form's number inputs, in declaration order."""
    rows = []
    for field in FIELDS:
        if not field.demo or not field.taken(settings):
            continue
        low, high = field.bounds(settings)
        step = field.multiple(settings) or (0.5 if field.kind == "number" else 1)
        default = field.default_for(settings)
        rows.append(
            {
                "name": field.name,
                "label": field.label,
                "kind": field.kind,
                "min": low,
                "max": high,
                "step": step,
                "default": "" if default is None else default,
                "placeholder": "model default" if field.name in ("width", "height") else "",
            }
        )
    return rows


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else _number(value)  # type: ignore[arg-type]


def request_table(settings: Settings, fields: tuple[RequestField, ...] = FIELDS) -> str:
    """The README's table of request ``fields`` (/generate's by default), with the limits of ``settings``."""
    rows = ["| Field | Type | Default | Limits | Meaning |", "|---|---|---|---|---|"]
    for field in fields:
        high = field.bounds(settings)[1]
        default = field.default_for(settings)
        if field.kind == "text":
            limits = f"at most {_number(high)} characters" + (", required" if field.required else "")
        elif field.kind == "choice":
            limits = "one of " + ", ".join(f"`{choice}`" for choice in field.choices)
        elif field.kind == "boolean":
            limits = "`true` or `false`"
        elif field.kind == "image":
            limits = f"base64 of at most MAX_UPLOAD_BYTES={settings.max_upload_bytes} bytes"
        elif field.kind == "adapters":
            limits = f"at most MAX_LORAS={settings.max_loras}; each scale {_limits(field, settings)}"
        else:
            multiple = field.multiple(settings)
            limits = _limits(field, settings) + (f", a multiple of {multiple}" if multiple else "")
        shown = "(required)" if field.required else "-" if default is None else f"`{_default_text(default)}`"
        rows.append(f"| `{field.name}` | {field.kind} | {shown} | {limits} | {field.meaning} |")
    return "\n".join(rows)
