"""/healthz (liveness) and /readyz (readiness): judged from the board alone, in microseconds. The Open
Inference Protocol's health routes (``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}/ready``,
for KServe and its clients) are aliases that give the same verdicts in that protocol's shape.

None of these routes calls the model, takes the engine's lock or does I/O beyond reading the shared board and
checking pids, so they answer while every request thread of the engine is busy generating.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request

from webapp import errors
from webapp.api import auth, context, job_routes
from webapp.board import readiness
from webapp.board.readiness import Verdict
from webapp.telemetry import logs

bp = Blueprint("health", __name__)


@bp.url_value_preprocessor
def mark_probe(endpoint: str | None, values: dict[str, object] | None) -> None:
    """Every route here is a probe: the access log leaves it out unless LOG_PROBES=1 (``logs.server_logger``).
    Marked as its route is matched, before any before_request hook (the app's body limit may answer first)."""
    request.environ[logs.PROBE_ENVIRON_KEY] = True


def current_verdict() -> Verdict:
    """Judge the board now, and record a readiness change on it if this is the first to see one."""
    runtime = context.runtime()
    return readiness.observe(runtime.board, runtime.settings)


def full_detail() -> bool:
    """Whether this probe may see each worker's row (pid, device, model, error text): always under
    PROBE_DETAIL=full; under brief, only with a valid API key (docs/operations.md, "What the probes show")."""
    runtime = context.runtime()
    if runtime.settings.probe_detail == "full":
        return True
    key = auth.presented_key()
    return key is not None and auth.keys().accepts(key)


def _body(verdict: Verdict, status: str, reason: str, brief: str) -> dict[str, object]:
    now = time.monotonic()
    body: dict[str, object] = {
        "status": status,
        "reason": reason,
        "policy": context.runtime().settings.ready_policy,
        "required_ready": verdict.required_ready,
    }
    if not full_detail():
        return {**body, "reason": brief, "detail": "brief"}
    return {**body, "workers": [worker.as_row(now) for worker in verdict.workers]}


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 while the container can still become or stay ready without a restart; 503 when it cannot
    (a load FAILED for good, a worker UNHEALTHY, the master gone)."""
    verdict = current_verdict()
    body = _body(verdict, "alive" if verdict.alive else "dead", verdict.alive_reason, verdict.alive_brief)
    return jsonify(body), 200 if verdict.alive else 503


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when READY_POLICY holds over the live workers; 503 at once otherwise, with the reason. The job
    store's state is told beside the verdict and never changes it: the synchronous routes serve without
    it (docs/architecture.md §17)."""
    verdict = current_verdict()
    body = _body(verdict, "ready" if verdict.ready else "not_ready", verdict.ready_reason, verdict.ready_brief)
    body["job_store"], why = job_routes.store_state()
    if why is not None and full_detail():
        body["job_store_error"] = why
    return jsonify(body), 200 if verdict.ready else 503


# -- the Open Inference Protocol (KServe v2) ------------------------------------------------------------
# The protocol answers a health question with the status alone: 200 for true, a 4xx for false. 400 is what
# Triton, the protocol's reference server, answers; KServe's own client counts any non-2xx as false. The
# body is small JSON, as KServe's servers send, with the reason /readyz would give.
OIP_FALSE = 400


def _oip(field: str, value: bool, reason: str, brief: str, **extra: object) -> tuple[Response, int]:
    body: dict[str, object] = {**extra, field: value}
    if not value:
        body["reason"] = reason if full_detail() else brief
    return jsonify(body), 200 if value else OIP_FALSE


@bp.get("/v2/health/live")
def oip_live() -> tuple[Response, int]:
    """The /healthz verdict."""
    verdict = current_verdict()
    return _oip("live", verdict.alive, verdict.alive_reason, verdict.alive_brief)


@bp.get("/v2/health/ready")
def oip_ready() -> tuple[Response, int]:
    """The /readyz verdict."""
    verdict = current_verdict()
    return _oip("ready", verdict.ready, verdict.ready_reason, verdict.ready_brief)


@bp.get("/v2/models/<path:name>/ready")
def oip_model_ready(name: str) -> tuple[Response, int]:
    """The /readyz verdict for the one model served here (SERVED_MODEL_NAME or MODEL_ID); 404 for another."""
    settings = context.runtime().settings
    if not settings.serves(name):
        message = f"model {name!r} is not served here; this server serves {settings.model_name!r}"
        return errors.error_response(errors.MODEL_NOT_FOUND, message, "name"), 404
    verdict = current_verdict()
    return _oip("ready", verdict.ready, verdict.ready_reason, verdict.ready_brief, name=settings.model_name)
