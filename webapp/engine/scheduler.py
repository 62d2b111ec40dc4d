"""The scheduler: which jobs a worker admits, which run together next, and which are dropped unrun
(docs/architecture.md §5).

Pure bookkeeping over jobs and the times it is given: no threads, no board, no model, no clock of its own.
The engine serialises every call (it holds its condition's lock around each) and does the waiting.

- Admission: at most ``max_ongoing`` jobs run and ``max_queued`` wait; ``admit`` refuses beyond that with
  ``Overloaded`` and a Retry-After of the images held times the measured seconds per image.
- Batches: the oldest live job plus later jobs with the same key (mode, size, steps, guidance, strength,
  adapters), in arrival order, up to ``max_batch_size`` images and ``max_ongoing`` jobs. A job that cannot
  join waits its turn: nothing overtakes a job except jobs that share its batch.
- Deadlines: a job whose deadline passed, or whose client stopped waiting, is dropped from the queue unrun;
  a running batch whose jobs have all expired is reported so the engine interrupts it.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from enum import StrEnum

from webapp.model.request import GenerationParams


class Outcome(StrEnum):
    """How a pipeline call ended (the generation metric's ``outcome`` label)."""

    SERVED = "served"
    FAILED = "failed"  # the worker's fault, or a fatal device error
    INTERRUPTED = "interrupted"  # nobody in it waited any more
    SPLIT = "split"  # a batch failed and its jobs run again alone
    CANARY = "canary"  # the canary after a job failed alone
    ADAPTER_FAILED = "adapter_failed"  # its LoRA adapter could not be used; the model never ran


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


@dataclass(eq=False)
class Job:
    """One generation request inside a worker. ``deadline`` is a time.monotonic() value."""

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
    adapter_load_s: float = 0.0  # seconds its batch spent loading the LoRA adapters it named
    # Steps done, one entry per step, then None once the future is settled: a stream sends each at once.
    updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _: self.updates.put(None))

    @property
    def key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call: the same mode (one pipeline each), size, steps,
        guidance, strength (which decides where an edit's schedule starts) and LoRA adapters with their scales
        (set on the model for the whole call)."""
        params = self.params
        return (
            params.mode,
            params.width,
            params.height,
            params.num_inference_steps,
            params.guidance_scale,
            params.strength,
            params.loras,
        )

    def expired(self, now: float) -> bool:
        return self.abandoned or now >= self.deadline or self.future.done()

    def abandon(self) -> None:
        """Its request stops waiting: the scheduler drops it unrun, or stops its batch if nobody else waits."""
        self.abandoned = True
        self.future.cancel()


def settle(future: Future, result: object = None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless something (the stall watchdog) already did."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def images(jobs: Iterable[Job]) -> int:
    return sum(job.params.num_images for job in jobs)


class Scheduler:
    """One worker's queue and running batch, with the counters published on the board."""

    def __init__(self, max_ongoing: int, max_queued: int, max_batch_size: int) -> None:
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.max_batch_size = max_batch_size
        self.pending: deque[Job] = deque()  # arrival order
        self.forming: list[Job] = []  # taken off the queue, not running yet (waiting for BATCH_WAIT_MS)
        self.running: list[Job] = []
        self.reserved = 0  # places held by requests still decoding their uploads, not yet jobs
        self.started = 0.0  # when the running batch started
        self.last_step = 0.0  # when it last finished a denoising step
        self.seconds_per_image = 0.0  # moving average over served calls, batching's gain included
        self.served = self.failed = self.shed = 0

    def counts(self) -> dict[str, int]:
        """What the board shows of this worker's load."""
        return {
            "queued": len(self.pending) + len(self.forming) + self.reserved,
            "in_flight": len(self.running),
            "served": self.served,
            "failed": self.failed,
            "shed": self.shed,
        }

    def retry_after(self) -> int:
        """Seconds until the images held now are likely done (at least 1): images x seconds per image."""
        held = images(self.pending) + images(self.forming) + images(self.running)
        return max(1, math.ceil(round((self.seconds_per_image or 1.0) * held, 3)))  # 9.000000000000002 is 9

    def _make_room(self) -> None:
        """Overloaded when MAX_ONGOING + MAX_QUEUED jobs (places held included) are already here."""
        if not self.free_places():
            self.shed += 1
            capacity = self.max_ongoing + self.max_queued
            message = f"this worker holds {capacity} jobs (MAX_ONGOING + MAX_QUEUED = {capacity})"
            raise Overloaded(message, self.retry_after())

    def free_places(self) -> int:
        """Places left before ``admit`` sheds (MAX_ONGOING + MAX_QUEUED, less every job held)."""
        held = len(self.pending) + len(self.forming) + len(self.running) + self.reserved
        return max(0, self.max_ongoing + self.max_queued - held)

    def reserve(self) -> None:
        """Hold a place for a job still being prepared (its upload decoded), or raise Overloaded as ``admit``
        does: a request is refused before it costs a decode."""
        self._make_room()
        self.reserved += 1

    def release(self) -> None:
        """Give back a place ``reserve`` held (its job was queued, or will never be)."""
        self.reserved = max(0, self.reserved - 1)

    def admit(self, job: Job) -> None:
        """Queue ``job``, or raise Overloaded when MAX_ONGOING + MAX_QUEUED jobs are already held."""
        self._make_room()
        self.pending.append(job)

    def fill(self, now: float) -> list[Job]:
        """Move queued jobs into the batch being formed: the oldest live job, then later ones with its key
        while they fit. Return the expired jobs taken off the queue, for the caller to settle."""
        dropped: list[Job] = []
        kept: deque[Job] = deque()
        batch = self.forming
        held = images(batch)
        for job in self.pending:
            if job.expired(now):
                dropped.append(job)
            elif len(batch) < self.max_ongoing and (
                not batch or (job.key == batch[0].key and held + job.params.num_images <= self.max_batch_size)
            ):
                batch.append(job)
                held += job.params.num_images
            else:
                kept.append(job)
        self.pending = kept
        return dropped

    def has_room(self) -> bool:
        """Whether another job could still join the batch being formed."""
        return len(self.forming) < self.max_ongoing and images(self.forming) < self.max_batch_size

    def start(self, now: float) -> list[Job]:
        """The batch being formed starts running; jobs whose client cancelled meanwhile are left out."""
        batch, self.forming = self.forming, []
        return self.run([job for job in batch if job.future.set_running_or_notify_cancel()], now)

    def run(self, batch: list[Job], now: float) -> list[Job]:
        """``batch`` becomes the running call (also a job run again alone after its batch failed)."""
        total = images(batch)
        for job in batch:
            job.started, job.batch_jobs, job.batch_images = now, len(batch), total
        self.running, self.started, self.last_step = batch, now, now
        return batch

    def step(self, step: int, now: float) -> bool:
        """The running call finished denoising step ``step`` (0-based); True when every job in it expired."""
        self.last_step = now
        for job in self.running:
            job.steps_done = step + 1
            job.updates.put(step + 1)
        return all(job.expired(now) for job in self.running)

    def stalled_for(self, now: float) -> float:
        """Seconds the running call has gone without a step (0 when nothing runs)."""
        return now - max(self.started, self.last_step) if self.running else 0.0

    def finish(self, outcome: Outcome, now: float) -> tuple[list[Job], float]:
        """The running call ended with ``outcome``: return its jobs and its duration."""
        batch, self.running = self.running, []
        elapsed = now - self.started
        for job in batch:
            job.finished = now
        if outcome is Outcome.SERVED:
            self.served += len(batch)
            per_image = elapsed / max(1, images(batch))
            self.seconds_per_image = 0.8 * (self.seconds_per_image or per_image) + 0.2 * per_image
        elif outcome is Outcome.FAILED:
            self.failed += len(batch)
        return batch, elapsed

    def clear(self) -> list[Job]:
        """Take every job held, running and queued (the worker turned UNHEALTHY)."""
        held = self.running + self.forming + list(self.pending)
        self.running, self.forming, self.pending = [], [], deque()
        return held
