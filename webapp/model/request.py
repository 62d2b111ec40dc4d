"""What a request asks the model for, validated: the value type the engine queues and the model draws.

Made by the API's parsers (``webapp.api.params``, ``webapp.api.openai.protocol``) and by the loader's warm-up;
it knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 100  # jpeg and webp quality when a request gives none (output_compression's scale)

Mode = Literal["text", "image", "inpaint"]  # text-to-image, image-to-image, inpainting
# ``strength`` when a request gives none: diffusers' own defaults. Image-to-image keeps a fifth of the input's
# structure; inpainting repaints the masked area from noise.
DEFAULT_STRENGTH: dict[str, float] = {"image": 0.8, "inpaint": 1.0}
# Families whose edit pipelines round the steps they skip down (SD3's and FLUX's get_timesteps), so they run
# steps - int(steps * (1 - strength)); SD's and SDXL's round the steps they run down: int(steps * strength).
SKIP_ROUNDED_FAMILIES = ("sd3", "flux")


def edit_steps(steps: int, strength: float, family: str) -> int:
    """The denoising steps an edit pipeline of ``family`` runs for ``steps`` at ``strength``: the last part
    of the schedule, as its ``get_timesteps`` computes it. 0 means it would run none (diffusers refuses)."""
    if family in SKIP_ROUNDED_FAMILIES:
        return steps - int(max(steps - steps * strength, 0))
    return min(int(steps * strength), steps)


@dataclass(frozen=True)
class Upload:
    """An edit's files as they arrived, their headers checked, not yet decoded: the request's thread checks
    what the headers say, and the pixels are decoded only once its job holds a place in the worker
    (docs/architecture.md §15). ``size`` is the size asked for (None: the input's own)."""

    image: bytes = field(repr=False)
    mask: bytes | None = field(default=None, repr=False)
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class GenerationParams:
    """A validated request. ``seeds`` holds one seed per image. An edit carries its input ``image`` (RGB,
    already ``width`` x ``height``), for inpainting its ``mask`` (mode L, 255 where to repaint, the same
    size), its ``strength`` and the ``denoising_steps`` its pipeline runs (``edit_steps``)."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]
    timeout_s: float | None = None  # the client's own deadline, never above REQUEST_TIMEOUT
    output_format: str = DEFAULT_FORMAT
    output_compression: int = DEFAULT_QUALITY
    image: Image | None = field(default=None, compare=False, repr=False)
    mask: Image | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    denoising_steps: int = 0  # an edit's; a text-to-image request runs num_inference_steps
    input_size: tuple[int, int] | None = None  # an edit's input as uploaded (upright), before any resize
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters by name, each with its scale (webapp.model.adapters)
    # An edit whose files are still to be decoded (then ``image`` is None): what ``uploads.decode`` turns into
    # ``image``, ``mask``, the size and ``input_size``. The engine never sees one.
    upload: Upload | None = field(default=None, compare=False, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def mode(self) -> Mode:
        if self.upload is not None:
            return "image" if self.upload.mask is None else "inpaint"
        if self.image is None:
            return "text"
        return "image" if self.mask is None else "inpaint"

    @property
    def steps_run(self) -> int:
        """The denoising steps the pipeline runs, which progress counts to."""
        return self.denoising_steps or self.num_inference_steps
