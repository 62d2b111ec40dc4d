"""Test loaders, named by MODEL_LOADER, that shape a load without patching the server's code.

Each wraps the real loader (``webapp.pipeline.load``), so what finally serves is the real tiny pipeline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from webapp import pipeline
from webapp.settings import Settings

_calls = 0  # per worker process: attempts seen by ``flaky``


def gated(settings: Settings, slot: int) -> pipeline.DiffusersModel:
    """Hold the load until the file named by GATE_FILE exists, so a test decides when loading ends."""
    gate = Path(os.environ["GATE_FILE"])
    deadline = time.monotonic() + float(os.environ.get("GATE_TIMEOUT", "300"))
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {gate} was never opened")
        time.sleep(0.05)
    return pipeline.load(settings, slot)


def flaky(settings: Settings, slot: int) -> pipeline.DiffusersModel:
    """Fail the first FLAKY_FAILURES attempts of this worker with a transient error, then load for real."""
    global _calls
    _calls += 1
    if _calls <= int(os.environ["FLAKY_FAILURES"]):
        raise ConnectionError(f"simulated hub outage on attempt {_calls}")
    return pipeline.load(settings, slot)
