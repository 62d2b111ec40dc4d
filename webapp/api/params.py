"""A generation request parsed: a decoded body validated against the loaded model's limits (``validate``,
over the declarations of ``webapp.api.fields``) and assembled into the ``GenerationParams`` the engine runs
(docs/architecture.md §6). A bad request raises InvalidRequest naming the field and the limit
(``webapp.api.refusals``); nothing is clamped, and an unknown field is an error rather than silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from typing import Any

from pydantic import ValidationError

from webapp import errors
from webapp.api import images, uploads
from webapp.api.fields import BY_NAME, DATA_URL, FIELDS, SEED_LIMIT, TIMEOUT_HEADER, RequestField, bounds_text
from webapp.api.refusals import explain, invalid, shown_value
from webapp.api.schema import model_of, taken
from webapp.errors import InvalidRequest
from webapp.model import adapters
from webapp.model.profile import Limits
from webapp.model.request import DEFAULT_STRENGTH, GenerationParams, edit_steps

__all__ = ["TIMEOUT_HEADER", "InvalidRequest", "parse", "timeout_from_header", "validate"]


def validate(title: str, fields: tuple[RequestField, ...], payload: object, limits: Limits) -> dict[str, Any]:
    """A decoded JSON body checked against ``fields``: every field's value (its default when absent or
    null), or InvalidRequest (422) for the first problem, an unknown field before any other."""
    if not isinstance(payload, dict):
        message = f"the body must be a JSON object, got {type(payload).__name__}"
        raise InvalidRequest(errors.INVALID_BODY, message)
    refused = {field.name for field in fields if not field.taken(limits)}
    payload = {key: value for key, value in payload.items() if not (key in refused and value is None)}
    try:
        request = model_of(title, fields, limits).model_validate(payload)
    except ValidationError as exc:
        found = exc.errors()
        first = next((error for error in found if error["type"] == "extra_forbidden"), found[0])
        raise explain(first, {field.name: field for field in fields}, limits) from None
    values = request.model_dump()
    for field in taken(fields, limits):  # null means absent, as for an optional field anywhere in JSON APIs
        if values[field.name] is None and field.default is not None:
            values[field.name] = field.default_for(limits)
    given = {name for name in request.model_fields_set if payload.get(name) is not None}
    if "output_compression" in given and values.get("output_format") not in images.LOSSY:
        lossy = " and ".join(images.LOSSY)
        raise invalid("output_compression", f"applies to {lossy} only; {values.get('output_format')} is lossless")
    return values


def seeds_from(first: int | None, count: int) -> tuple[int, ...]:
    """One seed per image: ``first`` (random when None), then first + 1, ... modulo 2**32."""
    first_seed = secrets.randbelow(SEED_LIMIT) if first is None else first
    return tuple((first_seed + i) % SEED_LIMIT for i in range(count))


def generation_values(values: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """What the model is asked for, from validated ``values`` under a loaded model's ``limits``
    (``Engine.limits``): a field it does not take is absent (its default: no negative prompt, the model's
    guidance), and an absent size is the default one."""
    width, height = limits.request_size
    return {
        "prompt": values["prompt"],
        "negative_prompt": values.get("negative_prompt"),
        "num_inference_steps": values["num_inference_steps"],
        "guidance_scale": float(values.get("guidance_scale", limits.default_guidance) or 0.0),
        "width": values.get("width") or width,
        "height": values.get("height") or height,
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
    return InvalidRequest(errors.INVALID_IMAGE, f"{name}: {message}", name)


def edit_values(
    image: bytes | None,
    mask: bytes | None,
    strength: float | None,
    size: tuple[int, int] | None,
    steps: int,
    limits: Limits,
) -> dict[str, Any]:
    """The edit's part of ``GenerationParams`` (empty for text-to-image): the input image and mask as an
    ``Upload`` whose headers are checked (``uploads.inspect``; decoded, at ``size`` or the input's own when
    None, once its job holds a place: ``jobs.admit``), the strength (its mode's default when None) and the
    denoising steps that strength runs, which must be at least one."""
    if image is None:
        if mask is not None:
            raise invalid("mask", "needs an image to repaint (image)")
        if strength is not None:
            raise invalid("strength", "applies to edits only: give an image")
        return {}
    mode = "image" if mask is None else "inpaint"
    if mode not in limits.edit_modes:  # the model inpaints but cannot do image-to-image alone
        family = limits.model_family or "loaded"
        raise invalid("mask", f"is required: the {family} model served here only inpaints (docs/api.md, Edits)")
    upload = uploads.inspect(image, mask, size, limits)
    strength = DEFAULT_STRENGTH[mode] if strength is None else strength
    run = edit_steps(steps, strength, limits.model_family)
    if run < 1:
        message = (
            f"{strength:g} of {steps} steps runs no denoising step; ask for at least {1 / steps:.3g} "
            "(1 / num_inference_steps), or for more steps"
        )
        raise invalid("strength", message)
    return {"upload": upload, "strength": strength, "denoising_steps": run}


def adapters_of(asked: list[dict[str, Any]] | None, limits: Limits) -> tuple[tuple[str, float], ...]:
    """A request's validated ``loras`` as (name, scale) pairs, each name one LORA_DIR lists now (read at this
    request: an adapter dropped into the folder is usable without a restart), none twice; 422 naming
    ``loras`` otherwise."""
    if not asked:
        return ()
    found = adapters.listing(limits.lora_dir)
    names = [item["name"] for item in asked]
    for index, name in enumerate(names):
        if name not in found:
            listed = ", ".join(found) or "none"
            raise invalid("loras", f"loras[{index}].name: no adapter {name!r} in LORA_DIR (listed: {listed})")
        if names.index(name) != index:
            raise invalid("loras", f"loras[{index}].name: {name!r} is named twice")
        if found[name].problem:
            raise invalid("loras", f"loras[{index}].name: adapter {name!r} is refused: {found[name].problem}")
    return tuple((item["name"], float(item["scale"])) for item in asked)


def parse(payload: object, limits: Limits) -> GenerationParams:
    """Validate a decoded /generate body against a loaded model's ``limits`` (``Engine.limits``); an image's
    header is checked here, on the request's thread, and its pixels decoded once admitted (``jobs.admit``)."""
    values = validate("GenerateRequest", FIELDS, payload, limits)
    asked = generation_values(values, limits)
    sized = isinstance(payload, dict) and any(payload.get(side) is not None for side in ("width", "height"))
    image, mask = decoded("image", values.get("image")), decoded("mask", values.get("mask"))
    size = (asked["width"], asked["height"]) if sized else None
    edit = edit_values(image, mask, values.get("strength"), size, asked["num_inference_steps"], limits)
    return GenerationParams(
        **{**asked, **edit},
        seeds=seeds_from(values["seed"], values["num_images"]),
        timeout_s=values["timeout_s"],
        output_format=values["output_format"],
        output_compression=values["output_compression"],
        loras=adapters_of(values.get("loras"), limits),
    )


def timeout_from_header(text: str | None, limits: Limits) -> float | None:
    """The X-Request-Timeout header: a header is text, so a number written as text is the only form; its
    limits are timeout_s's."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise invalid(TIMEOUT_HEADER, f"must be a number of seconds, got {shown_value(text)}") from None
    field = BY_NAME["timeout_s"]
    if not math.isfinite(value) or not 0 < value <= limits.request_timeout:
        raise invalid(TIMEOUT_HEADER, f"must be {bounds_text(field, limits)}, got {shown_value(text)}")
    return value
