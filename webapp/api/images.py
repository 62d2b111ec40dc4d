"""Encoding finished images: the formats the server answers in, their media types and the quality setting.

``output_compression`` follows OpenAI's Images API, where it is a percentage that defaults to 100 and
lower values give smaller files: it is the encoder's quality for jpeg and webp. png is lossless and takes
none. bench/encoding.py measures what each format costs per image.
"""

from __future__ import annotations

import io
from typing import Any

from webapp.model import request

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # output_format -> media type
BY_MEDIA_TYPE = {media: name for name, media in FORMATS.items()}
LOSSY = ("jpeg", "webp")  # the formats output_compression applies to

DEFAULT_QUALITY = request.DEFAULT_QUALITY  # declared with the request it is a default of


def encode(image: Any, output_format: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """``image`` (a PIL image) as ``output_format`` bytes; ``quality`` (0-100) for jpeg and webp."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r} (known: {', '.join(FORMATS)})")
    return buffer.getvalue()
