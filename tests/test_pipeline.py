"""The cascade end to end on tiny random models: files, resume, errors, and the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from show1_jax import cli
from show1_jax.generate_settings import GenerateSettings, Weights
from show1_jax.pipeline import Show1Pipeline, generate
from show1_jax.settings import SettingsError, load_settings
from show1_jax.tiny import build_tiny_show1
from show1_jax.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
# Smaller than configs/tiny_random.yaml: 8 keyframes of 8x12 -> 29 frames -> 32x48 -> 64x96, 2 steps per stage.
SMALL = [
    "keyframes.height=8",
    "keyframes.width=12",
    "keyframes.steps=2",
    "interpolation.steps=2",
    "first_frame.steps=2",
    "sr1.steps=2",
    "sr1.height=32",
    "sr1.width=48",
    "sr2.steps=3",
    "sr2.height=64",
    "sr2.width=96",
]
PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_show1(tmp_path_factory.mktemp("weights") / "tiny")


def settings_for(tiny, *overrides: str) -> GenerateSettings:
    s = load_settings(GenerateSettings, REPO / "configs" / "tiny_random.yaml", [*SMALL, *overrides])
    weights = Weights(base=str(tiny.base), interpolation=str(tiny.interpolation), sr1=str(tiny.sr1),
                      first_frame=str(tiny.first_frame), sr2=str(tiny.sr2))  # fmt: skip
    return dataclasses.replace(s, weights=weights)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    settings = settings_for(tiny)
    pipe = Show1Pipeline(settings.weights, dtype=jnp.float32, keep_loaded=True)
    out = tmp_path_factory.mktemp("run") / "out"
    return pipe, settings, generate(pipe, [PROMPT], settings, out)


@pytest.mark.slow
def test_full_cascade_writes_videos_of_the_expected_size(full_run):
    _, settings, result = full_run
    sizes = {"keyframes": (8, 8, 12), "interpolation": (29, 8, 12), "sr1": (29, 32, 48), "sr2": (29, 64, 96)}
    for stage, (frames, h, w) in sizes.items():
        assert result.frames[stage].shape == (1, frames, h, w, 3)
        assert np.isfinite(result.frames[stage]).all()
        for ext in ("mp4", "gif"):
            video = read_video(result.output_dir / f"prompt00_{stage}.{ext}")
            assert video.shape == (frames, h, w, 3), (stage, ext)
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["seed"] == settings.seed and run["settings"]["sr2"]["strength"] == settings.sr2.strength
    report = json.loads((result.output_dir / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == list(sizes)
    assert not list(result.output_dir.rglob(".*"))  # no temporary file left behind


@pytest.mark.slow
@pytest.mark.parametrize("restart", ["interpolation", "sr1", "sr2"])
def test_resume_from_each_stage_reproduces_the_final_video(full_run, tmp_path, restart):
    pipe, settings, first = full_run
    out = tmp_path / "out"
    shutil.copytree(first.output_dir, out)
    order = ["keyframes", "interpolation", "sr1", "sr2"]
    for stage in order[order.index(restart) :]:  # as if the run had stopped before `restart`
        (out / "stages" / f"{stage}.npz").unlink()
    again = generate(pipe, [PROMPT], settings, out, resume=True)
    assert again.reused == order[: order.index(restart)]
    np.testing.assert_array_equal(again.frames["sr2"], first.frames["sr2"])


@pytest.mark.slow
def test_resume_reruns_only_stages_whose_settings_changed(full_run, tmp_path):
    pipe, settings, first = full_run
    out = tmp_path / "out"
    shutil.copytree(first.output_dir, out)
    changed = dataclasses.replace(settings, sr2=dataclasses.replace(settings.sr2, strength=0.6))
    again = generate(pipe, [PROMPT], changed, out, resume=True)
    assert again.reused == ["keyframes", "interpolation", "sr1"]
    assert not np.array_equal(again.frames["sr2"], first.frames["sr2"])
    with pytest.raises(ValueError, match="another prompts"):
        generate(pipe, ["a blue square moving up"], changed, out, resume=True)


def test_bad_settings_are_named(tiny):
    with pytest.raises(SettingsError, match="unknown stage"):
        settings_for(tiny, "stages=[keyframes,upscale]")
    with pytest.raises(SettingsError, match="37 frames cannot be covered"):
        settings_for(tiny, "keyframes.num_frames=10")
    with pytest.raises(SettingsError, match="unknown setting.*sr1.stepz"):
        settings_for(tiny, "sr1.stepz=3")
    with pytest.raises(SettingsError, match=r"keyframes.frame_noise_correlation must be in \[0, 1\)"):
        settings_for(tiny, "keyframes.frame_noise_correlation=1.0")
    assert settings_for(tiny, "keyframes.frame_noise_correlation=0.5").keyframes.frame_noise_correlation == 0.5


def test_bad_inputs_fail_before_writing_anything(tiny, tmp_path):
    settings = settings_for(tiny, "stages=[keyframes]")
    pipe = Show1Pipeline(settings.weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match="empty"):
        generate(pipe, ["  "], settings, tmp_path / "a")
    missing = dataclasses.replace(settings, weights=dataclasses.replace(settings.weights, base=str(tmp_path / "x")))
    with pytest.raises(FileNotFoundError, match="weights.base"):
        generate(Show1Pipeline(missing.weights, dtype=jnp.float32), [PROMPT], missing, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "something").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(pipe, [PROMPT], settings, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        generate(pipe, [PROMPT], settings, tmp_path / "d", resume=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_unwritable_output_path_is_reported_on_a_file(tiny, tmp_path):
    """An output path below a regular file cannot be created: clear error, no partial output."""
    settings = settings_for(tiny, "stages=[keyframes]")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="writable"):
        generate(Show1Pipeline(settings.weights, dtype=jnp.float32), [PROMPT], settings, blocker / "out")


def test_generate_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--output", "--config", "--prompts-file", "--negative-prompt", "--seed", "--dtype", "--stages",
                   "--num-keyframes", "--keyframes-steps", "--sr1-guidance", "--sr2-steps", "--base", "--sr2",
                   "--resume", "--cache-dir", "key=value"):  # fmt: skip
        assert option in text, option


def test_command_line_errors_are_one_line(capsys, tmp_path):
    code = cli.main(["generate", "a cat", "--output", str(tmp_path / "o"), "stages=[nope]"])
    assert code == 1 and "unknown stage" in capsys.readouterr().err
