"""The diffusers text-to-image model behind the engine's small interface (see ``engine.Model``).

This is the only module that imports torch and diffusers, and only the engine thread imports it, after
the worker is already answering probes. One generation reads top to bottom in ``DiffusersModel.generate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "requires torchvision", printed at import

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL.Image import Image
from transformers.utils import logging as transformers_logging

from webapp import logs
from webapp.params import GenerationParams
from webapp.settings import BUILTIN_TINY_MODEL, EMBEDDED_MODELS, SCENES_MODEL, Settings

log = logs.get(__name__)
# The trained embedded model: weights, configs and model card (README.md), shipped as package data.
SCENES_MODEL_DIR = Path(__file__).resolve().parent / "models" / "scenes-64"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()


def choose_device(setting: str, slot: int, cuda_count: int) -> str:
    """DEVICE=auto spreads workers over GPUs by slot (cuda:slot % count), or uses the CPU without CUDA."""
    if setting == "auto":
        return f"cuda:{slot % cuda_count}" if cuda_count else "cpu"
    if setting == "cuda":
        return f"cuda:{slot % cuda_count}" if cuda_count else "cuda"
    return setting


def choose_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return _DTYPES[setting]


def model_location(settings: Settings) -> str:
    """The folder or hub id to load: the trained embedded model ships inside the package, the random one is
    built into the cache on first use."""
    if settings.model_id == SCENES_MODEL:
        return str(SCENES_MODEL_DIR)
    if settings.model_id == BUILTIN_TINY_MODEL:
        from webapp.tiny_model import ensure_built

        return str(ensure_built(settings.model_cache_dir))
    if settings.model_id.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {settings.model_id!r} (known: {', '.join(EMBEDDED_MODELS)})")
    if settings.model_id.startswith(("/", "./", "../", "~")):
        folder = Path(settings.model_id).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"MODEL_ID {settings.model_id} is not a folder")
        return str(folder)
    return settings.model_id


class DiffusersModel:
    """A loaded diffusers text-to-image pipeline on one device."""

    def __init__(self, pipe: DiffusionPipeline, device: str) -> None:
        self.pipe = pipe
        self.device = device
        scale = getattr(pipe, "vae_scale_factor", 8)
        sample = getattr(getattr(pipe, "unet", None), "config", None)
        side = int(getattr(sample, "sample_size", 64) * scale) if sample is not None else 512
        self.default_size = (side, side)

    def generate(self, batch: Sequence[GenerationParams], on_step: Callable[[int], None]) -> list[list[Image]]:
        """One pipeline call for requests that share size, steps and guidance: every image gets its own
        generator seeded with its seed, so a seed gives the same image alone or in a batch (up to float
        rounding: about 1e-6 on CPU). ``on_step(i)`` runs after each denoising step and may raise to stop."""
        first = batch[0]
        prompts, negatives, generators = [], [], []
        for params in batch:
            for seed in params.seeds:
                prompts.append(params.prompt)
                negatives.append(params.negative_prompt or "")  # "" is what the pipeline uses for None
                generators.append(torch.Generator(device=self.device).manual_seed(seed))

        def step_end(pipe: object, step: int, timestep: object, kwargs: dict) -> dict:
            on_step(step)
            return kwargs

        with torch.inference_mode():
            result = self.pipe(
                prompt=prompts,
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=generators,
                output_type="pil",
                callback_on_step_end=step_end,
            )
        images = list(result.images)
        per_request = []
        for params in batch:
            per_request.append(images[: params.num_images])
            images = images[params.num_images :]
        return per_request


def load(settings: Settings, slot: int) -> DiffusersModel:
    """The default MODEL_LOADER: ``from_pretrained`` the configured model onto this worker's device."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = choose_device(settings.device, slot, cuda_count)
    if device == "cpu":
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // (settings.workers or 1))
        torch.set_num_threads(threads)
    location = model_location(settings)
    dtype = choose_dtype(settings.dtype, device)
    log.info("model_load_start", slot=slot, model=str(location), device=device, dtype=str(dtype))
    pipe = AutoPipelineForText2Image.from_pretrained(location, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return DiffusersModel(pipe, device)
