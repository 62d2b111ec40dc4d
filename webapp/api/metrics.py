"""GET /metrics: Prometheus text for the whole container, answered by any worker.

Two sources, both read at scrape time: every process's counted events (``webapp.telemetry.recorder``), summed from
the instance's multiprocess folder (``webapp.board.metric_files``), dead workers included; and what is true now
(each slot's state, queue depth, heartbeat age; the container's readiness), read from the board rather than
from gauges a dead process would leave behind. ``init_app`` installs the route on an app.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response

from webapp.api import context, job_routes
from webapp.board import metric_files, readiness
from webapp.board.readiness import view_workers
from webapp.board.slots import State
from webapp.queue import Store
from webapp.queue.store import StoreUnavailable
from webapp.telemetry.recorder import PREFIX, recorder

if TYPE_CHECKING:
    from webapp.runtime import Runtime

bp = Blueprint("metrics", __name__)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


class BoardCollector:
    """Gauges read from the board at scrape time: they describe now, whoever is alive to answer."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        board, settings = self.runtime.board, self.runtime.settings
        now = time.monotonic()
        verdict = readiness.observe(board, settings)
        record = board.readiness

        yield GaugeMetricFamily(PREFIX + "ready", "1 while /readyz answers 200.", value=int(verdict.ready))
        yield GaugeMetricFamily(PREFIX + "alive", "1 while /healthz answers 200.", value=int(verdict.alive))
        changes = CounterMetricFamily(
            PREFIX + "readiness_changes", "Times /readyz turned ready or not_ready, since start.", labels=["to"]
        )
        changes.add_metric(["ready"], record.to_ready)
        changes.add_metric(["not_ready"], record.to_not_ready)
        yield changes
        yield GaugeMetricFamily(
            PREFIX + "readiness_last_change_timestamp_seconds",
            "Unix time of the last readiness change (0 before the first).",
            value=record.changed_wall,
        )
        yield GaugeMetricFamily(
            PREFIX + "workers_expected", "Workers gunicorn is configured for.", value=board.expected_workers
        )
        yield GaugeMetricFamily(
            PREFIX + "workers_required_ready",
            "READY workers /readyz needs (READY_POLICY).",
            value=verdict.required_ready,
        )

        yield from _slot_gauges(settings, board.read_all(), now)


def _slot_gauges(settings: Any, records: list[Any], now: float) -> Iterator[Any]:
    """Each slot's state and load, as the board records it now."""
    from prometheus_client.core import GaugeMetricFamily

    state = GaugeMetricFamily(
        PREFIX + "worker_state",
        "1 for the state each board slot records (see worker_untrusted for whether to believe it).",
        labels=["slot", "state"],
    )
    per_slot = {
        "queued": GaugeMetricFamily(PREFIX + "worker_queued_jobs", "Jobs waiting in the worker.", labels=["slot"]),
        "in_flight": GaugeMetricFamily(
            PREFIX + "worker_running_jobs", "Jobs in the worker's running batch.", labels=["slot"]
        ),
        "heartbeat": GaugeMetricFamily(
            PREFIX + "worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.", labels=["slot"]
        ),
        "crashes": GaugeMetricFamily(
            PREFIX + "worker_crash_streak", "Deaths in a row of the slot's workers before READY.", labels=["slot"]
        ),
        "attempt": GaugeMetricFamily(
            PREFIX + "worker_load_attempt", "The worker's current or last load attempt.", labels=["slot"]
        ),
        "untrusted": GaugeMetricFamily(
            PREFIX + "worker_untrusted",
            "1 when the slot's record cannot be believed now: pid gone, heartbeat stale, generation stalled or "
            "record torn (/readyz gives the reason).",
            labels=["slot"],
        ),
    }
    for view in view_workers(records, now, settings.heartbeat_timeout, settings.stall_timeout):
        slot, record = str(view.slot), view.record
        for candidate in State:
            if candidate is not State.EMPTY:
                state.add_metric([slot, candidate.name], int(candidate is record.state))
        if record.state is State.DEAD:
            continue
        per_slot["untrusted"].add_metric([slot], int(bool(view.problem)))
        per_slot["queued"].add_metric([slot], record.queued)
        per_slot["in_flight"].add_metric([slot], record.in_flight)
        per_slot["heartbeat"].add_metric([slot], max(0.0, now - record.heartbeat_mono) if record.heartbeat_mono else 0)
        per_slot["crashes"].add_metric([slot], record.crashes)
        per_slot["attempt"].add_metric([slot], record.attempt)
    yield state
    yield from per_slot.values()


class JobsCollector:
    """The stored jobs by status and the age of the oldest queued one (what an autoscaler scales on), read
    from the job store at scrape time (docs/architecture.md §17); nothing until a job was ever submitted."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if not self.store.exists():
            return
        try:
            by_status, oldest_s = self.store.counts()
        except StoreUnavailable:
            yield GaugeMetricFamily(PREFIX + "job_store_up", "1 while the job store can be read.", value=0)
            return
        yield GaugeMetricFamily(PREFIX + "job_store_up", "1 while the job store can be read.", value=1)
        jobs = GaugeMetricFamily(PREFIX + "jobs", "Stored jobs by status (expired ones left out).", labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            PREFIX + "jobs_oldest_queued_age_seconds",
            "Seconds the oldest queued job has waited (0 when none waits): the backlog to scale on.",
            value=oldest_s,
        )


@bp.get("/metrics")
def scrape() -> Response:
    """Prometheus text format for the whole container: every worker's counted events, dead ones included,
    and the board as it is now."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(BoardCollector(context.runtime()))
    registry.register(JobsCollector(job_routes.store()))
    folder = metric_files.folder()
    if folder:
        registry.register(metric_files.FolderCollector(folder))
        with metric_files.scrape_lock(folder):
            body = generate_latest(registry)
    else:  # standalone (no gunicorn hooks): this process's own registry
        from prometheus_client import REGISTRY

        recorder()
        body = generate_latest(registry) + generate_latest(REGISTRY)
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
