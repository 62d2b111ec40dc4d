"""Loading a model with a declared retry policy, and the rule that says which errors are worth retrying.

A load is retried only when the error is transient (the network, the hub's 5xx/429, an I/O hiccup, a
device still holding a dying worker's memory). Anything else is permanent and stops at once: a missing
or corrupt local model will not fix itself, and retrying it only delays the truth on /healthz.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from webapp import faults

T = TypeVar("T")

# Matched by class name anywhere in an exception's MRO, so this module imports neither torch, httpx nor
# huggingface_hub. Checked first: OfflineModeIsEnabled is a ConnectionError, yet offline stays offline.
PERMANENT_NAMES = frozenset(
    {
        "OfflineModeIsEnabled",
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "RemoteEntryNotFoundError",
        "HFValidationError",
        "SafetensorError",
    }
)
TRANSIENT_NAMES = frozenset(
    {
        "ConnectionError",  # builtins and requests
        "TimeoutError",
        "ConnectError",  # httpx / httpcore
        "NetworkError",
        "TimeoutException",
        "RemoteProtocolError",
        "Timeout",  # requests
        "OutOfMemoryError",  # torch.cuda: memory of a worker that is still exiting
        "IncompleteRead",
    }
)
PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    AttributeError,
    NotImplementedError,
    ImportError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    SyntaxError,
)
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _verdict(exc: BaseException) -> bool | None:
    """True transient, False permanent, None: this link alone does not tell."""
    names = _names(exc)
    if names & PERMANENT_NAMES:
        return False
    if "HfHubHTTPError" in names:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    if names & TRANSIENT_NAMES:
        return True
    if isinstance(exc, PERMANENT_TYPES):
        return False
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed load is worth another attempt.

    The chain of causes is read from the root cause outwards, because libraries wrap: diffusers raises a
    bare OSError around a hub ConnectError (transient) or around OfflineModeIsEnabled (permanent). The
    first link that tells decides. When no link tells, the error is permanent: only known transient
    failures are retried.
    """
    for link in reversed(faults.causes(exc)):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def describe(exc: BaseException) -> str:
    """A one-line description of an error for the board and logs: type and first line of the message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(max_attempts) | stop_before_delay(max_seconds),
        wait=wait_exponential_jitter(multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial),
        before_sleep=before_sleep,
        reraise=True,
    )
