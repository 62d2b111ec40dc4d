"""The body of POST /v1/images/generations, as the ``openai`` package's ``images.generate`` sends it
(docs/architecture.md §11).

``IMAGE_FIELDS`` declares the OpenAI fields this server honours; the fields that steer a diffusion model
(which OpenAI clients send through ``extra_body``) are /generate's own declarations, taken from
``params.FIELDS`` rather than written again. Validation is ``params.validate``: a field not declared here
(``style``, ``moderation``...) or a value this server cannot honour (``quality: "hd"``,
``response_format: "url"``) is refused with a 400 naming the param, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from webapp import errors
from webapp.api.params import (
    BY_NAME,
    GenerationParams,
    InvalidRequest,
    RequestField,
    generation_values,
    seeds_from,
    validate,
)
from webapp.settings import Settings

SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
TITLE = "CreateImageRequest"

IMAGE_FIELDS: tuple[RequestField, ...] = (
    BY_NAME["prompt"],
    RequestField(
        "model",
        "text",
        "Model",
        "The served model's id from /v1/models (SERVED_MODEL_NAME, else MODEL_ID); another is a 404. "
        "The served model when absent.",
        high=256,
    ),
    RequestField("n", "integer", "Images", "Images to generate.", default=1, low=1, high=attrgetter("max_images")),
    RequestField(
        "size",
        "text",
        "Size",
        "WIDTHxHEIGHT, each side within MIN_IMAGE_SIZE..MAX_IMAGE_SIZE and a multiple of the model's side "
        "multiple, or auto (the model's native size, within MAX_IMAGE_SIZE).",
        default="auto",
        high=11,
        pattern=SIZE_PATTERN,
    ),
    RequestField(
        "response_format",
        "choice",
        "Response format",
        "b64_json only: the server keeps no files, so it has no URL to give.",
        default="b64_json",
        choices=("b64_json",),
    ),
    BY_NAME["output_format"],
    BY_NAME["output_compression"],
    RequestField(
        "quality",
        "choice",
        "Quality",
        "auto or standard: the configured steps and guidance (set num_inference_steps and guidance_scale "
        "to change them).",
        default="auto",
        choices=("auto", "standard"),
    ),
    RequestField(
        "background",
        "choice",
        "Background",
        "auto or opaque: the model draws opaque images.",
        default="auto",
        choices=("auto", "opaque"),
    ),
    RequestField("stream", "boolean", "Stream", "true: answer as server-sent events.", default=False),
    RequestField(
        "partial_images",
        "integer",
        "Partial images",
        "0 only: this server streams no partial images, only each finished one.",
        default=0,
        low=0,
        high=0,
    ),
    RequestField("user", "text", "User", "An end-user id: logged with the request, not stored.", high=256),
    RequestField(
        "safety_identifier", "text", "Safety identifier", "As user: logged with the request, not stored.", high=256
    ),
    BY_NAME["negative_prompt"],
    BY_NAME["num_inference_steps"],
    BY_NAME["guidance_scale"],
    BY_NAME["seed"],
    BY_NAME["timeout_s"],
)


@dataclass(frozen=True)
class ImageRequest:
    """A validated OpenAI request: what to generate, and how to answer."""

    values: dict[str, object]
    size: tuple[int, int] | None  # None: the model's native size
    limits: Settings  # what it was checked against

    @property
    def stream(self) -> bool:
        return bool(self.values["stream"])

    @property
    def model(self) -> str | None:
        return self.values["model"]  # type: ignore[return-value]

    def params(self) -> GenerationParams:
        """What to generate; the limits must be a loaded model's (``Engine.limits``)."""
        values = self.values
        asked = generation_values(values, self.limits)
        if self.size is not None:
            asked["width"], asked["height"] = self.size
        return GenerationParams(
            **asked,
            seeds=seeds_from(values["seed"], int(values["n"])),  # type: ignore[arg-type, call-overload]
            timeout_s=values["timeout_s"],  # type: ignore[arg-type]
            output_format=str(values["output_format"]),
            output_compression=int(values["output_compression"]),  # type: ignore[call-overload]
        )


def _size(text: str, settings: Settings) -> tuple[int, int] | None:
    """``WxH`` checked against /generate's width and height declarations; None for auto."""
    if text == "auto":
        return None
    sides = tuple(int(side) for side in text.split("x"))
    for side, field in zip(sides, (BY_NAME["width"], BY_NAME["height"]), strict=True):
        low, high = field.bounds(settings)
        multiple = field.multiple(settings)
        assert low is not None and high is not None and multiple
        if not low <= side <= high or side % multiple:
            message = (
                f"size: each side must be from {low:g} to {high:g} and a multiple of {multiple} "
                f"(or auto for the model's native size), got {text!r}"
            )
            raise InvalidRequest(400, errors.INVALID_FIELD, message, "size")
    return sides  # type: ignore[return-value]


def parse(payload: object, settings: Settings) -> ImageRequest:
    """Validate a decoded body, or raise InvalidRequest: 400 for every problem, as OpenAI's API answers."""
    try:
        values = validate(TITLE, IMAGE_FIELDS, payload, settings)
    except InvalidRequest as exc:
        raise InvalidRequest(400, exc.code, exc.message, exc.field) from None
    return ImageRequest(values, _size(str(values["size"]), settings), settings)


def generation_params(payload: object, limits: Settings) -> GenerationParams:
    """What to generate for a decoded body, checked against a loaded model's ``limits`` (``Engine.limits``):
    the parser ``jobs.admit`` takes for this route."""
    return parse(payload, limits).params()
