"""GET / : the HTML demo. With JavaScript it streams progress from /generate/stream and polls /readyz
for the health panel; without it the form posts to /demo and a result page comes back.

The page loads nothing from other origins and is served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, render_template, request

from webapp.api import auth, context, jobs
from webapp.api.forms import form_fields, payload_from_form
from webapp.board import readiness
from webapp.errors import ApiError
from webapp.model import adapters
from webapp.model.request import DEFAULT_STRENGTH
from webapp.settings import SCENES_MODEL

bp = Blueprint("demo", __name__)
KEY_FIELD = "api_key"  # the no-JavaScript form's key field
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@bp.after_request
def secure(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _page(status: int = 200, **shown: Any) -> tuple[str, int]:
    # The scenes module (numpy, PIL) on the first page, not with the app: gunicorn's master imports the
    # app between binding and its first fork, and the first /healthz waits for it (docs/architecture.md §13).
    from webapp.model import scenes

    runtime = context.runtime()
    verdict = readiness.observe(runtime.board, runtime.settings)
    now = time.monotonic()
    shown.setdefault("values", {})
    return (
        render_template(
            "index.html",
            settings=runtime.limits,
            number_fields=form_fields(runtime.limits),
            verdict=verdict,
            workers=[worker.as_row(now) for worker in verdict.workers],
            any_ready=any(worker.ready for worker in verdict.workers),
            needs_key=auth.keys().enabled,
            examples=scenes.EXAMPLES if runtime.settings.model_id == SCENES_MODEL else (),
            edit_strength=DEFAULT_STRENGTH["image"],
            adapters=list(adapters.listing(runtime.settings.lora_dir)),
            adapter_examples=scenes.ADAPTER_EXAMPLES if runtime.settings.model_id == SCENES_MODEL else {},
            **shown,
        ),
        status,
    )


@bp.get("/")
def index() -> tuple[str, int]:
    """The demo page, with a snapshot of every worker's state (JavaScript keeps it live); ``?prompt=``
    fills the prompt (the example links, for a browser without JavaScript)."""
    prompt = request.args.get("prompt", "")
    return _page(values={"prompt": prompt} if prompt else {})


def _values() -> dict[str, str]:
    """The form's values to show again: never the API key."""
    return {name: value for name, value in request.form.items() if name != KEY_FIELD}


def _error_page(exc: ApiError) -> Response:
    page, status = _page(exc.status, values=_values(), error=exc)
    response = Response(page, status=status, mimetype="text/html")
    for name, value in exc.headers.items():
        response.headers[name] = value
    return response


def _refused(exc: ApiError) -> Response:
    """A 401 shown next to the form's key field."""
    return _error_page(ApiError(exc.code, exc.message, KEY_FIELD, exc.headers))


@bp.post("/demo")
@auth.required(refused=_refused, form_field=KEY_FIELD)
def demo_post() -> tuple[str, int] | Response:
    """The form without JavaScript: generate, then answer with the page showing the images or the error."""
    runtime = context.runtime()
    values = _values()
    payload = payload_from_form(request.form)
    if request.form.get("random_seed"):  # the page's "random" box: the server picks the seed
        payload.pop("seed", None)
    try:
        admitted = jobs.admit(runtime, payload, None, time.monotonic())
        images = jobs.wait(admitted)
    except ApiError as exc:
        return _error_page(exc)
    body, _ = jobs.answer(admitted, images)
    return _page(values=values, result=body)
