"""Alignment metric: colour, shape and direction read from the pixels of synthetic-shape videos."""

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from show1_jax.data.alignment import Recognition, ceiling, evaluate, recognise
from show1_jax.data.synthetic import (
    COLOURS,
    SHAPES,
    ClipSpec,
    Combination,
    SyntheticConfig,
    attribute_combinations,
    clip_specs,
    render_clip,
)
from show1_jax.data.videos import resize_frames

CONFIG = SyntheticConfig(height=40, width=64, num_frames=8)
SMALL = SyntheticConfig(height=24, width=40, num_frames=8)
# 40 triples: every colour with every shape, and every shape and every colour with every direction.
MIXED = [
    Combination(c, s, CONFIG.directions[i % 4])
    for i, (c, s) in enumerate(itertools.product(CONFIG.colours, CONFIG.shapes))
]
PERFECT = {"colour": 1.0, "shape": 1.0, "direction": 1.0, "overall": 1.0}


def clip(combination: Combination, config: SyntheticConfig = CONFIG, centre=(13.3, 21.7)) -> np.ndarray:
    spec = ClipSpec(*combination, center_y=centre[0], center_x=centre[1], caption="")
    return render_clip(spec, config)


def accuracies(report: dict) -> dict:
    return {k: report[k] for k in PERFECT}


def degrade(frames: np.ndarray, noise: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (PIL, sigma in pixels) then Gaussian pixel noise (sigma in 0..255 levels)."""
    blurred = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(blur))) for f in frames])
    return np.clip(np.round(blurred + rng.normal(0, noise, frames.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("config", [CONFIG, SMALL], ids=["40x64", "24x40"])
def test_every_real_clip_is_recognised(config):
    report = ceiling(config, n_per_combo=1, seed=0)  # all 160 triples
    assert report["count"] == len(attribute_combinations(config)) == 160
    assert accuracies(report) == PERFECT, report["confusion"]


@pytest.mark.parametrize(("config", "size"), [(CONFIG, (160, 256)), (SMALL, (96, 160))], ids=["40x64", "24x40"])
def test_clips_upscaled_4x_are_recognised(config, size):
    report = ceiling(config, MIXED, n_per_combo=1, seed=1, size=size)
    assert report["count"] == 40
    assert accuracies(report) == PERFECT, report["confusion"]


@pytest.mark.parametrize("config", [CONFIG, SMALL], ids=["40x64", "24x40"])
def test_noisy_slightly_blurred_clips_are_mostly_recognised(config):
    rng = np.random.default_rng(0)
    specs = clip_specs(len(MIXED), config, combinations=MIXED, seed=2)
    report = evaluate((degrade(render_clip(s, config), 20.0, 0.7, rng), s.combination) for s in specs)
    for attribute in ("colour", "shape", "direction"):
        assert report[attribute] >= 0.95, report["confusion"][attribute]


def test_shape_straddling_the_edges_is_recognised():
    for shape in SHAPES:
        for direction in CONFIG.directions:
            frames = clip(Combination("green", shape, direction), centre=(0.4, 63.2))  # centre at a frame corner
            foreground = frames[0].any(-1)
            assert foreground[0].any() and foreground[-1].any() and foreground[:, 0].any() and foreground[:, -1].any()
            found = recognise(frames)
            assert (found.colour, found.shape, found.direction) == ("green", shape, direction)
            assert found.shape_iou > 0.95


def test_diagnostics_of_a_real_clip():
    found = recognise(clip(Combination("orange", "triangle", "up")))
    assert found.rgb == COLOURS["orange"] and found.colour_distance == 0.0
    assert found.shape_iou == 1.0 and max(found.shape_ious.values()) == 1.0
    assert found.blur == 0.0 and abs(found.radius - CONFIG.shape_radius) <= 0.5
    assert found.displacement == pytest.approx((-CONFIG.speed, 0.0), abs=1e-6)

    upscaled = recognise(resize_frames(clip(Combination("orange", "triangle", "up")), 160, 256, crop="none"))
    assert upscaled.shape == "triangle" and upscaled.blur > 0
    assert abs(upscaled.radius - 4 * CONFIG.shape_radius) <= 2
    assert upscaled.displacement == pytest.approx((-4 * CONFIG.speed, 0.0), abs=0.1)


def test_blank_video_gives_nothing_and_counts_as_wrong():
    blank = np.zeros((8, 40, 64, 3), np.uint8)
    assert recognise(blank) == Recognition(None, None, None, foreground_fraction=0.0)
    report = evaluate([(blank, Combination("red", "circle", "left"))])
    assert accuracies(report) == {"colour": 0.0, "shape": 0.0, "direction": 0.0, "overall": 0.0}
    assert report["no_foreground"] == 1
    assert report["confusion"]["shape"] == {"circle": {"none": 1}}


def test_still_video_has_no_direction():
    frames = np.repeat(clip(Combination("red", "square", "left"))[:1], 8, axis=0)
    found = recognise(frames)
    assert (found.colour, found.shape, found.direction) == ("red", "square", None)
    assert found.displacement == (0.0, 0.0)


def test_wrong_colour_or_direction_is_wrong_for_that_attribute_only():
    asked = Combination("red", "diamond", "right")
    frames = clip(asked)
    recoloured = np.where(frames.any(-1, keepdims=True), np.asarray(COLOURS["blue"], np.uint8), frames)
    reversed_ = frames[::-1]  # moving left
    found = recognise(recoloured)
    assert (found.colour, found.shape, found.direction) == ("blue", "diamond", "right")
    assert recognise(reversed_).direction == "left"

    report = evaluate([(recoloured, asked)])
    assert accuracies(report) == {"colour": 0.0, "shape": 1.0, "direction": 1.0, "overall": pytest.approx(2 / 3)}
    assert report["confusion"]["colour"] == {"red": {"blue": 1}}
    report = evaluate([(reversed_, asked)])
    assert accuracies(report) == {"colour": 1.0, "shape": 1.0, "direction": 0.0, "overall": pytest.approx(2 / 3)}
    assert report["confusion"]["direction"] == {"right": {"left": 1}}


def test_evaluate_counts_a_hand_built_case():
    red_circle_left = Combination("red", "circle", "left")
    cases = [
        (clip(red_circle_left), red_circle_left),  # all right
        (clip(Combination("cyan", "cross", "left")), red_circle_left),  # colour and shape wrong
        (clip(Combination("red", "cross", "down")), Combination("red", "cross", "up")),  # direction wrong
        (np.zeros((8, 40, 64, 3), np.uint8), Combination("white", "square", "up")),  # nothing
    ]
    report = evaluate(iter(cases))
    assert report["count"] == 4 and report["no_foreground"] == 1
    assert accuracies(report) == {"colour": 2 / 4, "shape": 2 / 4, "direction": 2 / 4, "overall": 6 / 12}
    assert report["confusion"] == {
        "colour": {"red": {"red": 2, "cyan": 1}, "white": {"none": 1}},
        "shape": {"circle": {"circle": 1, "cross": 1}, "cross": {"cross": 1}, "square": {"none": 1}},
        "direction": {"left": {"left": 2}, "up": {"down": 1, "none": 1}},
    }
    with pytest.raises(ValueError, match="empty"):
        evaluate([])


def test_candidates_restrict_the_answers():
    frames = clip(Combination("orange", "triangle", "up"))
    found = recognise(frames, colours=("red", "yellow"), shapes=("circle", "square"), directions=("left", "right"))
    assert found.colour in ("red", "yellow") and found.shape in ("circle", "square")
    assert found.direction is None  # it moves up: along neither candidate
    assert recognise(frames, directions=("down", "up")).direction == "up"


def test_other_background_and_bad_inputs():
    config = dataclasses.replace(CONFIG, background=(128, 128, 128), colours=("red", "blue", "yellow"))
    assert accuracies(ceiling(config, n_per_combo=1, seed=3)) == PERFECT
    with pytest.raises(ValueError, match="uint8"):
        recognise(np.zeros((8, 40, 64, 3), np.float32))
    with pytest.raises(ValueError, match="background"):
        recognise(np.zeros((8, 40, 64, 3), np.uint8), background=COLOURS["white"])
    with pytest.raises(ValueError, match="unknown"):
        recognise(np.zeros((8, 40, 64, 3), np.uint8), shapes=("hexagon",))
