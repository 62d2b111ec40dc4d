"""The engine: one worker's coordinator between its request threads and its model (docs/architecture.md §5).

Two daemon threads per worker:
- the engine thread loads the model (``loader.load``), declares READY, then runs the batches the scheduler
  forms until the worker stops, finishes draining, or turns UNHEALTHY;
- the heartbeat thread writes the heartbeat, observes the container's readiness (so a change is counted
  when it happens, not only when someone probes) and watches the running call for a stalled step.

Request threads call ``submit``, which never waits, then wait on the job's future. Each concept has its
own module: what runs next is the scheduler's, every state change the lifecycle's, the load the loader's,
and running a batch (and who is charged when it fails) the runner's. The engine holds the lock that orders
them, and turns the worker UNHEALTHY (every job held fails at once with 503, another worker may serve it;
``on_unhealthy`` makes it exit, so gunicorn replaces it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from webapp.board import readiness
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import State
from webapp.engine import loader
from webapp.engine.loader import Model
from webapp.engine.priority import lower_thread_priority
from webapp.engine.runner import NOT_READY_RETRY_AFTER_S, RejectedByModel, Runner, WorkerUnhealthy
from webapp.engine.scheduler import DeadlineExceeded, Job, Outcome, Overloaded, Scheduler, settle
from webapp.model import faults
from webapp.model.profile import Limits
from webapp.model.request import GenerationParams
from webapp.settings import Settings
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)

__all__ = [
    "NOT_READY_RETRY_AFTER_S",
    "DeadlineExceeded",
    "Engine",
    "Job",
    "NotReady",
    "Overloaded",
    "RejectedByModel",
    "WorkerUnhealthy",
]


class NotReady(Exception):
    """The worker cannot take jobs now: ``state`` says why, ``retry_after_s`` when to ask again."""

    def __init__(self, state: State, retry_after_s: int) -> None:
        super().__init__(f"this worker is {state.name}")
        self.state = state
        self.retry_after_s = retry_after_s


class Engine:
    """Owns one worker's model. ``start()`` returns at once; the lifecycle puts progress on the board."""

    def __init__(
        self, settings: Settings, lifecycle: Lifecycle, on_unhealthy: Callable[[str], None] = lambda reason: None
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.on_unhealthy = on_unhealthy  # the worker's way out (a graceful exit under gunicorn)
        self.model: Model | None = None
        self.scheduler = Scheduler(settings.max_ongoing, settings.max_queued, settings.max_batch_size)
        self._lock = threading.Condition()  # guards the scheduler; notified when a job arrives
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.loaded_at: float | None = None  # Unix time the model finished loading (/v1/models' created)
        self._limits: Limits | None = None  # what requests are held to, once the model is loaded

    @property
    def state(self) -> State:
        return self.lifecycle.state

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine and heartbeat threads (daemons) and return immediately."""
        slot = self.lifecycle.slot
        self._threads = [
            threading.Thread(target=self._heartbeat, name=f"heartbeat-{slot}", daemon=True),
            threading.Thread(target=self._run, name=f"engine-{slot}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def drain(self) -> None:
        """Shutdown: refuse new jobs (DRAINING) but finish the ones already held."""
        self.lifecycle.draining()
        with self._lock:
            self._lock.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs and wait up to ``timeout`` s for the threads to finish their current step."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        lower_thread_priority(self.settings.engine_nice)  # generation waits behind probes (§5)
        try:
            loaded = loader.load(self.settings, self.lifecycle, self._stop)
            if loaded is not None:
                self._limits, self.model, self.loaded_at = loaded.limits, loaded.model, time.time()
                if self.lifecycle.ready():
                    host = _Host(self)
                    self._serve(Runner(loaded.model, loaded.limits, self.settings.max_consecutive_failures, host))
        except BaseException as exc:  # a bug here must not leave a READY worker that never serves
            log.exception("engine_crashed", slot=self.lifecycle.slot)
            self._turn_unhealthy(f"engine thread crashed: {faults.describe(exc)}")

    def _heartbeat(self) -> None:
        board, limit = self.lifecycle.board, self.settings.stall_timeout
        while not self._stop.is_set():
            now = time.monotonic()
            self.lifecycle.publish(heartbeat_mono=now)
            readiness.observe(board, self.settings)
            with self._lock:
                stuck = self.scheduler.stalled_for(now)
            if stuck > limit:
                self._turn_unhealthy(
                    f"denoising step stalled: no progress for {stuck:.1f} s (STALL_TIMEOUT={limit:g} s)"
                )
            self._stop.wait(self.settings.heartbeat_interval)

    def _turn_unhealthy(self, reason: str) -> None:
        """Say UNHEALTHY, fail every job this worker holds (503 to their clients) and ask it to exit."""
        if not self.lifecycle.unhealthy(reason):
            return  # already UNHEALTHY, or never READY
        with self._lock:
            held = self.scheduler.clear()
            self._publish()
        for job in held:
            settle(job.future, exc=WorkerUnhealthy(reason))
        self.on_unhealthy(reason)

    # -- admission ----------------------------------------------------------------------------------

    def limits(self) -> Limits:
        """What a request is checked against: the loaded model's limits (``Limits.of``, computed once by the
        loader); NotReady unless READY."""
        return self._check_ready()

    @property
    def loaded_limits(self) -> Limits | None:
        """The loaded model's limits whatever the state now (the pages that describe requests); None before."""
        return self._limits

    def reserve(self) -> None:
        """Hold a place for a job whose request is still preparing it (decoding its upload): NotReady unless
        READY, Overloaded when MAX_ONGOING + MAX_QUEUED are already held, as ``submit``. The place is given
        back by ``submit(..., reserved=True)`` or by ``release``."""
        self._check_ready()
        with self._lock:
            try:
                self.scheduler.reserve()
            except Overloaded:
                recorder().shed.inc()
                raise
            finally:
                self._publish()

    def free_places(self) -> int:
        """How many more jobs this worker would admit now (0 unless READY): what a claimer of stored jobs
        asks before it claims one (docs/architecture.md §17)."""
        if self.state is not State.READY:
            return 0
        with self._lock:
            return self.scheduler.free_places()

    def release(self) -> None:
        """Give back a place ``reserve`` held for a job that will not be submitted."""
        with self._lock:
            self.scheduler.release()
            self._publish()

    def submit(self, params: GenerationParams, deadline: float = math.inf, reserved: bool = False) -> Job:
        """Queue a job (in the place ``reserve`` held for it when ``reserved``, which is given back whatever
        happens); raise NotReady unless READY (it may have changed since ``limits``), Overloaded when
        MAX_ONGOING + MAX_QUEUED jobs are already here. Never waits."""
        job = Job(params, deadline)
        with self._lock:
            try:
                if reserved:
                    self.scheduler.release()
                if not (reserved and self.state is State.DRAINING):  # a place held before the drain is kept
                    self._check_ready()
                self.scheduler.admit(job)
            except Overloaded:
                recorder().shed.inc()
                raise
            finally:
                self._publish()
            self._lock.notify()
        return job

    def _check_ready(self) -> Limits:
        """The loaded model's limits while READY; else NotReady, with a Retry-After: the next load attempt's
        start when one is waiting."""
        state, limits = self.state, self._limits
        if state is State.READY and limits is not None:
            return limits
        retry_at = self.lifecycle.next_retry_mono
        if state in (State.STARTING, State.LOADING) and retry_at:
            raise NotReady(state, max(1, round(retry_at - time.monotonic())))
        raise NotReady(state, NOT_READY_RETRY_AFTER_S)

    def _publish(self) -> None:
        """The scheduler's counters onto the board (the caller holds the lock, which orders the writes)."""
        self.lifecycle.publish(**self.scheduler.counts())

    # -- serving ------------------------------------------------------------------------------------

    def _serve(self, runner: Runner) -> None:
        """Run batches until stopped, UNHEALTHY, or drained with nothing left to do."""
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                try:
                    runner.run(batch)
                except BaseException as exc:  # a bug: UNHEALTHY first, so no answer comes from a READY worker
                    reason = f"engine thread crashed: {faults.describe(exc)}"
                    log.exception("engine_crashed", slot=self.lifecycle.slot)
                    self._turn_unhealthy(reason)
                    for job in batch:
                        settle(job.future, exc=WorkerUnhealthy(reason))
                    return
            elif self.state is not State.READY and not self.scheduler.reserved:
                return  # drained: nothing queued, and no place held by a request still decoding its upload

    def _take_batch(self) -> list[Job]:
        """The next batch the scheduler forms, waiting up to BATCH_WAIT_MS for jobs that could join it."""
        with self._lock:
            if not self.scheduler.pending:
                self._lock.wait(0.2)
            self._drop(self.scheduler.fill(time.monotonic()))
            if not self.scheduler.forming:
                return []
            until = time.monotonic() + self.settings.batch_wait_ms / 1000
            while self.scheduler.has_room() and not self._stop.is_set() and time.monotonic() < until:
                self._lock.wait(until - time.monotonic())
                self._drop(self.scheduler.fill(time.monotonic()))
            now = time.monotonic()
            batch = self.scheduler.start(now)
            self._publish()
        for job in batch:
            recorder().queue_wait.observe(now - job.enqueued)
        return batch

    def _drop(self, expired: list[Job]) -> None:
        """Tell the jobs the scheduler dropped unrun (the caller holds the lock)."""
        if not expired:
            return
        self._publish()
        now = time.monotonic()
        for job in expired:
            message = f"deadline passed after {now - job.enqueued:.1f} s in the queue"
            settle(job.future, exc=DeadlineExceeded(message, ran=False))


class _Host:
    """The engine as its runner sees it (``runner.Host``): every call takes the engine's lock and publishes
    the scheduler's counters, so the runner holds neither."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def slot(self) -> int:
        return self._engine.lifecycle.slot

    @property
    def state(self) -> State:
        return self._engine.state

    def call_started(self) -> None:
        engine = self._engine
        engine.lifecycle.publish(last_step_mono=engine.scheduler.started)

    def stepped(self, step: int) -> bool:
        engine, now = self._engine, time.monotonic()
        with engine._lock:
            nobody_waits = engine.scheduler.step(step, now)
        engine.lifecycle.publish(last_step_mono=now)
        return nobody_waits

    def finished(self, outcome: Outcome) -> tuple[list[Job], float]:
        engine = self._engine
        with engine._lock:
            ended = engine.scheduler.finish(outcome, time.monotonic())
            engine._publish()
        return ended

    def run_alone(self, job: Job) -> None:
        engine = self._engine
        with engine._lock:
            engine.scheduler.run([job], time.monotonic())
            engine._publish()

    def turn_unhealthy(self, reason: str) -> None:
        self._engine._turn_unhealthy(reason)
