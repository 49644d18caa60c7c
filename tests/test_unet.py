"""The Show-1 UNets against the original PyTorch code (golden cases), the full-size manifests, and loader errors.

Measured on the public cases (max|ours - reference| / max|reference|, reference = the float64 PyTorch run):
  float32: unet_base 1.09e-6, unet_interp 1.07e-6, unet_sr1 2.70e-6, unet_sr2 1.18e-6, unet_if2 8.27e-7
  float64: unet_base 2.80e-8, unet_interp 2.21e-8, unet_sr1 6.20e-8, unet_sr2 3.57e-9, unet_if2 4.69e-9
  bfloat16: unet_base 2.3e-2, unet_sr1 1.07e-1, unet_sr2 2.2e-2, unet_if2 1.7e-2 (random weights, no tuning)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import golden
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from show1_jax import functional, load_component
from show1_jax.configs import ConfigError
from show1_jax.keymap import CheckpointMappingError
from show1_jax.loading import param_count, plan_load

UNET_KINDS = ("showone_unet3d", "diffusers_unet2d")
TOLERANCE = {"float32": 1e-5, "float64": 1e-6}


def run_case(folder: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ours, reference) for one UNet case, channels-last, every batch element."""
    model = load_component(folder, dtype=dtype)
    inputs = golden.load_npz(folder / "inputs.npz")
    ref = golden.load_npz(folder / "outputs.npz")["sample"]
    kwargs = {}
    if "class_labels" in inputs:
        kwargs["class_labels"] = jnp.asarray(inputs["class_labels"])
    out = model(
        jnp.asarray(golden.to_jax_layout(inputs["sample"]), dtype),
        jnp.asarray(inputs["timestep"]),
        jnp.asarray(inputs["encoder_hidden_states"], dtype),
        **kwargs,
    )
    return np.asarray(out.astype(jnp.float32 if dtype == jnp.bfloat16 else dtype)), golden.to_jax_layout(ref)


@pytest.mark.golden
@pytest.mark.parametrize("case", golden.model_cases(*UNET_KINDS))
def test_parity_float32(case):
    ours, ref = run_case(case, jnp.float32)
    assert golden.rel_err(ours, ref) <= TOLERANCE["float32"]


@pytest.mark.golden
@pytest.mark.parametrize("case", golden.model_cases(*UNET_KINDS))
def test_parity_float64(case):
    with jax.enable_x64(True):
        ours, ref = run_case(case, jnp.float64)
    assert ours.dtype == np.float64
    assert golden.rel_err(ours, ref) <= TOLERANCE["float64"]


@pytest.mark.golden
@pytest.mark.parametrize("case", golden.model_cases(*UNET_KINDS)[:1])
def test_bfloat16_is_close_and_finite(case):
    ours, ref = run_case(case, jnp.bfloat16)
    assert np.isfinite(ours).all()
    assert golden.rel_err(ours, ref) <= 0.15  # measured 1.7e-2 .. 1.07e-1 on the public cases


# --- full-size manifests: key names and shapes of the released checkpoints ---------------------------------------


def read_manifest(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
    return rows


def unet_manifests() -> list:
    folder = golden.GOLDEN / "manifests"
    params = []
    for cfg in sorted(folder.glob("*.config.json")):
        raw = json.loads(cfg.read_text())
        if raw.get("_class_name") in ("UNet3DConditionModel", "UNet2DConditionModel"):
            params.append(pytest.param(cfg, id=cfg.name.removesuffix(".config.json")))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no UNet manifest"))]


@pytest.mark.golden
@pytest.mark.parametrize("config_path", unet_manifests())
def test_full_size_manifest_maps_every_key(config_path):
    """Every manifest's config status (summary.json) is in the assertion message: most full-size configs other than
    show-1-base are inferred (sr1 partly, interp, sr2, IF-II-L), see the golden README."""
    name = config_path.name.removesuffix(".config.json")
    keys = read_manifest(config_path.with_name(f"{name}_keys.tsv"))
    summary = json.loads((config_path.parent / "summary.json").read_text())[name]
    lp = plan_load(json.loads(config_path.read_text()), keys)
    assert lp.report.ok, (summary["config_status"], lp.report)
    assert len(lp.plan) == len(keys) == summary["n_tensors_in_state_dict"]  # every key used, every param filled
    assert param_count(lp.model) == summary["n_params_unique"], summary["config_status"]


@pytest.mark.golden
def test_full_size_totals_match_spec():
    """SPEC.md §8: base 1,726.85M, interpolation 1,726.86M, SR1 796.34M, SR2 1,411.23M, IF-II-L 1,243.3M."""
    folder = golden.GOLDEN / "manifests"
    expected = {
        "base": 1726.85,
        "interp": 1726.86,
        "sr1": 796.34,
        "sr2_zeroscope_like": 1411.23,
        "if_ii_l_unet": 1243.3,
    }
    for name, millions in expected.items():
        if not (folder / f"{name}.config.json").exists():
            pytest.skip(f"manifest {name} not in {folder}")
        lp = plan_load(
            json.loads((folder / f"{name}.config.json").read_text()), read_manifest(folder / f"{name}_keys.tsv")
        )
        assert round(param_count(lp.model) / 1e6, 2 if name != "if_ii_l_unet" else 1) == millions, name


@pytest.mark.golden
def test_sr1_alternative_time_embedding_manifest():
    """The sr1 manifest built with time_embedding_dim=null (SPEC.md §12.1) maps too, with that config."""
    folder = golden.GOLDEN / "manifests"
    alt = folder / "sr1_alt_time_embedding_dim_None_keys.tsv"
    if not alt.exists():
        pytest.skip("no alternative sr1 manifest")
    raw = json.loads((folder / "sr1.config.json").read_text())
    assert plan_load(raw, read_manifest(alt)).report.ok is False  # the 768 config does not fit these weights
    raw["time_embedding_dim"] = None
    lp = plan_load(raw, read_manifest(alt))
    assert lp.report.ok and round(param_count(lp.model) / 1e6, 1) == 783.4


# --- loader errors --------------------------------------------------------------------------------------------------


@pytest.fixture
def unet_folder(tmp_path) -> Path:
    """A writable copy of the smallest golden UNet case folder."""
    cases = [p.values[0] for p in golden.model_cases("showone_unet3d") if p.values[0] is not None]
    if not cases:
        pytest.skip("no showone_unet3d golden case")
    src = min(cases, key=lambda c: (c / "diffusion_pytorch_model.safetensors").stat().st_size)
    dst = tmp_path / "unet"
    dst.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def rewrite(folder: Path, edit) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = dict(load_file(path))
    edit(sd)
    save_file(sd, path)


def test_missing_key_is_named(unet_folder):
    rewrite(unet_folder, lambda sd: sd.pop("conv_out.bias"))
    with pytest.raises(CheckpointMappingError, match=r"does not fill \(1\):\n  conv_out\.bias"):
        load_component(unet_folder)


def test_extra_keys_are_named(unet_folder):
    extra = {"conv_out.extra": np.zeros(3, "f4"), "down_blocks.9.resnets.0.conv1.bias": np.zeros(3, "f4")}
    rewrite(unet_folder, lambda sd: sd.update(extra))
    with pytest.raises(CheckpointMappingError) as err:
        load_component(unet_folder)
    assert all(k in str(err.value) for k in extra)
    assert err.value.report.unmapped == ["conv_out.extra"]  # no rule knows this name
    assert err.value.report.no_target == [("down_blocks.9.resnets.0.conv1.bias", "down_blocks.9.resnets.0.conv1.bias")]


def test_wrong_shape_is_named(unet_folder):
    def edit(sd):
        sd["conv_in.weight"] = np.zeros(sd["conv_in.weight"].shape[:1] + (2,) + sd["conv_in.weight"].shape[2:], "f4")

    rewrite(unet_folder, edit)
    with pytest.raises(CheckpointMappingError) as err:
        load_component(unet_folder)
    message = str(err.value)
    assert "checkpoint key `conv_in.weight` has shape" in message and "in_channels" in message


def test_truncated_safetensors_is_reported(unet_folder):
    from show1_jax.checkpoint_io import CheckpointError

    path = unet_folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_component(unet_folder)


def test_unknown_class_is_reported(unet_folder):
    cfg = json.loads((unet_folder / "config.json").read_text())
    cfg["_class_name"] = "UNetSpatioTemporalConditionModel"
    (unet_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="UNetSpatioTemporalConditionModel.*known classes"):
        load_component(unet_folder)


def test_unsupported_setting_is_refused(unet_folder):
    cfg = json.loads((unet_folder / "config.json").read_text())
    cfg["dual_cross_attention"] = True
    (unet_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="dual_cross_attention"):
        load_component(unet_folder)


def test_channels_first_input_is_refused(unet_folder):
    model = load_component(unet_folder)
    cfg = model.config
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((1, cfg.in_channels, 2, 8, 8)), 10, jnp.zeros((1, 3, cfg.encoder_hid_dim)))


# --- the forward as a pure function ------------------------------------------------------------------------------


def test_forward_is_pure_jittable_and_compiles_once_per_shape(unet_folder):
    model = load_component(unet_folder)
    cfg = model.config
    graphdef, params = functional.split(model)
    fwd = jax.jit(functional.pure(graphdef))
    rng = np.random.default_rng(0)

    def inputs(frames):
        x = jnp.asarray(rng.normal(size=(1, frames, 8, 8, cfg.in_channels)), jnp.float32)
        ctx = jnp.asarray(rng.normal(size=(1, 5, cfg.encoder_hid_dim)), jnp.float32)
        return x, ctx

    labels = (lambda v: {"class_labels": jnp.array([v])}) if cfg.class_embed_type else (lambda v: {})
    x, ctx = inputs(2)
    a = fwd(params, x, jnp.array([500]), ctx, **labels(20))
    b = fwd(params, x, jnp.array([500]), ctx, **labels(20))
    c = fwd(params, x * 0.5, jnp.array([10]), ctx, **labels(250))
    assert fwd._cache_size() == 1  # new values, same shapes: no recompilation
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic
    assert not np.allclose(np.asarray(a), np.asarray(c))
    fwd(params, inputs(3)[0], jnp.array([500]), ctx, **labels(20))
    assert fwd._cache_size() == 2  # a new frame count compiles once more
    eager = model(x, jnp.array([500]), ctx, **labels(20))
    np.testing.assert_allclose(np.asarray(a), np.asarray(eager), rtol=1e-5, atol=1e-5)


# --- the key table checked key by key, in both directions --------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("case", golden.model_cases(*UNET_KINDS))
def test_export_reproduces_the_checkpoint_bitwise(case):
    """load -> export gives back every tensor of the file, bit for bit, under its own name.

    This also covers the parameters the golden outputs cannot see (golden README, "Parameters the fixtures cannot
    exercise": temporal-conv biases before a per-channel GroupNorm, attention-pooling key biases).
    """
    from show1_jax import unet3d_params
    from show1_jax.keymap import export_state_dict
    from show1_jax.loading import flat_params

    model = load_component(case)
    ours = export_state_dict(
        {k: np.asarray(v) for k, v in flat_params(model).items()}, unet3d_params.export_table(model.config)
    )
    ref = load_file(case / "diffusion_pytorch_model.safetensors")
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape and np.array_equal(ours[key], value), key


# --- the SR2 traps of SPEC.md §6.3: a config that contradicts the checkpoint fails loudly -------------------------


@pytest.fixture
def sr2_folder(tmp_path) -> Path:
    """A writable copy of a golden latent (ModelScope-style) UNet case with transformer_in and Linear projections."""
    cases = [p.values[0] for p in golden.model_cases("showone_unet3d") if p.values[0] is not None]
    cases = [c for c in cases if json.loads((c / "config.json").read_text()).get("transfromer_in_opt")]
    cases = [c for c in cases if json.loads((c / "config.json").read_text()).get("use_linear_projection")]
    if not cases:
        pytest.skip("no golden UNet case with transformer_in and linear projections")
    dst = tmp_path / "sr2"
    dst.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(cases[0] / name, dst / name)
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_projection_rank_contradicting_the_config_is_refused(sr2_folder):
    edit_config(sr2_folder, use_linear_projection=False)
    with pytest.raises(CheckpointMappingError, match="is a Linear weight .* use_linear_projection=false"):
        load_component(sr2_folder)


def test_conv_projections_load_when_the_config_says_so(sr2_folder):
    """The same weights stored as 1x1 convs (the showone default) load with use_linear_projection=false."""

    def to_conv(sd):
        projections = ("proj_in.weight", "proj_out.weight")
        for key in [k for k in sd if "attentions" in k and "temp_" not in k and k.endswith(projections)]:
            sd[key] = np.ascontiguousarray(sd[key][:, :, None, None])

    ref = load_component(sr2_folder)
    rewrite(sr2_folder, to_conv)
    with pytest.raises(CheckpointMappingError, match="is a 1x1 conv weight"):
        load_component(sr2_folder)
    edit_config(sr2_folder, use_linear_projection=False)
    from show1_jax.loading import flat_params

    got, want = flat_params(load_component(sr2_folder)), flat_params(ref)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)


def test_transformer_in_weights_with_the_option_off_are_refused(sr2_folder):
    edit_config(sr2_folder, transfromer_in_opt=False)
    with pytest.raises(CheckpointMappingError, match="transformer_in.*transfromer_in_opt=false"):
        load_component(sr2_folder)


# --- the non-reference temporal position embedding (Show-1 Shapes' keyframe model) --------------------------------


def test_frame_position_embedding_values():
    from show1_jax.layers import frame_position_embedding

    table = np.asarray(frame_position_embedding(8, 7))
    assert table.shape == (8, 7)
    np.testing.assert_allclose(table[0], [0, 0, 0, 1, 1, 1, 0])  # sin 0 | cos 0 | odd dim's zero column
    np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)
    assert len({tuple(np.round(r, 5)) for r in table}) == 8  # every frame its own code


def test_temporal_position_embedding_gives_the_frames_an_order():
    from flax import nnx

    from show1_jax.layers import TransformerTemporalModel

    x = jnp.tile(jax.random.normal(jax.random.key(0), (2, 1, 3, 3, 16)), (1, 5, 1, 1, 1)).reshape(10, 3, 3, 16)
    outs = {}
    for pe in (None, "sinusoidal"):
        layer = TransformerTemporalModel(16, 2, 8, groups=4, position_embedding=pe, dtype=jnp.float32, rngs=nnx.Rngs(0))
        outs[pe] = np.asarray(layer(x, num_frames=5)).reshape(2, 5, 3, 3, 16)
    # the same clip in every frame: without a position code every frame comes out the same, with it they differ
    assert np.abs(outs[None] - outs[None][:, :1]).max() < 1e-5
    assert np.abs(outs["sinusoidal"] - outs["sinusoidal"][:, :1]).max() > 1e-2
    with pytest.raises(ValueError, match="position_embedding"):
        TransformerTemporalModel(16, 2, 8, groups=4, position_embedding="rope", dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_temporal_position_embedding_loads_released_weights(unet_folder):
    folder = unet_folder
    plain = load_component(folder)
    assert plain.config.temporal_position_embedding is None  # released configs do not have the key
    cfg = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(0)
    c = plain.config
    args = (
        jnp.asarray(rng.normal(size=(1, 4, 8, 8, c.in_channels)), jnp.float32),
        jnp.array([500]),
        jnp.asarray(rng.normal(size=(1, 5, c.encoder_hid_dim)), jnp.float32),
    )
    kwargs = {"class_labels": jnp.array([20])} if c.class_embed_type else {}
    (folder / "config.json").write_text(json.dumps({**cfg, "temporal_position_embedding": "sinusoidal"}))
    with_pe = load_component(folder)  # same keys and shapes: the embedding has no parameters
    assert with_pe.config.temporal_position_embedding == "sinusoidal"
    assert np.abs(np.asarray(with_pe(*args, **kwargs)) - np.asarray(plain(*args, **kwargs))).max() > 1e-4
    (folder / "config.json").write_text(json.dumps({**cfg, "temporal_position_embedding": "learned"}))
    with pytest.raises((ConfigError, ValueError), match="temporal_position_embedding"):
        load_component(folder)
