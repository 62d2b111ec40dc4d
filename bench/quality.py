"""Does the model draw what it is asked? A fixed set of captions and seeds, judged twice: by
webapp.model.scenes.analyze and by webapp.model.outlines.fit, which share no code.

    .venv/bin/python bench/quality.py [--model MODEL_ID] [--compare MODEL_ID] [--images 150]

First both judges are checked on the renderer's own scenes (each must read at least 99 % right, so their
misses below are the model's). Then each model row generates one image per caption (seeds from 10**6 up,
never used in training; the shapes in turn, so each has a third of the captions) at the default steps and
guidance, through the server's own loader (webapp.model.pipeline.load), and prints the share with the
right background, colour, shape, and all three, the share whose shape the outline fit reads right, and the
seconds per image. Rows: the model asked for (``--model``, by default the embedded trained one), the same
without classifier-free guidance (guidance 1.0), ``--compare`` if given (for example the weights before a
retraining), and the embedded random-weight model as the floor. Then, for the model and ``--compare``,
the share of each asked shape and each asked colour drawn right on all three counts.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.model import outlines, scenes
from webapp.settings import BUILTIN_TINY_MODEL, SCENES_MODEL, Settings

FIRST_SEED = 10**6


def judges_on_rendered_scenes(count: int) -> tuple[float, float]:
    """The share of the renderer's own scenes each judge reads right: the analyzer, the outline fit."""
    rng = random.Random("quality-analyzer")
    drawn = [scenes.random_scene(rng) for _ in range(count)]
    analyzer = sum(scenes.analyze(scenes.render(scene)) == scene.verdict for scene in drawn)
    fitted = sum(
        outlines.fit(scenes.render(scene), scene.colour, scene.background).shape == scene.shape for scene in drawn
    )
    return analyzer / count, fitted / count


def captions(count: int) -> list[str]:
    """``count`` captions, the shapes in turn, colours and backgrounds drawn at random."""
    rng = random.Random("quality-captions")
    chosen = []
    for index in range(count):
        scene = scenes.random_scene(rng)
        shape = scenes.SHAPES[index % len(scenes.SHAPES)]
        chosen.append(scenes.Scene(shape, scene.colour, scene.background).caption)
    return chosen


@dataclass
class Tally:
    """What one model drew right, overall and by the shape and colour asked for."""

    images: int = 0
    right: Counter = field(default_factory=Counter)  # background, colour, shape, all three, outline fit
    by_shape: Counter = field(default_factory=Counter)  # asked shape -> all three right
    shapes: Counter = field(default_factory=Counter)  # asked shape -> asked
    by_colour: Counter = field(default_factory=Counter)
    colours: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def share(self, key: str) -> str:
        return f"{self.right[key] / self.images:.1%}"


def judge(model_id: str, guidance: float | None, asked: list[str], steps: int | None) -> Tally:
    from webapp.model import pipeline
    from webapp.model.profile import Limits
    from webapp.model.request import GenerationParams

    settings = Settings.from_env({**os.environ, "MODEL_ID": model_id})
    model = pipeline.load(settings, 0)
    limits = Limits.of(settings, model.profile)  # the server's defaults for this model
    width, height = limits.default_size
    scale = limits.default_guidance if guidance is None else guidance
    tally = Tally()
    started = time.perf_counter()
    for index, caption in enumerate(asked):
        params = GenerationParams(
            caption, None, steps or limits.default_steps, scale, width, height, (FIRST_SEED + index,)
        )
        ((image,),) = model.generate([params], lambda step: None)
        seen, wanted = scenes.analyze(image), scenes.parse(caption)
        everything = seen == wanted
        tally.images += 1
        tally.right.update(
            background=seen.background == wanted.background,
            colour=seen.colour == wanted.colour,
            shape=seen.shape == wanted.shape,
            all_three=everything,
            outline_fit=outlines.fit(image, wanted.colour, wanted.background).shape == wanted.shape,
        )
        tally.shapes[wanted.shape] += 1
        tally.by_shape[wanted.shape] += everything
        tally.colours[wanted.colour] += 1
        tally.by_colour[wanted.colour] += everything
    tally.seconds = (time.perf_counter() - started) / len(asked)
    return tally


def breakdown(title: str, keys: list[str], tallies: dict[str, Tally], part: str) -> None:
    """One row per asked shape (or colour), one column per model: the share drawn right on all three."""
    print(f"\n| {title} | " + " | ".join(tallies) + " |\n|---|" + "---|" * len(tallies))
    for key in keys:
        cells = []
        for tally in tallies.values():
            asked, right = getattr(tally, part + "s")[key], getattr(tally, "by_" + part)[key]
            cells.append(f"{right / asked:.1%} ({right}/{asked})" if asked else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SCENES_MODEL, help="a MODEL_ID: a diffusers folder or an embedded name")
    parser.add_argument("--compare", help="another MODEL_ID to judge beside it (the weights before, say)")
    parser.add_argument("--images", type=int, default=150, help="captions per row")
    parser.add_argument("--steps", type=int, help="denoising steps (default: DEFAULT_STEPS)")
    args = parser.parse_args()
    analyzer, fitted = judges_on_rendered_scenes(600)
    print(f"analyzer on the renderer's own scenes: {analyzer:.1%} right (must be >= 99 %)")
    print(f"outline fit on the renderer's own scenes: {fitted:.1%} of shapes right (must be >= 99 %)")
    if min(analyzer, fitted) < 0.99:
        sys.exit("a judge misreads the renderer's own scenes: its verdicts on a model would mean nothing")
    asked = captions(args.images)
    rows = [(args.model, args.model, None), (f"{args.model}, guidance 1.0 (no CFG)", args.model, 1.0)]
    if args.compare:
        rows.append((args.compare, args.compare, None))
    rows.append((f"{BUILTIN_TINY_MODEL} (random weights)", BUILTIN_TINY_MODEL, None))
    print(
        "\n| model | background | colour | shape | all three | shape, by outline fit | s/image |"
        "\n|---|---|---|---|---|---|---|"
    )
    tallies = {}
    for name, model_id, guidance in rows:
        tally = tallies[name] = judge(model_id, guidance, asked, args.steps)
        shares = [tally.share(key) for key in ("background", "colour", "shape", "all_three", "outline_fit")]
        print(f"| {name} | " + " | ".join(shares) + f" | {tally.seconds:.3f} |", flush=True)
    compared = {name: tallies[name] for name in (args.model, args.compare) if name}
    breakdown("asked shape: all three right", list(scenes.SHAPES), compared, "shape")
    breakdown("asked colour: all three right", sorted(scenes.COLOURS), compared, "colour")
    print(f"\n({len(asked)} captions, seeds {FIRST_SEED}..{FIRST_SEED + len(asked) - 1})")


if __name__ == "__main__":
    main()
