"""Writing components in the released format and converting released folders into ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from show1_jax import functional, load_component
from show1_jax.convert import convert
from show1_jax.keymap import CheckpointMappingError
from show1_jax.loading import flat_params, save_converted, save_released
from show1_jax.tiny import TINY_BASE, random_model
from show1_jax.unet3d import UNet3DConditionModel

REPO = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0) -> UNet3DConditionModel:
    # Random non-zero values everywhere (zero biases would hide a bias that is dropped).
    return random_model(UNet3DConditionModel, TINY_BASE, seed=seed, perturb=0.1)


def forward(model):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 8, 8, 3)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, TINY_BASE.encoder_hid_dim)), jnp.float32)
    graphdef, params = functional.split(model)
    return np.asarray(jax.jit(functional.pure(graphdef))(params, x, jnp.array([321]), ctx))


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_released_format_round_trip(tmp_path):
    model = tiny_unet()
    folder = save_released(model, tmp_path / "unet")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
    assert_same_params(model, load_component(folder))


def test_converted_format_round_trip_and_dtype(tmp_path):
    model = tiny_unet()
    save_converted(model, tmp_path / "conv")
    back = load_component(tmp_path / "conv")
    assert_same_params(model, back)
    np.testing.assert_array_equal(forward(model), forward(back))
    half = load_component(tmp_path / "conv", dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(half).values())


def test_converted_folders_save_and_load_by_relative_path(tmp_path, monkeypatch):
    model = tiny_unet()
    monkeypatch.chdir(tmp_path)
    assert save_converted(model, Path("rel") / "conv") == (tmp_path / "rel" / "conv").resolve()
    assert_same_params(model, load_component(Path("rel") / "conv"))
    assert_same_params(model, load_component("rel/conv"))


def test_config_overrides_change_a_parameter_free_field_and_refuse_unknown_names(tmp_path):
    model = tiny_unet()
    save_converted(model, tmp_path / "conv")
    coded = load_component(tmp_path / "conv", config_overrides={"temporal_position_embedding": "sinusoidal"})
    assert coded.config.temporal_position_embedding == "sinusoidal" and model.config.temporal_position_embedding is None
    assert_same_params(model, coded)  # the frame code has no parameters: every weight loads as it was
    assert np.abs(forward(coded) - forward(model)).max() > 1e-3  # and the code reaches the output
    with pytest.raises(ValueError, match=r"config_overrides \['temporal_position_embeding'\] are not fields"):
        load_component(tmp_path / "conv", config_overrides={"temporal_position_embeding": "sinusoidal"})
    with pytest.raises(CheckpointMappingError, match="(?s)does not match UNet3DConditionModel.*conv_shortcut"):
        load_component(tmp_path / "conv", config_overrides={"block_out_channels": [64, 64]})


def test_convert_pipeline_folder(tmp_path):
    """A pipeline folder (model_index.json) converts component by component; other folders are copied."""
    src = tmp_path / "show-1-tiny"
    save_released(tiny_unet(), src / "unet")
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DPMSolverMultistepScheduler"}')
    (src / "model_index.json").write_text('{"unet": ["showone.models", "UNet3DConditionModel"]}')
    logs = []
    out = convert(src, tmp_path / "converted", log=logs.append)
    assert (out / "unet" / "params").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "model_index.json").is_file() and len(logs) == 2
    assert_same_params(load_component(src / "unet"), load_component(out / "unet"))


def test_convert_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path):
    src = save_released(tiny_unet(), tmp_path / "unet")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        convert(src, tmp_path / "exists")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{}")
    (bad / "unet").mkdir()
    (bad / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel", "in_channels": 3}))
    from show1_jax.checkpoint_io import CheckpointError

    with pytest.raises(CheckpointError, match="no weight"):  # the unet folder has a config but no weights
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_convert_command_line(tmp_path):
    src = save_released(tiny_unet(), tmp_path / "unet")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [sys.executable, "-m", "tools.convert_torch_weights", str(src), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "converted" in ok.stdout and (tmp_path / "out" / "params").is_dir()
    again = subprocess.run(
        [sys.executable, "-m", "tools.convert_torch_weights", str(src), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 1 and "exists" in again.stderr
