"""The bodies of POST /v1/images/generations and /v1/images/edits, as the ``openai`` package's
``images.generate`` and ``images.edit`` send them (docs/architecture.md §11).

``IMAGE_FIELDS`` declares the OpenAI fields this server honours; the fields that steer a diffusion model
(which OpenAI clients send through ``extra_body``) are /generate's own declarations, taken from
``fields.FIELDS`` rather than written again. Validation is ``params.validate``: a field not declared here
(``style``, ``moderation``...) or a value this server cannot honour (``quality: "hd"``,
``response_format: "url"`` with ``stream``) is refused with a 400 naming the param, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from werkzeug.datastructures import FileStorage, MultiDict

from webapp import errors
from webapp.api import uploads
from webapp.api.fields import BY_NAME, RequestField
from webapp.api.forms import form_value
from webapp.api.params import adapters_of, edit_values, generation_values, seeds_from, validate
from webapp.errors import InvalidRequest
from webapp.model import adapters
from webapp.model.profile import Limits
from webapp.model.request import GenerationParams
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
        "b64_json: the images in the answer; url: each image's URL under /v1/jobs, kept for JOB_TTL seconds "
        "(not with stream).",
        default="b64_json",
        choices=("b64_json", "url"),
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
    BY_NAME["loras"],
)


EDIT_TITLE = "CreateImageEditRequest"
# The form fields of an edit: a generation's, with ``size`` meaning the input's own size when auto, and
# ``strength``; the files (``image``, or ``image[]`` as the package sends a list, and ``mask``) are parts of
# their own (``EDIT_FILES``).
EDIT_FIELDS: tuple[RequestField, ...] = (
    *(
        RequestField(
            "size",
            "text",
            "Size",
            "WIDTHxHEIGHT to draw at, the image resized to it: each side within MIN_IMAGE_SIZE..MAX_IMAGE_SIZE and "
            "a multiple of the model's side multiple; or auto, the image's own size (which must be such a size).",
            default="auto",
            high=11,
            pattern=SIZE_PATTERN,
        )
        if field.name == "size"
        else field
        for field in IMAGE_FIELDS
    ),
    BY_NAME["strength"],
)
EDIT_FILES: dict[str, RequestField] = {"image": BY_NAME["image"], "image[]": BY_NAME["image"], "mask": BY_NAME["mask"]}


@dataclass(frozen=True)
class ImageRequest:
    """A validated OpenAI request: what to generate, and how to answer."""

    values: dict[str, Any]  # every declared field, validated (``params.validate``): its type is its declaration's
    size: tuple[int, int] | None  # None: the model's native size
    limits: Limits  # what it was checked against

    @property
    def stream(self) -> bool:
        return bool(self.values["stream"])

    @property
    def model(self) -> str | None:
        return self.values["model"]

    def params(self) -> GenerationParams:
        """What to generate; the limits must be a loaded model's (``Engine.limits``)."""
        values = self.values
        asked = generation_values(values, self.limits)
        if self.size is not None:
            asked["width"], asked["height"] = self.size
        return GenerationParams(
            **asked,
            seeds=seeds_from(values["seed"], values["n"]),
            timeout_s=values["timeout_s"],
            output_format=values["output_format"],
            output_compression=values["output_compression"],
            loras=self.adapters(),
        )

    def adapters(self) -> tuple[tuple[str, float], ...]:
        """The request's ``loras``, and the adapter its ``model`` names (at scale 1), as vLLM serves a LoRA
        module listed by /v1/models."""
        loras = adapters_of(self.values.get("loras"), self.limits)
        named = self.model
        listed = adapters.listing(self.limits.lora_dir) if named is not None else {}
        if named in listed and listed[named].problem:
            message = f"model: adapter {named!r} is refused: {listed[named].problem}"
            raise InvalidRequest(errors.INVALID_FIELD, message, "model")
        if named is not None and named in listed:
            if any(name == named for name, _ in loras):
                message = f"model: names the adapter {named!r}, which loras names too; give it once"
                raise InvalidRequest(errors.INVALID_FIELD, message, "model")
            loras = ((named, 1.0), *loras)
        if len(loras) > self.limits.max_loras:
            message = f"at most MAX_LORAS={self.limits.max_loras} adapters, with the one model names"
            raise InvalidRequest(errors.INVALID_FIELD, message, "loras")
        return loras


@dataclass(frozen=True)
class EditRequest(ImageRequest):
    """A validated edit: an ``ImageRequest`` with its input image's and mask's bytes (not yet decoded)."""

    image: bytes = b""
    mask: bytes | None = None

    def params(self) -> GenerationParams:
        """What to draw: the generation's params with the edit's (``params.edit_values``: the upload decoded and
        checked, at ``size`` or its own), against a loaded model's limits: InvalidRequest for a bad upload
        (answered 400 under /v1/, as OpenAI answers: ``errors.status_for``), 413 for one over MAX_UPLOAD_BYTES."""
        asked = super().params()
        edit = edit_values(
            self.image,
            self.mask,
            self.values["strength"],
            self.size,
            asked.num_inference_steps,
            self.limits,
        )
        return GenerationParams(**{**vars(asked), **edit})


@dataclass(frozen=True)
class EditForm:
    """A multipart edit as it arrived: its fields as JSON values (``forms.form_value``) and its files' bytes."""

    payload: dict[str, Any]
    image: bytes
    mask: bytes | None


def _one(values: list[Any], name: str) -> Any:
    if len(values) > 1:
        raise InvalidRequest(errors.INVALID_FIELD, f"{name}: given {len(values)} times; give it once", name)
    return values[0]


def edit_form(form: MultiDict[str, str], files: MultiDict[str, FileStorage], settings: Settings) -> EditForm:
    """The parts of a multipart edit (``jobs.read_form``) sorted out: one image (as ``image``, or ``image[]``),
    at most one mask, each file within MAX_UPLOAD_BYTES (413, read no further than that), every other part a
    field given once. A file under another name, or an image sent as a text field, is a 400 naming it;
    unknown fields are left for ``validate`` to refuse by name."""
    by_name = {field.name: field for field in EDIT_FIELDS}
    payload: dict[str, Any] = {}
    for name in form:
        if name in EDIT_FILES:
            message = f"{name}: must be a file part (with a filename), not a text field"
            raise InvalidRequest(errors.INVALID_FIELD, message, name.rstrip("[]"))
        raw = _one(form.getlist(name), name)
        payload[name] = form_value(by_name[name], raw) if name in by_name else raw
    for name in files:
        if name not in EDIT_FILES:
            message = f"{name}: not a file this route takes (files: image, mask)"
            raise InvalidRequest(errors.UNKNOWN_FIELD, message, name)
    images = files.getlist("image") + files.getlist("image[]")
    if not images:
        raise InvalidRequest(errors.MISSING_FIELD, "image: is required (a PNG, JPEG or WebP file part)", "image")
    if len(images) > 1:
        message = f"image: this server edits one image per request, got {len(images)}"
        raise InvalidRequest(errors.INVALID_FIELD, message, "image")
    masks = files.getlist("mask")
    mask = _read(_one(masks, "mask"), "mask", settings) if masks else None
    return EditForm(payload, _read(images[0], "image", settings), mask)


def _read(upload: FileStorage, name: str, settings: Settings) -> bytes:
    data = upload.stream.read(settings.max_upload_bytes + 1)
    uploads.check_length(len(data), name, settings.max_upload_bytes)
    return data


def _size(text: str, limits: Limits) -> tuple[int, int] | None:
    """``WxH`` checked against /generate's width and height declarations; None for auto."""
    if text == "auto":
        return None
    sides = tuple(int(side) for side in text.split("x"))
    for side, field in zip(sides, (BY_NAME["width"], BY_NAME["height"]), strict=True):
        low, high = field.bounds(limits)
        multiple = field.multiple(limits)
        assert low is not None and high is not None and multiple
        if not low <= side <= high or side % multiple:
            message = (
                f"size: each side must be from {low:g} to {high:g} and a multiple of {multiple} (or auto), got {text!r}"
            )
            raise InvalidRequest(errors.INVALID_FIELD, message, "size")
    return sides  # type: ignore[return-value]


def parse(payload: object, limits: Limits) -> ImageRequest:
    """Validate a decoded body, or raise InvalidRequest (a 422 is answered 400 under /v1/, as OpenAI's API
    answers: ``errors.status_for``)."""
    values = validate(TITLE, IMAGE_FIELDS, payload, limits)
    return ImageRequest(values, _size(str(values["size"]), limits), limits)


def generation_params(payload: object, limits: Limits) -> GenerationParams:
    """What to generate for a decoded body, checked against a loaded model's ``limits`` (``Engine.limits``):
    the parser ``jobs.admit`` takes for this route."""
    return parse(payload, limits).params()


def parse_edit(form: EditForm, limits: Limits) -> EditRequest:
    """Validate an edit's fields (InvalidRequest naming the param, answered 400 under /v1/); its files are
    checked when its params are made, against a loaded model's limits."""
    values = validate(EDIT_TITLE, EDIT_FIELDS, form.payload, limits)
    return EditRequest(values, _size(str(values["size"]), limits), limits, form.image, form.mask)


def edit_params(form: object, limits: Limits) -> GenerationParams:
    """What to draw for an edit (an ``EditForm``), against a loaded model's ``limits``: the parser
    ``jobs.admit`` takes for /v1/images/edits."""
    assert isinstance(form, EditForm)
    return parse_edit(form, limits).params()
