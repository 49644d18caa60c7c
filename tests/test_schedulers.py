"""Parity of show1_jax.schedulers with diffusers 0.19.3 (golden ``schedulers/*``), and the config errors.

Cases are discovered by ``kind`` (scheduler_dpm, scheduler_dpm_img2img, scheduler_ddpm, scheduler_add_noise); steps,
shapes, configs, the stand-in model's formula and the recorded noise are read from each case folder.

Measured on public set A (max|ours - ref| / max|ref|, ref = the float64 reference):

  | case / array                          | float32 | float64 |
  |---------------------------------------|---------|---------|
  | dpm_base traj_x (10 steps)            | 1.1e-06 | 7.0e-08 |
  | dpm_base x0 before thresholding       | 1.1e-07 | 2.7e-09 |
  | dpm_base traj_x0_pred (thresholded)   | 1.3e-05 | 1.1e-07 |
  | dpm_sr2 x_start (add_noise)           | 8.7e-08 | 0       |
  | dpm_sr2 traj_x (40 steps)             | 3.5e-07 | 7.2e-08 |
  | dpm_sr2 traj_x0_pred                  | 3.9e-07 | 1.6e-07 |
  | ddpm_if2 traj_x (recorded noise)      | 1.1e-07 | 4.0e-08 |
  | ddpm_if2 traj_pred_original_sample    | 4.7e-07 | 1.0e-07 |
  | ddpm_if2 traj_step_log_variance       | 1.4e-07 | 2.4e-08 |
  | ddpm_noising add_noise                | 6.6e-08 | 0       |

Timestep arrays, betas and alphas_cumprod are bit-exact. alpha_t/sigma_t are correctly rounded float32 square roots;
the reference's are not (they differ by <= 1 ulp; lambda_t by <= 4.8e-7 absolute), which is the ~1e-7 floor of the
float64 trajectories (the same 1-ulp effect appears in DDPM's scalar sqrt coefficients).
float32 x0 after thresholding: at t=995, alpha_t = 0.0062 turns the float32 rounding of x - sigma*eps into ~1.3e-5
absolute error in x0 = (x - sigma*eps)/alpha; thresholding divides by s <= 1.5 and clips to ~1, so the error is
~1.3e-5 of max|x0| = 1. It is inherent to float32 (the next x only sees it with weight alpha_t), hence 5e-5 there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import load_npz, rel_err, scheduler_cases, to_jax_layout

from show1_jax import schedulers as S

TOL = {"float32": 1e-5, "float64": 1e-6}
TOL_X0_AFTER_THRESHOLD_F32 = 5e-5  # measured 1.3e-5, see the module docstring
DTYPES = ["float32", "float64"]


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _case(folder: Path) -> tuple[dict, dict[str, np.ndarray], S.SchedulerConfig]:
    meta = json.loads((folder / "meta.json").read_text())
    return meta, load_npz(folder / "data.npz"), S.load_scheduler_config(folder)


def _steps_to_jax(arr: np.ndarray) -> np.ndarray:
    """[S, B, C, ...] reference layout -> [S, B, ..., C]."""
    return np.stack([to_jax_layout(a) for a in arr])


def _stand_in_model(formula: str):
    """The fixtures' deterministic stand-in model from its ``formula`` string.

    "tanh(x)*(t/1000) + 0.1*sin(3*x)" -> eps; "eps = ...; v = ..." -> [eps, v] on the channel (last) axis.
    t is the integer timestep, broadcast over the sample.
    """
    parts = [p.split("=", 1)[-1].strip() for p in formula.split(";") if p.strip()]
    code = [compile(p, "<formula>", "eval") for p in parts]

    def model(x: jax.Array, t: jax.Array) -> jax.Array:
        env = {"tanh": jnp.tanh, "sin": jnp.sin, "cos": jnp.cos, "exp": jnp.exp, "x": x, "t": jnp.asarray(t, x.dtype)}
        outs = [eval(c, {"__builtins__": {}}, env) for c in code]
        return jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]

    return model


def _tol(dtype: str) -> float:
    return TOL[dtype]


def _run_steps(schedule, model, x, noise=None):
    """Run every step of ``schedule`` with ``model``; returns stacked (x, aux, model_output) over steps."""

    @jax.jit
    def one(state, x, i, step_noise):
        t = jnp.asarray(schedule.timesteps)[i]
        out = model(x, t)
        kwargs = {} if step_noise is None else {"noise": step_noise}
        state, x, aux = schedule.step(state, out, i, x, return_aux=True, **kwargs)
        return state, x, aux, out

    state = schedule.init_state(x)
    xs, auxs, outs = [], [], []
    for i in range(len(schedule)):
        state, x, aux, out = one(state, x, jnp.int32(i), None if noise is None else noise[i])
        xs.append(np.asarray(x))
        auxs.append(jax.tree.map(np.asarray, aux))
        outs.append(np.asarray(out))
    return np.stack(xs), {k: np.stack([a[k] for a in auxs]) for k in auxs[0]}, np.stack(outs)


def _alt_config(config: S.DPMSolverMultistepConfig, key: str) -> tuple[int, S.DPMSolverMultistepConfig]:
    """``timesteps_N`` or ``timesteps_N__alt_<spacing>_offset<k>`` -> (N, config with that spacing)."""
    m = re.fullmatch(r"timesteps_(\d+)(?:__alt_(linspace|leading|trailing)_offset(\d+))?", key)
    assert m, f"unknown timesteps key {key!r} in the fixture: teach _alt_config its convention"
    if m.group(2):
        config = dataclasses.replace(config, timestep_spacing=m.group(2), steps_offset=int(m.group(3)))
    return int(m.group(1)), config


# --------------------------------------------------------------------------------------------------------------------
# tables and timesteps
# --------------------------------------------------------------------------------------------------------------------

ALL_KINDS = ("scheduler_dpm", "scheduler_dpm_img2img", "scheduler_ddpm", "scheduler_add_noise")


@pytest.mark.golden
@pytest.mark.parametrize("folder", scheduler_cases(*ALL_KINDS))
def test_tables_match_reference(folder):
    _, data, config = _case(folder)
    tables = S.noise_tables(config)
    np.testing.assert_array_equal(tables.betas, data["betas"])
    np.testing.assert_array_equal(tables.alphas_cumprod, data["alphas_cumprod"])
    for name in ("alpha_t", "sigma_t"):
        if name in data:  # the reference's vectorised float32 sqrt is not correctly rounded: <= 1 ulp apart
            ours, ref = getattr(tables, name), data[name]
            assert np.max(np.abs(ours.astype(np.float64) - ref) / np.spacing(ref)) <= 1.0, name
    if "lambda_t" in data:
        assert np.max(np.abs(tables.lambda_t - data["lambda_t"])) <= 1e-6  # measured 4.8e-7


@pytest.mark.golden
@pytest.mark.parametrize("folder", scheduler_cases("scheduler_dpm", "scheduler_dpm_img2img"))
def test_dpm_timesteps_exact(folder):
    _, data, config = _case(folder)
    keys = [k for k in data if k.startswith("timesteps_")]
    assert keys, "fixture has no timesteps_N arrays"
    for key in keys:
        steps, cfg = _alt_config(config, key)
        np.testing.assert_array_equal(S.dpm_timesteps(cfg, steps), data[key], err_msg=key)
        assert S.dpm_schedule(cfg, steps).timesteps.tolist() == data[key].tolist()


# --------------------------------------------------------------------------------------------------------------------
# trajectories with the stand-in model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("folder", scheduler_cases("scheduler_dpm", "scheduler_dpm_img2img"))
def test_dpm_trajectory(folder, dtype):
    """DPM-Solver++ (per-frame thresholding; or the SR2 img2img start) against the float64 reference trajectory."""
    meta, data, config = _case(folder)
    params = meta["params"]
    model = _stand_in_model(params["formula"])
    with jax.enable_x64(dtype == "float64"):
        if "clean_latents" in data:  # img2img: add_noise at timesteps[t_start], then the tail of the schedule
            steps = params["num_inference_steps"]
            t_start = S.img2img_t_start(steps, params["strength"])
            assert t_start == int(data["t_start"])
            schedule = S.dpm_schedule(config, steps).skip(t_start)
            clean = jnp.asarray(to_jax_layout(data["clean_latents"]), dtype)
            noise = jnp.asarray(to_jax_layout(data["noise"]), dtype)
            t0 = jnp.full((clean.shape[0],), schedule.timesteps[0])
            x = S.add_noise(S.noise_tables(config).alphas_cumprod, clean, noise, t0)
            ref_start = to_jax_layout(data["traj_x_start_after_add_noise"])
            assert rel_err(x, ref_start) <= _tol(dtype)
        else:
            schedule = S.dpm_schedule(config, params["traj_steps"])
            x = jnp.asarray(to_jax_layout(data["x_init"]), dtype)
        np.testing.assert_array_equal(schedule.timesteps, data["traj_timesteps_used"])

        traj, aux, outs = _run_steps(schedule, model, x)
        assert traj.dtype == np.dtype(dtype)
    # The model is evaluated on our own trajectory; at step 0 its input is the reference's, so this checks the
    # formula is read as the fixture meant it.
    assert rel_err(outs[0], to_jax_layout(data["traj_eps"][0])) <= _tol(dtype)
    assert rel_err(traj, _steps_to_jax(data["traj_x"])) <= _tol(dtype)
    x0_tol = TOL_X0_AFTER_THRESHOLD_F32 if dtype == "float32" and config.thresholding else _tol(dtype)
    assert rel_err(aux["x0_pred"], _steps_to_jax(data["traj_x0_pred"])) <= x0_tol
    if "traj_threshold_in" in data:
        ref_in = _steps_to_jax(data["traj_threshold_in"])
        assert rel_err(aux["x0_before_threshold"], ref_in) <= _tol(dtype)
        # Thresholding alone, on the reference's own input (float64: float32 rounding of inputs up to 1/alpha_t
        # ~ 160 would be ~1e-5 of the thresholded output).
        with jax.enable_x64(True):
            ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
            alone = jax.vmap(lambda v: S.dynamic_threshold(v, ratio, max_value))(jnp.asarray(ref_in))
            assert rel_err(alone, _steps_to_jax(data["traj_x0_pred"])) <= 1e-12


def _recorded_step_noise(meta: dict, data: dict, timesteps: np.ndarray, shape: tuple) -> np.ndarray:
    """The draws made inside ``step`` (in order), one per step with t > 0; zeros where t == 0 (nothing drawn)."""
    draws = [to_jax_layout(data[n["name"]]) for n in meta["noise"] if "step" in n["site"]]
    assert len(draws) == int(np.sum(timesteps > 0)), "one recorded draw per step with t > 0"
    it = iter(draws)
    return np.stack([next(it) if t > 0 else np.zeros(shape) for t in timesteps])


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("folder", scheduler_cases("scheduler_ddpm"))
def test_ddpm_trajectory(folder, dtype):
    """Stochastic DDPM (learned_range variance, thresholding) replaying the recorded per-step noise."""
    meta, data, config = _case(folder)
    model = _stand_in_model(meta["params"]["formula"])
    schedule = S.ddpm_schedule(config, meta["params"]["steps"])
    np.testing.assert_array_equal(schedule.timesteps, data["traj_timesteps_used"])
    x_init = to_jax_layout(data["x_init"])
    noise = _recorded_step_noise(meta, data, np.asarray(schedule.timesteps), x_init.shape)
    with jax.enable_x64(dtype == "float64"):
        traj, aux, outs = _run_steps(schedule, model, jnp.asarray(x_init, dtype), jnp.asarray(noise, dtype))
    assert rel_err(outs[0], to_jax_layout(data["traj_model_output"][0])) <= _tol(dtype)
    assert rel_err(traj, _steps_to_jax(data["traj_x"])) <= _tol(dtype)
    assert rel_err(aux["x0_pred"], _steps_to_jax(data["traj_pred_original_sample"])) <= _tol(dtype)
    if "traj_step_log_variance" in data:
        assert rel_err(aux["log_variance"], _steps_to_jax(data["traj_step_log_variance"])) <= _tol(dtype)


@pytest.mark.golden
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("folder", scheduler_cases("scheduler_add_noise"))
def test_add_noise(folder, dtype):
    meta, data, config = _case(folder)
    cases = sorted({k.split("_")[0] for k in data if re.fullmatch(r"case\d+_out", k)})
    assert cases
    table = S.noise_tables(config).alphas_cumprod
    with jax.enable_x64(dtype == "float64"):
        for c in cases:
            out = S.add_noise(
                table,
                jnp.asarray(to_jax_layout(data[f"{c}_x"]), dtype),
                jnp.asarray(to_jax_layout(data[f"{c}_noise"]), dtype),
                jnp.asarray(data[f"{c}_t"]),
            )
            # float64: exact (measured 0); float32: measured 6.6e-8
            assert rel_err(out, to_jax_layout(data[f"{c}_out"])) <= (1e-15 if dtype == "float64" else 1e-6), c


# --------------------------------------------------------------------------------------------------------------------
# Behaviour without golden data
# --------------------------------------------------------------------------------------------------------------------


def _oracle_setup(shape=(2, 3, 4, 5, 3), seed=0):
    """A fixed (x0, eps) pair and the model that predicts them exactly from any x_t on the line a_t x0 + s_t eps."""
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.uniform(-0.9, 0.9, shape), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x0, eps


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("order", [1, 2])
def test_dpm_exact_on_oracle(algorithm, solver_type, prediction_type, order):
    """With a model that knows (x0, eps), every DPM-Solver variant stays on x_t = alpha_t x0 + sigma_t eps (the
    exponential integrator is exact for constant x0 / eps), so it ends at alpha_0 x0 + sigma_0 eps."""
    config = S.DPMSolverMultistepConfig(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        algorithm_type=algorithm,
        solver_type=solver_type,
        prediction_type=prediction_type,
        solver_order=order,
    )
    tables = S.noise_tables(config)
    x0, eps = _oracle_setup()

    def model(x, t):
        a, s = jnp.asarray(tables.alpha_t)[t], jnp.asarray(tables.sigma_t)[t]
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]

    schedule = S.dpm_schedule(config, 12)
    x = tables.alpha_t[schedule.timesteps[0]] * x0 + tables.sigma_t[schedule.timesteps[0]] * eps
    traj, _, _ = _run_steps(schedule, model, x)
    expected = tables.alpha_t[0] * x0 + tables.sigma_t[0] * eps
    assert rel_err(traj[-1], expected) <= 2e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_exact_on_oracle(prediction_type):
    """Deterministic DDIM (eta 0) with an exact model lands on x0 (set_alpha_to_one: the final abar is 1)."""
    config = S.DDIMConfig(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
    tables = S.noise_tables(config)
    x0, eps = _oracle_setup(shape=(2, 6, 7, 3))

    def model(x, t):
        a, s = jnp.asarray(tables.alpha_t)[t], jnp.asarray(tables.sigma_t)[t]
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]

    schedule = S.ddim_schedule(config, 20)
    t0 = schedule.timesteps[0]
    traj, aux, _ = _run_steps(schedule, model, tables.alpha_t[t0] * x0 + tables.sigma_t[t0] * eps)
    assert rel_err(traj[-1], x0) <= 2e-5
    assert rel_err(aux["x0_pred"][0], x0) <= 2e-5


def test_dynamic_threshold_axes():
    """Default: one threshold per frame of [B, F, H, W, C] (the reference's (B*F, C, H, W) reshape, SPEC §3.3);
    ``axes=(1, 2, 3, 4)`` gives one per video. Both match numpy's linear quantile in float64."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5, 3)) * np.array([0.5, 2.0, 4.0])[None, :, None, None, None]
    ratio, max_value = 0.9, 3.0
    with jax.enable_x64(True):
        per_frame = np.asarray(S.dynamic_threshold(jnp.asarray(x), ratio, max_value))
        per_video = np.asarray(S.dynamic_threshold(jnp.asarray(x), ratio, max_value, axes=(1, 2, 3, 4)))
    s_frame = np.clip(np.quantile(np.abs(x), ratio, axis=(2, 3, 4), keepdims=True), 1, max_value)
    s_video = np.clip(np.quantile(np.abs(x), ratio, axis=(1, 2, 3, 4), keepdims=True), 1, max_value)
    np.testing.assert_allclose(per_frame, np.clip(x, -s_frame, s_frame) / s_frame, rtol=1e-12)
    np.testing.assert_allclose(per_video, np.clip(x, -s_video, s_video) / s_video, rtol=1e-12)
    assert not np.allclose(per_frame, per_video)
    # frames with small values are only clipped to [-1, 1] (s clamped to 1)
    np.testing.assert_allclose(per_frame[:, 0], np.clip(x[:, 0], -1, 1), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_order_statistics_equal_sorting(dtype):
    """The quantile's order statistics (selection by bisection on the float bits) equal a full sort, with ties,
    zeros and every rank position."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(dtype == "float64"):
        for n in (1, 7, 180):
            a = np.abs(rng.standard_normal((4, n))).astype(dtype)
            a[1] = np.round(a[1] * 3) / 3  # ties
            a[2] = 0.0
            for q in (0.0, 0.95, 0.995, 1.0):
                rank = np.dtype(dtype).type(q) * np.dtype(dtype).type(n - 1)
                below, above = int(np.floor(rank)), int(np.ceil(rank))
                lo, hi = S._order_statistics(jnp.asarray(a), below, above)
                srt = np.sort(a, axis=-1)
                np.testing.assert_array_equal(lo, srt[:, below])
                np.testing.assert_array_equal(hi, srt[:, above])


def test_ddpm_key_noise_is_explicit():
    """DDPM draws its variance noise from the given key: same key, same result; the recorded-noise path equals
    the key path when fed the same normal draw."""
    config = S.DDPMConfig(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    schedule = S.ddpm_schedule(config, 10)
    x = jnp.ones((1, 4, 4, 3)) * 0.3
    eps = jnp.full_like(x, 0.1)
    key = jax.random.key(3)
    _, a = schedule.step((), eps, 2, x, key=key)
    _, b = schedule.step((), eps, 2, x, key=key)
    _, c = schedule.step((), eps, 2, x, key=jax.random.key(4))
    _, d = schedule.step((), eps, 2, x, noise=jax.random.normal(key, x.shape))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="noise or a PRNG key"):
        schedule.step((), eps, 2, x)


def test_ddpm_last_step_adds_no_noise():
    config = S.DDPMConfig(beta_schedule="squaredcos_cap_v2")
    schedule = S.ddpm_schedule(config, 4)
    assert schedule.timesteps[-1] == 0
    x, eps = jnp.full((1, 2, 2, 3), 0.2), jnp.full((1, 2, 2, 3), 0.1)
    _, a = schedule.step((), eps, 3, x, noise=jnp.zeros_like(x))
    _, b = schedule.step((), eps, 3, x, noise=jnp.full_like(x, 100.0))
    np.testing.assert_array_equal(a, b)


def test_dpm_step_is_scannable():
    """The multistep state is a pytree: a lax.scan over the steps equals the Python loop."""
    config = S.DPMSolverMultistepConfig(beta_schedule="squaredcos_cap_v2", thresholding=True, sample_max_value=1.5)
    schedule = S.dpm_schedule(config, 8)
    model = _stand_in_model("tanh(x)*(t/1000) + 0.1*sin(3*x)")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, 3)), jnp.float32)

    def body(carry, i):
        state, x = carry
        state, x = schedule.step(state, model(x, jnp.asarray(schedule.timesteps)[i]), i, x)
        return (state, x), None

    (state, scanned), _ = jax.jit(lambda x: jax.lax.scan(body, (schedule.init_state(x), x), jnp.arange(8)))(x)
    traj, _, _ = _run_steps(schedule, model, x)
    np.testing.assert_allclose(scanned, traj[-1], rtol=1e-6, atol=1e-6)
    assert int(state.lower_order_nums) == 2


def test_skip_first_step_is_first_order():
    """After ``skip`` (img2img) the first step is first order even mid-schedule (lower_order_nums restarts at 0)."""
    config = S.DPMSolverMultistepConfig()
    full = S.dpm_schedule(config, 20)
    tail = full.skip(5)
    np.testing.assert_array_equal(tail.timesteps, full.timesteps[5:])
    x, m = jnp.full((1, 2, 2, 3), 0.5), jnp.full((1, 2, 2, 3), 0.2)
    stale = S.DPMState(jnp.full_like(x, 7.0), jnp.int32(0))  # lower_order_nums 0: the memory must not be used
    _, a = tail.step(stale, m, 0, x)
    _, b = tail.step(tail.init_state(x), m, 0, x)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Configs and errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("folder", scheduler_cases(*ALL_KINDS))
def test_config_roundtrip_from_file(folder):
    """A folder, its json path and the parsed dict give the same config; the json's values are kept."""
    raw = json.loads((folder / "scheduler_config.json").read_text())
    by_folder = S.load_scheduler_config(folder)
    assert by_folder == S.load_scheduler_config(folder / "scheduler_config.json") == S.load_scheduler_config(raw)
    assert type(by_folder).class_name == raw["_class_name"]
    for key, value in raw.items():
        if hasattr(by_folder, key) and not key.startswith("_"):
            assert getattr(by_folder, key) == value, key  # -Infinity parses to -inf and compares equal


def test_unknown_harmless_keys_are_ignored():
    cfg = S.DPMSolverMultistepConfig.from_config(
        {"_class_name": "DPMSolverMultistepScheduler", "clip_sample": True, "some_future_flag": 3, "solver_order": 1}
    )
    assert cfg.solver_order == 1
    assert cfg.ignored_keys == ("some_future_flag",)


BAD_CONFIGS = [
    (S.DPMSolverMultistepConfig, {"beta_schedule": "sigmoid"}, "beta_schedule"),
    (S.DDPMConfig, {"beta_schedule": "cosine"}, "beta_schedule"),
    (S.DPMSolverMultistepConfig, {"prediction_type": "flow"}, "prediction_type"),
    (S.DDIMConfig, {"prediction_type": "x0"}, "prediction_type"),
    (S.DPMSolverMultistepConfig, {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    (S.DPMSolverMultistepConfig, {"solver_type": "rk4"}, "solver_type"),
    (S.DPMSolverMultistepConfig, {"solver_order": 3}, "solver_order"),
    (S.DPMSolverMultistepConfig, {"use_karras_sigmas": True}, "use_karras_sigmas"),
    (S.DPMSolverMultistepConfig, {"final_sigmas_type": "zero"}, "final_sigmas_type"),
    (S.DPMSolverMultistepConfig, {"timestep_spacing": "karras"}, "timestep_spacing"),
    (S.DDPMConfig, {"variance_type": "fixed_large_log"}, "variance_type"),
    (S.DDIMConfig, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    (S.DDPMConfig, {"_class_name": "DPMSolverMultistepScheduler"}, "load_scheduler_config"),
]


@pytest.mark.parametrize(("cls", "raw", "names"), BAD_CONFIGS, ids=[f"{c.__name__}-{n}" for c, _, n in BAD_CONFIGS])
def test_bad_config_raises_naming_the_fix(cls, raw, names):
    with pytest.raises(S.SchedulerConfigError, match=names):
        cls.from_config(raw)


def test_unknown_scheduler_class():
    with pytest.raises(S.SchedulerConfigError, match="supported are"):
        S.load_scheduler_config({"_class_name": "EulerDiscreteScheduler"})


@pytest.mark.parametrize(
    ("make", "cls"),
    [(S.dpm_schedule, S.DPMSolverMultistepConfig), (S.ddpm_schedule, S.DDPMConfig), (S.ddim_schedule, S.DDIMConfig)],
)
def test_bad_step_counts(make, cls):
    with pytest.raises(S.SchedulerConfigError, match="positive integer"):
        make(cls(), 0)
    with pytest.raises(S.SchedulerConfigError, match="at most 1000 steps"):
        make(cls(), 1001)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_bad_strength(strength):
    with pytest.raises(S.SchedulerConfigError, match=r"strength must be in \(0, 1\]"):
        S.img2img_t_start(50, strength)


def test_img2img_t_start_matches_reference_rule():
    assert S.img2img_t_start(50, 0.8) == 10  # SPEC §3.6
    assert S.img2img_t_start(50, 1.0) == 0
    assert S.img2img_t_start(5, 0.8) == 1
    with pytest.raises(S.SchedulerConfigError, match="no denoising step"):
        S.img2img_t_start(5, 0.1)


def test_frame_correlated_noise_is_unit_normal_with_the_asked_frame_correlation():
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        np.asarray(S.frame_correlated_noise(key, (2, 3, 4, 5, 3))), np.asarray(jax.random.normal(key, (2, 3, 4, 5, 3)))
    )
    x = np.asarray(S.frame_correlated_noise(key, (4000, 2, 4, 4, 3), jnp.float32, 0.5), np.float64)
    assert x.dtype == np.float64 and abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    a, b = x[:, 0].ravel(), x[:, 1].ravel()
    assert abs(np.corrcoef(a, b)[0, 1] - 0.5) < 0.02
    assert abs(np.corrcoef(x[1:, 0].ravel(), x[:-1, 1].ravel())[0, 1]) < 0.02  # different clips: independent
    assert S.frame_correlated_noise(key, (1, 2, 3), jnp.bfloat16, 0.3).dtype == jnp.bfloat16
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            S.frame_correlated_noise(key, (1, 2, 3), jnp.float32, bad)
    with pytest.raises(ValueError, match=r"videos \[B, F, ...\]"):
        S.frame_correlated_noise(key, (4, 3), jnp.float32, 0.5)
