"""Does the model draw what it is asked? A fixed set of captions and seeds, judged by webapp.model.scenes.analyze.

    .venv/bin/python bench/quality.py [--model MODEL_ID] [--images 96]

First the analyzer is checked on the renderer's own scenes (it must read at least 99 % right, so its
misses below are the model's). Then each model row generates one image per caption (seeds from 10**6 up,
never used in training) at the default steps and guidance, through the server's own loader
(webapp.model.pipeline.load), and prints the share with the right background, colour, shape, and all three.
Rows: the model asked for (``--model``, by default the embedded trained one), the same without
classifier-free guidance (guidance 1.0), and the embedded random-weight model as the floor; each with its
seconds per image at those steps.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.model import scenes
from webapp.settings import BUILTIN_TINY_MODEL, SCENES_MODEL, Settings

FIRST_SEED = 10**6


def analyzer_accuracy(count: int) -> float:
    rng = random.Random("quality-analyzer")
    drawn = [scenes.random_scene(rng) for _ in range(count)]
    return sum(scenes.analyze(scenes.render(scene)) == scene.verdict for scene in drawn) / count


def captions(count: int) -> list[str]:
    rng = random.Random("quality-captions")
    return [scenes.random_scene(rng).caption for _ in range(count)]


def judge(model_id: str, guidance: float | None, asked: list[str], steps: int | None) -> dict[str, float]:
    from webapp.model import pipeline
    from webapp.model.profile import request_limits
    from webapp.model.request import GenerationParams

    settings = Settings.from_env({**os.environ, "MODEL_ID": model_id})
    model = pipeline.load(settings, 0)
    limits = request_limits(settings, model.profile)  # the server's defaults for this model
    width, height = limits.default_size
    scale = limits.default_guidance if guidance is None else guidance
    right = {"background": 0, "colour": 0, "shape": 0, "all three": 0}
    started = time.perf_counter()
    for index, caption in enumerate(asked):
        params = GenerationParams(
            caption, None, steps or limits.default_steps, scale, width, height, (FIRST_SEED + index,)
        )
        ((image,),) = model.generate([params], lambda step: None)
        seen, wanted = scenes.analyze(image), scenes.parse(caption)
        right["background"] += seen.background == wanted.background
        right["colour"] += seen.colour == wanted.colour
        right["shape"] += seen.shape == wanted.shape
        right["all three"] += seen == wanted
    seconds = (time.perf_counter() - started) / len(asked)
    return {**{key: f"{value / len(asked):.1%}" for key, value in right.items()}, "s/image": f"{seconds:.3f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SCENES_MODEL, help="a MODEL_ID: a diffusers folder or an embedded name")
    parser.add_argument("--images", type=int, default=96, help="captions per row")
    parser.add_argument("--steps", type=int, help="denoising steps (default: DEFAULT_STEPS)")
    args = parser.parse_args()
    print(f"analyzer on the renderer's own scenes: {analyzer_accuracy(1000):.1%} right (must be >= 99 %)")
    asked = captions(args.images)
    rows = [
        (args.model, args.model, None),
        (f"{args.model}, guidance 1.0 (no CFG)", args.model, 1.0),
        (f"{BUILTIN_TINY_MODEL} (random weights)", BUILTIN_TINY_MODEL, None),
    ]
    print("\n| model | background | colour | shape | all three | s/image |\n|---|---|---|---|---|---|")
    for name, model_id, guidance in rows:
        figures = judge(model_id, guidance, asked, args.steps)
        print(f"| {name} | " + " | ".join(figures.values()) + " |", flush=True)
    print(f"\n({len(asked)} captions, seeds {FIRST_SEED}..{FIRST_SEED + len(asked) - 1})")


if __name__ == "__main__":
    main()
