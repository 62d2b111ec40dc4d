"""The fields of a generation request, declared once (docs/architecture.md §6).

``FIELDS`` holds one declaration per field of /generate: its kind, meaning, default and bounds (fixed, or
read from the loaded model's ``Limits``); OpenAI's routes declare theirs from the same pieces
(``webapp.api.openai.protocol``). Everything else is derived from them: the pydantic model that validates a
body and its JSON Schema (``webapp.api.schema``), the parsing (``webapp.api.params``), the forms
(``webapp.api.forms``), the client's flags and the docs' tables (``webapp.tools.doctables``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from webapp.api import images
from webapp.model.profile import Limits
from webapp.model.request import DEFAULT_STRENGTH
from webapp.settings import base64_chars

SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1; image i of a request uses (seed + i) % 2**32
TIMEOUT_HEADER = "X-Request-Timeout"
# JSON Schema patterns for text: no NUL, and (when required) at least one character that is not blank.
TEXT_PATTERN = {False: "^[^\\u0000]*$", True: "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"}

# The document's form of ``validate``'s rule that a quality comes with a lossy format.
LOSSY_ONLY: dict[str, Any] = {
    "if": {"required": ["output_compression"], "properties": {"output_compression": {"type": "integer"}}},
    "then": {"required": ["output_format"], "properties": {"output_format": {"enum": list(images.LOSSY)}}},
}

Bound = Callable[[Limits], float] | float | None


@dataclass(frozen=True)
class RequestField:
    """One field of a request. ``low``/``high`` are bounds (a length for text), fixed or read from the limits;
    ``default`` likewise (None: absent means what ``meaning`` says); ``flag`` names the client's option."""

    name: str
    # image: a file, base64 in JSON; adapters: a list of LoRA adapters by name, each with a scale
    kind: Literal["text", "integer", "number", "choice", "boolean", "image", "adapters"]
    label: str
    meaning: str
    default: Bound = None
    low: Bound = None
    high: Bound = None
    multiple_of: Bound = None  # sides: the loaded model's multiple (Limits.size_multiple)
    required: bool = False
    low_exclusive: bool = False
    demo: bool = True  # shown as a field of the demo's form
    flag: str | None = None  # the client's command-line option, when it has one
    choices: tuple[str, ...] = ()  # the values a choice takes
    pattern: str | None = None  # a regular expression text must match (checked again by its parser)
    # Whether the loaded model takes this field, and why not when it does not: a field a model would ignore
    # is left out of its schema and refused by name, never dropped silently.
    applies: Callable[[Limits], bool] | None = None
    not_taken: str = ""

    def bounds(self, limits: Limits) -> tuple[float | None, float | None]:
        return _resolve(self.low, limits), _resolve(self.high, limits)

    def multiple(self, limits: Limits) -> int | None:
        return _resolve(self.multiple_of, limits)

    def taken(self, limits: Limits) -> bool:
        return self.applies is None or self.applies(limits)

    def default_for(self, limits: Limits) -> Any:
        return _resolve(self.default, limits)


def _resolve(value: Bound, limits: Limits) -> Any:
    return value(limits) if callable(value) else value


DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]{1,32};base64,", re.IGNORECASE)
DATA_URL_ROOM = 48  # the longest prefix DATA_URL takes, allowed on top of the base64 itself


def _upload_chars(limits: Limits) -> int:
    return base64_chars(limits.max_upload_bytes) + DATA_URL_ROOM


def _side(name: str, axis: int) -> RequestField:
    """The ``width`` (axis 0) or ``height`` (axis 1) field: bounded by the loaded model's limits, on its side
    multiple, and its native size (within MAX_IMAGE_SIZE) when absent."""
    return RequestField(
        name,
        "integer",
        name.capitalize(),
        f"Image {name} in pixels, a multiple of the model's side multiple (the model's native size, within "
        "MAX_IMAGE_SIZE, when absent).",
        default=lambda limits: limits.default_size[axis] if limits.default_size else None,
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
        applies=lambda limits: "inpaint" in limits.edit_modes,
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
        low=lambda limits: -limits.max_lora_scale,
        high=attrgetter("max_lora_scale"),
        demo=False,
        applies=lambda limits: limits.lora_dir is not None,
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


def number_text(value: float | None) -> str:
    """A bound as the docs and messages write it: an integer exactly, a float short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def bounds_text(field: RequestField, limits: Limits) -> str:
    """``field``'s bounds in words: "from 1 to 100", "more than 0 and at most 1"."""
    low, high = field.bounds(limits)
    if field.name == "timeout_s":
        return f"more than 0 and at most REQUEST_TIMEOUT={number_text(high)} s"
    if field.low_exclusive:
        return f"more than {number_text(low)} and at most {number_text(high)}"
    return f"from {number_text(low)} to {number_text(high)}"
