"""POST /generate: validate, hand the job to this worker's engine, wait with a deadline, answer.

Transport errors come first (413 size, 415 content type, 400 unparseable JSON, 406 Accept), then 503
while this worker is not READY or its queue is full, then 422 for a field outside its limits.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from webapp import errors
from webapp.board import State
from webapp.engine import DeadlineExceeded, NotReady, Overloaded, WorkerUnhealthy
from webapp.params import TIMEOUT_HEADER, InvalidRequest, parse, parse_timeout
from webapp.runtime import Runtime

bp = Blueprint("generate", __name__)
log = logging.getLogger("webapp.generate")
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


def _retry_after(runtime: Runtime) -> str:
    record = runtime.board.read(runtime.slot)
    if record.state in (State.STARTING, State.LOADING) and record.next_retry_mono:
        return str(max(1, round(record.next_retry_mono - time.monotonic())))
    return str(NOT_READY_RETRY_AFTER_S)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@bp.post("/generate")
def generate() -> Response:
    """Images for a JSON request: PNG for ``Accept: image/png`` (one image), else JSON with base64 PNGs,
    seeds and timings. 4xx for bad input, 503 + Retry-After when not ready or full, 504 past the deadline."""
    runtime: Runtime = current_app.extensions["runtime"]
    settings = runtime.settings
    received = time.monotonic()
    try:
        payload = _read_json(settings.max_body_bytes)
        wants = request.accept_mimetypes.best_match([JSON, PNG])
        if wants is None:
            raise InvalidRequest(406, errors.NOT_ACCEPTABLE, f"Accept must allow {JSON} or {PNG}")
        engine = runtime.engine
        if engine is None or engine.model is None or engine.state is not State.READY:
            state = engine.state if engine is not None else State.FAILED
            raise NotReady(state)
        params = parse(payload, settings, engine.model.default_size)
        header_timeout = parse_timeout(request.headers.get(TIMEOUT_HEADER), TIMEOUT_HEADER, settings.request_timeout)
        if wants == PNG and params.num_images != 1:
            raise InvalidRequest(
                406, errors.NOT_ACCEPTABLE, f"{PNG} holds one image; ask for {JSON} for num_images > 1", "num_images"
            )
        timeout = min(t for t in (settings.request_timeout, params.timeout_s, header_timeout) if t is not None)
        job = engine.submit(params, deadline=received + timeout)
    except InvalidRequest as exc:
        return errors.error_response(exc.status, exc.code, exc.message, exc.field)
    except NotReady as exc:
        message = f"this worker is {exc.state.name}; see /readyz"
        return errors.error_response(503, errors.NOT_READY, message, headers={"Retry-After": _retry_after(runtime)})
    except Overloaded as exc:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return errors.error_response(503, errors.OVERLOADED, str(exc), headers=headers)

    try:
        images = job.future.result(timeout=max(0.0, job.deadline - time.monotonic()))
    except WorkerUnhealthy as exc:
        message = f"this worker turned UNHEALTHY before finishing: {exc}"
        return errors.error_response(
            503, errors.WORKER_UNHEALTHY, message, headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
        )
    except FutureTimeout:
        job.abandoned = True  # the engine drops it unrun, or stops its batch if nobody else waits
        job.future.cancel()
        state = "while running" if job.started else "in the queue"
        return errors.error_response(504, errors.TIMEOUT, f"deadline of {timeout:g} s passed {state}")
    except DeadlineExceeded as exc:
        state = "while running" if exc.ran else "in the queue"
        return errors.error_response(504, errors.TIMEOUT, f"deadline of {timeout:g} s passed {state}: {exc}")
    except Exception:  # logged with the request id; the client sees no stack trace
        log.exception("event=generate_error request_id=%s slot=%s", g.request_id, runtime.slot)
        message = f"generation failed; quote request id {g.request_id} to the operator"
        return errors.error_response(500, errors.INTERNAL, message)

    encode_start = time.monotonic()
    pngs = [_png_bytes(image) for image in images]
    done = time.monotonic()
    timings = {
        "queue_ms": round((job.started - job.enqueued) * 1000, 1),
        "generate_ms": round((job.finished - job.started) * 1000, 1),
        "encode_ms": round((done - encode_start) * 1000, 1),
        "total_ms": round((done - received) * 1000, 1),
    }
    batch = {"jobs": job.batch_jobs, "images": job.batch_images}
    if wants == PNG:
        response = Response(pngs[0], mimetype=PNG)
        response.headers["X-Seed"] = str(params.seeds[0])
        response.headers["X-Generate-Ms"] = str(timings["generate_ms"])
        response.headers["X-Batch-Images"] = str(batch["images"])
        return response
    return jsonify(
        {
            "images": [
                {"seed": seed, "png_base64": base64.b64encode(png).decode("ascii")}
                for seed, png in zip(params.seeds, pngs, strict=True)
            ],
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "timings": timings,
            "batch": batch,
            "worker": {"slot": runtime.slot, "pid": runtime.board.read(runtime.slot).pid},
        }
    )
