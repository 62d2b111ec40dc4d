"""Input images and masks of an edit, checked before the model sees them (docs/api.md, "Edits").

Every upload is hostile until proven otherwise. ``prepare`` takes the raw bytes of an image (and a mask) and
gives what ``GenerationParams`` carries: an RGB image and an L mask (255 = repaint) of the size to draw, or
raises InvalidRequest naming the field:

- a file over MAX_UPLOAD_BYTES: 413, before it is opened;
- not PNG, JPEG or WebP (GIF, SVG, BMP, a text file renamed .png): 422, from its first bytes; PIL opens no
  other format;
- more pixels than MAX_UPLOAD_PIXELS (a decompression bomb: a small PNG declaring 100000x100000): 422, read
  from the header, before anything is decoded;
- animated (APNG, animated WebP): 422;
- truncated or corrupt: 422, when decoding fails part way;
- EXIF orientation is honoured (the image is turned upright before anything else);
- modes: transparency is composited onto white; 16-bit greyscale is scaled to 8 bits; palette, CMYK,
  greyscale and bilevel images are converted to RGB;
- a mask: transparent pixels (alpha below half) mark the area to repaint, as OpenAI's edits define it; a mask
  without alpha marks it white (at least half grey), as diffusers and AUTOMATIC1111 do. It must be the
  image's size and mark at least one pixel;
- the size: the image is drawn at the size the request asks for (resized to it: Lanczos for the image,
  nearest for the mask, and said in the answer's ``input_size``), or at its own size when the request gives
  none, which must then be one the model can draw.
"""

from __future__ import annotations

import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from webapp import errors
from webapp.engine.priority import lower_thread_priority
from webapp.errors import InvalidRequest
from webapp.model.profile import Limits
from webapp.model.request import GenerationParams, Upload

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders PIL may use on an upload
# Formats a client may send by mistake, named in the refusal: first bytes -> name.
KNOWN_OTHERS = {
    b"GIF87a": "a GIF",
    b"GIF89a": "a GIF",
    b"BM": "a BMP",
    b"II*\x00": "a TIFF",
    b"MM\x00*": "a TIFF",
    b"<svg": "an SVG",
    b"<?xml": "an XML (SVG?) document",
    b"%PDF": "a PDF",
}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
RESIZE_REDUCING_GAP = 3.0


def _refuse(field: str, message: str, code: errors.Code = errors.INVALID_IMAGE) -> InvalidRequest:
    return InvalidRequest(code, f"{field}: {message}", field)


def check_length(length: int, field: str, max_upload_bytes: int) -> None:
    """413 for a file over MAX_UPLOAD_BYTES, before anything reads it as an image."""
    if length > max_upload_bytes:
        message = f"is {length} bytes; the limit is MAX_UPLOAD_BYTES={max_upload_bytes}"
        raise _refuse(field, message, errors.PAYLOAD_TOO_LARGE)


# The formats taken, by their first bytes: a file that starts as one and cannot be opened is corrupt.
TAKEN = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WebP"}


def _what(data: bytes) -> str:
    head = data[:16].lstrip()
    for magic, name in TAKEN.items():
        if head.startswith(magic):
            return f"it starts as a {name} but cannot be read (truncated or corrupt)"
    for magic, name in KNOWN_OTHERS.items():
        if head.startswith(magic):
            return f"it is {name}"
    return "its bytes are none of these" if data else "it is empty"


def _header(data: bytes, field: str, limits: Limits) -> PILImage:
    """The upload opened from its header alone, nothing decoded: InvalidRequest (413, 422) naming ``field``
    for a file over MAX_UPLOAD_BYTES, another format, more pixels than the limit, or several frames."""
    check_length(len(data), field, limits.max_upload_bytes)
    limit = limits.upload_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice its MAX_IMAGE_PIXELS
        message = f"declares too many pixels ({exc}); the limit is MAX_UPLOAD_PIXELS={limit}"
        raise _refuse(field, message) from None
    except UnidentifiedImageError:
        what = _what(data)
        if what.startswith("it starts as"):  # a taken format, damaged: say so rather than ask for that format
            raise _refuse(field, f"could not be read: {what}") from None
        raise _refuse(field, f"must be a PNG, JPEG or WebP image; {what}") from None
    except Exception as exc:  # noqa: BLE001 - a header that cannot be read: the file is the client's
        raise _refuse(field, f"could not be read (truncated or corrupt): {exc}") from None
    width, height = image.size
    if width * height > limit:
        message = (
            f"declares {width}x{height} = {width * height} pixels; the limit is MAX_UPLOAD_PIXELS={limit} "
            "(refused before decoding)"
        )
        raise _refuse(field, message)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise _refuse(field, f"is animated ({frames} frames); send one still image")
    return image


def open_upload(data: bytes, field: str, limits: Limits) -> PILImage:
    """The upload decoded and turned upright, in its own mode; InvalidRequest (413, 422) naming ``field``."""
    image = _header(data, field, limits)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - truncated, a broken stream, bad EXIF: all the client's file
        raise _refuse(field, f"could not be decoded (truncated or corrupt): {exc}") from None


def inspect(image: bytes, mask: bytes | None, size: tuple[int, int] | None, limits: Limits) -> Upload:
    """An edit's files checked as far as their headers go (size in bytes, format, pixels declared, frames),
    on the request's thread and before its job is admitted: what a refused request costs. The pixels are
    decoded later, by ``decode``."""
    _header(image, "image", limits)
    if mask is not None:
        _header(mask, "mask", limits)
    return Upload(image, mask, size)


def _eight_bit(image: PILImage) -> PILImage:
    """A 16-bit greyscale image scaled to 8 bits (PIL's convert would clip everything above 255 to white)."""
    values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _has_alpha(image: PILImage) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: PILImage, field: str) -> PILImage:
    """``image`` as RGB: transparency over white, 16-bit greyscale scaled, other modes converted."""
    if image.mode in SIXTEEN_BIT:
        image = _eight_bit(image)
    try:
        if _has_alpha(image):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _refuse(field, f"has a mode ({image.mode}) that cannot be converted to RGB: {exc}") from None


def to_mask(image: PILImage, field: str) -> PILImage:
    """``image`` as an inpainting mask, mode L, 255 where to repaint: where it is transparent (alpha below
    half) when it has alpha, else where it is white (at least half grey)."""
    if _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
        repaint = alpha < 128
    else:
        grey = _eight_bit(image) if image.mode in SIXTEEN_BIT else image.convert("L")
        repaint = np.asarray(grey) >= 128
    if not repaint.any():
        how = "no pixel is transparent" if _has_alpha(image) else "no pixel is white"
        raise _refuse(field, f"marks nothing to repaint ({how})")
    return Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), mode="L")


def _drawable(size: tuple[int, int], limits: Limits) -> bool:
    multiple = limits.size_multiple
    low, high = limits.min_image_size, limits.max_image_size
    return all(low <= side <= high and side % multiple == 0 for side in size)


def prepare(
    image_data: bytes, mask_data: bytes | None, size: tuple[int, int] | None, limits: Limits
) -> tuple[PILImage, PILImage | None, tuple[int, int]]:
    """The input image (RGB) and mask (L) at the size to draw, and the input's own size (upright). ``size``
    is the request's (None: the input's, which must then be drawable under ``limits``, a loaded model's
    limits). InvalidRequest naming ``image`` or ``mask`` for anything the module docstring lists."""
    image = open_upload(image_data, "image", limits)
    mask = open_upload(mask_data, "mask", limits) if mask_data is not None else None
    own = image.size
    if mask is not None and mask.size != own:
        message = f"is {mask.size[0]}x{mask.size[1]}; it must be the image's size, {own[0]}x{own[1]}"
        raise _refuse("mask", message)
    if size is None:
        if not _drawable(own, limits):
            message = (
                f"is {own[0]}x{own[1]}, which the model cannot draw as it is: each side must be from "
                f"{limits.min_image_size} to {limits.max_image_size} and a multiple of {limits.size_multiple}. "
                "Ask for a size (width and height; size for OpenAI's API) to have it resized to that"
            )
            raise _refuse("image", message)
        size = own
    rgb = to_rgb(image, "image")
    marked = to_mask(mask, "mask") if mask is not None else None
    if size != own:
        # reducing_gap: a box reduction by a whole factor first, then Lanczos over at most 3x the size asked.
        # Pillow's own measure of "indistinguishable" in most cases; a 16.7 MP upload to 64x64 takes 34 ms of CPU
        # instead of 370, which is what a burst of uploads costs the other threads.
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=RESIZE_REDUCING_GAP)
        marked = marked.resize(size, Image.Resampling.NEAREST) if marked is not None else None
    return rgb, marked, own


def decode(params: GenerationParams, limits: Limits) -> GenerationParams:
    """``params`` with its upload decoded (``prepare``): the image and mask at the size to draw, the size and
    the input's own; the same ``params`` when it carries no upload."""
    upload = params.upload
    if upload is None:
        return params
    image, mask, own = prepare(upload.image, upload.mask, upload.size, limits)
    width, height = image.size
    return replace(params, image=image, mask=mask, width=width, height=height, input_size=own, upload=None)


class Decoder:
    """Where a worker decodes its uploads: at most ``concurrency`` at once, on threads ``nice`` steps below
    the request threads (as the engine's), so a burst of uploads can neither fill the memory with pixels
    nor take the CPU a probe needs (docs/architecture.md §15). Threads start on first use."""

    def __init__(self, concurrency: int, nice: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="decode", initializer=lower_thread_priority, initargs=(nice,)
        )

    def decode(self, params: GenerationParams, limits: Limits, deadline: float) -> GenerationParams:
        """``params`` decoded (``decode``), waiting for a decoding thread until ``deadline`` (time.monotonic) at
        most: TimeoutError past it (an unstarted decode is dropped), InvalidRequest for a bad file."""
        if params.upload is None:
            return params
        future = self._pool.submit(decode, params, limits)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()
            raise TimeoutError("the deadline passed before the upload was decoded") from None
