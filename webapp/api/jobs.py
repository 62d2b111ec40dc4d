"""One generation request's path through a worker, for every route that generates: read the body, admit
the job to the engine, wait for it, and answer (docs/architecture.md §6).

    read_json()            415 content type, 400 unparseable JSON, 413 a chunked body past the route's limit
    read_form(settings)    the same for a multipart/form-data body (an edit's uploads)
    admit(...)             503 + Retry-After while the worker is not READY or is full; 422 for a bad field
    wait(admitted)         the images, or 422 / 503 / 504 / 500 as ``wait`` says
    answer(admitted, ...)  the JSON body (base64 images, seeds, timings, batch, worker) and the image bytes

Every refusal is an ``ApiError``; Retry-After values come from the engine, which knows when it may have
room or be ready. Routes never read the board.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from flask import g, request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from webapp import errors
from webapp.api import answers, bodies, context
from webapp.api.images import encode
from webapp.api.params import parse, timeout_from_header
from webapp.engine.core import (
    NOT_READY_RETRY_AFTER_S,
    DeadlineExceeded,
    Job,
    NotReady,
    Overloaded,
    RejectedByModel,
    WorkerUnhealthy,
)
from webapp.errors import ApiError, InvalidRequest
from webapp.model.adapters import AdapterFailed
from webapp.model.faults import NonFiniteOutput
from webapp.model.request import GenerationParams
from webapp.runtime import Runtime
from webapp.settings import Settings
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
JSON = "application/json"
MULTIPART = "multipart/form-data"
# The most parts a multipart body may have: an edit has two files and two dozen fields at most. werkzeug
# refuses more (413) as it parses, so thousands of empty parts cost no more than reading them.
MAX_FORM_PARTS = 64


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def read_json() -> object:
    """The request's JSON body, decoded; InvalidRequest (415, 400, or 413 for a chunked body) when it cannot be.
    Its route's limit (``webapp.api.bodies``) was checked against a declared length before the route ran."""
    max_bytes = bodies.limit(request.path)
    if request.mimetype != JSON and not request.mimetype.endswith("+json"):
        shown = request.mimetype or "none"
        raise InvalidRequest(errors.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {JSON}, got {shown}")
    # The app's MAX_CONTENT_LENGTH is one byte over the limit, so a chunked body that is too long shows
    # as one byte too many here rather than being cut off silently at the limit.
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise InvalidRequest(errors.PAYLOAD_TOO_LARGE, f"body exceeds the limit of {max_bytes} bytes")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise InvalidRequest(errors.BAD_JSON, "body is not UTF-8") from None
    except ValueError as exc:
        raise InvalidRequest(errors.BAD_JSON, f"body is not valid JSON: {exc}") from None
    except RecursionError:  # a body of a few kilobytes can nest arrays thousands deep
        raise InvalidRequest(errors.BAD_JSON, "body is not valid JSON: nested too deeply") from None


def read_form(settings: Settings) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
    """A multipart/form-data body's fields and files; InvalidRequest (413, 415, 400) when it cannot be read:
    another content type, no boundary, parts that cannot be parsed, a chunked body over its route's limit
    (``webapp.api.bodies``: a declared length over it was refused before the route ran), more than
    MAX_FORM_PARTS parts, or a field (not a file) over MAX_BODY_BYTES."""
    limit = bodies.limit(request.path)
    if request.mimetype != MULTIPART:
        shown = request.mimetype or "none"
        raise InvalidRequest(errors.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {MULTIPART}, got {shown}")
    if not request.mimetype_params.get("boundary"):
        message = f"Content-Type {MULTIPART} needs its boundary parameter"
        raise InvalidRequest(errors.BAD_MULTIPART, message)
    parser = FormDataParser(
        max_form_memory_size=settings.max_body_bytes,
        max_content_length=limit,
        silent=False,
        max_form_parts=MAX_FORM_PARTS,
    )
    try:
        _, form, files = parser.parse(request.stream, MULTIPART, request.content_length, request.mimetype_params)
    except RequestEntityTooLarge:
        message = (
            f"multipart body over its limits: at most {MAX_FORM_PARTS} parts, {limit} bytes, and "
            f"MAX_BODY_BYTES={settings.max_body_bytes} for a field that is not a file"
        )
        raise InvalidRequest(errors.PAYLOAD_TOO_LARGE, message) from None
    except ValueError as exc:
        raise InvalidRequest(errors.BAD_MULTIPART, f"multipart body cannot be parsed: {exc}") from None
    return form, files


@dataclass
class Admitted:
    """A job the engine accepted, with what the answer needs."""

    runtime: Runtime
    job: Job
    timeout: float  # seconds from ``received``: the least of REQUEST_TIMEOUT and the client's own
    received: float
    encode_s: float = 0.0  # set by ``encoded``

    @property
    def params(self) -> GenerationParams:
        return self.job.params


def _not_ready(state_name: str, retry_after_s: int) -> ApiError:
    message = f"this worker is {state_name}; see /readyz"
    return ApiError(errors.NOT_READY, message, headers={"Retry-After": str(retry_after_s)})


Parser = Callable[[object, Settings], GenerationParams]


def admit(
    runtime: Runtime, payload: object, header_timeout: str | None, received: float, parser: Parser = parse
) -> Admitted:
    """Validate ``payload`` with ``parser`` against the loaded model's limits (``Engine.limits``: the
    settings with its sizes, multiple and defaults) and queue it on this worker's engine, or raise ApiError
    (503 + Retry-After while not READY or full, 4xx for a bad field). An edit's files are checked from their
    headers first, and decoded only once the job holds its place (``Engine.reserve``), by the worker's
    ``Decoder``: a request shed for a full worker costs no decode (docs/architecture.md §15)."""
    settings, engine = runtime.settings, runtime.engine
    if engine is None:
        raise _not_ready(runtime.lifecycle.state.name, NOT_READY_RETRY_AFTER_S)
    try:
        limits = engine.limits()
        params = parser(payload, limits)
        from_header = timeout_from_header(header_timeout, settings)
        timeout = min(t for t in (settings.request_timeout, params.timeout_s, from_header) if t is not None)
        deadline = received + timeout
        if params.upload is None:
            job = engine.submit(params, deadline=deadline)
        else:
            engine.reserve()
            try:
                params = context.decoder().decode(params, limits, deadline)
            except BaseException:
                engine.release()
                raise
            job = engine.submit(params, deadline=deadline, reserved=True)
    except NotReady as exc:
        raise _not_ready(exc.state.name, exc.retry_after_s) from None
    except Overloaded as exc:
        raise ApiError(errors.OVERLOADED, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except TimeoutError as exc:
        recorder().timed_out.labels("queued").inc()
        raise ApiError(errors.TIMEOUT, f"deadline of {timeout:g} s passed: {exc}") from None
    return Admitted(runtime, job, timeout, received)


def _timed_out(admitted: Admitted, ran: bool, detail: str = "") -> ApiError:
    recorder().timed_out.labels("running" if ran else "queued").inc()
    where = "while running" if ran else "in the queue"
    message = f"deadline of {admitted.timeout:g} s passed {where}" + (f": {detail}" if detail else "")
    return ApiError(errors.TIMEOUT, message)


def wait(admitted: Admitted) -> list[Any]:
    """The job's images, waiting until its deadline at most. Raises ApiError: 422 (the
    pipeline failed on this request alone while the worker stayed sound), 503 (the worker turned
    UNHEALTHY), 504 (deadline), 500 (the generation failed and the worker's canary too, or the model drew
    non-finite pixels: ``non_finite_output``). Errors are logged
    here, on the request's thread, so they carry its request id."""
    job = admitted.job
    until_deadline = max(0.0, job.deadline - time.monotonic())
    try:
        return job.future.result(timeout=until_deadline)
    except FutureTimeout:
        job.abandon()
        raise _timed_out(admitted, ran=bool(job.started)) from None
    except DeadlineExceeded as exc:
        raise _timed_out(admitted, exc.ran, str(exc)) from None
    except WorkerUnhealthy as exc:
        message = f"this worker turned UNHEALTHY before finishing: {exc}"
        headers = {"Retry-After": str(exc.retry_after_s)}
        raise ApiError(errors.WORKER_UNHEALTHY, message, headers=headers) from None
    except AdapterFailed as exc:  # the request's fault: the worker stayed sound and its weights clean
        raise ApiError(errors.ADAPTER_FAILED, f"loras: {exc}", "loras") from None
    except NonFiniteOutput as exc:  # counted against the worker by the runner
        message = (
            f"{exc}; no image is sent for a non-finite result, and the operator should check the model's dtype; "
            f"quote request id {g.request_id}"
        )
        raise ApiError(errors.NON_FINITE_OUTPUT, message) from None
    except RejectedByModel as exc:  # the error may hold internals: logged, not shown
        log.warning("request_rejected_by_model", slot=admitted.runtime.slot, error=str(exc), exc_info=exc.__cause__)
        cause = (
            "this request needs more device memory than the worker has (ask for fewer or smaller images)"
            if exc.out_of_memory
            else "the model failed on this request's input"
        )
        message = f"{cause}, while the worker stayed sound; quote request id {g.request_id} to the operator"
        raise ApiError(errors.REJECTED_BY_MODEL, message) from None
    except Exception:  # the client sees no stack trace
        log.exception("generate_error", slot=admitted.runtime.slot)
        message = f"generation failed; quote request id {g.request_id} to the operator"
        raise ApiError(errors.INTERNAL, message) from None


def steps(admitted: Admitted) -> Iterator[int]:
    """Each denoising step's number the moment the engine finishes it, until the job is settled or its
    deadline passes; then ``wait`` gives the images or the error."""
    job = admitted.job
    while True:
        try:
            step = job.updates.get(timeout=max(0.0, job.deadline - time.monotonic()))
        except queue.Empty:
            return  # the deadline passed: wait answers the 504
        if step is None:
            return
        yield step


def event(data: dict[str, Any], name: str | None = None) -> str:
    """One server-sent event carrying ``data`` as JSON, named ``name`` when given: every stream's format."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def streamed(admitted: Admitted, events: Iterator[str]) -> Iterator[str]:
    """``events`` of a streamed answer; when the client goes away first (gunicorn closes the iterator on a
    failed write), the job is abandoned: nobody is left to answer."""
    job = admitted.job
    try:
        yield from events
    finally:
        if not job.future.done():
            job.abandon()
            log.info("stream_abandoned", slot=admitted.runtime.slot, steps_done=job.steps_done)


def encoded(admitted: Admitted, images: list[Any]) -> list[bytes]:
    """The finished images in the request's output_format; the time it took is in the timings."""
    params = admitted.params
    started = time.monotonic()
    data = [encode(image, params.output_format, params.output_compression) for image in images]
    admitted.encode_s = time.monotonic() - started
    return data


def timings(admitted: Admitted) -> dict[str, float]:
    """Where the request's time went, in milliseconds, once its images are encoded."""
    job = admitted.job
    spent = {
        "queue_ms": round((job.started - job.enqueued) * 1000, 1),
        "generate_ms": round((job.finished - job.started) * 1000, 1),
        "encode_ms": round(admitted.encode_s * 1000, 1),
        "total_ms": round((time.monotonic() - admitted.received) * 1000, 1),
    }
    if admitted.params.loras:  # part of generate_ms: loading the adapters its batch needed (0 when held)
        spent["adapter_load_ms"] = round(job.adapter_load_s * 1000, 1)
    return spent


def answer(admitted: Admitted, images: list[Any]) -> tuple[dict[str, Any], list[bytes]]:
    """The JSON answer for finished images (``<format>_base64`` per image: png_base64 by default), and the
    encoded bytes."""
    params = admitted.params
    data = encoded(admitted, images)
    key = f"{params.output_format}_base64"
    body = answers.GenerateResponse(
        images=[
            answers.Image.model_validate({"seed": seed, key: base64.b64encode(item).decode("ascii")})
            for seed, item in zip(params.seeds, data, strict=True)
        ],
        output_format=params.output_format,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        timings=timings(admitted),
        batch=batch(admitted),
        worker=worker(admitted),
        edit=edit(params),
    )
    return body.body(), data


def edit(params: GenerationParams) -> answers.Edit | None:
    """What an edit did, once its upload is decoded (None for text-to-image)."""
    mode, size = params.mode, params.input_size
    if mode == "text" or size is None:
        return None
    return answers.Edit(
        mode=mode, strength=params.strength, denoising_steps=params.steps_run, input_size=f"{size[0]}x{size[1]}"
    )


def batch(admitted: Admitted) -> answers.Batch:
    return answers.Batch(jobs=admitted.job.batch_jobs, images=admitted.job.batch_images)


def worker(admitted: Admitted) -> answers.Worker:
    return answers.Worker(slot=admitted.runtime.slot, pid=os.getpid())
