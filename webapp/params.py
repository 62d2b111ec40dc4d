"""The parameters of one /generate request, and their validation.

Every field is checked against limits from settings. A bad request raises ``InvalidRequest`` naming the
field and the limit; nothing is clamped, and an unknown field is an error rather than silently dropped.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from webapp.errors import ApiError
from webapp.settings import SIZE_MULTIPLE, Settings

SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1; image i of a request uses (seed + i) % 2**32
FIELDS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "num_images",
    "timeout_s",
)
TIMEOUT_HEADER = "X-Request-Timeout"


class InvalidRequest(ApiError):
    """A client error (4xx) naming the offending ``field`` where there is one."""


@dataclass(frozen=True)
class GenerationParams:
    """A validated request. ``seeds`` holds one seed per image."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]
    timeout_s: float | None = None  # the client's own deadline, never above REQUEST_TIMEOUT

    @property
    def num_images(self) -> int:
        return len(self.seeds)


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(422, "invalid_field", f"{field}: {message}", field)


def _shown(value: object) -> str:
    """A client's value for an error message, cut short: an integer may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _integer(payload: dict[str, Any], field: str, default: int | None, low: int, high: int) -> int | None:
    value = payload.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field, f"must be an integer from {low} to {high}, got {type(value).__name__}")
    if not low <= value <= high:
        raise _invalid(field, f"must be from {low} to {high}, got {_shown(value)}")
    return value


def _number(value: object, field: str, low: float, high: float) -> float:
    """A JSON number from ``low`` to ``high``. An integer is compared exactly: converting one with hundreds
    of digits to a float would overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(field, f"must be a number from {low:g} to {high:g}, got {type(value).__name__}")
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise _invalid(field, f"must be from {low:g} to {high:g}, got {_shown(value)}")
    return float(value)


def _size(payload: dict[str, Any], field: str, default: int, settings: Settings) -> int:
    low, high = settings.min_image_size, settings.max_image_size
    value = _integer(payload, field, default, low, high)
    assert value is not None
    if value % SIZE_MULTIPLE:
        raise _invalid(field, f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
    return value


def _text(payload: dict[str, Any], field: str, limit: int, required: bool) -> str | None:
    value = payload.get(field)
    if value is None:
        if required:
            raise InvalidRequest(422, "missing_field", f"{field}: is required", field)
        return None
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _invalid(field, "must not be empty")
    if len(value) > limit:
        raise _invalid(field, f"must be at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise _invalid(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as exc:
        bad = f"U+{ord(value[exc.start]):04X}"
        raise _invalid(field, f"must be valid Unicode text: a lone surrogate {bad} at character {exc.start}") from None
    return value


def parse_timeout(value: object, field: str, limit: float) -> float | None:
    """A client deadline in seconds: a number more than 0 and at most REQUEST_TIMEOUT (never clamped)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(field, f"must be a number of seconds, got {type(value).__name__}")
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= limit:
        raise _invalid(field, f"must be more than 0 and at most REQUEST_TIMEOUT={limit:g} s, got {_shown(value)}")
    return float(value)


def timeout_from_header(text: str | None, limit: float) -> float | None:
    """The X-Request-Timeout header: a header is text, so a number written as text is the only form."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(TIMEOUT_HEADER, f"must be a number of seconds, got {_shown(text)}") from None
    return parse_timeout(value, TIMEOUT_HEADER, limit)


def parse(payload: object, settings: Settings, default_size: tuple[int, int]) -> GenerationParams:
    """Validate a decoded JSON body; ``default_size`` (width, height) is the model's native size."""
    if not isinstance(payload, dict):
        raise InvalidRequest(422, "invalid_body", f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise InvalidRequest(
            422, "unknown_field", f"{unknown[0]}: unknown field (accepted: {', '.join(FIELDS)})", unknown[0]
        )

    prompt = _text(payload, "prompt", settings.max_prompt_chars, required=True)
    assert prompt is not None
    negative = _text(payload, "negative_prompt", settings.max_prompt_chars, required=False)
    steps = _integer(payload, "num_inference_steps", settings.default_steps, 1, settings.max_steps)
    num_images = _integer(payload, "num_images", 1, 1, settings.max_images)
    seed = _integer(payload, "seed", None, 0, SEED_LIMIT - 1)

    guidance = payload.get("guidance_scale")
    if guidance is None:
        guidance = settings.default_guidance
    guidance = _number(guidance, "guidance_scale", 0, settings.max_guidance)

    width = _size(payload, "width", default_size[0], settings)
    height = _size(payload, "height", default_size[1], settings)

    assert steps is not None and num_images is not None
    first = secrets.randbelow(SEED_LIMIT) if seed is None else seed
    seeds = tuple((first + i) % SEED_LIMIT for i in range(num_images))
    timeout = parse_timeout(payload.get("timeout_s"), "timeout_s", settings.request_timeout)
    return GenerationParams(prompt, negative, steps, guidance, width, height, seeds, timeout)
