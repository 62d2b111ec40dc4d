"""Loading one worker's model, top to bottom in ``load`` (docs/architecture.md §5).

1. Respawn backoff: if the slot's workers died before READY, wait (``lifecycle.respawn_delay``) first.
2. Attempts under a declared tenacity policy: each is ``MODEL_LOADER(settings, slot)`` plus one warm-up
   generation at the size requests get by default, because a model can load cleanly and only fail when used
   (a missing tokenizer does that), and whose image must be a picture: finite and not one flat colour
   (``check_warm_up``), or the worker is FAILED for good with what to try.
   Only errors ``faults.is_transient`` knows are retried, with exponential backoff and jitter, until
   LOAD_MAX_ATTEMPTS or a wait that would end past LOAD_MAX_SECONDS.
3. The outcome: the warmed-up model, or FAILED with the reason on the board.

Every step is a transition of the worker's ``Lifecycle`` (STARTING -> LOADING (attempt k) -> WARMING, or
FAILED); READY is the engine's to declare, once it can serve. A load refused a transition (the worker is
draining) stops at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from webapp.board.lifecycle import Lifecycle, respawn_delay
from webapp.model import faults
from webapp.model.profile import Limits, ModelProfile
from webapp.model.request import GenerationParams
from webapp.settings import Settings, resolve_callable
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)


class Model(Protocol):
    """What a loader returns and the engine runs (``webapp.model.pipeline.DiffusersModel`` is the real one)."""

    device: str
    profile: ModelProfile

    def generate(self, batch: Sequence[GenerationParams], on_step: Callable[[int], None]) -> list[list[Any]]:
        """One pipeline call for compatible requests (same size, steps, guidance): for each request, its
        images (PIL), one per seed; call ``on_step(i)`` after each denoising step (it may raise to stop).
        Raises ``faults.NonFiniteOutput`` rather than return an image with a NaN or infinite pixel."""
        ...

    def use_adapters(self, loras: tuple[tuple[str, float], ...]) -> float:
        """Make ``loras`` (name, scale) the LoRA adapters the next ``generate`` runs with, () for none; return
        the seconds spent loading. Raises ``adapters.AdapterFailed`` when one cannot be used: the request's
        fault, with the weights left clean."""
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


def loader_module(settings: Settings) -> str:
    """The module MODEL_LOADER names (``module:function``)."""
    return settings.model_loader.partition(":")[0]


def model_code_imported(settings: Settings) -> bool:
    """Whether this process has MODEL_LOADER's module already: a worker forked after the master's
    ``preimport`` inherits it (docs/architecture.md §13)."""
    return loader_module(settings) in sys.modules


def preimport(settings: Settings) -> list[str]:
    """Import MODEL_LOADER's module, and what its optional ``preimport(settings)`` names, in this process
    without loading anything: the gunicorn master does it so the workers it forks afterwards start with the
    model code already imported (docs/architecture.md §13). Returns what the loader's ``preimport`` listed."""
    resolve_callable(settings.model_loader)  # imports the module, and checks the function is there
    hook = getattr(sys.modules[loader_module(settings)], "preimport", None)
    return list(hook(settings)) if callable(hook) else []


def warm_up_params(limits: Limits) -> GenerationParams:
    """One step at the size a request gets by default (the model's native size within MAX_IMAGE_SIZE), with
    the default guidance: the load's warm-up, and the engine's canary after a failure."""
    return GenerationParams("warm-up", None, 1, limits.default_guidance or 0.0, *limits.request_size, (0,))


def flat_colour(image: Any) -> tuple[int, ...] | None:
    """The one colour every pixel of a PIL ``image`` has, or None when it has more than one."""
    extrema = image.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    if all(low == high for low, high in bands):
        return tuple(low for low, _ in bands)
    return None


def check_warm_up(model: Model, limits: Limits) -> None:
    """Run the warm-up and check what it drew: BadWarmUp (permanent) when it is not finite, or one flat
    colour, with what to try (docs/architecture.md §12)."""
    dtype = model.profile.dtype
    try:
        images = model.generate([warm_up_params(limits)], lambda step: None)
    except faults.NonFiniteOutput as exc:
        hint = (
            "float16 gives NaN for this model; set DTYPE=bfloat16 (or float32)"
            if dtype == "float16"
            else f"the weights may hold NaN or overflow in {dtype}; check the checkpoint, or try DTYPE=float32"
        )
        raise faults.BadWarmUp(f"warm-up image is not finite (NaN or inf pixels in {dtype}): {hint}") from exc
    colour = flat_colour(images[0][0])
    if colour is not None:
        raise faults.BadWarmUp(
            f"warm-up image is one flat colour {colour} at {images[0][0].width}x{images[0][0].height}: the model "
            f"draws nothing ({dtype}); check the checkpoint, or try DTYPE=float32"
        )


@dataclass(frozen=True)
class Loaded:
    """A warmed-up model and what requests are held to with it (computed once, here)."""

    model: Model
    limits: Limits


def load(settings: Settings, lifecycle: Lifecycle, stop: threading.Event) -> Loaded | None:
    """Load and warm up this worker's model; None when it cannot (FAILED is on the board) or the worker is
    stopping."""
    delay = respawn_delay(lifecycle.crashes, settings.respawn_backoff_initial, settings.respawn_backoff_max)
    if delay:
        lifecycle.respawn_wait(delay)
        if stop.wait(delay):
            return None
    started = time.monotonic()
    try:
        loaded = _attempts(settings, lifecycle)
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
    return loaded


def _attempts(settings: Settings, lifecycle: Lifecycle) -> Loaded:
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
                loaded = _attempt(settings, lifecycle, number)
            except _Refused:
                raise
            except BaseException:
                recorder().load_attempts.labels("error").inc()
                raise
            recorder().load_attempts.labels("ok").inc()
            seconds = round(time.monotonic() - started, 3)
            log.info("loaded", slot=lifecycle.slot, attempt=number, device=loaded.model.device, seconds=seconds)
    return loaded


def _attempt(settings: Settings, lifecycle: Lifecycle, number: int) -> Loaded:
    """One attempt: the loader, then one warm-up generation, checked."""
    if not lifecycle.loading(number, settings.load_max_attempts):
        raise _Refused
    model: Model = resolve_callable(settings.model_loader)(settings, lifecycle.slot)
    limits = Limits.of(settings, model.profile)  # CannotServe (permanent) when no request could fit
    if not lifecycle.warming(model.device, model.profile.summary()):
        raise _Refused
    check_warm_up(model, limits)
    return Loaded(model, limits)
