"""Prometheus metrics: GET /metrics answers for the whole container from any worker.

Two sources, both read at scrape time:
- Events counted by each worker process (requests, generations, queue waits, batches, sheds, timeouts,
  loads, state changes) go through ``prometheus_client``'s multiprocess mode: every process writes its
  own mmap'ed files in a per-instance folder (inside the board's private folder, so a new instance starts
  from an empty one) and a scrape sums them. When a worker dies, the master folds its counter and
  histogram files into one ``*_exited.db`` file per type (``worker_exited``), so totals never go down
  and the folder does not grow with every recycled worker. Scrapes hold a shared flock on the folder
  and the fold an exclusive one, so no scrape sees a dead worker's counts twice or not at all.
- What is true now (each slot's state, queue depth, heartbeat age; the container's readiness) is read
  from the readiness board, not from gauges that a dead process would leave behind.

prometheus_client picks multiprocess mode when it is first imported, from PROMETHEUS_MULTIPROC_DIR. The
master sets that variable in ``on_starting``, so nothing the master imports before may import
prometheus_client: this module imports it only inside functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app

from webapp import logs
from webapp.board import Board, State
from webapp.readiness import Verdict, judge_board, pid_alive, view_workers

if TYPE_CHECKING:
    from webapp.runtime import Runtime

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "honest_diffusion_"
FOLDER = "metrics"
_LOCK_FILE = ".scrape.lock"
_EXITED = "exited"  # the pid part of the files that hold dead workers' counts
_FOLDED_TYPES = ("counter", "histogram")
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

bp = Blueprint("metrics", __name__)
log = logs.get(__name__)


def prepare_multiprocess(board: Board) -> Path:
    """Master, before any fork: make this instance's empty metrics folder and point prometheus_client at
    it. An operator's own PROMETHEUS_MULTIPROC_DIR is replaced: a folder shared with an earlier run would
    add that run's counts to this one's."""
    import sys

    folder = board.folder / FOLDER
    folder.mkdir(mode=0o700)
    os.environ[ENV] = str(folder)
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        if values.ValueClass.__name__ == "MutexValue":
            raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    return folder


@contextlib.contextmanager
def _shared_lock(folder: str) -> Iterator[None]:
    """Held by a scrape while it reads the files: the master does not fold files under it."""
    fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # only the master takes it exclusively, for milliseconds, never waiting
        yield
    finally:
        os.close(fd)


def worker_exited(pid: int, wait_s: float = 1.0) -> None:
    """Master, from child_exit: drop the dead worker's live gauges, then fold the counter and histogram
    files of every dead worker (this one, and any an earlier call had to leave) into the ``exited`` files
    and delete them. The master never blocks on the lock: a scrape held by a SIGSTOPped worker would
    freeze the whole arbiter. If the lock stays taken for ``wait_s``, the files stay (and are still
    counted, just not folded) until the next worker exits."""
    folder = os.environ.get(ENV)
    if not folder or not os.path.isdir(folder):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)
    fd = os.open(os.path.join(folder, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("metrics_fold_deferred", pid=pid, reason="a scrape holds the metrics folder")
                    return
                time.sleep(0.01)
        for path in Path(folder).glob("*_*.db"):
            kind, _, owner = path.stem.rpartition("_")
            if kind in _FOLDED_TYPES and owner.isdigit() and (int(owner) == pid or not pid_alive(int(owner))):
                _fold(path, Path(folder) / f"{kind}_{_EXITED}.db")
    finally:
        os.close(fd)


def _fold(dead: Path, total_path: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    total = MmapedDict(str(total_path))
    try:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(dead)):
            before, _ = total.read_value(key)
            total.write_value(key, before + value, timestamp)
    finally:
        total.close()
    dead.unlink()


class Recorder:
    """The counted events of one process. Build it through ``recorder()``, after the fork."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            PREFIX + "http_requests", "HTTP requests answered, by route and status.", ["method", "route", "status"]
        )
        self.request_seconds = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time to answer an HTTP request (to the first byte for /generate/stream).",
            ["route"],
            buckets=SECONDS_BUCKETS,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time a job waited in its worker's queue before its batch started.",
            buckets=SECONDS_BUCKETS,
        )
        self.generation = Histogram(
            PREFIX + "generation_duration_seconds",
            "Time of one pipeline call (a batch), by outcome: served, failed, interrupted, "
            "split (failed; its jobs ran again alone).",
            ["outcome"],
            buckets=SECONDS_BUCKETS,
        )
        self.batch_images = Histogram(
            PREFIX + "batch_images", "Images generated by one pipeline call.", buckets=BATCH_BUCKETS
        )
        self.batch_jobs = Histogram(PREFIX + "batch_jobs", "Requests sharing one pipeline call.", buckets=BATCH_BUCKETS)
        self.shed = Counter(PREFIX + "jobs_shed", "Requests refused at once with 503 because the worker was full.")
        self.client_timeouts = Counter(
            PREFIX + "client_timeouts",
            "Connections answered 408 and closed because their request did not arrive within CLIENT_TIMEOUT.",
        )
        self.rejected = Counter(
            PREFIX + "jobs_rejected_by_model",
            "Requests answered 422 because the pipeline failed on them alone while the worker's canary passed.",
        )
        self.timed_out = Counter(
            PREFIX + "jobs_timed_out",
            "Requests answered 504 because their deadline passed, by where the job was: queued or running.",
            ["phase"],
        )
        self.load_attempts = Counter(
            PREFIX + "load_attempts", "Pipeline load attempts (load plus warm-up), by outcome: ok, error.", ["outcome"]
        )
        self.load_seconds = Histogram(
            PREFIX + "load_duration_seconds",
            "From a worker's first load attempt to READY (ready) or FAILED (failed), retry waits included.",
            ["outcome"],
            buckets=LOAD_BUCKETS,
        )
        self.state_changes = Counter(
            PREFIX + "worker_state_changes", "Worker state changes, by the state entered.", ["state"]
        )


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's Recorder (made on first use, so in each worker after the fork)."""
    global _recorder
    if _recorder is None:
        with _recorder_lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder


def note_readiness(board: Board, verdict: Verdict) -> None:
    """Count and log a change of the container's readiness, once, whichever worker sees it first."""
    if board.note_readiness(verdict.ready):
        log.info("readiness_changed", ready=verdict.ready, reason=verdict.ready_reason)


class BoardCollector:
    """Gauges read from the board at scrape time: they describe now, whoever is alive to answer."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        board, settings = self.runtime.board, self.runtime.settings
        now = time.monotonic()
        verdict = judge_board(board, settings, now)
        note_readiness(board, verdict)
        readiness = board.readiness

        yield GaugeMetricFamily(PREFIX + "ready", "1 while /readyz answers 200.", value=int(verdict.ready))
        yield GaugeMetricFamily(PREFIX + "alive", "1 while /healthz answers 200.", value=int(verdict.alive))
        changes = CounterMetricFamily(
            PREFIX + "readiness_changes", "Times /readyz turned ready or not_ready, since start.", labels=["to"]
        )
        changes.add_metric(["ready"], readiness.to_ready)
        changes.add_metric(["not_ready"], readiness.to_not_ready)
        yield changes
        yield GaugeMetricFamily(
            PREFIX + "readiness_last_change_timestamp_seconds",
            "Unix time of the last readiness change (0 before the first).",
            value=readiness.changed_wall,
        )
        yield GaugeMetricFamily(
            PREFIX + "workers_expected", "Workers gunicorn is configured for.", value=board.expected_workers
        )
        yield GaugeMetricFamily(
            PREFIX + "workers_required_ready", "READY workers /readyz needs (READY_POLICY).", value=verdict.quorum
        )

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
        for view in view_workers(board.read_all(), now, settings.heartbeat_timeout, settings.stall_timeout):
            slot, record = str(view.slot), view.record
            for candidate in State:
                if candidate is not State.EMPTY:
                    state.add_metric([slot, candidate.name], int(candidate is record.state))
            if record.state is State.DEAD:
                continue
            per_slot["untrusted"].add_metric([slot], int(bool(view.problem)))
            per_slot["queued"].add_metric([slot], record.queued)
            per_slot["in_flight"].add_metric([slot], record.in_flight)
            per_slot["heartbeat"].add_metric(
                [slot], max(0.0, now - record.heartbeat_mono) if record.heartbeat_mono else 0
            )
            per_slot["crashes"].add_metric([slot], record.crashes)
            per_slot["attempt"].add_metric([slot], record.attempt)
        yield state
        yield from per_slot.values()


class FolderCollector:
    """Every process's counted events, summed. Like prometheus_client's MultiProcessCollector, except that
    it skips a file of size 0: a worker starting right now has created its file but not yet sized it,
    and reading it would fail the whole scrape (seen here as a 500 when a replacement worker booted)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for path in self.folder.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > 0:
                    files.append(str(path))
        return MultiProcessCollector.merge(files, accumulate=True)


@bp.get("/metrics")
def scrape() -> Response:
    """Prometheus text format for the whole container: every worker's counted events, dead ones included,
    and the board as it is now."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(BoardCollector(current_app.extensions["runtime"]))
    folder = os.environ.get(ENV)
    if folder:
        registry.register(FolderCollector(folder))
        with _shared_lock(folder):
            body = generate_latest(registry)
    else:  # standalone (no gunicorn hooks): this process's own registry
        from prometheus_client import REGISTRY

        recorder()
        body = generate_latest(registry) + generate_latest(REGISTRY)
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
