"""Loading one worker's model, top to bottom in ``load`` (docs/architecture.md §5).

1. Respawn backoff: if the slot's workers died before READY, wait (``lifecycle.respawn_delay``) first.
2. Attempts under a declared tenacity policy: each is ``MODEL_LOADER(settings, slot)`` plus one warm-up
   generation, because a model can load cleanly and only fail when used (a missing tokenizer does that).
   Only errors ``faults.is_transient`` knows are retried, with exponential backoff and jitter, until
   LOAD_MAX_ATTEMPTS or a wait that would end past LOAD_MAX_SECONDS.
3. The outcome: the warmed-up model, or FAILED with the reason on the board.

Every step is a transition of the worker's ``Lifecycle`` (STARTING -> LOADING (attempt k) -> WARMING, or
FAILED); READY is the engine's to declare, once it can serve. A load refused a transition (the worker is
draining) stops at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from webapp import faults, logs
from webapp.lifecycle import Lifecycle, respawn_delay
from webapp.params import GenerationParams
from webapp.recorder import recorder
from webapp.settings import Settings, resolve_callable

log = logs.get(__name__)


class Model(Protocol):
    """What a loader returns and the engine runs (``webapp.pipeline.DiffusersModel`` is the real one)."""

    device: str
    default_size: tuple[int, int]

    def generate(self, batch: Sequence[GenerationParams], on_step: Callable[[int], None]) -> list[list[Any]]:
        """One pipeline call for compatible requests (same size, steps, guidance): for each request, its
        images (PIL), one per seed; call ``on_step(i)`` after each denoising step (it may raise to stop)."""
        ...


class _Refused(Exception):
    """The lifecycle refused a loading transition: the worker is draining."""


def retrying(
    max_attempts: int,
    max_seconds: float,
    backoff_initial: float,
    backoff_max: float,
    before_sleep: Callable[[RetryCallState], None],
) -> Retrying:
    """The load policy: retry transient errors with exponential backoff and jitter; stop after
    ``max_attempts`` or before a wait that would end past ``max_seconds``; re-raise the last error."""
    return Retrying(
        retry=retry_if_exception(faults.is_transient),
        stop=stop_after_attempt(max_attempts) | stop_before_delay(max_seconds),
        wait=wait_exponential_jitter(multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial),
        before_sleep=before_sleep,
        reraise=True,
    )


def warm_up_params(model: Model, guidance: float) -> GenerationParams:
    """One step at the model's native size: the load's warm-up, and the engine's canary after a failure."""
    return GenerationParams("warm-up", None, 1, guidance, *model.default_size, (0,))


def load(settings: Settings, lifecycle: Lifecycle, stop: threading.Event) -> Model | None:
    """Load and warm up this worker's model; None when it cannot (FAILED is on the board) or the worker is
    stopping."""
    delay = respawn_delay(lifecycle.crashes, settings.respawn_backoff_initial, settings.respawn_backoff_max)
    if delay:
        lifecycle.respawn_wait(delay)
        if stop.wait(delay):
            return None
    started = time.monotonic()
    try:
        model = _attempts(settings, lifecycle)
    except _Refused:
        return None
    except BaseException as exc:  # every failure must reach the board, never vanish
        if faults.is_transient(exc):
            message = f"gave up after {lifecycle.attempt} attempt(s): {faults.describe(exc)}"
        else:
            message = f"permanent error on attempt {lifecycle.attempt}: {faults.describe(exc)}"
        recorder().load_seconds.labels("failed").observe(time.monotonic() - started)
        log.exception("load_failed", slot=lifecycle.slot, attempts=lifecycle.attempt, error=message)
        lifecycle.failed(message)
        return None
    recorder().load_seconds.labels("ready").observe(time.monotonic() - started)
    return model


def _attempts(settings: Settings, lifecycle: Lifecycle) -> Model:
    limit = settings.load_max_attempts

    def before_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        error = faults.describe(exc) if exc else "unknown error"
        log.warning(
            "load_retry", slot=lifecycle.slot, attempt=state.attempt_number, error=error, retry_in_s=round(wait, 2)
        )
        if not lifecycle.loading(state.attempt_number, limit, error=error, retry_in_s=wait):
            raise _Refused

    policy = retrying(
        limit, settings.load_max_seconds, settings.load_backoff_initial, settings.load_backoff_max, before_retry
    )
    for attempt in policy:
        with attempt:
            number = attempt.retry_state.attempt_number
            started = time.monotonic()
            try:
                model = _attempt(settings, lifecycle, number)
            except _Refused:
                raise
            except BaseException:
                recorder().load_attempts.labels("error").inc()
                raise
            recorder().load_attempts.labels("ok").inc()
            seconds = round(time.monotonic() - started, 3)
            log.info("loaded", slot=lifecycle.slot, attempt=number, device=model.device, seconds=seconds)
    return model


def _attempt(settings: Settings, lifecycle: Lifecycle, number: int) -> Model:
    """One attempt: the loader, then one warm-up generation."""
    if not lifecycle.loading(number, settings.load_max_attempts):
        raise _Refused
    model: Model = resolve_callable(settings.model_loader)(settings, lifecycle.slot)
    if not lifecycle.warming(model.device):
        raise _Refused
    model.generate([warm_up_params(model, settings.default_guidance)], lambda step: None)
    return model
