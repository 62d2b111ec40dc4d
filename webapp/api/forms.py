"""HTML forms as requests: a form's text read as the JSON value each field's declaration takes, for the same
validation as any body (the demo's no-JavaScript form, OpenAI's multipart edits), and the demo's inputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from webapp.api.fields import FIELDS, RequestField
from webapp.model.profile import Limits

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


def form_fields(limits: Limits) -> list[dict[str, Any]]:
    """The demo form's number inputs, in declaration order."""
    rows = []
    for field in FIELDS:
        if not field.demo or not field.taken(limits):
            continue
        low, high = field.bounds(limits)
        step = field.multiple(limits) or (0.5 if field.kind == "number" else 1)
        default = field.default_for(limits)
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


def payload_from_form(form: Mapping[str, str], fields: tuple[RequestField, ...] = FIELDS) -> dict[str, Any]:
    """An HTML form's fields as a request body, each read by ``form_value``: a blank field is absent (the
    server's default), except a required one, which stays blank for validation to refuse by name. A number
    or a list may carry spaces around it; text is kept as typed."""
    payload: dict[str, Any] = {}
    for field in fields:
        raw = form.get(field.name, "")
        value = form_value(field, raw if field.kind in ("text", "choice", "image") else raw.strip())
        if value is not None:
            payload[field.name] = value
        elif field.required:
            payload[field.name] = raw
    return payload
