"""What a request asks the model for, validated: the value type the engine queues and the model draws.

Made by the API's parsers (``webapp.api.params``, ``webapp.api.openai.protocol``) and by the loader's warm-up;
it knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 100  # jpeg and webp quality when a request gives none (output_compression's scale)


@dataclass(frozen=True)
class GenerationParams:
    """A validated request. ``seeds`` holds one seed per image."""

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

    @property
    def num_images(self) -> int:
        return len(self.seeds)
