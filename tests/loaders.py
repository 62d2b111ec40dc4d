"""Test loaders, named by MODEL_LOADER, that shape a load without patching the server's code.

Each wraps the real loader (``webapp.model.pipeline.load``), so what finally serves is the real tiny pipeline.
This module imports neither torch nor the pipeline module itself: a worker imports them as its load begins
(``gated``: while it waits at the gate, as the real loader would be importing), and gunicorn's master through
``preimport``. PREIMPORT_MODEL=0 says a server never loads (its gate stays shut): then neither imports them,
and the server costs no torch import at all.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from webapp.settings import Settings

if TYPE_CHECKING:
    from webapp.model import pipeline

_calls = 0  # per worker process: attempts seen by ``flaky``


def preimport(settings: Settings) -> list[str]:
    """What gunicorn's master imports before its first fork (``webapp.engine.loader.preimport``): torch,
    diffusers and the model's classes, as the real loader has it imported, unless PREIMPORT_MODEL=0 says that
    this server's workers never load (a gate that stays shut): then nothing heavy at all."""
    if os.environ.get("PREIMPORT_MODEL", "1") == "0":
        return []
    from webapp.model import pipeline

    return pipeline.preimport(settings)


def _load(settings: Settings, slot: int) -> pipeline.DiffusersModel:
    from webapp.model import pipeline

    return pipeline.load(settings, slot)


def gated(settings: Settings, slot: int) -> pipeline.DiffusersModel:
    """Hold the load until the file named by GATE_FILE exists, so a test decides when loading ends; the model
    code is imported meanwhile (unless PREIMPORT_MODEL=0), so opening the gate leaves the weights to load."""
    if os.environ.get("PREIMPORT_MODEL", "1") != "0":
        from webapp.model import pipeline  # noqa: F401 - imported now, as the real loader would be
    gate = Path(os.environ["GATE_FILE"])
    deadline = time.monotonic() + float(os.environ.get("GATE_TIMEOUT", "300"))
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {gate} was never opened")
        time.sleep(0.05)
    return _load(settings, slot)


def flaky(settings: Settings, slot: int) -> pipeline.DiffusersModel:
    """Fail the first FLAKY_FAILURES attempts of this worker with a transient error, then load for real."""
    global _calls
    _calls += 1
    if _calls <= int(os.environ["FLAKY_FAILURES"]):
        raise ConnectionError(f"simulated hub outage on attempt {_calls}")
    return _load(settings, slot)


class FaultyModel:
    """The real tiny pipeline, with faults injected by prompt (see ``faulty``)."""

    def __init__(self, inner: pipeline.DiffusersModel) -> None:
        self.inner = inner
        self.sick = False  # set by the prompt "sick": the next call fails too, whatever it is
        self.device = inner.device
        self.profile = inner.profile

    def use_adapters(self, loras):
        return self.inner.use_adapters(loras)

    def generate(self, batch, on_step):
        prompts = {params.prompt for params in batch}
        if self.sick or "sick" in prompts:
            # A device that fails for a moment, whatever it runs: the worker's canary right after fails too.
            self.sick = not self.sick
            raise RuntimeError("the device failed this call")
        if "fatal" in prompts:
            # No CUDA device runs here, so the error a poisoned CUDA context raises is simulated: this is
            # the message torch gives for an illegal memory access.
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if "nan" in prompts:
            import torch

            # A model that overflows on some inputs (float16 does, for FLUX): the real pipeline runs with its
            # VAE's last layer turned NaN for this call alone, so the real check of the pixels sees NaN.
            layer = self.inner.pipe.vae.decoder.conv_out
            saved = {name: value.detach().clone() for name, value in layer.named_parameters()}
            with torch.no_grad():
                for value in layer.parameters():
                    value.fill_(float("nan"))
            try:
                return self.inner.generate(batch, on_step)
            finally:
                with torch.no_grad():
                    for name, value in layer.named_parameters():
                        value.copy_(saved[name])
        if "ordinary" in prompts:
            raise ValueError("this prompt broke the text encoder")
        if "stall" in prompts:
            hold = threading.Event()

            def stall_after_first_step(step: int) -> None:
                on_step(step)
                hold.wait(float(os.environ.get("STALL_HOLD_S", "600")))  # a step that never finishes

            return self.inner.generate(batch, stall_after_first_step)
        return self.inner.generate(batch, on_step)


def faulty(settings: Settings, slot: int) -> FaultyModel:
    """The real model, whose generations fail on the prompts "fatal" (a device error), "nan" (NaN pixels),
    "ordinary" (an error in the pipeline caused by that request alone), "sick" (an error of the worker: the
    call after it, the engine's canary, fails too) and "stall" (a denoising step that never ends)."""
    return FaultyModel(_load(settings, slot))
