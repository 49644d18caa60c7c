"""The shipped Show-1 Shapes model (show1_jax/assets/show1-shapes): its size and layout, its loading through the
converted-weights path, and the README's first command (`show1 generate PROMPT --output DIR`, no weights) making
the video the prompt asks for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from show1_jax import cli, demo, load_component
from show1_jax.data.alignment import recognise
from show1_jax.data.videos import read_video
from show1_jax.loading import CONVERTED_MARKER

SHIPPED = demo.DEFAULT_WEIGHTS


def test_the_shipped_model_is_small_and_in_the_released_layout():
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"the shipped model is {size / 2**20:.1f} MB, over the 25 MB budget"
    info = json.loads((SHIPPED / "show1_shapes.json").read_text())
    assert {tuple(c) for c in info["held_out"]} == {tuple(c) for c in demo.split().held_out}
    for repo, component in demo.REPOS.values():
        raw = json.loads((SHIPPED / repo / component / "config.json").read_text())
        assert CONVERTED_MARKER in raw  # what tools/convert_torch_weights writes for released weights
    unet = load_component(SHIPPED / "show-1-base" / "unet")  # the same loader as converted released weights
    assert unet.config.temporal_position_embedding == "sinusoidal"
    assert (SHIPPED / "show-1-base" / "scheduler" / "scheduler_config.json").is_file()


def test_the_default_command_makes_the_prompted_video(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["generate", "a red circle moving right", "--output", str(out)]) == 0
    assert "using the shipped Show-1 Shapes model" in capsys.readouterr().out
    video = read_video(out / "prompt00_sr2.mp4").frames
    assert video.shape == (29, 80, 128, 3)
    seen = recognise(
        video, colours=demo.DATASET.colours, shapes=demo.DATASET.shapes, directions=demo.DATASET.directions
    )
    assert (seen.colour, seen.direction) == ("red", "right"), seen
    keyframes = read_video(out / "prompt00_keyframes.mp4").frames
    assert keyframes.shape == (8, 20, 32, 3)


@pytest.mark.parametrize("direction", ["left", "up"])
def test_the_direction_word_steers_the_shipped_keyframes(direction):
    """Same noise (seed), another direction word: the keyframes move the way the word says."""
    import dataclasses

    import jax.numpy as jnp

    from show1_jax.generate_settings import GenerateSettings, Weights
    from show1_jax.pipeline import Show1Pipeline
    from show1_jax.settings import load_settings
    from show1_jax.stages import video_to_uint8

    settings = load_settings(
        GenerateSettings, demo.generate_config(SHIPPED), [*demo.weight_overrides(SHIPPED), "stages=[keyframes]"]
    )
    pipe = Show1Pipeline(Weights(**dataclasses.asdict(settings.weights)), dtype=jnp.float32)
    frames = pipe([f"a blue square moving {direction}"], settings)["keyframes"]
    seen = recognise(
        video_to_uint8(np.asarray(frames))[0],
        colours=demo.DATASET.colours,
        shapes=demo.DATASET.shapes,
        directions=demo.DATASET.directions,
    )
    assert (seen.colour, seen.direction) == ("blue", direction), seen
