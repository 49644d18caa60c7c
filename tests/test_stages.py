"""The cascade's stage functions (show1_jax/stages.py) against the reference pipelines (golden ``pipelines/*``).

Each golden pipeline case is matched to its stage by the pipeline class in ``pipeline.json``; steps, guidance,
noise level, strength, sizes and component folders all come from that file and the case's inputs.

(a) Stage logic alone: the recorded per-step UNet outputs (``trace.npz``) replace the UNet; float64. Measured on
    public set A, max|ours - ref| / max|ref| over every step's latents (tolerance 1e-6) / the step-0 UNet input
    (tolerance 1e-12):
      t2v_base 5.8e-08 / 0, interp 8.0e-08 / 0, if2_sr 3.5e-07 / 6.0e-17, sr1_cond 8.0e-08 / 5.2e-17,
      v2v_sr2 1.2e-07 / 1.3e-16 (the real float64 VAE encodes the frames). The floor is the scheduler tables'
      1-ulp float32 square roots (tests/test_sampler.py).
(b) The whole stage with our models loaded from the case's component folders, float64, final output (tolerance
    2e-4 of the max reference magnitude; torch's own float32 run is off by up to 1.6e-2, golden README):
      t2v_base 4.3e-06, interp 1.5e-06, if2_sr 5.4e-07, sr1_cond 7.4e-05, v2v_sr2 9.4e-08 (the float32 output;
      6.9e-08 against the float64 decoder output). sr1_cond is the float64 UNet's 6e-8 step-0 difference amplified
      by the first DPM step at t=995 and CFG 7 (golden README, "float32 vs float64").
"""

from __future__ import annotations

import json
from pathlib import Path

import golden
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import load_npz, rel_err, to_jax_layout

from show1_jax import load_component, stages
from show1_jax import schedulers as S
from show1_jax.loading import abstract_model
from show1_jax.sampler import sample
from show1_jax.unet3d import UNetConfig

STEP_TOL = 1e-6  # (a): latents after every step, float64 trace replay
INPUT_TOL = 1e-12  # (a): the step-0 UNet input (float64 rounding of the resize / add_noise / VAE only)
STAGE_TOL = 2e-4  # (b): the whole stage in float64 against the float64 reference


def _cases(class_name: str) -> list:
    """Golden pipeline cases whose class (last dotted component) is exactly ``class_name``.

    ``golden.pipeline_cases`` matches substrings, and "IFSuperResolutionPipeline" is also a substring of
    "TextToVideoIFSuperResolutionPipeline_Cond".
    """
    params = golden.pipeline_cases(class_name)
    keep = []
    for p in params:
        folder = p.values[0]
        if folder is None:
            return params  # the skip marker
        meta = json.loads((folder / "pipeline.json").read_text())
        if meta.get("pipeline_class", meta.get("class", "")).rsplit(".", 1)[-1] == class_name:
            keep.append(p)
    return keep or [pytest.param(None, marks=pytest.mark.skip(reason=f"no pipeline case {class_name}"))]


# The stage of each reference pipeline class.
STAGE_OF_CLASS = {
    "TextToVideoIFPipeline": "keyframes",
    "TextToVideoIFInterpPipeline": "interp",
    "IFSuperResolutionPipeline": "first_frame",
    "TextToVideoIFSuperResolutionPipeline_Cond": "sr1",
    "VideoToVideoSDPipeline": "sr2",
}
STAGE_CASES = [
    pytest.param(kind, *p.values, id=f"{kind}-{p.id}", marks=p.marks)
    for class_name, kind in STAGE_OF_CLASS.items()
    for p in _cases(class_name)
]


# --------------------------------------------------------------------------------------------------------------------
# Running one golden case through its stage
# --------------------------------------------------------------------------------------------------------------------

_STEP0: dict[str, np.ndarray] = {}


def _keep_step0(k, x_in_bits) -> None:
    if int(k) == 0:
        _STEP0["x_in"] = np.ascontiguousarray(np.asarray(x_in_bits)).view(np.float64)[..., 0]


def _replay(trace, x_in, t, cond):
    """A denoiser returning the recorded CFG-batch UNet output of the step whose timestep is t; keeps the step-0
    model input the stage built."""
    del cond
    k = jnp.argmax(trace["step_timesteps"] == t[0])
    # The callback may run on a thread outside enable_x64, where a float64 argument would arrive rounded to
    # float32: pass the bits.
    jax.debug.callback(_keep_step0, k, jax.lax.bitcast_convert_type(x_in.astype(jnp.float64), jnp.uint32))
    return trace["unet_output"][k]


def _trace_params(trace: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
        "step_timesteps": jnp.asarray(trace["step_timesteps"]),
        "unet_output": jnp.asarray(np.stack([to_jax_layout(o) for o in trace["unet_output"]])),
    }


def _arg(meta: dict, name: str):
    """A call argument of the reference run: from ``call_kwargs``, else the recorded ``params``."""
    value = meta["call_kwargs"].get(name, meta.get("params", {}).get(name))
    if value is None:
        raise KeyError(f"pipeline.json records no {name!r} in call_kwargs or params")
    return value


def _run(kind: str, folder: Path, denoise, params, *, return_trajectory: bool):
    """Run the case's stage in float64 with the recorded noise -> (output, trajectory or None), channels-last."""
    meta = json.loads((folder / "pipeline.json").read_text())
    kwargs = meta["call_kwargs"]
    inputs, draws_npz = load_npz(folder / "inputs.npz"), load_npz(folder / "noise.npz")
    draws = [draws_npz[d["name"]] for d in meta["noise"]]  # in the reference's draw order (SPEC §1.7)
    f64 = jnp.float64
    text = stages.cfg_text(
        jnp.asarray(inputs["negative_prompt_embeds"], f64), jnp.asarray(inputs["prompt_embeds"], f64)
    )
    schedule = S.make_schedule(S.load_scheduler_config(folder / "scheduler"), kwargs["num_inference_steps"])
    common = dict(guidance_scale=_arg(meta, "guidance_scale"), return_trajectory=return_trajectory)
    x = lambda a: jnp.asarray(to_jax_layout(a))  # noqa: E731
    if kind in ("first_frame", "sr1"):
        noising = S.load_scheduler_config(folder / "image_noising_scheduler")
        alphas = jnp.asarray(S.noise_tables(noising).alphas_cumprod)
    if kind == "keyframes":
        out = stages.keyframes(denoise, params, schedule, text, noise=x(draws[0]), dtype=f64, **common)
    elif kind == "interp":
        pixel_values = x(inputs["pixel_values"])  # [B, F, H, W, 3]: keyframes at frames 0 and -1
        out = stages.interpolation_window(
            denoise,
            params,
            schedule,
            text,
            pixel_values[:, 0],
            pixel_values[:, -1],
            init_noise=x(inputs["init_noise"]),
            num_frames=kwargs.get("num_frames", pixel_values.shape[1]),
            dtype=f64,
            **common,
        )
    elif kind == "first_frame":
        out = stages.first_frame_sr(
            denoise,
            params,
            schedule,
            alphas,
            text,
            x(inputs["image"]),
            height=kwargs.get("height", draws[0].shape[-2]),  # the initial noise is drawn at the output size
            width=kwargs.get("width", draws[0].shape[-1]),
            noise_level=_arg(meta, "noise_level"),
            init_noise=x(draws[0]),
            cond_noise=x(draws[1]),
            step_noise=jnp.stack([x(d) for d in draws[2:]]),  # only the steps with t > 0 draw
            dtype=f64,
            **common,
        )
    elif kind == "sr1":
        out = stages.sr1_window(
            denoise,
            params,
            schedule,
            alphas,
            text,
            x(inputs["image"]),
            x(inputs["first_frame_cond"])[:, 0],
            noise_level=_arg(meta, "noise_level"),
            init_noise=x(draws[0]),
            cond_noise=x(draws[1]),
            dtype=f64,
            **common,
        )
    else:
        frames = inputs["video_uint8"]  # a list of F frames: batch 1
        frames = frames if frames.ndim == 5 else frames[None]
        batch = frames.shape[0]
        vae = load_component(folder / meta["components"]["vae"], dtype=f64)
        vae_graphdef, vae_params = nnx.split(vae)
        out = stages.video_to_video_sr2(
            denoise,
            params,
            vae_graphdef,
            vae_params,
            schedule,
            text,
            jnp.asarray(frames),
            strength=_arg(meta, "strength"),
            num_inference_steps=kwargs["num_inference_steps"],
            posterior_noise=jnp.asarray(stages.latents_from_torch(draws[0], batch)),
            noise=jnp.asarray(stages.latents_from_torch(draws[1], batch)),
            dtype=f64,
            **common,
        )
    return out if return_trajectory else (out, None)


# --------------------------------------------------------------------------------------------------------------------
# (a) stage logic with the recorded UNet outputs; (b) the whole stage with our models
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("kind,folder", STAGE_CASES)
def test_stage_logic_replaying_the_recorded_unet(kind, folder):
    """(a) Every step's latents within 1e-6 and the exact step-0 UNet input; float64."""
    trace, outputs = load_npz(folder / "trace.npz"), load_npz(folder / "outputs.npz")
    _STEP0.clear()
    with jax.enable_x64(True):
        out, trajectory = _run(kind, folder, _replay, _trace_params(trace), return_trajectory=True)
        jax.block_until_ready(out)
        jax.effects_barrier()
    assert trajectory.dtype == np.float64
    assert len(trajectory) == len(trace["latents_after_step"])
    for k, ref in enumerate(trace["latents_after_step"]):
        assert rel_err(trajectory[k], to_jax_layout(ref)) <= STEP_TOL, f"step {k}"
    assert rel_err(_STEP0["x_in"], to_jax_layout(trace["unet_input_step0"])) <= INPUT_TOL
    if kind != "sr2":  # SR2's output is decoded by the VAE: (b) checks it
        assert rel_err(out, to_jax_layout(outputs["output"])) <= STEP_TOL


@pytest.mark.golden
@pytest.mark.parametrize("kind,folder", STAGE_CASES)
def test_stage_with_our_models_float64(kind, folder):
    """(b) The whole stage, our UNet (and VAE) loaded from the case's component folders, float64, within 2e-4."""
    meta = json.loads((folder / "pipeline.json").read_text())
    ref = to_jax_layout(load_npz(folder / "outputs.npz")["output"])
    with jax.enable_x64(True):
        unet = load_component(folder / meta["components"]["unet"], dtype=jnp.float64)
        graphdef, params = nnx.split(unet)
        out, _ = _run(kind, folder, stages.unet_denoiser(graphdef), params, return_trajectory=False)
        out = np.asarray(out)
    assert out.dtype == (np.float32 if kind == "sr2" else np.float64)  # SR2 decodes to float32 (SPEC §3.6)
    assert rel_err(out, ref) <= STAGE_TOL


# --------------------------------------------------------------------------------------------------------------------
# Window assembly on tiny random UNets
# --------------------------------------------------------------------------------------------------------------------


def _tiny_unet(in_channels: int, noise_level: bool) -> tuple[stages.UNetDenoiser, nnx.State]:
    """A seeded one-level IF-style 3D UNet: 32 channels, resnets with temporal convs, a cross-attention mid block
    with temporal attention, text pooling, optional noise-level embedding (resnet blocks halve the compile time)."""
    config = {
        "_class_name": "UNet3DConditionModel",
        "act_fn": "gelu",
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 4,
        "attention_head_dim": 8,
        "block_out_channels": [32],
        "class_embed_type": "timestep" if noise_level else None,
        "cross_attention_dim": 32,
        "down_block_types": ["ResnetDownsampleBlock3D"],
        "encoder_hid_dim": 16,
        "in_channels": in_channels,
        "layers_per_block": 1,
        "mid_block_type": "UNetMidBlock3DSimpleCrossAttn",
        "norm_num_groups": 16,
        "out_channels": 6,
        "resnet_skip_time_act": True,
        "resnet_time_scale_shift": "scale_shift",
        "time_embedding_act_fn": "gelu",
        "time_embedding_dim": 48,
        "up_block_types": ["ResnetUpsampleBlock3D"],
    }
    graphdef, state = nnx.split(abstract_model("UNet3DConditionModel", UNetConfig.from_dict(config)))
    rng = np.random.default_rng(in_channels)

    def fill(leaf):  # seeded random values (as the golden models: no exact zeros, e.g. in the temporal convs)
        shape = leaf.shape
        if len(shape) >= 2:
            return jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])), leaf.dtype)
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), leaf.dtype)

    return stages.unet_denoiser(graphdef), jax.tree.map(fill, state)


def _pixel_schedule(steps: int) -> S.DPMSolverSchedule:
    config = S.DPMSolverMultistepConfig(
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        lambda_min_clipped=-5.1,
        variance_type="fixed_small",
    )
    return S.dpm_schedule(config, steps)


def _text(rng: np.random.Generator, batch: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal((2 * batch, 5, 16)), jnp.float32)


def test_interpolate_batched_equals_sequential_and_reference_write_back():
    """All windows folded into one batch == windows one by one (lax.scan) == per-window calls written back in the
    reference's order (frames 4i..4i+4, boundaries from the later window, keyframes replaced; SPEC §3.4)."""
    rng = np.random.default_rng(0)
    denoise, params = _tiny_unet(7, noise_level=False)
    batch, k, h, w = 2, 3, 8, 12
    text = _text(rng, batch)
    frames = jnp.asarray(rng.uniform(-1, 1, (batch, k, h, w, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, 5, h, w, 3)), jnp.float32)
    schedule = _pixel_schedule(2)
    run = lambda batched, token=None: stages.interpolate(  # noqa: E731
        denoise, params, schedule, text, frames, guidance_scale=4.0, init_noise=noise, batched=batched,
        progress_token=token,
    )  # fmt: skip
    batched = np.asarray(run(True))
    # The sequential loop takes one progress token per window; the shared bar counts steps * windows.
    seen = []
    with stages.progress_scope(lambda done, total: seen.append((done, total)), len(schedule), windows=k - 1) as tok:
        sequential = np.asarray(run(False, tok))
    assert sorted(seen) == [(i, 2 * (k - 1)) for i in range(1, 2 * (k - 1) + 1)]
    with pytest.raises(ValueError, match=f"windows={k - 1}"):
        run(False, jnp.int32(0))
    assert batched.shape == (batch, 4 * (k - 1) + 1, h, w, 3)

    windows = [
        np.asarray(
            stages.interpolation_window(
                denoise, params, schedule, text, frames[:, i], frames[:, i + 1], guidance_scale=4.0, init_noise=noise
            )
        )
        for i in range(k - 1)
    ]
    reference = np.zeros_like(batched)
    for i, window in enumerate(windows):
        reference[:, 4 * i : 4 * i + 5] = window
    np.testing.assert_allclose(sequential, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched, reference, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(reference[:, 4], windows[1][:, 0])  # the boundary comes from the later window
    assert not np.allclose(windows[0][:, 4], windows[1][:, 0], atol=1e-3)  # ... and the two windows disagree there
    assert not np.allclose(reference[:, 0], np.asarray(frames[:, 0]), atol=1e-3)  # keyframes are replaced


def test_super_resolve_sr1_assembles_windows_and_chains_the_first_frame():
    """29 frames = 4 windows of 8 with stride 7 (SPEC §3.5): the clip function equals a Python loop of sr1_window
    calls in which window i is conditioned on the frame already written at 7i (window 0: the IF-II-L frame) and
    overwrites it."""
    rng = np.random.default_rng(1)
    denoise, params = _tiny_unet(6, noise_level=True)
    batch, n, h, w, hh, ww = 1, 29, 4, 6, 8, 12
    windows = (n - 8) // 7 + 1
    text = _text(rng, batch)
    video = jnp.asarray(rng.uniform(-1, 1, (batch, n, h, w, 3)), jnp.float32)
    first = jnp.asarray(rng.uniform(-1, 1, (batch, hh, ww, 3)), jnp.float32)
    init_noise = jnp.asarray(rng.standard_normal((windows, batch, 8, hh, ww, 3)), jnp.float32)
    cond_noise = jnp.asarray(rng.standard_normal((windows, batch, 8, hh, ww, 3)), jnp.float32)
    alphas = jnp.asarray(S.noise_tables(S.DDPMConfig(beta_schedule="squaredcos_cap_v2")).alphas_cumprod)
    schedule = _pixel_schedule(2)
    kw = dict(guidance_scale=7.0, noise_level=250)
    out = np.asarray(
        stages.super_resolve_sr1(
            denoise, params, schedule, alphas, text, video, first, init_noise=init_noise, cond_noise=cond_noise, **kw
        )
    )
    assert out.shape == (batch, n, hh, ww, 3)

    expected = np.zeros_like(out)
    outputs = []
    for i in range(windows):
        ffc = first if i == 0 else jnp.asarray(expected[:, 7 * i])
        window = stages.sr1_window(
            denoise,
            params,
            schedule,
            alphas,
            text,
            video[:, 7 * i : 7 * i + 8],
            ffc,
            init_noise=init_noise[i],
            cond_noise=cond_noise[i],
            **kw,
        )
        outputs.append(np.asarray(window))
        expected[:, 7 * i : 7 * i + 8] = outputs[-1]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    # The overlap frames come from the later window, and the chaining matters: conditioning window 1 on the
    # IF-II-L frame instead of its chained frame changes it.
    np.testing.assert_array_equal(expected[:, 7], outputs[1][:, 0])
    assert not np.allclose(outputs[0][:, 7], outputs[1][:, 0], atol=1e-3)
    unchained = stages.sr1_window(
        denoise,
        params,
        schedule,
        alphas,
        text,
        video[:, 7:15],
        first,
        init_noise=init_noise[1],
        cond_noise=cond_noise[1],
        **kw,
    )
    assert not np.allclose(np.asarray(unchained), outputs[1], atol=1e-3)


def test_super_resolve_sr1_rejects_frame_counts_the_windows_cannot_cover():
    denoise, params = _tiny_unet(6, noise_level=True)
    text = jnp.zeros((2, 5, 16))
    first = jnp.zeros((1, 8, 12, 3))
    for n in (7, 30, 37):
        with pytest.raises(ValueError, match=r"cannot cover .* valid frame counts are .*\b29\b"):
            stages.super_resolve_sr1(
                denoise,
                params,
                _pixel_schedule(2),
                jnp.zeros(1000),
                text,
                jnp.zeros((1, n, 4, 6, 3)),
                first,
                guidance_scale=7.0,
                noise_level=250,
                key=jax.random.key(0),
            )
    assert stages.sr1_frame_counts()[:4] == [8, 15, 22, 29]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def test_resize_bilinear_align_corners_matches_the_definition():
    """torch's bilinear with align_corners=True: corners map to corners, src = i * (in - 1) / (out - 1)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 6, 3))
    with jax.enable_x64(True):
        out = np.asarray(stages.resize_bilinear(jnp.asarray(x), (7, 16)))
    expected = np.zeros((2, 7, 16, 3))
    for i in range(7):
        for j in range(16):
            sy, sx = i * 3 / 6, j * 5 / 15
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 3), min(x0 + 1, 5)
            ly, lx = sy - y0, sx - x0
            expected[:, i, j] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
                (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
            )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]])


def test_video_to_uint8_truncates_and_clamps():
    video = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, 0.5])
    # x*0.5 + 0.5 then *255 truncated: 0.0 -> 127 (127.5 truncated), 0.5 -> 191 (191.25)
    np.testing.assert_array_equal(stages.video_to_uint8(video), [0, 0, 127, 254, 255, 255, 191])


def test_resize_frames_bicubic_is_pil_default_resize():
    from PIL import Image

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 3, 10, 16, 3), dtype=np.uint8)
    out = stages.resize_frames_bicubic(frames, (20, 36))
    assert out.shape == (2, 3, 20, 36, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1, 2], np.asarray(Image.fromarray(frames[1, 2]).resize((36, 20))))
    np.testing.assert_array_equal(
        out[0, 0], np.asarray(Image.fromarray(frames[0, 0]).resize((36, 20), Image.Resampling.BICUBIC))
    )


def test_latents_from_torch_layout():
    b, f = 2, 3
    torch_noise = np.arange(b * f * 4 * 2 * 5, dtype=np.float64).reshape(b * f, 4, 2, 5)
    ours = stages.latents_from_torch(torch_noise, b)
    assert ours.shape == (b, f, 2, 5, 4)
    np.testing.assert_array_equal(ours[1, 2], np.transpose(torch_noise[1 * f + 2], (1, 2, 0)))  # row = b*F + f


def test_interpolation_cond_is_a_linear_blend_with_end_mask():
    a, b = jnp.full((1, 2, 2, 3), -1.0), jnp.full((1, 2, 2, 3), 1.0)
    cond = np.asarray(stages.interpolation_cond(a, b, 5))
    np.testing.assert_allclose(cond[0, :, 0, 0, 0], [-1.0, -0.5, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(cond[0, :, 0, 0, 3], [1, 0, 0, 0, 1])


def test_keyframes_key_draws_dropout_and_progress():
    """With a key instead of recorded noise: deterministic per key; the progress bar advances once per step.
    SPEC §1.6: eval mode by default; ``dropout_key`` switches on the reference's train-mode temporal-conv dropout,
    deterministic per key and different from eval mode."""
    rng = np.random.default_rng(4)
    denoise, params = _tiny_unet(3, noise_level=False)
    text = _text(rng, 1)
    schedule = _pixel_schedule(3)
    seen = []

    def run(key, dropout_key=None):
        with stages.progress_scope(lambda done, total: seen.append((done, total)), len(schedule)) as token:
            return np.asarray(
                stages.keyframes(
                    denoise,
                    params,
                    schedule,
                    text,
                    guidance_scale=9.0,
                    key=jax.random.key(key),
                    shape=(2, 8, 12),
                    dropout_key=None if dropout_key is None else jax.random.key(dropout_key),
                    progress_token=token,
                )
            )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 2, 8, 12, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-4)
    assert seen == [(1, 3), (2, 3), (3, 3)] * 3
    d, e, f = run(0, dropout_key=0), run(0, dropout_key=0), run(0, dropout_key=1)
    np.testing.assert_array_equal(d, e)
    assert not np.allclose(d, a, atol=1e-4)
    assert not np.allclose(d, f, atol=1e-4)
    with pytest.raises(ValueError, match="shape="):
        stages.keyframes(denoise, params, schedule, text, guidance_scale=9.0, key=jax.random.key(0))


def test_keyframes_frame_noise_correlation_draws_the_mixed_prior():
    """frame_noise_correlation > 0 starts from schedulers.frame_correlated_noise drawn from the key (the frames share
    part of it; 0, the reference's independent draw, is checked in test_schedulers); with given noise it is refused."""
    rng = np.random.default_rng(5)
    denoise, params = _tiny_unet(3, noise_level=False)
    text = _text(rng, 2)
    schedule = _pixel_schedule(3)
    key, shape = jax.random.key(3), (2, 4, 8, 12, 3)
    mixed = stages.keyframes(
        denoise, params, schedule, text, guidance_scale=9.0, key=key, shape=shape[1:4], frame_noise_correlation=0.6
    )

    def given(noise):
        return np.asarray(stages.keyframes(denoise, params, schedule, text, guidance_scale=9.0, noise=noise))

    np.testing.assert_allclose(
        np.asarray(mixed), given(S.frame_correlated_noise(key, shape, jnp.float32, 0.6)), rtol=0, atol=1e-3
    )
    assert np.abs(np.asarray(mixed) - given(jax.random.normal(key, shape))).max() > 0.1
    with pytest.raises(ValueError, match="a given noise is used as it is"):
        stages.keyframes(
            denoise, params, schedule, text, guidance_scale=9.0, noise=jnp.zeros(shape), frame_noise_correlation=0.5
        )


def test_guidance_none_is_the_conditional_prediction_alone():
    """guidance_scale=None runs one UNet pass per step on the prompts' embeddings [B, L, D]: the same frames as CFG at
    scale 1 (eps_u + 1 * (eps_c - eps_u) = eps_c, the variance from the conditional half), for the batched
    interpolation windows and the SR1 windows with their noise-level labels; a CFG batch without guidance is refused."""
    rng = np.random.default_rng(2)
    schedule = _pixel_schedule(2)
    batch, h, w = 2, 6, 8
    text = _text(rng, batch)
    positive = text[batch:]

    denoise, params = _tiny_unet(7, noise_level=False)
    frames = jnp.asarray(rng.uniform(-1, 1, (batch, 3, h, w, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, 5, h, w, 3)), jnp.float32)
    interp = lambda t, g: np.asarray(  # noqa: E731
        stages.interpolate(denoise, params, schedule, t, frames, guidance_scale=g, init_noise=noise)
    )
    unguided = interp(positive, None)
    np.testing.assert_allclose(unguided, interp(text, 1.0), rtol=0, atol=1e-5)
    assert not np.allclose(unguided, interp(text, 4.0), atol=1e-3)
    with pytest.raises(ValueError, match=r"without guidance text must be the prompts' embeddings \[B, L, D\]"):
        interp(text, None)

    denoise, params = _tiny_unet(6, noise_level=True)
    video = jnp.asarray(rng.uniform(-1, 1, (batch, 8, 4, 6, 3)), jnp.float32)
    first = jnp.asarray(rng.uniform(-1, 1, (batch, h, w, 3)), jnp.float32)
    init_noise = jnp.asarray(rng.standard_normal((1, batch, 8, h, w, 3)), jnp.float32)
    cond_noise = jnp.asarray(rng.standard_normal((1, batch, 8, h, w, 3)), jnp.float32)
    alphas = jnp.asarray(S.noise_tables(S.DDPMConfig(beta_schedule="squaredcos_cap_v2")).alphas_cumprod)
    sr1 = lambda t, g: np.asarray(  # noqa: E731
        stages.super_resolve_sr1(denoise, params, schedule, alphas, t, video, first, guidance_scale=g,
                                 noise_level=250, init_noise=init_noise, cond_noise=cond_noise)
    )  # fmt: skip
    np.testing.assert_allclose(sr1(positive, None), sr1(text, 1.0), rtol=0, atol=1e-5)


def test_strength_starts_the_conditioned_stages_part_way_from_their_conditioning():
    """strength < 1 (SDEdit): the schedule's img2img tail from the conditioning frames noised to its first timestep,
    so the loop never sees the highest noise levels; strength 1 is the reference (pure noise, every step)."""
    rng = np.random.default_rng(3)
    schedule = _pixel_schedule(8)
    batch, h, w = 1, 6, 8
    text = _text(rng, batch)
    noise = jnp.asarray(rng.standard_normal((batch, 5, h, w, 3)), jnp.float32)
    start = jnp.asarray(rng.uniform(-1, 1, (batch, 5, h, w, 3)), jnp.float32)

    same, x = stages.from_strength(schedule, 1.0, noise, start)
    assert same is schedule
    np.testing.assert_array_equal(np.asarray(x), np.asarray(noise * schedule.init_noise_sigma))
    tail, x = stages.from_strength(schedule, 0.5, noise, start)
    assert len(tail) == 4
    np.testing.assert_array_equal(np.asarray(tail.timesteps), np.asarray(schedule.timesteps)[4:])
    t0 = int(np.asarray(tail.timesteps)[0])
    abar = float(S.noise_tables(tail.config).alphas_cumprod[t0])
    np.testing.assert_allclose(np.asarray(x), np.sqrt(abar) * start + np.sqrt(1 - abar) * noise, rtol=1e-6, atol=1e-6)

    # interpolation: the start is the keyframe blend; the window then runs the tail's 4 steps, not 8
    denoise, params = _tiny_unet(7, noise_level=False)
    frames = jnp.asarray(rng.uniform(-1, 1, (batch, 2, h, w, 3)), jnp.float32)
    blend = stages.interpolation_cond(frames[:, 0], frames[:, 1], 5)
    expected = sample(
        denoise, params, tail, stages.from_strength(schedule, 0.5, noise, blend[..., :3])[1],
        {"text": text, "channels": blend}, guidance_scale=4.0, model_input_fn=stages._with_channels,
    )  # fmt: skip
    seen = []
    with stages.progress_scope(lambda done, total: seen.append(done), len(tail)) as token:
        got = stages.interpolation_window(
            denoise, params, schedule, text, frames[:, 0], frames[:, 1], guidance_scale=4.0, init_noise=noise,
            strength=0.5, progress_token=token,
        )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
    assert sorted(seen) == [1, 2, 3, 4]
    full = stages.interpolation_window(denoise, params, schedule, text, frames[:, 0], frames[:, 1],
                                       guidance_scale=4.0, init_noise=noise)  # fmt: skip
    assert not np.allclose(np.asarray(full), np.asarray(got), atol=1e-3)
