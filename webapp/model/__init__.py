"""The model: what a request asks it for (``request``), what its errors mean (``faults``), its profile and the
limits it makes (``profile``), the diffusers adapter (``pipeline``), and the embedded models (``tiny_model``,
``scenes``, ``weights/``). Only ``pipeline`` and ``tiny_model`` import torch."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# What the model libraries read from the environment once, at import, as this server wants it unless the
# operator set it otherwise: no progress bars, no advisory warnings, and only errors from transformers' logger
# (which prints e.g. "requires torchvision" at import). They are set when this package is imported, which is
# before ``pipeline`` or ``tiny_model`` imports those libraries.
LIBRARY_ENV_DEFAULTS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def quiet_libraries(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each of ``LIBRARY_ENV_DEFAULTS`` in ``environ`` that is not set there already."""
    for name, value in LIBRARY_ENV_DEFAULTS.items():
        environ.setdefault(name, value)


quiet_libraries()
