"""A worker's side of the stored jobs (docs/architecture.md §17): one thread that claims queued jobs while
the worker is READY and has room, renews its leases, releases the lapsed leases of others and sweeps
expired jobs; each claimed job runs on a thread of its own through the same path as a /generate request
(``jobs.admit``, ``jobs.steps``, ``jobs.wait``, ``jobs.answer``), so it is validated, batched, charged and
answered exactly as one.

Readiness still decides who works: a worker that is not READY claims nothing, and the engine's own
admission is asked how many places are free (``Engine.free_places``) before each claim.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import tenacity
from flask import Flask, g

from webapp import errors
from webapp.api import jobs
from webapp.api.images import FORMATS
from webapp.api.openai import protocol
from webapp.api.params import parse
from webapp.errors import ApiError
from webapp.queue import Store
from webapp.queue.store import StoredJob, StoreUnavailable
from webapp.runtime import Runtime
from webapp.telemetry import logs

log = logs.get(__name__)
SWEEP_INTERVAL_S = 60.0
# A stored job's route -> how its request is read: /generate's body, or OpenAI's (Prefer: respond-async).
PARSERS: dict[str, jobs.Parser] = {"generate": parse, "openai": protocol.generation_params}


def image_url(job_id: str, n: int) -> str:
    return f"/v1/jobs/{job_id}/images/{n}"


class Claimer:
    """Claims and runs stored jobs for one worker (``start`` returns at once; ``wake`` after a submit here)."""

    def __init__(self, app: Flask, runtime: Runtime, store: Store, owner: str) -> None:
        self.app, self.runtime, self.store, self.owner = app, runtime, store, owner
        self.settings = runtime.settings
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._held: dict[str, jobs.Admitted | None] = {}  # claimed job id -> its engine job, once admitted
        self._store_error: str | None = None  # why the store failed this thread's last look; None if it answered
        self._store_answered = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"claimer-{runtime.slot}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more, and give back what this worker still runs (its engine has stopped)."""
        self._stop.set()
        self._wake.set()
        if self.store.exists():
            requeued = self.store.requeue(self.owner)
            if requeued:
                log.info("jobs_requeued", slot=self.runtime.slot, jobs=requeued)

    def _run(self) -> None:
        renew_every = self.settings.job_lease_seconds / 3
        next_renew = next_sweep = 0.0
        while not self._stop.is_set():
            claimed = False
            try:
                now = time.monotonic()
                if self.store.exists():  # else no job was ever submitted here: nothing to do, nothing written
                    if now >= next_renew:
                        self._renew()
                        next_renew = now + renew_every
                    if now >= next_sweep:
                        self.store.sweep()
                        next_sweep = now + SWEEP_INTERVAL_S
                    claimed = self._claim()
                if self._store_error is not None:
                    log.info("job_store_available", slot=self.runtime.slot)
                self._store_error, self._store_answered = None, True
            except StoreUnavailable as exc:
                if self._store_error is None:
                    log.warning("job_store_unavailable", slot=self.runtime.slot, error=str(exc))
                self._store_error = str(exc)
            except Exception:  # a bug here must not end the thread: stored jobs would wait for nobody
                log.exception("claimer_error", slot=self.runtime.slot)
            if not claimed:
                self._wake.wait(self.settings.job_poll_interval)
                self._wake.clear()

    def store_state(self) -> tuple[str, str | None]:
        """What this thread last saw of the job store: ("up", None), ("unavailable", why), or ("unknown",
        None) before its first look. Read by /readyz, which asks the store nothing itself."""
        if self._store_error is not None:
            return "unavailable", self._store_error
        return ("up", None) if self._store_answered else ("unknown", None)

    def _renew(self) -> None:
        """Renew the leases of the jobs this worker runs (stopping the ones a client canceled), and put back
        in the queue the jobs whose holder stopped renewing (a worker that froze, or one the master never
        saw die). Only the jobs it knows it runs: a claim whose answer was lost (the store restarted as it
        answered) left a job under this worker's name that nobody runs, and its lease must lapse."""
        with self._lock:
            running = list(self._held)
        for job_id in self.store.renew(self.owner, running):
            with self._lock:
                admitted = self._held.get(job_id)
            if admitted is not None:
                admitted.job.abandon()
        self.store.release("its lease ran out (the worker stopped renewing it)", expired_before=time.time())

    def _claim(self) -> bool:
        """Claim one job if this worker has room for it; whether one was claimed."""
        engine = self.runtime.engine
        with self._lock:
            held = len(self._held)
        if engine is None or engine.free_places() <= 0 or held >= self.settings.max_ongoing:
            return False
        stored = self.store.claim(self.owner)
        if stored is None:
            return False
        with self._lock:
            self._held[stored.id] = None
        threading.Thread(target=self._serve, args=(stored,), name=f"job-{stored.id}", daemon=True).start()
        return True

    def _serve(self, stored: StoredJob) -> None:
        try:
            with self.app.app_context():
                g.request_id = stored.id
                logs.bind_request(stored.id)
                self._run_job(stored)
        except StoreUnavailable as exc:  # its lease lapses and another attempt runs it
            log.warning("job_store_unavailable", slot=self.runtime.slot, job=stored.id, error=str(exc))
        except Exception:
            log.exception("job_error", slot=self.runtime.slot, job=stored.id)
            self.store.finish(stored.id, self.owner, "failed", errors.INTERNAL, f"job failed; quote {stored.id}")
        finally:
            with self._lock:
                self._held.pop(stored.id, None)
            self._wake.set()

    def _run_job(self, stored: StoredJob) -> None:
        log.info("job_claimed", slot=self.runtime.slot, job=stored.id, attempt=stored.attempt)
        try:
            admitted = jobs.admit(self.runtime, stored.request, None, time.monotonic(), PARSERS[stored.route])
        except ApiError as exc:
            self._settle_refused(stored, exc)
            return
        with self._lock:
            self._held[stored.id] = admitted
        total = admitted.params.steps_run
        canceled = False
        unrecorded = 0
        for step in jobs.steps(admitted):
            try:
                wanted = self.store.progress(stored.id, self.owner, step, total)
            except StoreUnavailable as exc:  # the step's record is lost, not the job: it runs on
                if not unrecorded:
                    log.warning("job_store_unavailable", slot=self.runtime.slot, job=stored.id, error=str(exc))
                unrecorded += 1
                continue
            if not wanted:
                admitted.job.abandon()  # asked to cancel (or no longer ours): stop between steps
                canceled = True
                break
        if canceled:
            message = "canceled while running"
            self._settle(self.store.finish, stored.id, self.owner, "canceled", errors.CANCELED, message)
            log.info("job_canceled", slot=self.runtime.slot, job=stored.id)
            return
        try:
            images = jobs.wait(admitted)
        except ApiError as exc:
            self._settle(self.store.finish, stored.id, self.owner, "failed", exc.code, exc.message)
            log.info("job_failed", slot=self.runtime.slot, job=stored.id, code=exc.code)
            return
        body, data = jobs.answer(admitted, images)
        output = stored_output(stored.id, body)
        media_type = FORMATS[admitted.params.output_format]
        if self._settle(self.store.succeed, stored.id, self.owner, output, [(media_type, item) for item in data]):
            log.info("job_succeeded", slot=self.runtime.slot, job=stored.id, attempt=stored.attempt)

    def _settle(self, write: Callable[..., bool], *args: Any) -> bool:
        """Write a job's end (its images and status), tried again while the store cannot take it, for as long
        as the job's lease would last: images drawn are not thrown away for a store's restart. Past that
        the lease has lapsed and another attempt owns the job."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(self.settings.job_lease_seconds),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2),
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            reraise=True,
        )
        return retrying(write, *args)

    def _settle_refused(self, stored: StoredJob, exc: ApiError) -> None:
        """A claimed job the engine would not take: back to the queue when the worker is the reason (not
        READY, or full since the claim), else failed with the refusal (its request was valid at submit,
        so the model's limits changed)."""
        if exc.code in (errors.NOT_READY, errors.OVERLOADED):
            self.store.requeue(self.owner, stored.id)
            return
        self.store.finish(stored.id, self.owner, "failed", exc.code, exc.message)


def stored_output(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A job's output: /generate's answer (``jobs.answer``) with each image's bytes replaced by its URL."""
    images = []
    for n, image in enumerate(body["images"]):
        kept = {key: value for key, value in image.items() if not key.endswith("_base64")}
        images.append({"url": image_url(job_id, n), **kept})
    return {**body, "images": images}
