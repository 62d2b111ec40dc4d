"""Every hostile upload the edits take, through the real decoders: what ``webapp.api.uploads.prepare`` makes
of each file, or the 4xx naming the field it refuses it with (docs/api.md, Edits). The same files go to a
real server in tests/test_edits.py."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from webapp.api import uploads
from webapp.errors import InvalidRequest
from webapp.model.profile import Limits, profile
from webapp.settings import Settings

EMBEDDED = profile("StableDiffusionPipeline", (64, 64), 8, None, "float32")


def limits(**env: str) -> Limits:
    """The limits of the embedded model under the settings ``env`` gives."""
    return Limits.of(Settings.from_env(env), EMBEDDED)


LIMITS = limits()  # the embedded model's: sides 64..256, a multiple of 8


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of about 100 bytes whose header declares ``width`` x ``height`` RGB pixels, with one small
    compressed row of data: decoding it would fail as truncated, so a refusal that names the pixels came
    from the header alone."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def refused(image: bytes, mask: bytes | None = None, size=None, settings: Limits = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        uploads.prepare(image, mask, size, settings)
    return caught.value


RED_CIRCLE = Image.new("RGB", (64, 64), "white")
RED_CIRCLE.paste((255, 0, 0), (16, 16, 48, 48))


def frames(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "green")[:count]]


HOSTILE = {
    "a decompression bomb": (png_declaring(100_000, 100_000), "(10000000000 pixels)"),
    "a bomb under PIL's own guard": (png_declaring(12_000, 12_000), "declares 12000x12000 = 144000000 pixels"),
    # The default limit is (4 x the largest side the model draws) squared: 1024x1024 for the embedded model's 256.
    "just over MAX_UPLOAD_PIXELS": (png_declaring(1025, 1024), "the limit is MAX_UPLOAD_PIXELS=1048576"),
    "a GIF": (encoded(RED_CIRCLE, "GIF"), "must be a PNG, JPEG or WebP image; it is a GIF"),
    "an SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "it is an SVG"),
    "a BMP": (encoded(RED_CIRCLE, "BMP"), "it is a BMP"),
    "a text file named .png": (b"just some text, not an image\n", "its bytes are none of these"),
    "an empty file": (b"", "it is empty"),
    "a truncated PNG": (encoded(RED_CIRCLE)[:-40], "truncated or corrupt"),
    "a truncated JPEG": (encoded(RED_CIRCLE, "JPEG")[:200], "truncated or corrupt"),
    "a corrupt PNG": (encoded(RED_CIRCLE)[:40] + b"\x00" * 60, "truncated or corrupt"),
    "an animated PNG": (encoded(frames(2)[0], "PNG", save_all=True, append_images=frames(2)[1:]), "animated"),
    "an animated WebP": (encoded(frames(3)[0], "WEBP", save_all=True, append_images=frames(3)[1:]), "animated"),
    "an image the model cannot draw at its own size": (encoded(Image.new("RGB", (300, 64))), "cannot draw"),
    "a side off the model's multiple": (encoded(Image.new("RGB", (68, 64))), "a multiple of 8"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_image_is_refused_naming_the_field(name):
    data, says = HOSTILE[name]
    problem = refused(data)
    assert (problem.status, problem.code, problem.field) == (422, "invalid_image", "image"), problem.message
    assert says in problem.message and problem.message.startswith("image: ")


def test_a_file_over_max_upload_bytes_is_a_413_before_it_is_opened():
    settings = limits(MAX_UPLOAD_BYTES="2048")
    problem = refused(png_declaring(64, 64) + b"\x00" * 4096, settings=settings)
    assert (problem.status, problem.code, problem.field) == (413, "payload_too_large", "image")
    assert "MAX_UPLOAD_BYTES=2048" in problem.message


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    grey = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    data = encoded(grey)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image, _, _ = uploads.prepare(data, None, None, LIMITS)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (128, 128, 128)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (Image.new("RGBA", (64, 64), (255, 0, 0, 0)), (255, 255, 255)),  # transparent: white shows through
        (Image.new("RGBA", (64, 64), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (64, 64), (0, 0)), (255, 255, 255)),
        (Image.new("L", (64, 64), 77), (77, 77, 77)),
        (Image.new("1", (64, 64), 1), (255, 255, 255)),
        (Image.new("RGB", (64, 64), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE), (0, 0, 255)),
    ],
    ids=["transparent RGBA", "opaque RGBA", "transparent LA", "grey", "bilevel", "palette"],
)
def test_modes_are_converted_to_rgb(source, expected):
    image, _, _ = uploads.prepare(encoded(source), None, None, LIMITS)
    assert image.mode == "RGB" and image.getpixel((10, 10)) == expected


def test_a_palette_with_a_transparent_entry_is_composited_onto_white():
    source = Image.new("P", (64, 64), 0)
    source.putpalette([255, 0, 0, 0, 255, 0])
    data = encoded(source, transparency=0)
    image, _, _ = uploads.prepare(data, None, None, LIMITS)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_is_converted_to_rgb():
    source = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # full magenta and yellow: red
    image, _, _ = uploads.prepare(encoded(source, "JPEG", quality=95), None, None, LIMITS)
    red, green, blue = image.getpixel((10, 10))
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_honoured_before_the_size_is_read():
    wide = Image.new("RGB", (128, 64), "white")
    wide.paste((255, 0, 0), (0, 0, 16, 64))  # a red band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: display rotated 90 degrees clockwise
    image, _, own = uploads.prepare(encoded(wide, "JPEG", exif=exif, quality=95), None, None, LIMITS)
    assert own == (64, 128) and image.size == (64, 128)
    assert image.getpixel((32, 4))[1] < 80, "the left band is now along the top"


def test_a_mask_marks_transparent_pixels_or_white_ones():
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: repaint it
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (0, 0, 32, 64))
    for mask in (alpha, white):
        _, marked, _ = uploads.prepare(encoded(RED_CIRCLE), encoded(mask), None, LIMITS)
        assert marked.mode == "L"
        assert (marked.getpixel((5, 5)), marked.getpixel((60, 5))) == (255, 0)


@pytest.mark.parametrize(
    ("mask", "says"),
    [
        (Image.new("L", (32, 64), 255), "is 32x64; it must be the image's size, 64x64"),
        (Image.new("RGBA", (64, 64), (0, 0, 0, 255)), "marks nothing to repaint (no pixel is transparent)"),
        (Image.new("L", (64, 64), 0), "marks nothing to repaint (no pixel is white)"),
    ],
    ids=["another size", "opaque", "black"],
)
def test_a_mask_that_cannot_be_used_is_refused_naming_it(mask, says):
    problem = refused(encoded(RED_CIRCLE), encoded(mask))
    assert (problem.status, problem.field) == (422, "mask") and says in problem.message


def test_a_hostile_mask_is_refused_as_the_image_would_be():
    problem = refused(encoded(RED_CIRCLE), png_declaring(100_000, 100_000))
    assert problem.field == "mask" and "MAX_UPLOAD_PIXELS" in problem.message


def test_an_image_is_resized_to_an_asked_size_and_says_its_own():
    big = Image.new("RGB", (1000, 750), (0, 0, 255))
    mask = Image.new("L", (1000, 750), 0)
    mask.paste(255, (0, 0, 500, 750))
    image, marked, own = uploads.prepare(encoded(big), encoded(mask), (128, 96), LIMITS)
    assert own == (1000, 750) and image.size == marked.size == (128, 96)
    assert image.getpixel((64, 48)) == (0, 0, 255)
    assert (marked.getpixel((10, 48)), marked.getpixel((120, 48))) == (255, 0)


def test_the_pixel_limit_follows_the_model_unless_the_operator_sets_one():
    """Unset, MAX_UPLOAD_PIXELS is (4 x MAX_IMAGE_SIZE) squared (under a loaded model's limits, its largest
    side): a bomb just under the old fixed 16.7 MP is refused from its header on a 256-pixel model. An operator
    can raise it, and then the header check alone passes a file of that size."""
    assert LIMITS.upload_pixels == 1024 * 1024
    assert limits(MAX_IMAGE_SIZE="1024").upload_pixels == 4096 * 4096
    assert "MAX_UPLOAD_PIXELS=1048576" in refused(png_declaring(4096, 4095)).message
    raised = limits(MAX_UPLOAD_PIXELS=str(4096 * 4096))
    over = refused(png_declaring(4097, 4096), settings=raised)
    assert "the limit is MAX_UPLOAD_PIXELS=16777216" in over.message
    upload = uploads.inspect(png_declaring(4096, 4095), None, (64, 64), raised)  # its header is all that is read
    assert upload.size == (64, 64)
