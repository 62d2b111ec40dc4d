"""What the loaded model is and what it can draw, read from the model itself (docs/architecture.md §12).

A ``ModelProfile`` is built once per worker from the loaded pipeline (``webapp.model.pipeline.profile_of``): its
family, native size, side multiple, largest side, dtype, whether it takes negative prompts and guidance, and
the default steps and guidance that suit it. ``request_limits`` folds it into the operator's settings: the
result is the ``Settings`` every request is checked against, and from which the request schema, the OpenAPI
document, the demo's form and the README's table are derived, as they were from the settings alone.

The family (``FAMILIES``) is known before loading, from the pipeline class that ``model_index.json`` names:
it decides the dtype under ``DTYPE=auto``. This module imports neither torch nor diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from webapp.settings import Settings


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
    edits: tuple[str, ...] = ("image", "inpaint")

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


def request_limits(settings: Settings, model: ModelProfile) -> Settings:
    """The settings requests are held to with ``model`` loaded: sides on the model's multiple, within
    MIN_IMAGE_SIZE..MAX_IMAGE_SIZE and the model's own largest side (MIN rounded up and MAX down to the
    multiple); the default size is the native one, or the largest of its shape within MAX_IMAGE_SIZE;
    DEFAULT_STEPS and DEFAULT_GUIDANCE, where unset, are the model's. CannotServe when nothing fits."""
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
    return settings.model_copy(
        update={
            "min_image_size": low,
            "max_image_size": high,
            "size_multiple": multiple,
            "default_size": _fit(model.native_size, low, high, multiple),
            "default_steps": steps,
            "default_guidance": guidance,
            "takes_negative_prompt": model.negative_prompt,
            "takes_guidance": model.guidance,
            "edit_modes": model.edits,
            "model_family": model.family,
        }
    )
