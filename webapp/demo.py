"""GET / : the HTML demo. With JavaScript it streams progress from /generate/stream and polls /readyz
for the health panel; without it the form posts to /demo and a result page comes back.

The page loads nothing from other origins and is served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request

from webapp.errors import ApiError
from webapp.generate import admit, await_images, result_body
from webapp.health import current_verdict
from webapp.params import InvalidRequest
from webapp.runtime import Runtime

bp = Blueprint("demo", __name__)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
INTEGER_FIELDS = ("num_inference_steps", "width", "height", "seed", "num_images")
NUMBER_FIELDS = ("guidance_scale",)
TEXT_FIELDS = ("prompt", "negative_prompt")


@bp.after_request
def secure(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _payload_from_form(form: Any) -> dict[str, Any]:
    """The form's strings as a /generate payload: blank fields are left to the server's defaults."""
    payload: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if form.get(name, "") or name == "prompt":
            payload[name] = form.get(name, "")
    for name in INTEGER_FIELDS + NUMBER_FIELDS:
        raw = form.get(name, "").strip()
        if not raw or (name == "seed" and form.get("random_seed")):
            continue
        try:
            payload[name] = int(raw) if name in INTEGER_FIELDS else float(raw)
        except ValueError:
            kind = "an integer" if name in INTEGER_FIELDS else "a number"
            raise InvalidRequest(422, "invalid_field", f"{name}: must be {kind}, got {raw!r}", name) from None
    return payload


def _page(status: int = 200, **context: Any) -> tuple[str, int]:
    runtime: Runtime = current_app.extensions["runtime"]
    verdict = current_verdict()
    now = time.monotonic()
    context.setdefault("values", {})
    return (
        render_template(
            "index.html",
            settings=runtime.settings,
            verdict=verdict,
            workers=[w.as_row(now) for w in verdict.workers],
            any_ready=any(w.ready for w in verdict.workers),
            **context,
        ),
        status,
    )


@bp.get("/")
def index() -> tuple[str, int]:
    """The demo page, with a snapshot of every worker's state (JavaScript keeps it live)."""
    return _page()


@bp.post("/demo")
def demo_post() -> tuple[str, int] | Response:
    """The form without JavaScript: generate, then answer with the page showing the images or the error."""
    runtime: Runtime = current_app.extensions["runtime"]
    values = request.form.to_dict()
    try:
        admitted = admit(runtime, _payload_from_form(request.form), None, time.monotonic())
        images = await_images(admitted)
    except ApiError as exc:
        page, status = _page(exc.status, values=values, error=exc)
        response = Response(page, status=status, mimetype="text/html")
        for name, value in exc.headers.items():
            response.headers[name] = value
        return response
    assert images is not None
    body, _ = result_body(admitted, images)
    return _page(values=values, result=body)
