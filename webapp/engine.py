"""The engine: one thread per worker owns the model from load to serve; request threads hand it jobs.

States on the board (docs/architecture.md §2): STARTING -> LOADING (attempt k) -> WARMING -> READY, or
FAILED when the load cannot succeed. Each load attempt is ``loader(settings, slot)`` plus one warm-up
generation, because a model can load cleanly and only fail when used (a missing tokenizer does that).

At runtime (docs/architecture.md §2): READY -> UNHEALTHY when a generation hits a fatal device error, when
MAX_CONSECUTIVE_FAILURES generations fail in a row by the worker's own fault, or when a denoising step
outlasts STALL_TIMEOUT. The engine then fails its queued and running jobs at once and asks the worker to
exit, so gunicorn replaces it. On shutdown, ``drain()`` refuses new jobs (DRAINING) and finishes the rest.

Serving (docs/architecture.md §5): at most MAX_ONGOING jobs run at once and MAX_QUEUED wait; beyond that
``submit`` sheds at once. Every job has a deadline: one that expires while queued is dropped unrun, and a
pipeline call whose jobs have all expired or been abandoned is interrupted between denoising steps. Queued
jobs that can share a pipeline call (same size, steps and guidance) run as one batch of up to
MAX_BATCH_SIZE images, each image with its own seeded generator, so a seed gives the same image alone or in
a batch. A batch that fails runs again one job at a time, and a job that fails alone is followed by a
canary generation that tells whether the request or the worker is at fault (``_charge``).

A second thread writes the heartbeat and watches for stalls, so a frozen process is visible to every
other worker and a stuck step is caught by this one.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenacity import RetryCallState

from webapp import faults, loading, logs, metrics
from webapp.board import Board, State
from webapp.params import GenerationParams
from webapp.readiness import judge_board
from webapp.settings import Settings, resolve_callable

log = logs.get(__name__)


class Model(Protocol):
    """What the engine needs from a loaded model (``webapp.pipeline.DiffusersModel`` is the real one)."""

    device: str
    default_size: tuple[int, int]

    def generate(self, batch: Sequence[GenerationParams], on_step: Callable[[int], None]) -> list[list[Any]]:
        """One pipeline call for compatible requests (same size, steps, guidance): for each request, its
        images (PIL), one per seed; call ``on_step(i)`` after each denoising step (it may raise to stop)."""
        ...


class NotReady(Exception):
    """The worker cannot take jobs now; ``state`` says why."""

    def __init__(self, state: State) -> None:
        super().__init__(f"this worker is {state.name}")
        self.state = state


class Overloaded(Exception):
    """MAX_ONGOING + MAX_QUEUED jobs are already here; ``retry_after_s`` estimates when room frees up."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The job's deadline passed: ``ran`` tells whether it was interrupted or dropped from the queue."""

    def __init__(self, message: str, ran: bool) -> None:
        super().__init__(message)
        self.ran = ran


class _Interrupted(Exception):
    """Raised from the step callback to stop a pipeline call nobody waits for any more."""


class WorkerUnhealthy(Exception):
    """The job could not run because this worker turned UNHEALTHY; another worker may serve it."""


class RejectedByModel(Exception):
    """The pipeline failed on this job alone while the worker stayed sound (its canary generation passed):
    the request's own input is at fault, so it is charged to the request and not to the worker.
    ``out_of_memory`` says the device had too little memory for what it asked."""

    def __init__(self, message: str, out_of_memory: bool) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


@dataclass
class Job:
    """One /generate request inside the engine. ``deadline`` is a time.monotonic() value."""

    params: GenerationParams
    deadline: float = math.inf
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    batch_jobs: int = 0  # how many jobs shared its pipeline call
    batch_images: int = 0
    abandoned: bool = False  # its request stopped waiting (deadline, client gone): nobody needs the result
    steps_done: int = 0  # denoising steps finished, for progress reports
    # Steps done, one entry per step, then None once the future is settled: a stream sends each at once.
    updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _: self.updates.put(None))

    def step_done(self, steps: int) -> None:
        self.steps_done = steps
        self.updates.put(steps)

    @property
    def key(self) -> tuple[int, int, int, float]:
        """Jobs with equal keys can share one pipeline call."""
        p = self.params
        return (p.width, p.height, p.num_inference_steps, p.guidance_scale)

    def expired(self, now: float) -> bool:
        return self.abandoned or now >= self.deadline or self.future.done()


class Engine:
    """Owns one worker's model. ``start()`` returns at once; progress is written to ``board[slot]``."""

    def __init__(self, settings: Settings, board: Board, slot: int) -> None:
        self.settings = settings
        self.board = board
        self.slot = slot
        self.state = State.STARTING
        self.model: Model | None = None
        self._pending: deque[Job] = deque()  # FIFO; guarded by _arrived's lock
        self._arrived = threading.Condition()
        self._counts_lock = threading.Lock()
        self._counts = {"in_flight": 0, "queued": 0, "served": 0, "failed": 0, "shed": 0}
        self._seconds_per_image = 0.0  # moving average of batch time per image, for Retry-After
        self._batch: list[Job] = []
        self._batch_started = 0.0
        self._last_step = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._draining = False
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
        record = self.board.write(self.slot, state=state, **fields)
        metrics.recorder().state_changes.labels(state.name).inc()
        shown = {k: v for k, v in fields.items() if k in ("attempt", "error", "device")}
        bad = state in (State.FAILED, State.UNHEALTHY)  # what an operator's log alert should match
        (log.error if bad else log.info)("state", slot=self.slot, pid=record.pid, state=state.name, **shown)

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.board.write(self.slot, heartbeat_mono=now)
            # Readiness changes are counted when they happen, not only when someone probes or scrapes.
            metrics.note_readiness(self.board, judge_board(self.board, self.settings, now))
            stuck = now - max(self._batch_started, self._last_step)
            if self._batch and stuck > self.settings.stall_timeout:
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
        for job in list(self._batch):
            _settle(job.future, exc=WorkerUnhealthy(reason))
        with self._arrived:
            waiting = list(self._pending)
            self._pending.clear()
        self._count(queued=-len(waiting))
        for job in waiting:
            _settle(job.future, exc=WorkerUnhealthy(reason))
        self.on_unhealthy(reason)

    def _run(self) -> None:
        record = self.board.read(self.slot)
        delay = self.settings.respawn_delay(record.crashes)
        if delay:
            message = f"respawn backoff {delay:g} s after {record.crashes} crash(es) in a row before READY"
            log.warning("respawn_backoff", slot=self.slot, crashes=record.crashes, delay_s=delay)
            self.board.write(self.slot, error=message, next_retry_mono=time.monotonic() + delay)
            if self._stop.wait(delay):
                return
        load_started = time.monotonic()
        try:
            self.model = self._load()
        except BaseException as exc:  # every failure must reach the board, never vanish
            attempt = self.board.read(self.slot).attempt
            if loading.is_transient(exc):
                message = f"gave up after {attempt} attempt(s): {loading.describe(exc)}"
            else:
                message = f"permanent error on attempt {attempt}: {loading.describe(exc)}"
            metrics.recorder().load_seconds.labels("failed").observe(time.monotonic() - load_started)
            log.exception("load_failed", slot=self.slot, attempts=attempt, error=message)
            self._set_state(State.FAILED, error=message, next_retry_mono=0.0)
            return
        if self._draining:
            return
        metrics.recorder().load_seconds.labels("ready").observe(time.monotonic() - load_started)
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
                try:
                    model = self._load_once(number)
                except BaseException:
                    metrics.recorder().load_attempts.labels("error").inc()
                    raise
                metrics.recorder().load_attempts.labels("ok").inc()
                seconds = round(time.monotonic() - started, 3)
                log.info("loaded", slot=self.slot, attempt=number, device=model.device, seconds=seconds)
        return model

    def _load_once(self, attempt: int) -> Model:
        """One attempt: the loader, then one warm-up generation (a model can load and only fail in use)."""
        s = self.settings
        self._set_state(State.LOADING, attempt=attempt, next_retry_mono=0.0)
        model = resolve_callable(s.model_loader)(s, self.slot)
        self._set_state(State.WARMING, device=model.device)
        model.generate([self._warm_up_params(model)], lambda step: None)
        return model

    def _warm_up_params(self, model: Model | None = None) -> GenerationParams:
        """One step at the model's native size: the load's warm-up, and the canary after a failure."""
        model = model or self.model
        assert model is not None
        return GenerationParams("warm-up", None, 1, self.settings.default_guidance, *model.default_size, (0,))

    def _before_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        error = loading.describe(exc) if exc else "unknown error"
        log.warning(
            "load_retry", slot=self.slot, attempt=retry_state.attempt_number, error=error, retry_in_s=round(wait, 2)
        )
        self._set_state(State.LOADING, error=error, next_retry_mono=time.monotonic() + wait)

    # -- serving ------------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        """Change counters and publish them on the board at once (the board lock orders the writes)."""
        with self._counts_lock:
            for key, delta in deltas.items():
                self._counts[key] += delta
            counts = dict(self._counts)
        self.board.write(self.slot, **counts)

    def retry_after(self) -> int:
        """Seconds until this worker has likely worked through the images it holds now (at least 1). The
        measured seconds per image already include batching's gain: it is a batch's time over its images."""
        with self._arrived:
            images = sum(job.params.num_images for job in self._pending)
        images += sum(job.params.num_images for job in list(self._batch))
        per_image = self._seconds_per_image or 1.0
        return max(1, math.ceil(per_image * images))

    def submit(self, params: GenerationParams, deadline: float = math.inf) -> Job:
        """Queue a job; raise NotReady unless READY, Overloaded when MAX_ONGOING + MAX_QUEUED jobs are
        already here. Never waits."""
        if self.state is not State.READY or self._draining:
            raise NotReady(State.DRAINING if self._draining and self.state is State.READY else self.state)
        job = Job(params, deadline)
        capacity = self.settings.max_ongoing + self.settings.max_queued
        with self._counts_lock:
            held = self._counts["queued"] + self._counts["in_flight"]
            full = held >= capacity
            self._counts["shed" if full else "queued"] += 1
            counts = dict(self._counts)
        self.board.write(self.slot, **counts)
        if full:
            metrics.recorder().shed.inc()
            raise Overloaded(
                f"this worker holds {held} jobs (MAX_ONGOING + MAX_QUEUED = {capacity})", self.retry_after()
            )
        with self._arrived:
            self._pending.append(job)
            self._arrived.notify()
        return job

    def _serve(self) -> None:
        """Run batches until stopped, unhealthy, or drained with nothing left to do."""
        while not self._stop.is_set() and self.state is not State.UNHEALTHY:
            batch = self._take_batch()
            if batch:
                self._run_batch(batch)
            elif self._draining:
                with self._arrived:
                    if not self._pending:
                        return

    def _take_batch(self) -> list[Job]:
        """The oldest live job plus queued jobs that can share its pipeline call, in arrival order, up to
        MAX_BATCH_SIZE images and MAX_ONGOING jobs. Expired or abandoned jobs are dropped unrun."""
        s = self.settings
        with self._arrived:
            if not self._pending:
                self._arrived.wait(0.2)
            batch = self._gather([])
            if not batch:
                return []
            until = time.monotonic() + s.batch_wait_ms / 1000
            while sum(j.params.num_images for j in batch) < s.max_batch_size and len(batch) < s.max_ongoing:
                remaining = until - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    break
                self._arrived.wait(remaining)
                batch = self._gather(batch)
        started = [job for job in batch if job.future.set_running_or_notify_cancel()]
        self._count(queued=-len(batch), in_flight=len(started))
        now = time.monotonic()
        for job in started:
            metrics.recorder().queue_wait.observe(now - job.enqueued)
        return started

    def _gather(self, batch: list[Job]) -> list[Job]:
        """Move fitting jobs from the queue into ``batch`` (the caller holds the condition's lock)."""
        s = self.settings
        now = time.monotonic()
        images = sum(j.params.num_images for j in batch)
        kept: deque[Job] = deque()
        for job in self._pending:
            if job.expired(now):
                self._drop_unrun(job, now)
            elif (
                len(batch) < s.max_ongoing
                and (not batch or job.key == batch[0].key)
                and (not batch or images + job.params.num_images <= s.max_batch_size)
            ):
                batch.append(job)
                images += job.params.num_images
            else:
                kept.append(job)
        self._pending = kept
        return batch

    def _drop_unrun(self, job: Job, now: float) -> None:
        self._count(queued=-1)
        waited = now - job.enqueued
        _settle(job.future, exc=DeadlineExceeded(f"deadline passed after {waited:.1f} s in the queue", ran=False))

    def _on_step(self, step: int) -> None:
        now = time.monotonic()
        self._last_step = now
        for job in self._batch:
            job.step_done(step + 1)
        self.board.write(self.slot, last_step_mono=now)
        if all(job.expired(now) for job in self._batch):
            raise _Interrupted(f"every job's deadline passed by step {step + 1}")

    def _call(self, batch: list[Job]) -> list[list[Any]]:
        """One pipeline call for ``batch``, watched by the stall watchdog and the step callback."""
        self._batch_started = self._last_step = time.monotonic()
        images_total = sum(job.params.num_images for job in batch)
        for job in batch:
            job.started, job.batch_jobs, job.batch_images = self._batch_started, len(batch), images_total
        self._batch = batch
        self.board.write(self.slot, last_step_mono=self._batch_started)
        assert self.model is not None
        return self.model.generate([job.params for job in batch], self._on_step)

    def _run_batch(self, batch: list[Job]) -> None:
        """Run a batch and settle its jobs. When a batch of several jobs fails, each runs again alone, so
        one request's bad input cannot fail the others; a job that fails alone is judged by ``_charge``."""
        try:
            results = self._call(batch)
        except _Interrupted as stop:
            self._finish(batch, outcome="interrupted")
            log.info("batch_interrupted", slot=self.slot, jobs=len(batch), reason=str(stop))
            for job in batch:
                _settle(job.future, exc=DeadlineExceeded(f"interrupted: {stop}", ran=True))
            return
        except Exception as exc:  # noqa: BLE001 - any pipeline error is judged below, never lost
            if faults.is_fatal(exc):
                self._fail(batch, exc, f"fatal device error: {loading.describe(exc)}")
            elif len(batch) > 1:
                self._finish(batch, outcome="split")
                log.warning("batch_failed_retrying_alone", slot=self.slot, jobs=len(batch), error=loading.describe(exc))
                for job in batch:
                    if self.state is State.UNHEALTHY:
                        return  # _turn_unhealthy settled the rest
                    if job.expired(time.monotonic()):
                        _settle(job.future, exc=DeadlineExceeded("deadline passed while its batch ran", ran=True))
                        continue
                    self._count(in_flight=1)
                    self._run_batch([job])
            else:
                self._charge(batch[0], exc)
            return
        elapsed = self._finish(batch, outcome="served")
        self._consecutive_failures = 0
        per_image = elapsed / sum(job.params.num_images for job in batch)
        previous = self._seconds_per_image or per_image
        self._seconds_per_image = 0.8 * previous + 0.2 * per_image
        for job, images in zip(batch, results, strict=True):
            _settle(job.future, result=images)

    def _charge(self, job: Job, exc: Exception) -> None:
        """A job failed alone: a canary generation (the warm-up's) tells whose fault it was. If the canary
        passes, the worker is sound and the request is rejected (422), counting nothing against the worker;
        if it fails too, the failure is the worker's (500) and counts towards MAX_CONSECUTIVE_FAILURES."""
        self._finish([job], outcome="failed")
        try:
            self._call([Job(self._warm_up_params())])
        except Exception as canary_exc:
            self._batch = []
            self._consecutive_failures += 1
            log.error(
                "generate_failed",
                slot=self.slot,
                consecutive=self._consecutive_failures,
                error=loading.describe(exc),
                canary_error=loading.describe(canary_exc),
                exc_info=exc,
            )
            _settle(job.future, exc=exc)
            if faults.is_fatal(canary_exc):
                self._turn_unhealthy(f"fatal device error: {loading.describe(canary_exc)}")
            elif self._consecutive_failures >= self.settings.max_consecutive_failures:
                self._turn_unhealthy(
                    f"{self._consecutive_failures} generations failed in a row; last: {loading.describe(exc)}"
                )
            return
        self._batch = []
        metrics.recorder().rejected.inc()
        rejected = RejectedByModel(loading.describe(exc), faults.is_out_of_memory(exc))
        rejected.__cause__ = exc  # the request's thread logs it, with the request id
        _settle(job.future, exc=rejected)

    def _fail(self, batch: list[Job], exc: Exception, reason: str) -> None:
        """A fatal device error: every job of the batch fails (500) and the worker turns UNHEALTHY."""
        self._finish(batch, outcome="failed")
        error = loading.describe(exc)
        log.error("generate_failed", slot=self.slot, jobs=len(batch), fatal=True, error=error, exc_info=exc)
        for job in batch:
            _settle(job.future, exc=exc)
        self._turn_unhealthy(reason)

    def _finish(self, batch: list[Job], outcome: str) -> float:
        """Settle the counters of a finished pipeline call; return how long the call took. ``outcome`` is
        served, failed, interrupted, or split (it failed and its jobs run again one at a time)."""
        now = time.monotonic()
        for job in batch:
            job.finished = now
        self._batch = []
        deltas = {"in_flight": -len(batch)}
        if outcome in ("served", "failed"):
            deltas[outcome] = len(batch)
        self._count(**deltas)
        elapsed = now - self._batch_started
        recorded = metrics.recorder()
        recorded.generation.labels(outcome).observe(elapsed)
        recorded.batch_jobs.observe(len(batch))
        recorded.batch_images.observe(sum(job.params.num_images for job in batch))
        return elapsed


def _settle(future: Future, result: object = None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless something (the stall watchdog) already did."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
