"""Running one batch on the model, and deciding who is charged when it fails (docs/architecture.md §5).

- a fatal device error (``faults.is_fatal``) fails the whole batch and turns the worker UNHEALTHY;
- any other error in a batch of several jobs: each job runs again alone (outcome ``split``), so one
  request's bad input cannot fail the others;
- non-finite pixels (NaN or inf) in some images: their jobs fail (500), the rest are served, and the call
  counts toward MAX_CONSECUTIVE_FAILURES like any failure of the worker's;
- an error in a job running alone: a canary (the load's warm-up generation) runs. If it passes, the worker
  is sound and the request is rejected (``RejectedByModel``, 422), counting nothing against the worker; if
  it fails too, the failure is the worker's (500), and MAX_CONSECUTIVE_FAILURES in a row (a served call
  resets the count) make it UNHEALTHY.
- every job whose deadline passed or whose client left stops the call between two denoising steps, once
  nobody in the batch still waits;
- a LoRA adapter that cannot be used (``AdapterFailed``: corrupt, built for another base model, gone) fails
  the batch's jobs (every job of a batch names the same adapters) with a 422 naming it, before the call,
  counting nothing against the worker.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from webapp.board.slots import State
from webapp.engine import loader
from webapp.engine.loader import Model
from webapp.engine.scheduler import DeadlineExceeded, Job, Outcome, images, settle
from webapp.model import faults
from webapp.model.adapters import AdapterFailed
from webapp.model.profile import Limits
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
# Retry-After when nothing better is known: a worker starting, failed, draining or turned UNHEALTHY (a replacement
# takes longer than this; another worker or replica may serve the request now). The one such figure.
NOT_READY_RETRY_AFTER_S = 5


class WorkerUnhealthy(Exception):
    """The job could not run because this worker turned UNHEALTHY; another worker may serve it."""

    retry_after_s = NOT_READY_RETRY_AFTER_S


class RejectedByModel(Exception):
    """The pipeline failed on this job alone while the worker stayed sound (its canary generation passed):
    the request's own input is at fault. ``out_of_memory``: the device had too little memory for it."""

    def __init__(self, message: str, out_of_memory: bool) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


class _Interrupted(Exception):
    """Raised from the step callback to stop a pipeline call nobody waits for any more."""


class Host(Protocol):
    """What a runner asks of the engine that owns the scheduler, its lock and the worker's state: each call
    takes the lock and publishes the counters itself, so the runner holds neither."""

    @property
    def slot(self) -> int: ...

    @property
    def state(self) -> State: ...

    def call_started(self) -> None:
        """A pipeline call for the running batch begins (the stall watchdog's clock starts)."""

    def stepped(self, step: int) -> bool:
        """The running call finished denoising step ``step``; True when nobody in it waits any more."""

    def finished(self, outcome: Outcome) -> tuple[list[Job], float]:
        """The running call ended with ``outcome``: its jobs, and how long it ran."""

    def run_alone(self, job: Job) -> None:
        """``job`` becomes the running call by itself (a split batch's, or the canary)."""

    def turn_unhealthy(self, reason: str) -> None:
        """Fail every job held, say UNHEALTHY and make the worker exit."""


class Runner:
    """Runs the engine thread's batches on ``model`` for ``host`` (the engine). ``limits`` give the canary
    (the load's warm-up); ``max_failures`` failed calls in a row by the worker's own fault make it
    UNHEALTHY."""

    def __init__(self, model: Model, limits: Limits, max_failures: int, host: Host) -> None:
        self.model = model
        self.canary = loader.warm_up_params(limits)
        self.max_failures = max_failures
        self.host = host
        self.failures = 0  # pipeline calls failed in a row by the worker's own fault

    def _on_step(self, step: int) -> None:
        if self.host.stepped(step):
            raise _Interrupted(f"every job's deadline passed by step {step + 1}")

    def _call(self, batch: list[Job]) -> list[list[Any]]:
        """One pipeline call for the running ``batch``, watched by the stall watchdog and the step callback."""
        self.host.call_started()
        return self.model.generate([job.params for job in batch], self._on_step)

    def run(self, batch: list[Job]) -> None:
        """Run the batch the scheduler started and settle its jobs; a failure is judged as the module says.
        Its LoRA adapters (the same for every job: the scheduler's key) are set first, loaded if need be,
        and the load is charged to its jobs."""
        try:
            loading = self.model.use_adapters(batch[0].params.loras)
        except AdapterFailed as bad:
            self._finish(Outcome.ADAPTER_FAILED)
            recorder().lora_failed.inc(len(batch))
            for job in batch:
                settle(job.future, exc=bad)
            return
        except Exception as exc:  # noqa: BLE001 - judged like a failed call
            self._charge_or_split(batch, exc)
            return
        for job in batch:
            job.adapter_load_s = loading
        try:
            results = self._call(batch)
        except _Interrupted as stop:
            self._finish(Outcome.INTERRUPTED)
            log.info("batch_interrupted", slot=self.host.slot, jobs=len(batch), reason=str(stop))
            for job in batch:
                settle(job.future, exc=DeadlineExceeded(f"interrupted: {stop}", ran=True))
        except faults.NonFiniteOutput as bad:
            self._non_finite(batch, bad)
        except Exception as exc:  # noqa: BLE001 - any pipeline error is judged, never lost
            self._charge_or_split(batch, exc)
        else:
            self._finish(Outcome.SERVED)
            self.failures = 0
            for job, result in zip(batch, results, strict=True):
                settle(job.future, result=result)

    def _charge_or_split(self, batch: list[Job], exc: Exception) -> None:
        if faults.is_fatal(exc):
            self._fail(batch, exc)
        elif len(batch) > 1:
            self._split(batch, exc)
        else:
            self._charge(batch[0], exc)

    def _non_finite(self, batch: list[Job], bad: faults.NonFiniteOutput) -> None:
        """Some images came out NaN or infinite: their jobs fail (500 ``non_finite_output``, never a black
        picture), the others get their images, and the call counts as the worker's failure."""
        self._finish(Outcome.FAILED)
        self.failures += 1
        log.error(
            "non_finite_output", slot=self.host.slot, jobs=len(bad.bad), consecutive=self.failures, error=str(bad)
        )
        for index, (job, result) in enumerate(zip(batch, bad.results, strict=True)):
            if index in bad.bad:
                settle(job.future, exc=bad)
            else:
                settle(job.future, result=result)
        if self.failures >= self.max_failures:
            self.host.turn_unhealthy(f"{self.failures} generations failed in a row; last: {bad}")

    def _split(self, batch: list[Job], exc: Exception) -> None:
        """A batch of several jobs failed: run each again alone, so only the job at fault fails."""
        self._finish(Outcome.SPLIT)
        log.warning("batch_failed_retrying_alone", slot=self.host.slot, jobs=len(batch), error=faults.describe(exc))
        for job in batch:
            if self.host.state is State.UNHEALTHY:
                settle(
                    job.future, exc=WorkerUnhealthy("the worker turned UNHEALTHY while its batch ran again job by job")
                )
            elif job.expired(time.monotonic()):
                settle(job.future, exc=DeadlineExceeded("deadline passed while its batch ran", ran=True))
            else:
                self.host.run_alone(job)
                self.run([job])

    def _charge(self, job: Job, exc: Exception) -> None:
        """A job failed alone: the canary says whose fault it was (see the module's docstring)."""
        self._finish(Outcome.FAILED)
        canary = Job(self.canary)
        self.host.run_alone(canary)
        try:
            self.model.use_adapters(())  # the canary runs on the plain weights, as the load's warm-up did
            self._call([canary])
        except Exception as canary_exc:
            self._finish(Outcome.CANARY)
            self.failures += 1
            log.error(
                "generate_failed",
                slot=self.host.slot,
                consecutive=self.failures,
                error=faults.describe(exc),
                canary_error=faults.describe(canary_exc),
                exc_info=exc,
            )
            settle(job.future, exc=exc)
            if faults.is_fatal(canary_exc):
                self.host.turn_unhealthy(f"fatal device error: {faults.describe(canary_exc)}")
            elif self.failures >= self.max_failures:
                self.host.turn_unhealthy(f"{self.failures} generations failed in a row; last: {faults.describe(exc)}")
            return
        self._finish(Outcome.CANARY)
        recorder().rejected.inc()
        rejected = RejectedByModel(faults.describe(exc), faults.is_out_of_memory(exc))
        rejected.__cause__ = exc  # the request's thread logs it, with the request id
        settle(job.future, exc=rejected)

    def _fail(self, batch: list[Job], exc: Exception) -> None:
        """A fatal device error: every job of the batch fails (500) and the worker turns UNHEALTHY."""
        self._finish(Outcome.FAILED)
        error = faults.describe(exc)
        log.error("generate_failed", slot=self.host.slot, jobs=len(batch), fatal=True, error=error, exc_info=exc)
        for job in batch:
            settle(job.future, exc=exc)
        self.host.turn_unhealthy(f"fatal device error: {error}")

    def _finish(self, outcome: Outcome) -> None:
        """The running call ended with ``outcome``: settle the counters and record the call."""
        batch, elapsed = self.host.finished(outcome)
        recorded = recorder()
        recorded.generation.labels(outcome).observe(elapsed)
        if outcome is not Outcome.CANARY:
            recorded.batch_jobs.observe(len(batch))
            recorded.batch_images.observe(images(batch))
