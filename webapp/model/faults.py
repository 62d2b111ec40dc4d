"""What an error means: whether a failed load is worth retrying, and whether a failed generation leaves
the device unusable. Errors are matched by class name and message along the whole chain of causes
(``causes``, walked here once for both questions), so this module imports neither torch, httpx nor
huggingface_hub.

- Loads: an error is transient (the network, the hub's 5xx/429, an I/O hiccup, a device still holding a
  dying worker's memory) or permanent (a missing or corrupt local model will not fix itself, and retrying
  it only delays the truth on /healthz). Only known transient errors are retried.
- Generations: a fatal error (an illegal memory access, a device-side assert, a lost GPU) poisons the CUDA
  context for the whole process: every later call fails too, so the worker must say UNHEALTHY and exit to
  be replaced. Everything else (a prompt that breaks a tokenizer, an out-of-memory for one oversized batch)
  fails that request alone and changes nothing.
"""

from __future__ import annotations

import errno

# Matched case-insensitively in the message of any exception in the chain. These are the texts the CUDA
# runtime, cuBLAS/cuDNN and NVML put in the errors torch raises once a context is broken.
FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "an illegal address",
    "uncorrectable ecc error",
    "gpu is lost",
    "fallen off the bus",
    "device lost",
    "cuda driver version is insufficient",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "nccl error",
)
# torch raises these type names for device failures; out-of-memory is deliberately not among them.
FATAL_TYPE_NAMES = frozenset({"AcceleratorError", "CudaError"})


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the chain of errors behind it (``__cause__``, else ``__context__``), outermost first."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


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
    for link in reversed(causes(exc)):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def describe(exc: BaseException) -> str:
    """A one-line description of an error for the board and logs: type and first line of the message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_fatal(exc: BaseException) -> bool:
    """True when ``exc`` (or anything in its cause chain) means the device can no longer be trusted."""
    for link in causes(exc):
        names = _names(link)
        if "OutOfMemoryError" in names:
            return False
        if names & FATAL_TYPE_NAMES:
            return True
        text = str(link).lower()
        if any(marker in text for marker in FATAL_MARKERS):
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """True when the device ran out of memory for this call (torch's OutOfMemoryError, anywhere in the chain):
    the request asked for more than the device holds, and the device itself is fine."""
    return any("OutOfMemoryError" in _names(link) for link in causes(exc))


class NonFiniteOutput(Exception):
    """The model drew non-finite pixels (NaN or inf) for the requests at ``bad`` (indexes into the batch);
    ``results`` holds every request's images, the others' sound. Raised by the model adapter, which sees the
    float pixels before they become a picture (PIL turns NaN into black)."""

    def __init__(self, message: str, bad: set[int], results: list[list[object]]) -> None:
        super().__init__(message)
        self.bad = bad
        self.results = results


class BadWarmUp(ValueError):
    """The warm-up image was not a picture (non-finite, or one flat colour): permanent, never retried."""
