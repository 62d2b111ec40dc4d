"""The diffusers model behind the engine's small interface (see ``engine.Model``): text-to-image, and the
image-to-image and inpainting pipelines built from it.

This is the only module that imports torch and diffusers. A worker's engine thread imports it, after the
worker is already answering probes, unless the worker inherited it from the gunicorn master (``preimport``,
docs/architecture.md §13). One generation reads top to bottom in ``DiffusersModel.generate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image as PILImage
from PIL.Image import Image
from transformers.utils import logging as transformers_logging

from webapp.model import adapters, faults  # the package set LIBRARY_ENV_DEFAULTS before the imports above
from webapp.model.faults import NonFiniteOutput
from webapp.model.profile import ModelProfile, choose_dtype, family_of, profile
from webapp.model.request import GenerationParams, Mode
from webapp.settings import BUILTIN_TINY_MODEL, EMBEDDED_MODELS, SCENES_MODEL, SIZE_MULTIPLE, Settings
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
# The trained embedded model: weights, configs and model card (README.md), shipped as package data.
SCENES_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "scenes-64"
# The embedded model draws its shapes best at a lower guidance than Stable Diffusion's 7.5: on captions and
# seeds held out from bench/quality.py, 98.9 % right at 4.0 against 95.6 % at 7.5, which leaves stray marks
# beside the shape (docs/models.md). DEFAULT_GUIDANCE still overrides it.
SCENES_MODEL_GUIDANCE = 4.0
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


def placement(device: str) -> dict[str, str]:
    """``from_pretrained``'s placement for ``device``. On an accelerator, ``device_map`` has each component's
    weights read straight onto it as they load, instead of built in host memory and copied by ``.to()``
    (diffusers measured FLUX's 23.8 GB transformer in 1.09 s against 4.86 s, its PR 12305). On the CPU,
    nothing: the safetensors files are memory-mapped, which is already the floor (docs/benchmarks.md)."""
    kind = torch.device(device).type
    return {} if kind == "cpu" else {"device_map": kind}


def local_folder(settings: Settings) -> Path | None:
    """The folder MODEL_ID names on this disk, without building anything: the trained embedded model, or a
    local path (which may not exist); None for a hub id or a model still to be built."""
    if settings.model_id == SCENES_MODEL:
        return SCENES_MODEL_DIR
    if settings.model_id.startswith(("/", "./", "../", "~")):
        return Path(settings.model_id).expanduser()
    return None


def model_location(settings: Settings) -> str:
    """The folder or hub id to load: the trained embedded model ships inside the package, the random one is
    built into the cache on first use."""
    if settings.model_id == BUILTIN_TINY_MODEL:
        from webapp.model.tiny_model import ensure_built

        return str(ensure_built(settings.model_cache_dir))
    folder = local_folder(settings)
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"MODEL_ID {settings.model_id} is not a folder")
        return str(folder)
    if settings.model_id.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {settings.model_id!r} (known: {', '.join(EMBEDDED_MODELS)})")
    return settings.model_id


def preimport(settings: Settings) -> list[str]:
    """Import the classes ``load`` will need for the configured model, without loading or touching a device:
    the gunicorn master calls this (``webapp.engine.loader.preimport``) so the workers it forks later inherit
    them. Reads ``model_index.json`` only when the model is a folder already on disk (``local_folder``); a
    hub id or a model still to be built imports torch and diffusers alone. Only classes of diffusers and
    transformers are imported, whatever the folder names. Returns the classes imported."""
    folder = local_folder(settings)
    if folder is None or not (folder / "model_index.json").is_file():
        return []
    index = DiffusionPipeline.load_config(str(folder))  # as ``load`` reads it
    wanted = [("diffusers", str(index.get("_class_name", "")))]
    wanted += [tuple(value) for value in index.values() if isinstance(value, list) and len(value) == 2]
    imported = []
    for library, name in wanted:
        if library in ("diffusers", "transformers") and isinstance(name, str) and name.isidentifier():
            module = importlib.import_module(library)
            if getattr(module, name, None) is not None:  # the lazy module imports the class's own module
                imported.append(f"{library}.{name}")
    return imported


def profile_of(pipe: DiffusionPipeline, dtype: str) -> ModelProfile:
    """The loaded pipeline's profile, read from the pipeline and its denoiser's config (never guessed):
    the native size is the pipeline's own default (``default_sample_size`` x VAE scale, or the UNet's
    ``sample_size`` x VAE scale for SD 1.x/2.x); the side multiple is the one its checks or its latent
    packing need (SD/SDXL: 8 and the VAE scale; SD3: VAE scale x patch size; FLUX: VAE scale x 2)."""
    name = type(pipe).__name__
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is None:
        denoiser = getattr(pipe, "unet", None)
    config = dict(getattr(denoiser, "config", {}))
    sample = getattr(pipe, "default_sample_size", None) or config.get("sample_size") or 64
    height, width = (sample, sample) if isinstance(sample, int) else sample  # a UNet may give (height, width)
    family = family_of(name).name
    max_side = None
    if family == "flux":
        multiple = scale * 2  # latents are packed in 2x2 patches
    elif family == "sd3" or "patch_size" in config:
        patch = int(config.get("patch_size") or 1)
        multiple = scale * patch
        if config.get("pos_embed_max_size"):
            max_side = int(config["pos_embed_max_size"]) * patch * scale
    else:
        multiple = math.lcm(SIZE_MULTIPLE, scale)  # diffusers' SD and SDXL pipelines refuse sides off 8
    native = tuple(int(side) * scale // multiple * multiple for side in (width, height))
    guidance_embeds = config.get("guidance_embeds") if family == "flux" else None
    return profile(name, native, multiple, max_side, dtype, guidance_embeds)  # type: ignore[arg-type]


def edit_pipelines(pipe: DiffusionPipeline, device: str, side: int) -> dict[Mode, DiffusionPipeline]:
    """The image-to-image and inpainting pipelines of a loaded text-to-image ``pipe`` that draw: built with
    ``from_pipe``, they hold the same component objects (UNet or transformer, VAE, text encoders), so a
    worker's memory does not grow with them (docs/benchmarks.md), and each must draw one finite step at
    ``side`` x ``side`` before the worker offers it. A mode diffusers maps no pipeline to, or whose pipeline
    cannot run this model (SD3's inpainting wants 16 latent channels), is left out and logged: requests for
    it are refused by name, never failed by the model."""
    edits: dict[Mode, DiffusionPipeline] = {}
    grey = PILImage.new("RGB", (side, side), (128, 128, 128))
    half = PILImage.new("L", (side, side), 0)
    half.paste(255, (0, 0, side // 2, side))
    for mode, auto, inputs in (
        ("image", AutoPipelineForImage2Image, {"image": grey}),
        ("inpaint", AutoPipelineForInpainting, {"image": grey, "mask_image": half}),
    ):
        try:
            edit = auto.from_pipe(pipe)
            edit.set_progress_bar_config(disable=True)
            with torch.inference_mode():
                drawn = edit(
                    prompt="check",
                    num_inference_steps=1,
                    strength=1.0,
                    width=side,
                    height=side,
                    generator=torch.Generator(device=device).manual_seed(0),
                    output_type="np",
                    **inputs,
                ).images
            if not np.isfinite(drawn).all():
                raise ValueError("its one-step check drew non-finite pixels")
        except Exception as exc:  # noqa: BLE001 - any failure leaves the mode out, said in the log
            log.warning("edit_mode_unavailable", mode=mode, pipeline=type(pipe).__name__, error=str(exc)[:300])
            continue
        edits[mode] = edit
    return edits


@contextlib.contextmanager
def _read_not_mapped() -> Iterator[None]:
    """While an adapter loads, safetensors reads its file with ``pread`` rather than mapping it.

    Measured here (bench/lora_churn.py, docs/benchmarks.md): every ``safetensors.torch.load_file`` through the
    default ``mmap`` backend keeps about 64 bytes per tensor for good, in safetensors' own native code (0.7.0 and
    0.8.0 alike; torch.frombuffer on a mapping does not, nor does the ``pread`` backend or the numpy framework):
    7 kB for each load of a 112-tensor adapter, and a server that cycles adapters grows until it is killed.
    diffusers' ``load_lora_weights`` calls ``load_file(path, device="cpu")`` and takes no backend, and a state
    dict passed in memory would lose the file's ``lora_adapter_metadata`` (its LoRA config). So, for the call
    alone, on the engine thread (nothing else loads weights then), ``load_file`` is safetensors' own with
    ``backend="pread"``: the same tensors, read into memory that is freed with them."""
    mapped = safetensors.torch.load_file
    safetensors.torch.load_file = functools.partial(mapped, backend="pread")
    try:
        yield
    finally:
        safetensors.torch.load_file = mapped


class DiffusersModel:
    """A loaded diffusers pipeline on one device, with its ``profile``: the text-to-image ``pipe`` and the
    edit pipelines built from it (``edit_pipelines``), one per mode."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        device: str,
        profile: ModelProfile,
        edits: dict[Mode, DiffusionPipeline] | None = None,
        lora_dir: Path | None = None,
        lora_cache_size: int = 1,
    ) -> None:
        self.pipe = pipe
        self.device = device
        self.profile = profile
        self.pipelines: dict[Mode, DiffusionPipeline] = {"text": pipe, **(edits or {})}
        self.lora_dir = lora_dir
        self.adapters = adapters.Cache(lora_cache_size)
        self.active: adapters.Loras = ()  # the adapters the last call ran with

    def use_adapters(self, loras: adapters.Loras) -> float:
        """Make ``loras`` the adapters the next call runs with (none: plain weights), loading those not yet
        held and evicting the least recently used beyond LORA_CACHE_SIZE (``delete_adapters``). Runs on the
        engine thread between calls, never during one. Returns the seconds spent loading. Raises
        ``adapters.AdapterFailed`` for an adapter that is gone, known bad, or fails to load (corrupt, or
        shaped for another base model): whatever it half-loaded is removed first, so the weights are clean."""
        recorded = recorder()
        if not loras:
            if self.active:
                self.pipe.disable_lora()
                self.active = ()
            return 0.0
        found = adapters.listing(self.lora_dir)
        wanted = {name for name, _ in loras}
        seconds = 0.0
        for name, _ in loras:
            adapter = found.get(name)
            reason = "is no longer in LORA_DIR" if adapter is None else self.adapters.known_bad(adapter)
            if reason is not None:
                if self.active:  # the failed request's batch ran nothing; the next one starts from plain
                    self.pipe.disable_lora()
                    self.active = ()
                known = "" if adapter is None else " (known bad until its file changes)"
                raise adapters.AdapterFailed(name, reason + known)
            if self.adapters.holds(adapter):
                recorded.lora_cache.labels("hit").inc()
                continue
            recorded.lora_cache.labels("miss").inc()
            if name in self.adapters.loaded:  # its file changed since it was loaded
                self._unload(name)
            for evicted in self.adapters.evictions(wanted):
                self._unload(evicted)
                recorded.lora_cache.labels("eviction").inc()
            seconds += self._load(adapter)
        self.pipe.enable_lora()
        self.pipe.set_adapters([name for name, _ in loras], adapter_weights=[scale for _, scale in loras])
        self.active = loras
        return seconds

    def _load(self, adapter: adapters.Adapter) -> float:
        started = time.monotonic()
        try:
            if adapter.weights is None:  # refused at the request; a folder changed since then lands here
                raise ValueError(adapter.problem or "no safetensors file to load")
            # Exactly the file listed and stamped: its folder and weight_name, never diffusers' own choice.
            with _read_not_mapped():
                self.pipe.load_lora_weights(
                    str(adapter.weights.parent),
                    weight_name=adapter.weights.name,
                    adapter_name=adapter.name,
                    use_safetensors=True,
                )
        except Exception as exc:
            if adapter.name in self._loaded_names():
                self.pipe.delete_adapters(adapter.name)
            if self.adapters.loaded:  # those still held stay loaded, but none is active until a batch sets it
                self.pipe.disable_lora()
            self.active = ()
            reason = f"failed to load: {faults.describe(exc)}"[:500]
            self.adapters.bad[adapter.name] = (adapter.stamp, reason)
            log.warning("adapter_failed", adapter=adapter.name, error=reason)
            raise adapters.AdapterFailed(adapter.name, reason) from exc
        elapsed = time.monotonic() - started
        self.adapters.loaded[adapter.name] = adapter.stamp
        self.adapters.bad.pop(adapter.name, None)
        recorder().lora_load_seconds.observe(elapsed)
        log.info("adapter_loaded", adapter=adapter.name, seconds=round(elapsed, 3), held=len(self.adapters.loaded))
        return elapsed

    def _unload(self, name: str) -> None:
        self.pipe.delete_adapters(name)
        self.adapters.loaded.pop(name, None)

    def _loaded_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def generate(self, batch: Sequence[GenerationParams], on_step: Callable[[int], None]) -> list[list[Image]]:
        """One pipeline call for requests that share mode, size, steps, guidance and strength (the
        scheduler's batch key): every image gets its own generator seeded with its seed, so a seed gives the
        same image alone or in a batch (up to float rounding: about 1e-6 on CPU), and an edit's images their
        own request's input and mask. ``on_step(i)`` runs after each denoising step and may raise to stop.
        Raises NonFiniteOutput when any image has a NaN or infinite pixel: it is never returned as a picture
        (PIL would turn NaN into black)."""
        first = batch[0]
        prompts, negatives, generators, inputs, masks = [], [], [], [], []
        for params in batch:
            for seed in params.seeds:
                prompts.append(params.prompt)
                negatives.append(params.negative_prompt or "")  # "" is what the pipeline uses for None
                generators.append(torch.Generator(device=self.device).manual_seed(seed))
                inputs.append(params.image)
                masks.append(params.mask)

        def step_end(pipe: object, step: int, timestep: object, kwargs: dict) -> dict:
            on_step(step)
            return kwargs

        steering = {"guidance_scale": first.guidance_scale} if self.profile.guidance else {}
        if self.profile.negative_prompt and any(negatives):
            steering["negative_prompt"] = negatives
        edit: dict[str, object] = {}
        if first.mode != "text":
            edit = {"image": inputs, "strength": first.strength}
        if first.mode == "inpaint":
            edit["mask_image"] = masks
        with torch.inference_mode():
            result = self.pipelines[first.mode](
                prompt=prompts,
                num_inference_steps=first.num_inference_steps,
                width=first.width,
                height=first.height,
                generator=generators,
                output_type="np",
                callback_on_step_end=step_end,
                **steering,
                **edit,
            )
        pixels = result.images  # float, (images, height, width, channels), 0..1 when finite
        finite = np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
        images = self.pipe.numpy_to_pil(np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0))
        per_request, bad = [], set()
        start = 0
        for index, params in enumerate(batch):
            per_request.append(images[start : start + params.num_images])
            if not finite[start : start + params.num_images].all():
                bad.add(index)
            start += params.num_images
        if bad:
            count = int((~finite).sum())
            message = (
                f"the model drew {count} of {len(finite)} image(s) with non-finite pixels (NaN or inf) in "
                f"{self.profile.dtype}"
            )
            raise NonFiniteOutput(message, bad, per_request)
        return per_request


def load(settings: Settings, slot: int) -> DiffusersModel:
    """The default MODEL_LOADER: ``from_pretrained`` the configured model onto this worker's device, in the
    dtype that suits its family (read from ``model_index.json`` before loading) unless DTYPE says which."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = choose_device(settings.device, slot, cuda_count)
    if device == "cpu":
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // (settings.workers or 1))
        torch.set_num_threads(threads)
    location = model_location(settings)
    index = DiffusionPipeline.load_config(location)
    family = family_of(str(index.get("_class_name", "")))
    dtype = choose_dtype(settings.dtype, device, family, has_transformer="transformer" in index)
    where = placement(device)
    target = torch.device(device)
    if target.type == "cuda" and target.index is not None:
        torch.cuda.set_device(target)  # device_map="cuda" means this worker's GPU, cuda:slot % count
    log.info(
        "model_load_start", slot=slot, model=str(location), device=device, dtype=dtype, family=family.name, **where
    )
    pipe = AutoPipelineForText2Image.from_pretrained(location, dtype=_DTYPES[dtype], **where)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)  # after device_map, a no-op; without it (the CPU), where the pipeline runs
    read = profile_of(pipe, dtype)
    edits = edit_pipelines(pipe, device, max(64, read.size_multiple))
    read = dataclasses.replace(read, edits=tuple(edits))
    if settings.model_id == SCENES_MODEL:  # its own default, from bench/quality.py (docs/models.md)
        read = dataclasses.replace(read, default_guidance=SCENES_MODEL_GUIDANCE)
    return DiffusersModel(pipe, device, read, edits, settings.lora_dir, settings.lora_cache_size)
