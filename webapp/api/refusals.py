"""A request's problems in words: pydantic's first error turned into our InvalidRequest, naming the field,
what it takes and what it got (a client's value cut short: an integer may have thousands of digits).
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

from webapp import errors
from webapp.api.fields import RequestField, bounds_text
from webapp.api.schema import clean_text
from webapp.errors import InvalidRequest
from webapp.model.profile import Limits


def shown_value(value: object) -> str:
    """A client's value for an error message, cut short: an integer may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(errors.INVALID_FIELD, f"{field}: {message}", field)


def explain(error: Any, fields: dict[str, RequestField], limits: Limits) -> InvalidRequest:
    """Our 422 for pydantic's first error: the field, what it takes, and what it got."""
    name, kind, value = str(error["loc"][0]), error["type"], error.get("input")
    nested = len(error["loc"]) > 1  # inside a field's value (an adapter's keys): that field explains it
    if nested and fields[name].kind == "adapters":
        return _explain_adapters(error, fields[name], limits)
    if kind == "extra_forbidden" and name in fields:  # declared, but not taken by the loaded model
        family = limits.model_family or "loaded"
        return invalid(name, f"the {family} model served here does not take it: {fields[name].not_taken}")
    if kind == "extra_forbidden":
        accepted = ", ".join(name for name, field in fields.items() if field.taken(limits))
        return InvalidRequest(errors.UNKNOWN_FIELD, f"{name}: unknown field (accepted: {accepted})", name)
    if kind == "missing" or (value is None and fields[name].required):
        return InvalidRequest(errors.MISSING_FIELD, f"{name}: is required", name)
    field = fields[name]
    if field.kind == "choice":
        shown = ", ".join(field.choices)
        return invalid(name, f"must be one of {shown}, got {shown_value(value)}. {field.meaning}")
    if field.kind == "boolean":
        return invalid(name, f"must be true or false, got {shown_value(value)}")
    if field.kind == "adapters":
        return _explain_adapters(error, field, limits)
    if field.kind == "image" and kind == "string_too_long":
        message = (
            f"{name}: is {len(value)} characters of base64; the limit is MAX_UPLOAD_BYTES="
            f"{limits.max_upload_bytes} bytes ({error['ctx']['max_length']} characters)"
        )
        return InvalidRequest(errors.PAYLOAD_TOO_LARGE, message, name)
    if field.kind == "image":
        return invalid(name, f"must be a base64 string (an image file), got {type(value).__name__}")
    if field.kind == "text":
        if kind == "string_too_long":
            return invalid(name, f"must be at most {error['ctx']['max_length']} characters, got {len(value)}")
        if kind == "text":
            return invalid(name, error["msg"])
        if kind == "string_pattern_mismatch":
            return invalid(name, f"{field.meaning} Got {shown_value(value)}")
        if isinstance(value, str):  # pydantic-core refuses a lone surrogate before our check sees it
            try:
                clean_text(value)
            except PydanticCustomError as problem:
                return invalid(name, problem.message())
        return invalid(name, f"must be a string, got {type(value).__name__}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    what = "an integer" if field.kind == "integer" else "a number"
    if kind == "multiple_of":
        family = f" (the {limits.model_family} model's side multiple)" if limits.model_family else ""
        return invalid(name, f"must be a multiple of {field.multiple(limits)}{family}, got {value}")
    if (field.kind == "integer" and not integer) or not number:
        return invalid(name, f"must be {what} {bounds_text(field, limits)}, got {type(value).__name__}")
    return invalid(name, f"must be {bounds_text(field, limits)}, got {shown_value(value)}")


def _explain_adapters(error: Any, field: RequestField, limits: Limits) -> InvalidRequest:
    """Our 422 for a problem inside ``loras``, with where in it (``loras[0].scale``)."""
    name, kind, value = field.name, error["type"], error.get("input")
    where = name + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
    if kind == "too_long":
        return invalid(name, f"at most MAX_LORAS={limits.max_loras} adapters, got {len(value)}")
    if kind == "missing":
        return invalid(name, f"{where} is required")
    if kind == "extra_forbidden":
        return invalid(name, f"{where}: unknown key (an adapter takes name and scale)")
    if kind == "string_pattern_mismatch":
        return invalid(name, f"{where} must be an adapter's name (letters, digits, . _ -), got {shown_value(value)}")
    if where.endswith(".scale"):
        return invalid(name, f"{where} must be a number {bounds_text(field, limits)}, got {shown_value(value)}")
    return invalid(name, f"{where}: must be a list of {{name, scale}} objects, got {shown_value(value)}")
