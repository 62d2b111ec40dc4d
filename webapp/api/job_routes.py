"""Asynchronous jobs over HTTP (docs/architecture.md §17): submit, read, follow, fetch images, cancel.

    POST /v1/jobs                       /generate's body -> 202, Location, the job (validated first, the same
                                        4xx as /generate; committed before the answer)
    POST /generate + Prefer: respond-async    the same
    GET  /v1/jobs[?status=&limit=]      the caller's jobs, newest first
    GET  /v1/jobs/<id>                  the job; 404 unknown (or another key's), 410 past its retention
    GET  /v1/jobs/<id>/events           its states as server-sent events, resumable with Last-Event-ID
    GET  /v1/jobs/<id>/images/<n>       an image's bytes
    POST /v1/jobs/<id>/cancel           idempotent

``Prefer: wait=N`` on a submit or a GET holds the answer up to N seconds (at most REQUEST_TIMEOUT) for the job
to finish, and says what it applied in ``Preference-Applied``. An ``Idempotency-Key`` makes a submit safe to repeat.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from webapp import errors
from webapp.api import answers, auth, bodies, context, jobs, webhooks
from webapp.api.claimer import PARSERS, Claimer, stored_output
from webapp.api.images import FORMATS
from webapp.engine.core import NotReady
from webapp.errors import ApiError, InvalidRequest
from webapp.queue import Store, open_store
from webapp.queue.store import (
    STATUSES,
    IdempotencyConflict,
    StoredJob,
    StoreUnavailable,
    lease_owner,
    new_id,
)
from webapp.runtime import Runtime
from webapp.settings import Settings
from webapp.telemetry import logs

log = logs.get(__name__)
bp = Blueprint("jobs", __name__, url_prefix=errors.JOBS_PATH)
IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as Stripe's and the IETF draft's keys
STORE_RETRY_AFTER_S = 5
EVENTS_POLL_S = 0.05  # how often a long poll or an event stream reads the job: how late a client may learn
_STORE, _CLAIMER, _DELIVERER = "honest_diffusion.job_store", "honest_diffusion.claimer", "honest_diffusion.webhooks"
_WAITERS, _WAITERS_ANY = "honest_diffusion.job_waiters", "honest_diffusion.job_waiters_any"


def waiting_places(settings: Settings) -> int:
    """How many long polls and event streams a worker holds at once: the request threads left over when
    every admitted /generate holds one and two stay free for the probes (THREADS - MAX_ONGOING - MAX_QUEUED
    - 2). A request thread that waits on a job is not free to answer /readyz: without this bound, clients
    following jobs could starve the probes (docs/architecture.md §17)."""
    return settings.threads - settings.max_ongoing - settings.max_queued - 2


def _waiting_place() -> bool:
    """Take a place to wait in, if one is free (give it back with ``_leave``)."""
    return bool(current_app.extensions[_WAITERS_ANY]) and current_app.extensions[_WAITERS].acquire(blocking=False)


def install(app: Flask, runtime: Runtime) -> None:
    """Give ``app`` the job store, and for a worker with an engine the claimer that runs stored jobs."""
    job_store = open_store(runtime.settings)
    app.extensions[_STORE] = job_store
    app.extensions[_WAITERS] = threading.BoundedSemaphore(max(1, waiting_places(runtime.settings)))
    app.extensions[_WAITERS_ANY] = waiting_places(runtime.settings) > 0
    if runtime.engine is not None:
        claimer = Claimer(app, runtime, job_store, lease_owner(runtime.settings, os.getpid()))
        deliverer = webhooks.Deliverer(job_store, runtime.settings, _body, runtime.slot)
        app.extensions[_CLAIMER], app.extensions[_DELIVERER] = claimer, deliverer
        claimer.start()
        deliverer.start()


def shutdown(app: Flask) -> None:
    """The worker exits: its claimer stops and gives back the jobs it still runs."""
    deliverer = app.extensions.get(_DELIVERER)
    if deliverer is not None:
        deliverer.stop()
    claimer = app.extensions.get(_CLAIMER)
    if claimer is not None:
        try:
            claimer.stop()
        except StoreUnavailable as exc:  # their leases lapse and another worker takes them
            log.warning("job_store_unavailable", error=str(exc))


def store() -> Store:
    return current_app.extensions[_STORE]


def store_state() -> tuple[str, str | None]:
    """What this worker's claimer last saw of the job store (``Claimer.store_state``); "unknown" with no
    engine (no claimer)."""
    claimer = current_app.extensions.get(_CLAIMER)
    return claimer.store_state() if claimer is not None else ("unknown", None)


def wants_async() -> bool:
    """Whether the request's Prefer header asks for an asynchronous answer (RFC 7240 respond-async)."""
    return "respond-async" in _preferences()


def _preferences() -> dict[str, str]:
    found = {}
    for part in request.headers.get("Prefer", "").split(","):
        name, _, value = part.split(";")[0].strip().partition("=")
        if name:
            found[name.lower()] = value.strip().strip('"')
    return found


def _wait_s() -> float | None:
    """Prefer: wait=N, in seconds, at most REQUEST_TIMEOUT; None when not asked."""
    asked = _preferences().get("wait")
    if asked is None:
        return None
    if not asked.isdigit():
        raise InvalidRequest(errors.INVALID_FIELD, f"Prefer wait must be whole seconds, got {asked!r}", "Prefer")
    return min(float(asked), context.runtime().settings.request_timeout)


def accept(route: str, payload: object) -> Response:
    """Validate ``payload`` as ``route`` would (the loaded model's limits: 503 + Retry-After before that),
    store it as a queued job and answer 202 with it, or the job as it stands after Prefer: wait."""
    runtime = context.runtime()
    if runtime.engine is None:
        raise ApiError(errors.NOT_READY, f"this worker is {runtime.lifecycle.state.name}; see /readyz",
                       headers={"Retry-After": str(STORE_RETRY_AFTER_S)})  # fmt: skip
    payload, webhook, events = webhooks.read_fields(payload, runtime.settings)
    try:
        PARSERS[route](payload, runtime.engine.limits())
    except NotReady as exc:
        message = f"this worker is {exc.state.name}; see /readyz"
        raise ApiError(errors.NOT_READY, message, headers={"Retry-After": str(exc.retry_after_s)}) from None
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not _KEY_PATTERN.match(key):
        message = f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters"
        raise InvalidRequest(errors.INVALID_FIELD, message, IDEMPOTENCY_HEADER)
    wait_s = _wait_s()
    assert isinstance(payload, dict)  # the parser refused anything else
    try:
        stored, created = store().submit(auth.owner(), route, payload, key, webhook, events)
    except IdempotencyConflict as exc:
        message = f"{IDEMPOTENCY_HEADER} {key!r} already names job {exc} made from another body"
        raise InvalidRequest(errors.IDEMPOTENCY_CONFLICT, message, IDEMPOTENCY_HEADER) from None
    except StoreUnavailable as exc:
        raise _store_unavailable(exc) from None
    claimer = current_app.extensions.get(_CLAIMER)
    if claimer is not None:
        claimer.wake()
    applied = []
    if wait_s is not None:
        stored, waited = _wait_for(stored, wait_s)
        if waited:
            applied.append(f"wait={wait_s:g}")
    response = jsonify(_body(stored))
    response.status_code = 200 if stored.finished else 202
    response.headers["Location"] = f"{errors.JOBS_PATH}/{stored.id}"
    if "respond-async" in _preferences():
        applied.insert(0, "respond-async")
    if applied:
        response.headers["Preference-Applied"] = ", ".join(applied)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def keep_finished(route: str, kept: dict[str, object], admitted: jobs.Admitted, finished: list[object]) -> list[str]:
    """Store a request answered at once as a finished job, with its images, for its client to fetch by URL
    (OpenAI's ``response_format: "url"``); the images' paths. 503 job_store_unavailable when it cannot."""
    job_id = new_id()
    body, data = jobs.answer(admitted, finished)
    output = stored_output(job_id, body)
    media_type = FORMATS[admitted.params.output_format]
    try:
        store().record(job_id, auth.owner(), route, kept, output, [(media_type, item) for item in data])
    except StoreUnavailable as exc:
        raise _store_unavailable(exc) from None
    return [image["url"] for image in output["images"]]


def _store_unavailable(exc: StoreUnavailable) -> ApiError:
    stored = " nothing was stored;" if request.method == "POST" else ""
    message = f"the job store cannot answer now ({exc});{stored} try again after Retry-After"
    return ApiError(errors.JOB_STORE_UNAVAILABLE, message, headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def _wait_for(stored: StoredJob, seconds: float) -> tuple[StoredJob, bool]:
    """The job once it finishes or ``seconds`` pass, and whether it was waited for: when every waiting place
    of this worker is taken (``waiting_places``), the job as it stands, at once (RFC 7240: a preference the
    server may decline; Preference-Applied then leaves it out)."""
    if stored.finished or not _waiting_place():
        return stored, stored.finished
    places = current_app.extensions[_WAITERS]
    try:
        end = time.monotonic() + seconds
        while not stored.finished and time.monotonic() < end:
            time.sleep(min(EVENTS_POLL_S, max(0.0, end - time.monotonic())))
            stored = _read(stored.id)
    finally:
        places.release()
    return stored, True


def _read(job_id: str) -> StoredJob:
    """The caller's job: 404 when there is none (or it is another key's), 410 past its retention."""
    try:
        stored = store().get(job_id)
    except StoreUnavailable as exc:
        raise _store_unavailable(exc) from None
    if stored is None or stored.owner != auth.owner():
        raise ApiError(errors.JOB_NOT_FOUND, f"no job {job_id!r}", "id")
    if stored.expired(time.time()):
        raise ApiError(errors.JOB_EXPIRED, f"job {job_id} expired at {stored.expires_at:.0f} (JOB_TTL)", "id")
    return stored


def _body(stored: StoredJob) -> dict[str, object]:
    """The job object (``answers.Job``)."""
    progress = None
    if stored.status == "running" and stored.step is not None:
        progress = answers.Progress(step=stored.step, total=stored.total_steps)
    error = answers.JobError(code=stored.error_code, message=stored.error_message or "") if stored.error_code else None
    return answers.Job(
        id=stored.id,
        status=stored.status,
        created_at=stored.created_at,
        started_at=stored.started_at,
        completed_at=stored.completed_at,
        expires_at=stored.expires_at,
        queue_position=stored.queue_position,
        progress=progress,
        attempt=stored.attempt,
        request=stored.request,
        error=error,
        output=answers.JobOutput.model_validate(stored.output) if stored.output else None,
        webhook=stored.webhook,
        webhook_events_filter=list(stored.webhook_events) if stored.webhook else None,
    ).body()


@bp.post("")
@bodies.takes_uploads
@auth.required
def submit() -> Response:
    """Store a job from /generate's body; 202 with the job and its Location."""
    try:
        return accept("generate", jobs.read_json())
    except ApiError as exc:
        return exc.response()


@bp.get("")
@auth.required
def list_jobs() -> Response:
    limit = request.args.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        return InvalidRequest(errors.INVALID_FIELD, "limit must be a whole number from 1 to 100", "limit").response()
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        message = f"status must be one of {', '.join(STATUSES)}"
        return InvalidRequest(errors.INVALID_FIELD, message, "status").response()
    try:
        found = store().list(auth.owner(), int(limit), status)
    except StoreUnavailable as exc:
        return _store_unavailable(exc).response()
    return jsonify(answers.JobList(data=[answers.Job.model_validate(_body(job)) for job in found]).body())


@bp.get("/<job_id>")
@auth.required
def get_job(job_id: str) -> Response:
    """The job; with ``Prefer: wait=N``, once it finishes or N seconds pass (a long poll: one request
    instead of one every few hundred milliseconds)."""
    try:
        stored = _read(job_id)
        wait_s = _wait_s()
        if wait_s is None:
            return jsonify(_body(stored))
        stored, waited = _wait_for(stored, wait_s)
        response = jsonify(_body(stored))
        if waited:
            response.headers["Preference-Applied"] = f"wait={wait_s:g}"
        return response
    except ApiError as exc:
        return exc.response()


@bp.post("/<job_id>/cancel")
@auth.required
def cancel(job_id: str) -> Response:
    """Cancel: a queued job at once, a running one between its steps, a finished one is left as it is."""
    try:
        _read(job_id)
        canceled = store().cancel(job_id)
        assert canceled is not None
        return jsonify(_body(canceled))
    except StoreUnavailable as exc:
        return _store_unavailable(exc).response()
    except ApiError as exc:
        return exc.response()


@bp.get("/<job_id>/images/<int:n>")
@auth.required
def image(job_id: str, n: int) -> Response:
    try:
        stored = _read(job_id)
        found = store().image(job_id, n)
    except StoreUnavailable as exc:
        return _store_unavailable(exc).response()
    except ApiError as exc:
        return exc.response()
    if found is None:
        message = f"job {job_id} has no image {n} (it is {stored.status})"
        return ApiError(errors.JOB_NOT_FOUND, message, "n").response()
    media_type, data = found
    return Response(data, mimetype=media_type)


@bp.get("/<job_id>/events")
@auth.required
def events(job_id: str) -> Response:
    """The job's states as server-sent events, one per change (its version is the event's id), named by
    its status (``progress`` for a running job's steps), until it finishes or REQUEST_TIMEOUT passes (a
    client reconnects with Last-Event-ID and misses nothing but the steps in between)."""
    try:
        stored = _read(job_id)
    except ApiError as exc:
        return exc.response()
    if not _waiting_place():
        places = waiting_places(context.runtime().settings)
        message = (
            f"this worker already follows {max(0, places)} jobs for clients (THREADS - MAX_ONGOING - MAX_QUEUED - 2, "
            "so that the probes always find a thread): poll GET /v1/jobs/<id>, or follow again after Retry-After"
        )
        return ApiError(errors.FOLLOWERS_FULL, message, headers={"Retry-After": "1"}).response()
    seen = request.headers.get("Last-Event-ID", "")
    last = int(seen) if seen.isdigit() else 0
    until = time.monotonic() + context.runtime().settings.request_timeout
    owner = auth.owner()
    job_store = store()

    def stream(stored: StoredJob | None, last: int) -> Iterator[str]:
        while stored is not None and time.monotonic() < until:
            if stored.version > last:
                last = stored.version
                name = "progress" if stored.status == "running" and stored.step else stored.status
                yield f"id: {last}\nevent: {name}\ndata: {json.dumps(_body(stored))}\n\n"
            if stored.finished:
                return
            time.sleep(EVENTS_POLL_S)
            try:
                stored = job_store.get(job_id)
            except StoreUnavailable:
                continue
            if stored is not None and stored.owner != owner:
                return

    response = Response(stream(stored, last), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.call_on_close(current_app.extensions[_WAITERS].release)  # when the stream ends or its client leaves
    return response
