"""The pydantic model of a request body, built from its field declarations (``webapp.api.fields``) under the
loaded model's limits: it validates bodies (``webapp.api.params.validate``) and gives the JSON Schema the
OpenAPI document carries. Strict: a JSON integer for an integer, a JSON number for a number (never converted:
one with hundreds of digits would overflow), and a field no declaration names is refused, never dropped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from webapp.api.fields import LOSSY_ONLY, TEXT_PATTERN, RequestField
from webapp.model import adapters
from webapp.model.profile import Limits


def clean_text(value: str | None) -> str | None:
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


def _annotation(field: RequestField, limits: Limits) -> Any:
    low, high = field.bounds(limits)
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
        return Annotated[list[item], Field(max_length=limits.max_loras)] | None  # type: ignore[valid-type]
    if field.kind == "image":
        encoded = {"contentEncoding": "base64", "contentMediaType": "image/*"}
        return Annotated[str, Field(max_length=int(high), json_schema_extra=encoded)] | None  # type: ignore[arg-type]
    if field.kind == "text":
        checks: list[Any] = [Field(max_length=int(high))] if high is not None else []
        if field.pattern:
            checks.append(Field(pattern=field.pattern))
        checks.append(AfterValidator(clean_text))
        if field.required:
            checks.append(AfterValidator(_not_blank))
        if not field.pattern:  # the document says what clean_text and _not_blank check
            checks.append(Field(json_schema_extra={"pattern": TEXT_PATTERN[field.required]}))
        text = Annotated[str, *checks]
        return text if field.required else text | None
    constraints: dict[str, Any] = {"le": high, "multiple_of": field.multiple(limits)}
    constraints["gt" if field.low_exclusive else "ge"] = low
    if field.kind == "number":
        constraints["allow_inf_nan"] = False
    base = int if field.kind == "integer" else float
    number = Annotated[base, Field(**{key: value for key, value in constraints.items() if value is not None})]
    return number if field.required else number | None


@lru_cache(maxsize=16)
def model_of(title: str, fields: tuple[RequestField, ...], limits: Limits) -> type[BaseModel]:
    """The pydantic model of a body made of ``fields`` under ``limits`` (strict: a JSON integer for an
    integer, a JSON number for a number; unknown fields refused)."""
    definitions: dict[str, Any] = {}
    for field in taken(fields, limits):
        default = ... if field.required else field.default_for(limits)
        definitions[field.name] = (_annotation(field, limits), Field(default, description=field.meaning))
    names = {field.name for field in taken(fields, limits)}
    extra = LOSSY_ONLY if {"output_format", "output_compression"} <= names else None
    config = ConfigDict(strict=True, extra="forbid", title=title, json_schema_extra=extra)
    return create_model(title, __config__=config, **definitions)


def taken(fields: tuple[RequestField, ...], limits: Limits) -> tuple[RequestField, ...]:
    """The ``fields`` the model under ``limits`` takes."""
    return tuple(field for field in fields if field.taken(limits))
