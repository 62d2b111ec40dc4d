"""The scene vocabulary, renderer and analyzer (webapp/model/scenes.py): the analyzer must read the renderer's
own scenes right before it may judge a model's."""

from __future__ import annotations

import random

from PIL import Image

from webapp.model import outlines, scenes
from webapp.model.scenes import Scene, Verdict


def test_captions_say_an_before_orange_and_parse_back():
    scene = Scene("triangle", "orange", "yellow")
    assert scene.caption == "an orange triangle on a yellow background"
    assert Scene("circle", "red", "orange").caption == "a red circle on an orange background"
    assert scenes.parse(scene.caption) == scene.verdict


def test_the_analyzer_reads_the_renderers_own_scenes():
    rng = random.Random(20261202)
    drawn = [scenes.random_scene(rng) for _ in range(600)]
    right = sum(scenes.analyze(scenes.render(scene)) == scene.verdict for scene in drawn)
    assert right >= 0.99 * len(drawn), f"{right} of {len(drawn)}"


def test_every_colour_pair_and_shape_is_told_apart_at_the_smallest_size():
    for shape in scenes.SHAPES:
        for colour in scenes.COLOURS:
            for background in scenes.COLOURS:
                if colour == background:
                    continue
                scene = Scene(shape, colour, background, scenes.MIN_FRACTION)
                assert scenes.analyze(scenes.render(scene)) == scene.verdict, scene


def test_a_plain_image_has_no_shape():
    image = scenes.render(Scene("circle", "red", "blue", fraction=0.01))
    assert scenes.analyze(image) == Verdict("blue", None, None)


def test_the_outline_fit_reads_the_renderers_own_scenes_and_finds_their_place():
    """webapp/model/outlines.py, the second judge: every shape, colour pair, size and position."""
    rng = random.Random(20261205)
    for scene in [scenes.random_scene(rng) for _ in range(300)]:
        fit = outlines.fit(scenes.render(scene), scene.colour, scene.background)
        assert fit.shape == scene.shape, (scene, fit)
        assert abs(fit.fraction - scene.fraction) <= 0.05 and fit.agreement >= 0.97, (scene, fit)


def test_the_outline_fit_and_the_analyzer_judge_blurred_and_rounded_shapes_alike():
    """What a model draws is soft: a blurred triangle and a square with rounded corners are still read as
    what they are by both judges, by different means."""
    from PIL import ImageDraw, ImageFilter

    triangle = scenes.render(Scene("triangle", "yellow", "black", 0.5)).filter(ImageFilter.GaussianBlur(1.5))
    rounded = Image.new("RGB", (64, 64), scenes.COLOURS["yellow"])
    ImageDraw.Draw(rounded).rounded_rectangle((16, 16, 47, 47), radius=5, fill=scenes.COLOURS["blue"])
    for image, scene in (
        (triangle, Scene("triangle", "yellow", "black")),
        (rounded, Scene("square", "blue", "yellow")),
    ):
        assert outlines.fit(image, scene.colour, scene.background).shape == scene.shape
        assert scenes.analyze(image) == scene.verdict
