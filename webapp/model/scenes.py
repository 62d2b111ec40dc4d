"""Scenes of one shape on a plain background: the vocabulary, a renderer and an analyzer (issue 15's data
set and quality oracle; no torch here).

A scene is a colour, a shape (circle, square, triangle with its apex up), a background colour that differs
from the shape's, a size (at least a quarter of the image's width) and a position. ``caption`` says it in
words (``a red circle on a white background``; ``an`` before orange), ``render`` draws it with PIL, and
``analyze`` reads an image back: the background colour from the border, the shape's colour and shape
from the pixels that differ from the background. The analyzer is what judges a model's images, so it is
checked first on the renderer's own scenes (tests/test_scenes.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# As CSS names them. orange and yellow differ by 90 in green alone, so colours are told apart by distance.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
SIDE = 64  # the native size of the embedded model
MIN_FRACTION, MAX_FRACTION = 0.3, 0.6  # the shape's width as a fraction of the image's
MIN_SHAPE_PIXELS = 40


# Prompts the demo offers for the trained model: one per shape, in colours it draws well.
EXAMPLES = (
    "a red circle on a white background",
    "a yellow triangle on a black background",
    "an orange circle on a purple background",
    "a white square on a green background",
    "a green triangle on an orange background",
)


# A prompt for each LoRA adapter shipped with the embedded model (webapp/model/weights/loras), which the demo
# offers beside the adapter: what it teaches (training/train_lora.py).
ADAPTER_EXAMPLES = {"night": "a red circle at night"}


def article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    fraction: float = 0.45  # the shape's width over the image's
    x: float = 0.5  # the shape's centre, as fractions of the image's width and height
    y: float = 0.5

    @property
    def caption(self) -> str:
        on = f"{article(self.background)} {self.background} background"
        return f"{article(self.colour)} {self.colour} {self.shape} on {on}"

    @property
    def verdict(self) -> Verdict:
        return Verdict(self.background, self.colour, self.shape)


@dataclass(frozen=True)
class Verdict:
    """What an image shows; None where the analyzer cannot tell."""

    background: str | None
    colour: str | None
    shape: str | None


def random_scene(rng: random.Random) -> Scene:
    """A scene drawn from ``rng``: every shape, colour pair, size and position the data set holds."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    fraction = rng.uniform(MIN_FRACTION, MAX_FRACTION)
    half = fraction / 2
    x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
    return Scene(rng.choice(SHAPES), colour, background, fraction, x, y)


def parse(caption: str) -> Verdict:
    """The verdict a caption asks for (``a red circle on a white background``)."""
    words = caption.lower().split()
    colour, shape = words[1], words[2]
    background = words[words.index("background") - 1]
    return Verdict(background, colour, shape)


def render(scene: Scene, side: int = SIDE) -> Image.Image:
    """The scene as an RGB image of ``side`` x ``side`` pixels, edges crisp."""
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    width = scene.fraction * side
    cx, cy, half = scene.x * side, scene.y * side, width / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # apex up, as wide as it is tall
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in NAMES], dtype=float)


def nearest_colour(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb.astype(float)) ** 2).sum(axis=-1)))]


def _nearest_indices(pixels: np.ndarray) -> np.ndarray:
    """Each pixel's nearest palette colour, as an index into NAMES."""
    return np.argmin(((pixels[..., None, :] - PALETTE) ** 2).sum(axis=-1), axis=-1)


def _outlines(height: int, width: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill a ``height`` x ``width`` box, as boolean masks."""
    rows = (np.arange(height)[:, None] + 0.5) / height  # 0 at the top, 1 at the bottom
    cols = (np.arange(width)[None, :] + 0.5) / width
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (rows - 0.5) ** 2 + (cols - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(cols - 0.5) <= rows / 2,  # apex up: as wide as the box at the bottom row
    }


def _shape_of(mask: np.ndarray) -> str | None:
    """circle, square or triangle: the outline, drawn to fill the shape's bounding box, that overlaps its
    pixels best (intersection over union). A soft edge or a rounded corner costs every outline alike, so
    the best one still wins where a threshold on one figure would flip."""
    rows, cols = np.nonzero(mask)
    if len(rows) < MIN_SHAPE_PIXELS:
        return None
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = mask[top : bottom + 1, left : right + 1]
    overlaps = {name: (box & outline).sum() / (box | outline).sum() for name, outline in _outlines(*box.shape).items()}
    return max(overlaps, key=overlaps.get)


def analyze(image: Image.Image) -> Verdict:
    """What ``image`` shows: the background from its border's median colour, and the shape from the
    pixels whose nearest palette colour is another one (no distance threshold: orange and yellow are only
    90 apart)."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = nearest_colour(np.median(border, axis=0))
    mask = _nearest_indices(pixels) != NAMES.index(background)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return Verdict(background, None, None)
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    return Verdict(background, colour, _shape_of(mask))
