"""/healthz (liveness) and /readyz (readiness): judged from the board alone, in microseconds.

Neither route calls the model, takes the engine's lock or does I/O beyond reading the shared board and
checking pids, so both answer while every request thread of the engine is busy generating.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify

from webapp import readiness
from webapp.readiness import Verdict
from webapp.runtime import Runtime

bp = Blueprint("health", __name__)


def current_verdict() -> Verdict:
    """Judge the board now, and record a readiness change on it if this is the first to see one."""
    runtime: Runtime = current_app.extensions["runtime"]
    return readiness.observe(runtime.board, runtime.settings)


def _body(verdict: Verdict, status: str, reason: str) -> dict[str, object]:
    now = time.monotonic()
    return {
        "status": status,
        "reason": reason,
        "policy": current_app.extensions["runtime"].settings.ready_policy,
        "required_ready": verdict.required_ready,
        "workers": [worker.as_row(now) for worker in verdict.workers],
    }


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """200 while the container can still become or stay ready without a restart; 503 when it cannot
    (a load FAILED for good, a worker UNHEALTHY, the master gone)."""
    verdict = current_verdict()
    body = _body(verdict, "alive" if verdict.alive else "dead", verdict.alive_reason)
    return jsonify(body), 200 if verdict.alive else 503


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when READY_POLICY holds over the live workers; 503 at once otherwise, with the reason."""
    verdict = current_verdict()
    body = _body(verdict, "ready" if verdict.ready else "not_ready", verdict.ready_reason)
    return jsonify(body), 200 if verdict.ready else 503
