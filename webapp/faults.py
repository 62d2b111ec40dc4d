"""Which errors during a generation leave the device unusable.

A fatal error (an illegal memory access, a device-side assert, a lost GPU) poisons the CUDA context for
the whole process: every later call fails too, so the worker must say UNHEALTHY and exit to be replaced.
Everything else (a prompt that breaks a tokenizer, an out-of-memory for one oversized batch) fails that
request alone and changes nothing.
"""

from __future__ import annotations

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
