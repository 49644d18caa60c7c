"""The compiled sampler: trace replay of the golden pipelines, CFG, recompilation, progress, Python-loop parity.

Trace replay (golden ``pipelines/*``: the recorded UNet output of every step fed back as the denoiser's output,
float64, max|ours - ref| / max|ref| over every step's latents), measured on public set A:
t2v_base 5.8e-08, interp 8.0e-08, sr1_cond 8.0e-08, if2_sr (DDPM learned_range + recorded noise) 3.5e-07,
v2v_sr2 (img2img tail) 1.2e-07. The floor is the reference's 1-ulp-off float32 square roots in its scheduler
tables (see tests/test_schedulers.py); tolerance 1e-6.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import load_npz, pipeline_cases, rel_err, to_jax_layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from show1_jax import schedulers as S
from show1_jax.sampler import Sampler, apply_guidance, concat_cond_channels, sample

# --------------------------------------------------------------------------------------------------------------------
# Golden trace replay
# --------------------------------------------------------------------------------------------------------------------


def _replay(params, x_in, t, cond):
    """A denoiser that returns the recorded CFG-batch output of the step whose timestep is t."""
    del x_in, cond
    k = jnp.argmax(params["step_timesteps"] == t[0])
    return params["unet_output"][k]


@pytest.mark.golden
@pytest.mark.parametrize("folder", pipeline_cases())
def test_pipeline_trace_replay(folder):
    """Every golden pipeline's denoising loop, replayed from ``trace.npz`` (+ ``noise.npz`` for DDPM steps).

    The starting sample and the constant conditioning channels are read from the recorded step-0 UNet input
    ([x; x] for CFG, then the stage's extra channels), so the test needs no stage logic; it checks CFG on the eps
    channels, the learned-variance handling, per-frame thresholding, the img2img tail and DDPM's noise.
    """
    meta = json.loads((folder / "pipeline.json").read_text())
    trace, outputs, draws = (load_npz(folder / f) for f in ("trace.npz", "outputs.npz", "noise.npz"))
    kwargs = meta["call_kwargs"]
    config = S.load_scheduler_config(folder / "scheduler")
    schedule = S.make_schedule(config, kwargs["num_inference_steps"])
    np.testing.assert_array_equal(schedule.timesteps, trace["scheduler_timesteps"])
    if "strength" in kwargs:
        schedule = schedule.skip(S.img2img_t_start(kwargs["num_inference_steps"], kwargs["strength"]))
    np.testing.assert_array_equal(schedule.timesteps, trace["step_timesteps"])

    unet_input = to_jax_layout(trace["unet_input_step0"])  # [2B, ..., C + extra]
    channels = trace["latents_after_step"].shape[2]  # reference layout [S, B, C, ...]
    batch = unet_input.shape[0] // 2
    x_init, extra = unet_input[:batch, ..., :channels], unet_input[:batch, ..., channels:]
    has_extra = extra.shape[-1] > 0
    noise = None
    if schedule.needs_noise:
        step_draws = [to_jax_layout(draws[d["name"]]) for d in meta["noise"] if "scheduling_" in d["site"]]
        it = iter(step_draws)
        noise = np.stack([next(it) if t > 0 else np.zeros_like(x_init) for t in schedule.timesteps])

    with jax.enable_x64(True):
        params = {
            "step_timesteps": jnp.asarray(trace["step_timesteps"]),
            "unet_output": jnp.asarray(np.stack([to_jax_layout(o) for o in trace["unet_output"]])),
        }
        sampler = Sampler(_replay, model_input_fn=concat_cond_channels if has_extra else None, return_trajectory=True)
        x, trajectory = sampler(
            params,
            schedule,
            jnp.asarray(x_init),
            jnp.asarray(extra) if has_extra else None,
            guidance_scale=kwargs["guidance_scale"],
            noise=None if noise is None else jnp.asarray(noise),
        )
        # The model input the sampler builds at step 0 is the one the reference fed its UNet.
        x_cfg = jnp.concatenate([jnp.asarray(x_init)] * 2)
        built = concat_cond_channels(x_cfg, jnp.asarray(extra)) if has_extra else x_cfg
        np.testing.assert_array_equal(built, unet_input)
    assert x.dtype == jnp.float64
    assert rel_err(x, to_jax_layout(outputs["final_latents"])) <= 1e-6
    for k in range(len(schedule)):
        assert rel_err(trajectory[k], to_jax_layout(trace["latents_after_step"][k])) <= 1e-6, f"step {k}"


# --------------------------------------------------------------------------------------------------------------------
# A small stand-in denoiser
# --------------------------------------------------------------------------------------------------------------------

SHAPE = (2, 3, 4, 6, 3)  # [B, F, H, W, C]


def _denoiser(trace_counter: list | None = None, variance: bool = True):
    """eps depends on x, t and a per-batch "text" scalar (so the CFG halves differ); optional variance channels."""

    def denoise(params, x_in, t, cond):
        if trace_counter is not None:
            trace_counter.append(1)  # runs once per trace, not per call
        x = x_in[..., :3]
        scale = params["w"] * (1.0 + cond["text"]).reshape((-1,) + (1,) * (x.ndim - 1))
        tt = (t.astype(x.dtype) / 1000).reshape(scale.shape)
        eps = jnp.tanh(x) * tt * scale + 0.1 * jnp.sin(3 * x) + 0.01 * x_in[..., 3:].sum(-1, keepdims=True)
        return jnp.concatenate([eps, jnp.tanh(x - 0.2)], -1) if variance else eps

    return denoise


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(SHAPE), dtype)
    cond = {"text": jnp.asarray([0.0, 0.0, 0.5, -0.3], dtype)}  # [negative (B); positive (B)]
    return {"w": jnp.asarray(1.0, dtype)}, x, cond


def _dpm_schedule(steps=6):
    config = S.DPMSolverMultistepConfig(
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        lambda_min_clipped=-5.1,
        variance_type="fixed_small",
    )
    return S.dpm_schedule(config, steps)


def test_apply_guidance_eps_only_variance_from_conditional_half():
    """SPEC §1.4: guidance on the eps channels; the variance channels come from the conditional (second) half."""
    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.standard_normal((4, 2, 3, 6)))
    u, c = out[:2], out[2:]
    guided = apply_guidance(out, 7.0, 3, keep_variance=True)
    np.testing.assert_allclose(guided[..., :3], u[..., :3] + 7.0 * (c[..., :3] - u[..., :3]), rtol=1e-6)
    np.testing.assert_array_equal(guided[..., 3:], c[..., 3:])
    np.testing.assert_array_equal(apply_guidance(out, 7.0, 3, keep_variance=False), guided[..., :3])
    np.testing.assert_array_equal(apply_guidance(out, None, 3, keep_variance=False), out[..., :3])


def test_concat_cond_channels_duplicates_for_cfg():
    x = jnp.zeros((4, 2, 2, 3))
    cond = jnp.arange(2 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 2, 4)
    out = concat_cond_channels(x, cond)
    assert out.shape == (4, 2, 2, 7)
    np.testing.assert_array_equal(out[:2, ..., 3:], cond)
    np.testing.assert_array_equal(out[2:, ..., 3:], cond)


def test_compiled_loop_equals_python_loop_and_manual_loop():
    """The scan loop, the Python loop around one jitted step and a hand-written loop agree."""
    params, x, cond = _inputs()
    schedule = _dpm_schedule()
    sampler = Sampler(_denoiser(), model_input_fn=None)
    scanned = sampler(params, schedule, x, cond, guidance_scale=5.0)
    looped = sampler.python_loop(params, schedule, x, cond, guidance_scale=5.0)
    np.testing.assert_allclose(scanned, looped, rtol=0, atol=1e-6)

    denoise = _denoiser()
    state, xm = schedule.init_state(x), x
    for i, t in enumerate(np.asarray(schedule.timesteps)):
        out = denoise(params, jnp.concatenate([xm, xm]), jnp.full((4,), t), cond)
        u, c = out[:2, ..., :3], out[2:, ..., :3]
        state, xm = schedule.step(state, u + 5.0 * (c - u), i, xm)
    np.testing.assert_allclose(scanned, xm, rtol=0, atol=1e-5)


def test_guidance_scale_and_progress_do_not_recompile():
    """The guidance scale and the progress bar are traced arguments: one compilation serves them all."""
    traces: list = []
    params, x, cond = _inputs()
    schedule = _dpm_schedule()
    sampler = Sampler(_denoiser(traces))
    a = sampler(params, schedule, x, cond, guidance_scale=4.0)
    b = sampler(params, schedule, x, cond, guidance_scale=9.0)
    c = sampler(params, schedule, x, cond, guidance_scale=jnp.asarray(9.0), progress=lambda done, total: None)
    assert sampler.cache_size() == 1
    assert len(traces) == 1
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, c)


class _Bar:
    """tqdm-like: records update() calls."""

    def __init__(self):
        self.n, self.calls = 0, []

    def update(self, k):
        self.n += k
        self.calls.append(k)


def test_progress_advances_every_step_from_inside_the_loop():
    params, x, cond = _inputs()
    schedule = _dpm_schedule(steps=7)
    sampler = Sampler(_denoiser())
    bar = _Bar()
    sampler(params, schedule, x, cond, guidance_scale=3.0, progress=bar)
    assert bar.n == 7 and len(bar.calls) == 7
    seen = []
    sampler(params, schedule, x, cond, guidance_scale=3.0, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 7) for k in range(1, 8)]
    bar2 = _Bar()
    sampler.python_loop(params, schedule, x, cond, guidance_scale=3.0, progress=bar2)
    assert bar2.n == 7
    with pytest.raises(ValueError, match="report_progress=False"):
        Sampler(_denoiser(), report_progress=False)(params, schedule, x, cond, guidance_scale=3.0, progress=bar)


def test_progress_with_batch_sharded_over_devices():
    """The progress callback also works when the sample is sharded over several devices (ordered debug callbacks
    are refused there, so the sampler uses unordered ones and sinks that only move forward)."""
    devices = np.array(jax.devices()[:2])
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = Mesh(devices, ("batch",))
    params, x, cond = _inputs()
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    schedule = _dpm_schedule(steps=5)
    sampler = Sampler(_denoiser())
    bar = _Bar()
    out = sampler(params, schedule, x_sharded, cond, guidance_scale=3.0, progress=bar)
    assert bar.n == 5
    np.testing.assert_allclose(out, sampler(params, schedule, x, cond, guidance_scale=3.0), atol=1e-6)


def test_ddpm_noise_from_key_or_supplied():
    """Stochastic steps: noise from fold_in(key, i), or the same noise supplied as [S, ...], give the same result."""
    config = S.DDPMConfig(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
    )
    schedule = S.ddpm_schedule(config, 5)
    params, x, cond = _inputs()
    sampler = Sampler(_denoiser())
    key = jax.random.key(7)
    by_key = sampler(params, schedule, x, cond, guidance_scale=4.0, key=key)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), x.shape) for i in range(len(schedule))])
    by_noise = sampler(params, schedule, x, cond, guidance_scale=4.0, noise=noise)
    np.testing.assert_allclose(by_key, by_noise, atol=1e-6)
    by_python = sampler.python_loop(params, schedule, x, cond, guidance_scale=4.0, noise=noise)
    np.testing.assert_allclose(by_key, by_python, atol=1e-6)
    other = sampler(params, schedule, x, cond, guidance_scale=4.0, key=jax.random.key(8))
    assert not np.allclose(by_key, other)
    with pytest.raises(ValueError, match="stochastic"):
        sampler(params, schedule, x, cond, guidance_scale=4.0)
    with pytest.raises(ValueError, match="noise has 4 steps"):
        sampler(params, schedule, x, cond, guidance_scale=4.0, noise=noise[:4])


def test_model_input_fn_and_img2img_tail():
    """Extra conditioning channels reach the denoiser; a ``skip``-ped schedule runs only the tail."""
    params, x, cond = _inputs()
    seen_t = []
    inner = _denoiser()

    def denoise(params, x_in, t, cond):
        assert x_in.shape[-1] == 5  # 3 sample channels + 2 conditioning channels
        jax.debug.callback(lambda tt: seen_t.append(int(tt)), t[0])
        return inner(params, x_in, t, cond)

    extra = jnp.ones(SHAPE[:-1] + (2,))
    schedule = _dpm_schedule(steps=10)
    tail = schedule.skip(4)
    out = sample(
        denoise,
        params,
        tail,
        x,
        {**cond, "extra": extra},
        guidance_scale=jnp.asarray(2.0),
        model_input_fn=lambda x_in, c: concat_cond_channels(x_in, c["extra"]),
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert seen_t == np.asarray(schedule.timesteps[4:]).tolist()


def test_learned_range_dpm_equals_fixed_small():
    """SPEC §4.1: with variance_type learned_range DPM-Solver drops the variance channels itself; with fixed_small
    the sampler drops them first. Both give the same samples."""
    params, x, cond = _inputs()
    fixed = _dpm_schedule()
    learned = S.dpm_schedule(dataclasses.replace(fixed.config, variance_type="learned_range"), len(fixed))
    assert learned.uses_variance_channels and not fixed.uses_variance_channels
    sampler = Sampler(_denoiser(variance=True))
    np.testing.assert_array_equal(
        sampler(params, fixed, x, cond, guidance_scale=9.0), sampler(params, learned, x, cond, guidance_scale=9.0)
    )


def test_no_cfg():
    """guidance_scale=None: a single batch goes through the denoiser, no guidance."""
    params, x, _ = _inputs()
    cond = {"text": jnp.asarray([0.5, -0.3])}
    schedule = _dpm_schedule(steps=4)
    out = Sampler(_denoiser())(params, schedule, x, cond)
    denoise = _denoiser()
    state, xm = schedule.init_state(x), x
    for i, t in enumerate(np.asarray(schedule.timesteps)):
        state, xm = schedule.step(state, denoise(params, xm, jnp.full((2,), t), cond)[..., :3], i, xm)
    np.testing.assert_allclose(out, xm, atol=1e-5)
