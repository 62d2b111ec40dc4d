"""POST /generate (JSON or PNG) and POST /generate/stream (server-sent progress events).

Both go the same way: validate, hand the job to this worker's engine, wait with a deadline, answer.
Transport errors come first (413 size, 415 content type, 400 unparseable JSON, 406 Accept), then 503
while this worker is not READY or already full, then 422 for a field outside its limits. ``admit``,
``await_images`` and ``result_body`` are shared with the HTML demo's form post.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from webapp import errors, logs, metrics
from webapp.board import State
from webapp.engine import DeadlineExceeded, Job, NotReady, Overloaded, RejectedByModel, WorkerUnhealthy
from webapp.errors import ApiError
from webapp.params import TIMEOUT_HEADER, GenerationParams, InvalidRequest, parse, timeout_from_header
from webapp.runtime import Runtime

bp = Blueprint("generate", __name__)
log = logs.get(__name__)
PNG = "image/png"
JSON = "application/json"
NOT_READY_RETRY_AFTER_S = 5


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _read_json(max_bytes: int) -> object:
    if request.content_length is not None and request.content_length > max_bytes:
        message = f"body is {request.content_length} bytes; the limit is {max_bytes}"
        raise InvalidRequest(413, errors.PAYLOAD_TOO_LARGE, message)
    if request.mimetype != JSON and not request.mimetype.endswith("+json"):
        shown = request.mimetype or "none"
        raise InvalidRequest(415, errors.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {JSON}, got {shown}")
    # The app's MAX_CONTENT_LENGTH is one byte over the limit, so a chunked body that is too long shows
    # as one byte too many here rather than being cut off silently at the limit.
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise InvalidRequest(413, errors.PAYLOAD_TOO_LARGE, f"body exceeds the limit of {max_bytes} bytes")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise InvalidRequest(400, errors.BAD_JSON, "body is not UTF-8") from None
    except ValueError as exc:
        raise InvalidRequest(400, errors.BAD_JSON, f"body is not valid JSON: {exc}") from None
    except RecursionError:  # a body of a few kilobytes can nest arrays thousands deep
        raise InvalidRequest(400, errors.BAD_JSON, "body is not valid JSON: nested too deeply") from None


def retry_after(runtime: Runtime) -> str:
    record = runtime.board.read(runtime.slot)
    if record.state in (State.STARTING, State.LOADING) and record.next_retry_mono:
        return str(max(1, round(record.next_retry_mono - time.monotonic())))
    return str(NOT_READY_RETRY_AFTER_S)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Admitted:
    """A job the engine accepted, with what the answer needs."""

    runtime: Runtime
    job: Job
    params: GenerationParams
    timeout: float
    received: float


def admit(runtime: Runtime, payload: object, header_timeout: str | None, received: float) -> Admitted:
    """Validate ``payload`` and queue it on this worker's engine, or raise ApiError (422, 503 + Retry-After)."""
    settings = runtime.settings
    engine = runtime.engine
    if engine is None or engine.model is None or engine.state is not State.READY:
        state = engine.state if engine is not None else State.FAILED
        raise ApiError(
            503,
            errors.NOT_READY,
            f"this worker is {state.name}; see /readyz",
            headers={"Retry-After": retry_after(runtime)},
        )
    params = parse(payload, settings, engine.model.default_size)
    from_header = timeout_from_header(header_timeout, settings.request_timeout)
    timeout = min(t for t in (settings.request_timeout, params.timeout_s, from_header) if t is not None)
    try:
        job = engine.submit(params, deadline=received + timeout)
    except NotReady as exc:
        message = f"this worker is {exc.state.name}; see /readyz"
        raise ApiError(503, errors.NOT_READY, message, headers={"Retry-After": retry_after(runtime)}) from None
    except Overloaded as exc:
        raise ApiError(503, errors.OVERLOADED, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    return Admitted(runtime, job, params, timeout, received)


def await_images(admitted: Admitted, wait_s: float | None = None) -> list[Any] | None:
    """The job's images; None if ``wait_s`` passed first (the job goes on). Raises ApiError for 422 (the
    pipeline failed on this request alone while the worker stayed sound), 503 (the worker turned UNHEALTHY),
    504 (deadline) or 500 (the generation failed and the worker's canary too; logged with the request id)."""
    job, timeout = admitted.job, admitted.timeout
    until_deadline = max(0.0, job.deadline - time.monotonic())
    try:
        return job.future.result(timeout=until_deadline if wait_s is None else min(wait_s, until_deadline))
    except FutureTimeout:
        if wait_s is not None and time.monotonic() < job.deadline:
            return None
        job.abandoned = True  # the engine drops it unrun, or stops its batch if nobody else waits
        job.future.cancel()
        metrics.recorder().timed_out.labels("running" if job.started else "queued").inc()
        state = "while running" if job.started else "in the queue"
        raise ApiError(504, errors.TIMEOUT, f"deadline of {timeout:g} s passed {state}") from None
    except WorkerUnhealthy as exc:
        message = f"this worker turned UNHEALTHY before finishing: {exc}"
        headers = {"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
        raise ApiError(503, errors.WORKER_UNHEALTHY, message, headers=headers) from None
    except RejectedByModel as exc:  # logged with the request id; the error may hold internals: not shown
        log.warning("request_rejected_by_model", slot=admitted.runtime.slot, error=str(exc), exc_info=exc.__cause__)
        cause = (
            "this request needs more device memory than the worker has (ask for fewer or smaller images)"
            if exc.out_of_memory
            else "the model failed on this request's input"
        )
        message = f"{cause}, while the worker stayed sound; quote request id {g.request_id} to the operator"
        raise ApiError(422, errors.REJECTED_BY_MODEL, message) from None
    except DeadlineExceeded as exc:
        metrics.recorder().timed_out.labels("running" if exc.ran else "queued").inc()
        state = "while running" if exc.ran else "in the queue"
        raise ApiError(504, errors.TIMEOUT, f"deadline of {timeout:g} s passed {state}: {exc}") from None
    except Exception:  # logged with the request id; the client sees no stack trace
        log.exception("generate_error", slot=admitted.runtime.slot)  # the request id is bound to the thread
        message = f"generation failed; quote request id {g.request_id} to the operator"
        raise ApiError(500, errors.INTERNAL, message) from None


def result_body(admitted: Admitted, images: list[Any]) -> tuple[dict[str, Any], list[bytes]]:
    """The JSON answer for finished images, and the PNG bytes."""
    job, params, runtime = admitted.job, admitted.params, admitted.runtime
    encode_start = time.monotonic()
    pngs = [_png_bytes(image) for image in images]
    done = time.monotonic()
    body = {
        "images": [
            {"seed": seed, "png_base64": base64.b64encode(png).decode("ascii")}
            for seed, png in zip(params.seeds, pngs, strict=True)
        ],
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "timings": {
            "queue_ms": round((job.started - job.enqueued) * 1000, 1),
            "generate_ms": round((job.finished - job.started) * 1000, 1),
            "encode_ms": round((done - encode_start) * 1000, 1),
            "total_ms": round((done - admitted.received) * 1000, 1),
        },
        "batch": {"jobs": job.batch_jobs, "images": job.batch_images},
        "worker": {"slot": runtime.slot, "pid": runtime.board.read(runtime.slot).pid},
    }
    return body, pngs


@bp.post("/generate")
def generate() -> Response:
    """Images for a JSON request: PNG for ``Accept: image/png`` (one image), else JSON with base64 PNGs,
    seeds and timings. 4xx for bad input, 503 + Retry-After when not ready or full, 504 past the deadline."""
    runtime: Runtime = current_app.extensions["runtime"]
    received = time.monotonic()
    try:
        payload = _read_json(runtime.settings.max_body_bytes)
        # RFC 9110 12.5.1: no Accept means any type (urllib and http.client send none); werkzeug's
        # best_match would find nothing in an empty list.
        wants = request.accept_mimetypes.best_match([JSON, PNG]) if request.headers.get("Accept") else JSON
        if wants is None:
            raise InvalidRequest(406, errors.NOT_ACCEPTABLE, f"Accept must allow {JSON} or {PNG}")
        count = payload.get("num_images") if isinstance(payload, dict) else None
        if wants == PNG and isinstance(count, int) and not isinstance(count, bool) and count != 1:
            raise InvalidRequest(
                406, errors.NOT_ACCEPTABLE, f"{PNG} holds one image; ask for {JSON} for num_images > 1", "num_images"
            )
        admitted = admit(runtime, payload, request.headers.get(TIMEOUT_HEADER), received)
        images = await_images(admitted)
    except ApiError as exc:
        return exc.response()
    assert images is not None
    body, pngs = result_body(admitted, images)
    if wants == PNG:
        response = Response(pngs[0], mimetype=PNG)
        response.headers["X-Seed"] = str(admitted.params.seeds[0])
        response.headers["X-Generate-Ms"] = str(body["timings"]["generate_ms"])
        response.headers["X-Batch-Images"] = str(body["batch"]["images"])
        return response
    return jsonify(body)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@bp.post("/generate/stream")
def generate_stream() -> Response:
    """The same request as /generate, answered as server-sent events: ``progress`` ({step, total}) after
    every denoising step, then ``done`` (the JSON /generate answer) or ``error`` ({status, code, message,
    field}). A request refused before it is queued gets the plain JSON error and status instead."""
    runtime: Runtime = current_app.extensions["runtime"]
    received = time.monotonic()
    try:
        admitted = admit(
            runtime, _read_json(runtime.settings.max_body_bytes), request.headers.get(TIMEOUT_HEADER), received
        )
    except ApiError as exc:
        return exc.response()
    total = admitted.params.num_inference_steps

    def events() -> Iterator[str]:
        job = admitted.job
        try:
            yield _event("queued", {"total": total})
            while True:
                try:  # a step number as soon as the engine finishes the step; None once the job is settled
                    step = job.updates.get(timeout=max(0.0, job.deadline - time.monotonic()))
                except queue.Empty:
                    step = None  # the deadline passed: await_images answers the 504
                if step is not None:
                    yield _event("progress", {"step": step, "total": total})
                    continue
                try:
                    images = await_images(admitted)
                except ApiError as exc:
                    yield _event("error", exc.as_dict())
                    return
                assert images is not None
                yield _event("done", result_body(admitted, images)[0])
                return
        finally:
            if not job.future.done():  # the client went away (gunicorn closes the stream): nobody to answer
                job.abandoned = True
                job.future.cancel()
                log.info("stream_abandoned", slot=runtime.slot, steps_done=job.steps_done, total=total)

    response = Response(events(), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"  # proxies must pass each event on at once
    return response
