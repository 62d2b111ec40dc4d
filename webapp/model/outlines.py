"""A second judge of shapes that shares no code with ``scenes.analyze``: it fits the renderer's own outlines
to an image and keeps the one that explains its pixels best (analysis by synthesis; no torch here).

``scenes.analyze`` reads the shape from a mask of the pixels that differ from the background, drawn into
that mask's bounding box. This module never builds that mask. Given the colours a caption asked for, each
pixel costs its squared distance to the shape's colour if a rendered outline covers it, and to the
background's otherwise; every shape is rendered by ``scenes.render`` at every size from ``SIZES`` and slid
over every pixel position, and the shape of the cheapest fit is the verdict. A square with rounded corners
is still nearer a square than a circle when its sides are straight, and a blob that is neither loses to
whichever outline covers it best, with the fit's agreement saying how well.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from webapp.model import scenes

# Shape widths tried, as fractions of the image's side: the data set's 0.3-0.6, and a margin either way
# for a model that draws a little small or large.
SIZES = tuple(round(0.2 + 0.025 * step, 3) for step in range(21))  # 0.2 to 0.7


@dataclass(frozen=True)
class Fit:
    """The outline that explains an image best: its shape, width (fraction of the side), top-left corner
    in pixels, and ``agreement``, the share of pixels whose nearer colour (shape's or background's) is the
    one the outline puts there."""

    shape: str
    fraction: float
    left: int
    top: int
    agreement: float


@functools.cache
def _kernel(shape: str, fraction: float, side: int) -> np.ndarray:
    """``shape`` at width ``fraction`` of ``side``, rendered into the smallest square canvas that holds it, as
    a float mask (1 inside)."""
    size = int(np.ceil(fraction * side)) + 1
    half = fraction * side / 2
    scene = scenes.Scene(shape, "white", "black", fraction * side / size, half / size, half / size)
    drawn = np.asarray(scenes.render(scene, size).convert("L"), dtype=np.float32) / 255
    return (drawn > 0.5).astype(np.float32)


@functools.cache
def _kernel_spectrum(shape: str, fraction: float, side: int) -> np.ndarray:
    """The conjugate spectrum of ``_kernel``, zero-padded to twice ``side``: a product with an image's
    spectrum is the cost of the outline at every top-left corner at once, with no wrap-around there."""
    return np.conj(np.fft.rfft2(_kernel(shape, fraction, side), s=(2 * side, 2 * side)))


def fit(image: Image.Image, colour: str, background: str) -> Fit:
    """The best outline for ``image``, drawn in ``colour`` on ``background`` (the caption's colours)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = pixels.shape[0]
    near_shape = ((pixels - np.array(scenes.COLOURS[colour], dtype=np.float32)) ** 2).sum(axis=-1)
    near_background = ((pixels - np.array(scenes.COLOURS[background], dtype=np.float32)) ** 2).sum(axis=-1)
    # Cost of an outline = the background cost everywhere + (shape - background) cost under the outline.
    gain = near_shape - near_background
    spectrum = np.fft.rfft2(gain, s=(2 * side, 2 * side))
    best: tuple[float, str, float, int, int] | None = None
    for shape in scenes.SHAPES:
        for fraction in SIZES:
            reach = side - _kernel(shape, fraction, side).shape[0] + 1  # top-left corners that keep it inside
            if reach < 1:
                continue
            costs = np.fft.irfft2(spectrum * _kernel_spectrum(shape, fraction, side))[:reach, :reach]
            top, left = np.unravel_index(int(np.argmin(costs)), costs.shape)
            cost = float(costs[top, left])
            if best is None or cost < best[0]:
                best = (cost, shape, fraction, int(left), int(top))
    assert best is not None, "the image is smaller than every outline"
    _, shape, fraction, left, top = best
    placed = np.zeros(pixels.shape[:2], dtype=bool)
    kernel = _kernel(shape, fraction, side) > 0.5
    placed[top : top + kernel.shape[0], left : left + kernel.shape[1]] = kernel
    agreement = float(((near_shape < near_background) == placed).mean())
    return Fit(shape, fraction, left, top, agreement)
