"""The engine: one thread per worker owns the model from load to serve; request threads hand it jobs.

States on the board (DESIGN.md §2): STARTING -> LOADING (attempt k) -> WARMING -> READY, or FAILED when
the load cannot succeed. Each load attempt is ``loader(settings, slot)`` plus one warm-up generation,
because a model can load cleanly and only fail when used (a missing tokenizer does exactly that).

At runtime (DESIGN.md §2): READY -> UNHEALTHY when a generation hits a fatal device error, when
MAX_CONSECUTIVE_FAILURES generations fail in a row, or when a denoising step outlasts STALL_TIMEOUT. The
engine then fails its queued and running jobs at once and asks the worker to exit, so gunicorn replaces it.
On shutdown, ``drain()`` refuses new jobs (DRAINING) and finishes the queued ones.

A second thread writes the heartbeat and watches for stalls, so a frozen process is visible to every
other worker and a stuck step is caught by this one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenacity import RetryCallState

from webapp import faults, loading
from webapp.board import Board, State
from webapp.params import GenerationParams
from webapp.settings import Settings, resolve_callable

log = logging.getLogger(__name__)


class Model(Protocol):
    """What the engine needs from a loaded model (``webapp.pipeline.DiffusersModel`` is the real one)."""

    device: str
    default_size: tuple[int, int]

    def generate(self, params: GenerationParams, on_step: Callable[[int], None]) -> list[Any]:
        """Images (PIL) for ``params``, one per seed; call ``on_step(i)`` after each denoising step."""
        ...


class NotReady(Exception):
    """The worker cannot take jobs now; ``state`` says why."""

    def __init__(self, state: State) -> None:
        super().__init__(f"this worker is {state.name}")
        self.state = state


class Overloaded(Exception):
    """The queue is full; the job was not accepted."""


class WorkerUnhealthy(Exception):
    """The job could not run because this worker turned UNHEALTHY; another worker may serve it."""


@dataclass
class Job:
    params: GenerationParams
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    last_step: float = 0.0
    finished: float = 0.0


class Engine:
    """Owns one worker's model. ``start()`` returns at once; progress is written to ``board[slot]``."""

    def __init__(self, settings: Settings, board: Board, slot: int) -> None:
        self.settings = settings
        self.board = board
        self.slot = slot
        self.state = State.STARTING
        self.model: Model | None = None
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queued)
        self._counts_lock = threading.Lock()
        self._counts = {"in_flight": 0, "queued": 0, "served": 0, "failed": 0, "shed": 0}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._draining = False
        self._current: Job | None = None
        self._consecutive_failures = 0
        self._unhealthy_lock = threading.Lock()
        self.on_unhealthy: Callable[[str], None] = lambda reason: None  # the worker's exit, set by the hooks

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and engine threads (daemons) and return immediately."""
        self._threads = [
            threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.slot}", daemon=True),
            threading.Thread(target=self._run, name=f"engine-{self.slot}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """Shutdown: refuse new jobs (DRAINING) but finish the ones already queued."""
        if self._draining:
            return
        self._draining = True
        if self.state not in (State.FAILED, State.UNHEALTHY):
            self._set_state(State.DRAINING)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs and wait up to ``timeout`` s for the threads to finish their current step."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _set_state(self, state: State, **fields: object) -> None:
        if self._draining and state in (State.LOADING, State.WARMING, State.READY):
            state = State.DRAINING  # a load that finishes during shutdown must not look like progress
        self.state = state
        self.board.write(self.slot, state=state, **fields)
        log.info(
            "event=state slot=%s pid=%s state=%s%s",
            self.slot,
            self.board.read(self.slot).pid,
            state.name,
            "".join(f" {k}={v!r}" for k, v in fields.items() if k in ("attempt", "error", "device")),
        )

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.board.write(self.slot, heartbeat_mono=now)
            job = self._current
            if job is not None and now - max(job.started, job.last_step) > self.settings.stall_timeout:
                stuck = now - max(job.started, job.last_step)
                self._turn_unhealthy(
                    f"denoising step stalled: no progress for {stuck:.1f} s (STALL_TIMEOUT="
                    f"{self.settings.stall_timeout:g} s)"
                )
            self._stop.wait(self.settings.heartbeat_interval)

    def _turn_unhealthy(self, reason: str) -> None:
        """Say UNHEALTHY, fail every job this worker holds (503 to their clients) and ask it to exit."""
        with self._unhealthy_lock:
            if self.state is State.UNHEALTHY:
                return
            self._set_state(State.UNHEALTHY, error=reason)
        current = self._current
        if current is not None and not current.future.done():
            _settle(current.future, exc=WorkerUnhealthy(reason))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._count(queued=-1)
            _settle(job.future, exc=WorkerUnhealthy(reason))
        self.on_unhealthy(reason)

    def _run(self) -> None:
        record = self.board.read(self.slot)
        delay = self.settings.respawn_delay(record.crashes)
        if delay:
            message = f"respawn backoff {delay:g} s after {record.crashes} crash(es) in a row before READY"
            log.warning("event=respawn_backoff slot=%s crashes=%s delay_s=%.1f", self.slot, record.crashes, delay)
            self.board.write(self.slot, error=message, next_retry_mono=time.monotonic() + delay)
            if self._stop.wait(delay):
                return
        try:
            self.model = self._load()
        except BaseException as exc:  # every failure must reach the board, never vanish
            attempt = self.board.read(self.slot).attempt
            if loading.is_transient(exc):
                message = f"gave up after {attempt} attempt(s): {loading.describe(exc)}"
            else:
                message = f"permanent error on attempt {attempt}: {loading.describe(exc)}"
            log.exception("event=load_failed slot=%s error=%r", self.slot, message)
            self._set_state(State.FAILED, error=message, next_retry_mono=0.0)
            return
        if self._draining:
            return
        self._set_state(State.READY, ready_mono=time.monotonic(), next_retry_mono=0.0, crashes=0)
        self._serve()

    def _load(self) -> Model:
        s = self.settings
        policy = loading.retrying(
            s.load_max_attempts, s.load_max_seconds, s.load_backoff_initial, s.load_backoff_max, self._before_retry
        )
        self.board.write(self.slot, max_attempts=s.load_max_attempts)
        for attempt in policy:
            with attempt:
                number = attempt.retry_state.attempt_number
                started = time.monotonic()
                self._set_state(State.LOADING, attempt=number, next_retry_mono=0.0)
                loader = resolve_callable(s.model_loader)
                model = loader(s, self.slot)
                self._set_state(State.WARMING, device=model.device)
                warm = GenerationParams("warm-up", None, 1, s.default_guidance, *model.default_size, (0,))
                model.generate(warm, self._on_step)
                log.info(
                    "event=loaded slot=%s attempt=%s device=%s seconds=%.2f",
                    self.slot,
                    number,
                    model.device,
                    time.monotonic() - started,
                )
        return model

    def _before_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        error = loading.describe(exc) if exc else "unknown error"
        log.warning(
            "event=load_retry slot=%s attempt=%s error=%r retry_in_s=%.2f",
            self.slot,
            retry_state.attempt_number,
            error,
            wait,
        )
        self._set_state(State.LOADING, error=error, next_retry_mono=time.monotonic() + wait)

    # -- serving ------------------------------------------------------------------------------------

    def _on_step(self, step: int) -> None:
        now = time.monotonic()
        job = self._current
        if job is not None:
            job.last_step = now
        self.board.write(self.slot, last_step_mono=now)

    def _count(self, **deltas: int) -> None:
        """Change counters and publish them on the board at once (the board lock orders the writes)."""
        with self._counts_lock:
            for key, delta in deltas.items():
                self._counts[key] += delta
            counts = dict(self._counts)
        self.board.write(self.slot, **counts)

    def submit(self, params: GenerationParams) -> Job:
        """Queue a job; raise NotReady unless READY, Overloaded when MAX_QUEUED jobs already wait."""
        if self.state is not State.READY or self._draining:
            raise NotReady(State.DRAINING if self._draining and self.state is State.READY else self.state)
        job = Job(params)
        with self._counts_lock:
            full = self._counts["queued"] >= self.settings.max_queued
            self._counts["shed" if full else "queued"] += 1
            counts = dict(self._counts)
        self.board.write(self.slot, **counts)
        if full:
            raise Overloaded(f"{counts['queued']} jobs already wait on this worker (MAX_QUEUED)")
        self._queue.put_nowait(job)
        return job

    def _serve(self) -> None:
        """Run queued jobs one at a time until stopped, or until drained and the queue is empty."""
        while not self._stop.is_set() and self.state is not State.UNHEALTHY:
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._draining:
                    return
                continue
            self._count(queued=-1)
            if not job.future.set_running_or_notify_cancel():
                continue  # its request gave up while it waited
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        job.started = time.monotonic()
        self._current = job
        self._count(in_flight=1)
        self.board.write(self.slot, last_step_mono=job.started)
        try:
            assert self.model is not None
            images = self.model.generate(job.params, self._on_step)
        except Exception as exc:  # the request gets a 500; the worker keeps serving unless it is fatal
            job.finished = time.monotonic()
            self._current = None
            self._count(in_flight=-1, failed=1)
            self._consecutive_failures += 1
            fatal = faults.is_fatal(exc)
            log.exception(
                "event=generate_failed slot=%s fatal=%s consecutive=%s error=%r",
                self.slot,
                fatal,
                self._consecutive_failures,
                loading.describe(exc),
            )
            _settle(job.future, exc=exc)
            if fatal:
                self._turn_unhealthy(f"fatal device error: {loading.describe(exc)}")
            elif self._consecutive_failures >= self.settings.max_consecutive_failures:
                self._turn_unhealthy(
                    f"{self._consecutive_failures} generations failed in a row; last: {loading.describe(exc)}"
                )
            return
        job.finished = time.monotonic()
        self._current = None
        self._consecutive_failures = 0
        self._count(in_flight=-1, served=1)
        _settle(job.future, result=images)


def _settle(future: Future, result: object = None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless something (the stall watchdog) already did."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
