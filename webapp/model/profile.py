"""What the loaded model is and what it can draw, read from the model itself (docs/architecture.md §12).

A ``ModelProfile`` is built once per worker from the loaded pipeline (``webapp.model.pipeline.profile_of``): its
family, native size, side multiple, largest side, dtype, whether it takes negative prompts and guidance, and
the default steps and guidance that suit it. ``Limits.of`` folds it into the operator's settings, once, when a
worker loads its model: the result is what every request is checked against, and what the request schema,
the OpenAPI document and the demo's form are derived from. ``Limits.before_load`` describes requests while
no model is loaded (and in the README).

The family (``FAMILIES``) is known before loading, from the pipeline class that ``model_index.json`` names:
it decides the dtype under ``DTYPE=auto``. This module imports neither torch nor diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webapp.settings import SIZE_MULTIPLE, UPLOAD_SIDE_FACTOR, Settings

EDIT_MODES = ("image", "inpaint")  # image-to-image and inpainting, the edits a model may draw


@dataclass(frozen=True)
class Family:
    """A family of pipelines served alike. ``accelerator_dtype`` is DTYPE=auto's choice on a GPU (float32 on
    the CPU); ``guidance`` says in words what guidance_scale means for it."""

    name: str
    title: str
    pipelines: tuple[str, ...]
    accelerator_dtype: str
    default_steps: int
    default_guidance: float
    guidance: str
    negative_prompt: bool


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd",
        "Stable Diffusion 1.x / 2.x",
        ("StableDiffusionPipeline",),
        "float16",
        20,
        7.5,
        "classifier-free guidance (above 1 turns it on)",
        True,
    ),
    Family(
        "sdxl",
        "Stable Diffusion XL",
        ("StableDiffusionXLPipeline",),
        "float16",
        30,
        5.0,
        "classifier-free guidance (above 1 turns it on)",
        True,
    ),
    Family(
        "sd3",
        "Stable Diffusion 3 / 3.5",
        ("StableDiffusion3Pipeline",),
        "bfloat16",  # SD3.5 overflows in float16
        28,
        7.0,
        "classifier-free guidance (above 1 turns it on)",
        True,
    ),
    Family(
        "flux",
        "FLUX.1",
        ("FluxPipeline",),
        "bfloat16",  # float16 gives NaN latents, which decode to black images (diffusers issue 9096)
        28,
        3.5,
        "distilled guidance: an input of the transformer, one pass per step; schnell takes none",
        False,  # FluxPipeline applies a negative prompt only through true CFG, which this server does not run
    ),
)
OTHER = Family(
    "other", "another diffusers text-to-image pipeline", (), "float16", 30, 7.5, "as the pipeline defines it", True
)
# FLUX.1-schnell (no guidance embedding) is distilled for few steps and takes no guidance.
SCHNELL_STEPS = 4


def family_of(pipeline_class: str) -> Family:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``)."""
    return next((family for family in FAMILIES if pipeline_class in family.pipelines), OTHER)


def choose_dtype(setting: str, device: str, family: Family, has_transformer: bool = False) -> str:
    """DTYPE: an explicit value always wins; ``auto`` is float32 on the CPU and the family's dtype on an
    accelerator (bfloat16 for an unknown transformer-based pipeline, float16 for an unknown UNet one)."""
    if setting != "auto":
        return setting
    if not device.startswith("cuda"):
        return "float32"
    if family is OTHER and has_transformer:
        return "bfloat16"
    return family.accelerator_dtype


@dataclass(frozen=True)
class ModelProfile:
    """The loaded model as requests see it. ``max_side`` is the largest side the model itself can draw
    (SD3's position embeddings cover only so many patches), None when it sets no bound."""

    family: str
    pipeline: str
    native_size: tuple[int, int]
    size_multiple: int
    max_side: int | None
    dtype: str
    negative_prompt: bool
    guidance: bool
    default_steps: int
    default_guidance: float
    # The edit modes it draws: image-to-image and inpainting, where diffusers maps a pipeline to it and that
    # pipeline drew one step at load (webapp.model.pipeline.edit_pipelines).
    edits: tuple[str, ...] = EDIT_MODES

    def summary(self) -> str:
        """One short line for the readiness board and the logs."""
        width, height = self.native_size
        return f"{self.family} {self.pipeline} {width}x{height}/{self.size_multiple} {self.dtype}"

    def as_dict(self) -> dict[str, Any]:
        """The profile as /v1/models and `honest-diffusion status` show it."""
        return {
            "family": self.family,
            "pipeline": self.pipeline,
            "native_size": f"{self.native_size[0]}x{self.native_size[1]}",
            "size_multiple": self.size_multiple,
            "max_side": self.max_side,
            "dtype": self.dtype,
            "negative_prompt": self.negative_prompt,
            "guidance": self.guidance,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
            "edits": list(self.edits),
        }


def profile(
    pipeline: str,
    native_size: tuple[int, int],
    size_multiple: int,
    max_side: int | None,
    dtype: str,
    guidance_embeds: bool | None = None,
) -> ModelProfile:
    """The profile of a ``pipeline`` class with what was read from the model; ``guidance_embeds`` is FLUX's
    transformer flag (False: schnell, which takes no guidance and wants few steps)."""
    family = family_of(pipeline)
    takes_guidance = guidance_embeds is not False
    steps = family.default_steps if takes_guidance or family.name != "flux" else SCHNELL_STEPS
    return ModelProfile(
        family=family.name,
        pipeline=pipeline,
        native_size=native_size,
        size_multiple=size_multiple,
        max_side=max_side,
        dtype=dtype,
        negative_prompt=family.negative_prompt,
        guidance=takes_guidance,
        default_steps=steps,
        default_guidance=family.default_guidance if takes_guidance else 0.0,
    )


class CannotServe(ValueError):
    """The settings and the model leave no request that could be served (a permanent load failure)."""


def _fit(native: tuple[int, int], low: int, high: int, multiple: int) -> tuple[int, int]:
    """The native size, or where a side exceeds ``high``, the largest size of the same shape within it."""
    width, height = native
    longest = max(width, height)
    if longest > high:
        width, height = (max(low, side * high // longest // multiple * multiple) for side in (width, height))
    return width, height


class NotLoaded(RuntimeError):
    """Limits that describe requests before a model is loaded were asked for what only a loaded model says."""


@dataclass(frozen=True)
class Limits:
    """What one request is held to: the operator's settings with the loaded model folded in
    (docs/architecture.md §12). Built once per load (``of``), kept by the engine (``Engine.limits``) and the
    only thing a request is parsed against; ``before_load`` describes requests while no model is loaded."""

    max_prompt_chars: int
    min_image_size: int  # on the model's multiple, and within its own largest side
    max_image_size: int
    size_multiple: int
    max_steps: int
    max_guidance: float
    max_images: int
    max_loras: int
    max_lora_scale: float
    lora_dir: Path | None
    max_upload_bytes: int
    upload_pixels: int  # MAX_UPLOAD_PIXELS, or (UPLOAD_SIDE_FACTOR x max_image_size) squared
    request_timeout: float
    # The model's: None only before a model is loaded (``before_load``), when a request gets them from the
    # model it will be drawn by.
    default_size: tuple[int, int] | None
    default_steps: int | None
    default_guidance: float | None
    takes_negative_prompt: bool
    takes_guidance: bool
    edit_modes: tuple[str, ...]  # the edits the loaded model draws
    model_family: str  # "" before a model is loaded

    @classmethod
    def of(cls, settings: Settings, model: ModelProfile) -> Limits:
        """The limits with ``model`` loaded: sides on the model's multiple, within MIN_IMAGE_SIZE..MAX_IMAGE_SIZE
        and the model's own largest side (MIN rounded up and MAX down to the multiple); the default size is the
        native one, or the largest of its shape within MAX_IMAGE_SIZE; DEFAULT_STEPS and DEFAULT_GUIDANCE,
        where unset, are the model's. CannotServe when nothing fits."""
        multiple = model.size_multiple
        high = settings.max_image_size if model.max_side is None else min(settings.max_image_size, model.max_side)
        high -= high % multiple
        low = -(-settings.min_image_size // multiple) * multiple
        if low > high:
            raise CannotServe(
                f"no image size fits: MIN_IMAGE_SIZE={settings.min_image_size} on the model's multiple of {multiple} "
                f"is {low}, above the largest side allowed ({high}: MAX_IMAGE_SIZE={settings.max_image_size}, "
                f"the model's own limit {model.max_side})"
            )
        steps = model.default_steps if settings.default_steps is None else settings.default_steps
        guidance = model.default_guidance if settings.default_guidance is None else settings.default_guidance
        if steps > settings.max_steps:
            raise CannotServe(
                f"the model's default of {steps} steps exceeds MAX_STEPS={settings.max_steps}: set DEFAULT_STEPS"
            )
        if guidance > settings.max_guidance:
            raise CannotServe(
                f"the model's default guidance {guidance:g} exceeds MAX_GUIDANCE={settings.max_guidance:g}: set "
                "DEFAULT_GUIDANCE"
            )
        return cls._made(
            settings,
            min_image_size=low,
            max_image_size=high,
            size_multiple=multiple,
            default_size=_fit(model.native_size, low, high, multiple),
            default_steps=steps,
            default_guidance=guidance,
            takes_negative_prompt=model.negative_prompt,
            takes_guidance=model.guidance,
            edit_modes=model.edits,
            model_family=model.family,
        )

    @classmethod
    def before_load(cls, settings: Settings) -> Limits:
        """What the pages that describe requests show while no model is loaded (no request is parsed then:
        each is refused with 503): the configured bounds on the default multiple, no default size, and every
        field some model takes, the edits included; once loaded, the model's own ``of`` replaces them."""
        return cls._made(
            settings,
            min_image_size=settings.min_image_size,
            max_image_size=settings.max_image_size,
            size_multiple=SIZE_MULTIPLE,
            default_size=None,
            default_steps=settings.default_steps,
            default_guidance=settings.default_guidance,
            takes_negative_prompt=True,
            takes_guidance=True,
            edit_modes=EDIT_MODES,
            model_family="",
        )

    @classmethod
    def _made(cls, settings: Settings, **model: Any) -> Limits:
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_steps=settings.max_steps,
            max_guidance=settings.max_guidance,
            max_images=settings.max_images,
            max_loras=settings.max_loras,
            max_lora_scale=settings.max_lora_scale,
            lora_dir=settings.lora_dir,
            max_upload_bytes=settings.max_upload_bytes,
            upload_pixels=settings.max_upload_pixels or (UPLOAD_SIDE_FACTOR * model["max_image_size"]) ** 2,
            request_timeout=settings.request_timeout,
            **model,
        )

    @property
    def request_size(self) -> tuple[int, int]:
        """The size a request without one gets: the loaded model's (NotLoaded for ``before_load``'s)."""
        if self.default_size is None:
            raise NotLoaded("requests are parsed against a loaded model's limits (Limits.of), never before_load's")
        return self.default_size
