"""POST /generate (JSON, or one image's bytes) and POST /generate/stream (server-sent progress events).

Both read top to bottom with ``webapp.api.jobs``: read the body, admit the job, wait, answer. Transport errors
come first (413 size, 415 content type, 400 unparseable JSON, 406 Accept), then 503 while this worker is
not READY or already full, then 422 for a field outside its limits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, request

from webapp import errors
from webapp.api import auth, bodies, context, images, job_routes, jobs
from webapp.api.fields import TIMEOUT_HEADER
from webapp.api.jobs import JSON
from webapp.errors import ApiError, InvalidRequest

bp = Blueprint("generate", __name__)


IMAGE_TYPES = list(images.BY_MEDIA_TYPE)


def _negotiate(payload: object) -> str:
    """The media type to answer in, from Accept (JSON when there is none: RFC 9110 12.5.1, and urllib
    and http.client send none). An image type answers with that format's bytes, so it must agree with an
    output_format in the body, and it holds one image."""
    wants = request.accept_mimetypes.best_match([JSON, *IMAGE_TYPES]) if request.headers.get("Accept") else JSON
    if wants is None:
        raise InvalidRequest(errors.NOT_ACCEPTABLE, f"Accept must allow {JSON} or one of {', '.join(IMAGE_TYPES)}")
    if wants == JSON or not isinstance(payload, dict):
        return wants
    named = images.BY_MEDIA_TYPE[wants]
    chosen = payload.get("output_format")
    if chosen is not None and chosen != named:
        message = f"Accept: {wants} and output_format {chosen!r} disagree; ask for {JSON} or drop one"
        raise InvalidRequest(errors.NOT_ACCEPTABLE, message, "output_format")
    count = payload.get("num_images")
    if isinstance(count, int) and not isinstance(count, bool) and count != 1:
        message = f"{wants} holds one image; ask for {JSON} for num_images > 1"
        raise InvalidRequest(errors.NOT_ACCEPTABLE, message, "num_images")
    return wants


@bp.post("/generate")
@bodies.takes_uploads
@auth.required
def generate() -> Response:
    """Images for a JSON request: the image's bytes for ``Accept: image/png`` (or image/jpeg, image/webp;
    one image), else JSON with base64 images, seeds and timings. 4xx for bad input, 503 + Retry-After
    when not ready or full, 504 past the deadline."""
    runtime = context.runtime()
    received = time.monotonic()
    try:
        payload = jobs.read_json()
        if job_routes.wants_async():  # Prefer: respond-async: stored as a job, answered 202 (§17)
            return job_routes.accept("generate", payload)
        wants = _negotiate(payload)
        if wants != JSON:
            payload = {"output_format": images.BY_MEDIA_TYPE[wants], **payload}
        admitted = jobs.admit(runtime, payload, request.headers.get(TIMEOUT_HEADER), received)
        finished = jobs.wait(admitted)
    except ApiError as exc:
        return exc.response()
    if wants != JSON:
        response = Response(jobs.encoded(admitted, finished)[0], mimetype=wants)
        response.headers["X-Seed"] = str(admitted.params.seeds[0])
        response.headers["X-Generate-Ms"] = str(jobs.timings(admitted)["generate_ms"])
        response.headers["X-Batch-Images"] = str(admitted.job.batch_images)
        return response
    return jsonify(jobs.answer(admitted, finished)[0])


@bp.post("/generate/stream")
@bodies.takes_uploads
@auth.required
def generate_stream() -> Response:
    """The same request as /generate, answered as server-sent events: ``progress`` ({step, total}) after
    every denoising step, then ``done`` (the JSON /generate answer) or ``error`` ({status, code, message,
    field}). A request refused before it is queued gets the plain JSON error and status instead."""
    runtime = context.runtime()
    received = time.monotonic()
    try:
        payload = jobs.read_json()
        admitted = jobs.admit(runtime, payload, request.headers.get(TIMEOUT_HEADER), received)
    except ApiError as exc:
        return exc.response()
    total = admitted.params.steps_run

    def events() -> Iterator[str]:
        yield jobs.event({"total": total}, "queued")
        for step in jobs.steps(admitted):
            yield jobs.event({"step": step, "total": total}, "progress")
        try:
            finished = jobs.wait(admitted)
        except ApiError as exc:
            yield jobs.event(exc.as_dict(), "error")
            return
        yield jobs.event(jobs.answer(admitted, finished)[0], "done")

    response = Response(jobs.streamed(admitted, events()), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"  # proxies must pass each event on at once
    return response
