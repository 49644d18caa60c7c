"""Diffusion schedulers with diffusers 0.19.3 behaviour, as pure functions of arrays.

Three schedulers are supported, each configured from a diffusers ``scheduler_config.json``:

- DPM-Solver++ multistep (``DPMSolverMultistepScheduler``): the pixel stages and SR2 (SPEC §4.1, §4.6).
- DDPM (``DDPMScheduler``): IF-II-L's stochastic learned-range sampler and the noise-augmentation scheduler (§4.5).
- DDIM (``DDIMScheduler``).

How the pieces fit:

1. ``XConfig.from_config(dict | path)`` reads the json into a frozen dataclass (``load_scheduler_config`` picks the
   class from ``_class_name``).
2. ``x_schedule(config, num_inference_steps)`` runs ``set_timesteps`` on the host (numpy) and precomputes every
   per-step scalar coefficient in float32, exactly as diffusers computes them from its float32 tables. The result is
   a pytree (arrays are leaves, the config is static) whose ``step`` is a pure, jit-able, scan-able function:
   ``schedule.step(state, model_output, i, sample, noise=...) -> (state, prev_sample)`` with ``i`` the (traced)
   index into ``schedule.timesteps``. Multistep memory lives in the explicit ``state`` pytree.
3. ``schedule.skip(t_start)`` gives the img2img tail ``timesteps[t_start:]`` (``img2img_t_start`` computes t_start
   from the strength as the diffusers img2img pipelines do).

Precision (SPEC §1.7, golden README "float32 islands"): the reference's tables and every per-step scalar are float32
even in a float64 run; they multiply float64 tensors after promotion. We keep them as float32 arrays and cast them to
the sample's dtype at use, so a float64 run here sees the same float32-rounded coefficients.

Layout is channels-last: videos [B, F, H, W, C], images [B, H, W, C]. Learned-variance channels are the second half
of the LAST axis. Dynamic thresholding is per frame: the Show-1 pipelines reshape (B, C, F, H, W) -> (B*F, C, H, W)
before ``scheduler.step`` (§3.3 step 5), which here is a quantile over (H, W, C) for every (b, f): the default
``threshold_axes=(-3, -2, -1)``. The same default is per image for [B, H, W, C] (IF-II-L).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DDIMConfig",
    "DDIMSchedule",
    "DDPMConfig",
    "DDPMSchedule",
    "DPMSolverMultistepConfig",
    "DPMSolverSchedule",
    "DPMState",
    "NoiseTables",
    "Schedule",
    "SchedulerConfigError",
    "add_noise",
    "ddim_schedule",
    "ddim_timesteps",
    "ddpm_schedule",
    "ddpm_timesteps",
    "dpm_schedule",
    "dpm_timesteps",
    "dynamic_threshold",
    "img2img_t_start",
    "load_scheduler_config",
    "make_schedule",
    "noise_tables",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
LEARNED_VARIANCE = ("learned", "learned_range")
DEFAULT_THRESHOLD_AXES = (-3, -2, -1)  # per frame of [B, F, H, W, C], per image of [B, H, W, C]


class SchedulerConfigError(ValueError):
    """A scheduler config or call that this port does not support; the message names the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def _read_source(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "scheduler_config.json"
    if not path.is_file():
        raise SchedulerConfigError(f"no scheduler config at {path}: pass a scheduler_config.json or its folder")
    return json.loads(path.read_text())


_Config = TypeVar("_Config", bound="_BaseConfig")


@dataclasses.dataclass(frozen=True)
class _BaseConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    # diffusers class this config belongs to (checked against ``_class_name``).
    class_name: ClassVar[str] = ""
    # Keys that this class accepts and ignores because they do not change its behaviour (e.g. DPM-Solver ignores
    # clip_sample). Keys starting with "_" are always ignored. Other unknown keys are ignored too and listed in
    # ``ignored_keys`` for inspection.
    _harmless: ClassVar[frozenset[str]] = frozenset()
    # Keys from other diffusers versions that change behaviour: key -> the values that keep 0.19.3 behaviour.
    _pinned: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    ignored_keys: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @classmethod
    def from_config(cls: type[_Config], source: Mapping[str, Any] | str | os.PathLike) -> _Config:
        """Read a diffusers ``scheduler_config.json`` (a dict, a json path, or the folder holding it)."""
        raw = _read_source(source)
        name = raw.get("_class_name")
        if name is not None and name != cls.class_name:
            raise SchedulerConfigError(
                f"scheduler config is for {name!r}, not {cls.class_name!r}: read it with load_scheduler_config() "
                "or the matching config class"
            )
        fields = {f.name for f in dataclasses.fields(cls) if f.name != "ignored_keys"}
        kwargs: dict[str, Any] = {}
        ignored = []
        for key, value in raw.items():
            if key in fields:
                kwargs[key] = value
            elif key in cls._pinned:
                if value not in cls._pinned[key]:
                    raise SchedulerConfigError(
                        f"{cls.class_name} config has {key}={value!r}, which this port does not support (it "
                        f"reproduces diffusers 0.19.3): set {key} to {cls._pinned[key][0]!r} or remove the key"
                    )
            elif not key.startswith("_") and key not in cls._harmless:
                ignored.append(key)
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs, ignored_keys=tuple(sorted(ignored)))

    def __post_init__(self) -> None:
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise SchedulerConfigError(
                f"unknown beta_schedule {self.beta_schedule!r}: use one of {BETA_SCHEDULES} or give trained_betas"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise SchedulerConfigError(
                f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                f"{self.num_train_timesteps}: make them agree"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise SchedulerConfigError(
                f"unsupported prediction_type {self.prediction_type!r}: use one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise SchedulerConfigError(
                f"unsupported timestep_spacing {self.timestep_spacing!r}: use one of {TIMESTEP_SPACINGS}"
            )
        if self.thresholding and not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise SchedulerConfigError(
                f"dynamic_thresholding_ratio {self.dynamic_thresholding_ratio} must be in (0, 1] (a quantile)"
            )


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig(_BaseConfig):
    """``DPMSolverMultistepScheduler`` config (diffusers 0.19.3 defaults).

    Supported: algorithm_type dpmsolver++ / dpmsolver, solver_order 1 / 2, solver_type midpoint / heun. As in the
    reference, algorithm_type "deis" runs as dpmsolver++ and solver_type logrho/bh1/bh2 run as midpoint, and
    thresholding only acts with dpmsolver++.
    """

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None

    class_name: ClassVar[str] = "DPMSolverMultistepScheduler"
    _harmless: ClassVar[frozenset[str]] = frozenset({"clip_sample", "clip_sample_range", "set_alpha_to_one"})
    _pinned: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "euler_at_final": (False,),
        "use_lu_lambdas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "rescale_betas_zero_snr": (False,),
        # 0.19.3 ends the last step at t=0 (alpha_0, sigma_0), which newer diffusers calls "sigma_min".
        "final_sigmas_type": ("sigma_min",),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm_type == "deis":  # the reference silently runs deis as dpmsolver++
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):  # the reference silently maps these to midpoint
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type not in ("dpmsolver++", "dpmsolver"):
            raise SchedulerConfigError(
                f"unsupported algorithm_type {self.algorithm_type!r}: use 'dpmsolver++' (the Show-1 configs) or "
                "'dpmsolver'; the stochastic sde-* variants are not implemented"
            )
        if self.solver_type not in ("midpoint", "heun"):
            raise SchedulerConfigError(f"unsupported solver_type {self.solver_type!r}: use 'midpoint' or 'heun'")
        if self.solver_order not in (1, 2):
            raise SchedulerConfigError(f"unsupported solver_order {self.solver_order}: use 2 (the Show-1 configs) or 1")
        if self.use_karras_sigmas:
            raise SchedulerConfigError("use_karras_sigmas=True is not supported: set it to false")
        if self.variance_type not in (None, "fixed_small", "fixed_small_log", "fixed_large", *LEARNED_VARIANCE):
            raise SchedulerConfigError(
                f"unsupported variance_type {self.variance_type!r} for DPM-Solver: use null, 'fixed_small' or "
                "'learned_range'"
            )


@dataclasses.dataclass(frozen=True)
class DDPMConfig(_BaseConfig):
    """``DDPMScheduler`` config (diffusers 0.19.3 defaults: leading spacing, fixed_small, clip_sample)."""

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"

    class_name: ClassVar[str] = "DDPMScheduler"
    _harmless: ClassVar[frozenset[str]] = frozenset({"set_alpha_to_one"})
    _pinned: ClassVar[Mapping[str, tuple[Any, ...]]] = {"rescale_betas_zero_snr": (False,)}

    def __post_init__(self) -> None:
        super().__post_init__()
        supported = ("fixed_small", "fixed_small_log", "fixed_large", *LEARNED_VARIANCE)
        if self.variance_type not in supported:
            raise SchedulerConfigError(f"unsupported DDPM variance_type {self.variance_type!r}: use one of {supported}")


@dataclasses.dataclass(frozen=True)
class DDIMConfig(_BaseConfig):
    """``DDIMScheduler`` config (diffusers 0.19.3 defaults)."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    class_name: ClassVar[str] = "DDIMScheduler"
    _harmless: ClassVar[frozenset[str]] = frozenset({"variance_type"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rescale_betas_zero_snr:
            raise SchedulerConfigError("rescale_betas_zero_snr=True is not supported: set it to false")


_CONFIG_CLASSES = {c.class_name: c for c in (DPMSolverMultistepConfig, DDPMConfig, DDIMConfig)}
SchedulerConfig = DPMSolverMultistepConfig | DDPMConfig | DDIMConfig


def load_scheduler_config(source: Mapping[str, Any] | str | os.PathLike) -> SchedulerConfig:
    """Read a ``scheduler_config.json`` into the config class named by its ``_class_name``."""
    raw = _read_source(source)
    name = raw.get("_class_name")
    if name not in _CONFIG_CLASSES:
        raise SchedulerConfigError(f"unsupported scheduler class {name!r}: supported are {sorted(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[name].from_config(raw)


# --------------------------------------------------------------------------------------------------------------------
# Noise tables (float32, as diffusers builds them)
# --------------------------------------------------------------------------------------------------------------------


class NoiseTables(NamedTuple):
    """float32 tables over the training timesteps, each [num_train_timesteps]."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alpha_t: np.ndarray  # sqrt(alphas_cumprod)
    sigma_t: np.ndarray  # sqrt(1 - alphas_cumprod)
    lambda_t: np.ndarray  # log(alpha_t) - log(sigma_t)


def _f32(x: Any) -> np.float32:
    return np.float32(x)


def _exp32(x: np.float32) -> np.float32:
    # torch's float32 scalar exp/log are (nearly) correctly rounded; numpy's float32 SIMD exp/log are not.
    return np.float32(np.exp(np.float64(x)))


def _log32(x: np.ndarray | np.float32) -> np.ndarray | np.float32:
    return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on CPU, bit for bit.

    torch rounds start, end and step = (end - start)/(n - 1) to float32 and computes start + step*i for the first
    half and end - step*(n-1-i) for the second with one rounding (a fused multiply-add; matches the golden betas
    exactly, a two-rounding float32 evaluation does not). The float64 evaluation below is exact for these magnitudes,
    so rounding it once to float32 reproduces the fused result.
    """
    a, b = _f32(start), _f32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float64(_f32((b - a) / _f32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    first = np.float64(a) + step * i
    second = np.float64(b) - step * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    # squaredcos_cap_v2 (betas_for_alpha_bar): Python float64 maths, then one cast to float32.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]).astype(np.float32)


@lru_cache(maxsize=32)
def noise_tables(config: _BaseConfig) -> NoiseTables:
    """The reference's float32 tables for ``config`` (SPEC §4.3; golden ``schedulers/*/data.npz``).

    betas and alphas_cumprod match the reference bit for bit. torch's cumprod accumulates float32 inputs in float64
    and rounds each output to float32 (a float32 running product differs in ~1000 entries). alpha_t and sigma_t are
    correctly rounded float32 square roots; the reference's vectorised float32 sqrt is not, so they differ from the
    golden tables by at most 1 ulp (and lambda_t by ~5e-7 absolute), which moves trajectories by ~1e-7 relative.
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64).astype(np.float32)
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        root = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        betas = root * root
    else:
        betas = _cosine_betas(n)
    alphas = np.float32(1.0) - betas
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    alpha_t = np.sqrt(alphas_cumprod)
    sigma_t = np.sqrt(np.float32(1.0) - alphas_cumprod)
    lambda_t = _log32(alpha_t) - _log32(sigma_t)
    for table in (betas, alphas_cumprod, alpha_t, sigma_t, lambda_t):
        table.flags.writeable = False
    return NoiseTables(betas, alphas_cumprod, alpha_t, sigma_t, lambda_t)


# --------------------------------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------------------------------


def _check_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise SchedulerConfigError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if num_inference_steps > num_train_timesteps:
        raise SchedulerConfigError(
            f"num_inference_steps={num_inference_steps} is more than the {num_train_timesteps} training timesteps: "
            f"use at most {num_train_timesteps} steps"
        )


def dpm_timesteps(config: DPMSolverMultistepConfig, num_inference_steps: int) -> np.ndarray:
    """``DPMSolverMultistepScheduler.set_timesteps(n).timesteps`` (0.19.3) as int64 [S] (S <= n after dedup)."""
    _check_steps(num_inference_steps, config.num_train_timesteps)
    n = int(num_inference_steps)
    lam = noise_tables(config).lambda_t
    # lambda_min_clipped trims the last training timesteps (critical for the cosine schedule, SPEC §4.2); torch's
    # searchsorted compares in the table's float32.
    clipped_idx = int(np.searchsorted(lam[::-1], np.float32(config.lambda_min_clipped), side="left"))
    last = config.num_train_timesteps - clipped_idx
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:  # trailing
        ratio = config.num_train_timesteps / n
        ts = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    # Many steps can give duplicates; the reference keeps the first of each.
    _, first = np.unique(ts, return_index=True)
    return ts[np.sort(first)]


def _ddpm_like_timesteps(config: DDPMConfig | DDIMConfig, num_inference_steps: int) -> np.ndarray:
    _check_steps(num_inference_steps, config.num_train_timesteps)
    n, total = int(num_inference_steps), config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (total // n)).round()[::-1].astype(np.int64) + config.steps_offset
    return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1


def ddpm_timesteps(config: DDPMConfig, num_inference_steps: int) -> np.ndarray:
    """``DDPMScheduler.set_timesteps(n).timesteps`` (0.19.3) as int64 [n]."""
    return _ddpm_like_timesteps(config, num_inference_steps)


def ddim_timesteps(config: DDIMConfig, num_inference_steps: int) -> np.ndarray:
    """``DDIMScheduler.set_timesteps(n).timesteps`` (0.19.3) as int64 [n]."""
    return _ddpm_like_timesteps(config, num_inference_steps)


def img2img_t_start(num_inference_steps: int, strength: float) -> int:
    """First index into the timesteps for an img2img run (diffusers ``get_timesteps``; SR2 uses strength 0.8).

    The run then uses ``timesteps[t_start:]`` (``schedule.skip(t_start)``): 50 steps at strength 0.8 give t_start 10.
    """
    if not 0.0 < strength <= 1.0:
        raise SchedulerConfigError(f"strength must be in (0, 1], got {strength}: 1.0 starts from pure noise")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep == 0:
        raise SchedulerConfigError(
            f"strength {strength} with {num_inference_steps} steps leaves no denoising step: raise either"
        )
    return max(num_inference_steps - init_timestep, 0)


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces: thresholding, add_noise
# --------------------------------------------------------------------------------------------------------------------


def dynamic_threshold(
    x0: jax.Array,
    ratio: float,
    max_value: float,
    axes: Sequence[int] = DEFAULT_THRESHOLD_AXES,
) -> jax.Array:
    """Imagen dynamic thresholding as diffusers ``_threshold_sample`` (SPEC §4.3 steps 2-3).

    s = quantile(|x0|, ratio) over ``axes`` (torch's linear interpolation), clamped to [1, max_value]; then
    clip(x0, -s, s) / s. With the default axes (the last three) this is per frame of a [B, F, H, W, C] video (the
    pipelines' (B*F, C, H, W) reshape) and per image of [B, H, W, C]; pass ``axes=(1, 2, 3, 4)`` for one threshold
    per video.

    Args:
      x0: predicted clean sample, any shape, e.g. [B, F, H, W, C].
      ratio: dynamic_thresholding_ratio (the quantile).
      max_value: sample_max_value.
      axes: the axes that share one threshold.
    Returns:
      the thresholded x0, same shape and dtype.
    """
    dtype = x0.dtype
    if dtype not in (jnp.float32, jnp.float64):
        x0 = x0.astype(jnp.float32)  # the reference upcasts half precision for the quantile
    axes = tuple(sorted(a % x0.ndim for a in axes))
    keep = [a for a in range(x0.ndim) if a not in axes]
    moved = jnp.transpose(x0, keep + list(axes))
    flat = moved.reshape(moved.shape[: len(keep)] + (-1,))  # [..., N]
    n = flat.shape[-1]
    # torch.quantile: rank = q * (N - 1) in the tensor's dtype, lerp between the neighbouring order statistics.
    np_dtype = np.dtype(x0.dtype.name)
    rank = np_dtype.type(ratio) * np_dtype.type(n - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    weight = rank - np_dtype.type(below)
    lo, hi = _order_statistics(jnp.abs(flat), below, above)
    w = jnp.asarray(weight, x0.dtype)
    s = lo + w * (hi - lo) if weight < 0.5 else hi - (hi - lo) * (1 - w)  # torch's lerp
    s = jnp.clip(s, 1.0, max_value)[..., None]
    out = jnp.clip(flat, -s, s) / s
    out = out.reshape(moved.shape)
    out = jnp.transpose(out, np.argsort(keep + list(axes)))
    return out.astype(dtype)


def _order_statistics(a: jax.Array, below: int, above: int) -> tuple[jax.Array, jax.Array]:
    """The below-th and above-th (= below or below + 1) smallest entries of each row of a >= 0, [..., N] -> [...].

    Exact selection by bisection on the float bit patterns (monotone for non-negative floats): 31 (float32) or 63
    (float64) counting passes over the row instead of a sort; bit-identical to sorting, and ~20x faster than
    ``jnp.sort`` on CPU for SR1-sized frames.
    """
    int_dtype, passes = (jnp.int32, 31) if a.dtype == jnp.float32 else (jnp.int64, 63)
    bits = jax.lax.bitcast_convert_type(a, int_dtype)

    def bisect(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid[..., None], axis=-1) >= below + 1
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    start = (jnp.zeros(bits.shape[:-1], int_dtype), jnp.max(bits, axis=-1))
    low_bits = jax.lax.fori_loop(0, passes, bisect, start)[0]
    if above == below:
        high_bits = low_bits
    else:  # the next order statistic: a tie with the below-th value, or the smallest value above it
        ties = jnp.sum(bits <= low_bits[..., None], axis=-1) >= above + 1
        next_up = jnp.min(jnp.where(bits > low_bits[..., None], bits, jnp.iinfo(int_dtype).max), axis=-1)
        high_bits = jnp.where(ties, low_bits, next_up)
    to_float = partial(jax.lax.bitcast_convert_type, new_dtype=a.dtype)
    return to_float(low_bits), to_float(high_bits)


def _per_batch(coef: jax.Array, ndim: int) -> jax.Array:
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def frame_correlated_noise(
    key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, correlation: float = 0.0
) -> jax.Array:
    """Standard normal noise for videos [B, F, ...] whose frames share a part: sqrt(c) e_clip + sqrt(1 - c) e_frame.

    Every element stays N(0, 1) and any two frames' noises have correlation ``c`` (the "mixed" noise prior of PYoCo,
    Ge et al. 2023: a video model trained and sampled with it keeps content from frame to frame more easily). ``c = 0``
    is the reference's independent noise, exactly ``jax.random.normal(key, shape, dtype)``.
    """
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"frame noise correlation must be in [0, 1), got {correlation} (0: independent frames)")
    shape = tuple(shape)
    if correlation == 0.0:
        return jax.random.normal(key, shape, dtype)
    if len(shape) < 3:
        raise ValueError(f"frame-correlated noise is for videos [B, F, ...], got shape {shape}")
    k_clip, k_frame = jax.random.split(key)
    shared = jax.random.normal(k_clip, (shape[0], 1, *shape[2:]), jnp.float32)
    own = jax.random.normal(k_frame, shape, jnp.float32)
    return (math.sqrt(correlation) * shared + math.sqrt(1.0 - correlation) * own).astype(dtype)


def add_noise(
    alphas_cumprod: np.ndarray | jax.Array,
    original_samples: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array | int,
) -> jax.Array:
    """Forward diffusion q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (``scheduler.add_noise``).

    Used for SR noise augmentation (SPEC §3.5) and the SR2 img2img start (§3.6). As the reference, the float32
    abar_t is cast to the sample dtype before the square roots.

    Args:
      alphas_cumprod: the float32 table [num_train_timesteps] (``noise_tables(config).alphas_cumprod``).
      original_samples: clean samples [B, ...] (e.g. [B, F, H, W, C]).
      noise: same shape.
      timesteps: one integer per batch element [B], or a scalar for all.
    Returns:
      noisy samples, same shape and dtype as ``original_samples``.
    """
    dtype = original_samples.dtype
    abar = jnp.asarray(alphas_cumprod)[jnp.asarray(timesteps)].astype(dtype)
    sqrt_alpha = _per_batch(jnp.sqrt(abar), original_samples.ndim)
    sqrt_one_minus = _per_batch(jnp.sqrt(1 - abar), original_samples.ndim)
    return sqrt_alpha * original_samples + sqrt_one_minus * noise.astype(dtype)


def _x0_from_output(prediction_type: str, model_output, sample, alpha, sigma):
    # alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), both already in the sample dtype.
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output


def _at(table: np.ndarray | jax.Array, i: jax.Array | int) -> jax.Array:
    # Schedules hold numpy arrays until they are passed through jit; index them as jax arrays so i may be traced.
    return jnp.asarray(table)[i]


def _cast(coef: np.ndarray | jax.Array, i: jax.Array | int, dtype) -> jax.Array:
    return _at(coef, i).astype(dtype)


def _split_learned(model_output: jax.Array, sample: jax.Array, who: str) -> tuple[jax.Array, jax.Array]:
    c = sample.shape[-1]
    if model_output.shape[-1] != 2 * c:
        raise ValueError(
            f"{who}: variance_type is learned but the model output has {model_output.shape[-1]} channels for a "
            f"{c}-channel sample; expected {2 * c} ([eps, variance] on the last axis)"
        )
    return model_output[..., :c], model_output[..., c:]


class Schedule(Protocol):
    """What the sampler needs from a schedule (DPMSolverSchedule, DDPMSchedule, DDIMSchedule)."""

    timesteps: jax.Array
    init_noise_sigma: float
    needs_noise: bool  # the step draws noise (DDPM, DDIM with eta > 0)
    uses_variance_channels: bool  # the step consumes the model's learned-variance channels

    def __len__(self) -> int: ...
    def init_state(self, sample: jax.Array) -> Any: ...
    def step(
        self,
        state: Any,
        model_output: jax.Array,
        i: jax.Array | int,
        sample: jax.Array,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[Any, jax.Array]: ...


def _register(cls, data_fields: Sequence[str]):
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in data_fields]
    return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=meta)


def _slice_fields(obj, start: int, fields: Sequence[str]):
    if not 0 <= start < len(obj):
        raise SchedulerConfigError(f"cannot skip {start} of {len(obj)} steps: at least one step must remain")
    return dataclasses.replace(obj, **{f: getattr(obj, f)[start:] for f in fields})


# --------------------------------------------------------------------------------------------------------------------
# DPM-Solver++ multistep
# --------------------------------------------------------------------------------------------------------------------


class DPMState(NamedTuple):
    """Multistep memory of DPM-Solver, carried through the sampling loop."""

    prev_model_output: jax.Array  # converted output (x0 for ++, eps otherwise) of the previous step, sample's shape
    lower_order_nums: jax.Array  # int32 scalar: steps taken so far, saturating at solver_order


_DPM_ARRAYS = ("timesteps", "alpha", "sigma", "ratio", "phi", "coef_d1", "inv_r0", "force_first")


@dataclasses.dataclass(frozen=True)
class DPMSolverSchedule:
    """DPM-Solver multistep schedule: per-step float32 coefficients for ``timesteps`` [S].

    Step i goes from s = timesteps[i] to t = timesteps[i+1] (t = 0 after the last step, SPEC §4.2):
      first order:  x_t = ratio*x - phi*D0
      second order: x_t = ratio*x - phi*D0 - coef_d1*D1,   D1 = inv_r0 * (m0 - m1)
    with (dpmsolver++) ratio = sigma_t/sigma_s, phi = alpha_t (e^-h - 1), h = lambda_t - lambda_s,
    r0 = (lambda_s - lambda_{s-1}) / h, and coef_d1 = phi/2 (midpoint) or -alpha_t((e^-h - 1)/h + 1) (heun).
    ``config`` is static; every other field is a [S] array leaf.
    """

    config: DPMSolverMultistepConfig
    timesteps: np.ndarray | jax.Array  # int32 [S]
    alpha: np.ndarray | jax.Array  # float32 [S] alpha at timesteps[i] (for the x0 conversion)
    sigma: np.ndarray | jax.Array
    ratio: np.ndarray | jax.Array
    phi: np.ndarray | jax.Array
    coef_d1: np.ndarray | jax.Array
    inv_r0: np.ndarray | jax.Array
    force_first: np.ndarray | jax.Array  # bool [S]: lower_order_final makes this step first order
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES

    init_noise_sigma: ClassVar[float] = 1.0
    needs_noise: ClassVar[bool] = False

    @property
    def uses_variance_channels(self) -> bool:
        return self.config.variance_type in LEARNED_VARIANCE

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def skip(self, t_start: int) -> DPMSolverSchedule:
        """The img2img tail ``timesteps[t_start:]``; its first step is first order, as in the reference."""
        return _slice_fields(self, t_start, _DPM_ARRAYS)

    def init_state(self, sample: jax.Array) -> DPMState:
        return DPMState(jnp.zeros_like(sample), jnp.zeros((), jnp.int32))

    def convert_model_output(self, model_output: jax.Array, i: jax.Array | int, sample: jax.Array) -> jax.Array:
        """x0 prediction (dpmsolver++, thresholded if configured) or eps (dpmsolver); [B, ..., C]."""
        return self._convert(model_output, i, sample)[1]

    def _convert(self, model_output, i, sample) -> tuple[jax.Array, jax.Array]:
        # -> (converted output before thresholding, after thresholding)
        c, dtype = self.config, sample.dtype
        if self.uses_variance_channels and model_output.shape[-1] == 2 * sample.shape[-1]:
            # The reference slices model_output[:, :3]; the first half is the same for the 6-channel pixel UNets.
            model_output = model_output[..., : sample.shape[-1]]
        model_output = model_output.astype(dtype)
        alpha, sigma = _cast(self.alpha, i, dtype), _cast(self.sigma, i, dtype)
        if c.algorithm_type == "dpmsolver++":
            x0 = _x0_from_output(c.prediction_type, model_output, sample, alpha, sigma)
            if c.thresholding:
                return x0, dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value, self.threshold_axes)
            return x0, x0
        if c.prediction_type == "epsilon":
            eps = model_output
        elif c.prediction_type == "sample":
            eps = (sample - alpha * model_output) / sigma
        else:
            eps = alpha * model_output + sigma * sample
        return eps, eps

    def step(
        self,
        state: DPMState,
        model_output: jax.Array,
        i: jax.Array | int,
        sample: jax.Array,
        *,
        noise: jax.Array | None = None,
        return_aux: bool = False,
    ):
        """One DPM-Solver step from timesteps[i].

        Args:
          state: DPMState from ``init_state`` or the previous step.
          model_output: [B, ..., C] (or [B, ..., 2C] with learned variance; the first half is used).
          i: index into ``timesteps`` (may be traced).
          sample: x at timesteps[i], [B, ..., C].
          noise: unused (deterministic solver); accepted for a uniform interface.
          return_aux: also return {"x0_pred": the converted output (after thresholding), "x0_before_threshold"}.
        Returns:
          (state, prev_sample) or (state, prev_sample, aux).
        """
        del noise
        dtype = sample.dtype
        m0_raw, m0 = self._convert(model_output, i, sample)
        ratio, phi = _cast(self.ratio, i, dtype), _cast(self.phi, i, dtype)
        prev = ratio * sample - phi * m0
        if self.config.solver_order == 2:
            d1 = _cast(self.inv_r0, i, dtype) * (m0 - state.prev_model_output)
            second = ratio * sample - phi * m0 - _cast(self.coef_d1, i, dtype) * d1
            use_second = (state.lower_order_nums >= 1) & jnp.logical_not(_at(self.force_first, i))
            prev = jnp.where(use_second, second, prev)
        nums = jnp.minimum(state.lower_order_nums + 1, self.config.solver_order).astype(jnp.int32)
        new_state = DPMState(m0, nums)
        if return_aux:
            return new_state, prev, {"x0_pred": m0, "x0_before_threshold": m0_raw}
        return new_state, prev


_register(DPMSolverSchedule, _DPM_ARRAYS)


def dpm_schedule(
    config: DPMSolverMultistepConfig,
    num_inference_steps: int,
    *,
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES,
) -> DPMSolverSchedule:
    """``set_timesteps(num_inference_steps)`` plus every per-step coefficient, computed as the reference does in
    float32 from its tables."""
    tables = noise_tables(config)
    ts = dpm_timesteps(config, num_inference_steps)
    n = len(ts)
    lam, al, sg = tables.lambda_t, tables.alpha_t, tables.sigma_t
    plus = config.algorithm_type == "dpmsolver++"
    arrays = {k: np.zeros(n, np.float32) for k in ("alpha", "sigma", "ratio", "phi", "coef_d1", "inv_r0")}
    force_first = np.zeros(n, bool)
    for j, s in enumerate(ts):
        t = ts[j + 1] if j + 1 < n else 0
        arrays["alpha"][j], arrays["sigma"][j] = al[s], sg[s]
        h = _f32(lam[t] - lam[s])
        if plus:
            ratio = _f32(sg[t] / sg[s])
            em1 = _f32(_exp32(-h) - _f32(1))
            phi = _f32(al[t] * em1)
            heun = -_f32(al[t] * _f32(_f32(em1 / h) + _f32(1)))
        else:
            ratio = _f32(al[t] / al[s])
            em1 = _f32(_exp32(h) - _f32(1))
            phi = _f32(sg[t] * em1)
            heun = _f32(sg[t] * _f32(_f32(em1 / h) - _f32(1)))
        arrays["ratio"][j], arrays["phi"][j] = ratio, phi
        if j >= 1:
            r0 = _f32(_f32(lam[s] - lam[ts[j - 1]]) / h)
            arrays["inv_r0"][j] = _f32(1) / r0
            arrays["coef_d1"][j] = _f32(0.5) * phi if config.solver_type == "midpoint" else heun
        # lower_order_final: below 15 steps the last step is first order (SPEC §4.2).
        force_first[j] = config.solver_order == 1 or (config.lower_order_final and j == n - 1 and n < 15)
    return DPMSolverSchedule(
        config=config,
        timesteps=ts.astype(np.int32),
        force_first=force_first,
        threshold_axes=tuple(threshold_axes),
        **arrays,
    )


# --------------------------------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------------------------------

_DDPM_ARRAYS = (
    "timesteps",
    "sqrt_alpha_prod",
    "sqrt_beta_prod",
    "x0_coeff",
    "sample_coeff",
    "std",
    "min_log",
    "max_log",
    "has_noise",
)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """DDPM schedule: per-step float32 coefficients for ``timesteps`` [S] (prev_t = t - N // num_inference_steps).

    mean = x0_coeff * x0 + sample_coeff * x_t; for t > 0 the step adds noise scaled by ``std`` (fixed variance
    types) or by exp(logvar / 2) with logvar = frac*max_log + (1-frac)*min_log, frac = (v + 1)/2 (learned_range,
    v = the model's variance channels in [-1, 1]).
    """

    config: DDPMConfig
    timesteps: np.ndarray | jax.Array  # int32 [S]
    sqrt_alpha_prod: np.ndarray | jax.Array  # float32 [S] sqrt(abar_t)
    sqrt_beta_prod: np.ndarray | jax.Array  # sqrt(1 - abar_t)
    x0_coeff: np.ndarray | jax.Array
    sample_coeff: np.ndarray | jax.Array
    std: np.ndarray | jax.Array  # noise scale for the fixed variance types
    min_log: np.ndarray | jax.Array  # log of the clamped posterior variance beta~_t
    max_log: np.ndarray | jax.Array  # log beta_t
    has_noise: np.ndarray | jax.Array  # bool [S]: t > 0
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES

    init_noise_sigma: ClassVar[float] = 1.0
    needs_noise: ClassVar[bool] = True

    @property
    def uses_variance_channels(self) -> bool:
        return self.config.variance_type in LEARNED_VARIANCE

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def skip(self, t_start: int) -> DDPMSchedule:
        return _slice_fields(self, t_start, _DDPM_ARRAYS)

    def init_state(self, sample: jax.Array) -> tuple:
        del sample
        return ()

    def step(
        self,
        state: tuple,
        model_output: jax.Array,
        i: jax.Array | int,
        sample: jax.Array,
        *,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
        return_aux: bool = False,
    ):
        """One stochastic DDPM step from timesteps[i].

        Args:
          state: ``()`` (DDPM keeps no memory).
          model_output: [B, ..., C], or [B, ..., 2C] = [eps, v] for the learned variance types.
          i: index into ``timesteps`` (may be traced).
          sample: x_t, [B, ..., C].
          noise: the variance noise for this step, sample's shape (ignored where t == 0, where the reference
            draws nothing). Or give ``key`` to draw it with ``jax.random.normal``.
          return_aux: also return {"x0_pred": x0 after thresholding/clipping, "log_variance": the learned-range
            log variance (zeros where t == 0)}.
        Returns:
          (state, prev_sample) or (state, prev_sample, aux).
        """
        c, dtype = self.config, sample.dtype
        v = None
        if self.uses_variance_channels:
            model_output, v = _split_learned(model_output, sample, "DDPMSchedule")
            v = v.astype(dtype)
        model_output = model_output.astype(dtype)
        sa, sb = _cast(self.sqrt_alpha_prod, i, dtype), _cast(self.sqrt_beta_prod, i, dtype)
        x0 = _x0_from_output(c.prediction_type, model_output, sample, sa, sb)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value, self.threshold_axes)
        elif c.clip_sample:
            x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        prev = _cast(self.x0_coeff, i, dtype) * x0 + _cast(self.sample_coeff, i, dtype) * sample
        if noise is None:
            if key is None:
                raise ValueError("DDPM steps are stochastic: pass the step's noise or a PRNG key")
            noise = jax.random.normal(key, sample.shape, dtype)
        noise = noise.astype(dtype)
        log_variance = None
        if c.variance_type == "learned_range":
            frac = (v + 1) / 2
            log_variance = frac * _cast(self.max_log, i, dtype) + (1 - frac) * _cast(self.min_log, i, dtype)
            scaled = jnp.exp(0.5 * log_variance) * noise
        elif c.variance_type == "learned":
            scaled = v**0.5 * noise
        else:
            scaled = _cast(self.std, i, dtype) * noise
        prev = jnp.where(_at(self.has_noise, i), prev + scaled, prev)
        if return_aux:
            if log_variance is None:
                log_variance = jnp.zeros_like(sample)
            aux = {"x0_pred": x0, "log_variance": jnp.where(_at(self.has_noise, i), log_variance, 0)}
            return state, prev, aux
        return state, prev


_register(DDPMSchedule, _DDPM_ARRAYS)


def _prev_alpha(ac: np.ndarray, prev_t: int, final: np.float32) -> np.float32:
    return ac[prev_t] if prev_t >= 0 else final


def ddpm_schedule(
    config: DDPMConfig,
    num_inference_steps: int,
    *,
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES,
) -> DDPMSchedule:
    """``set_timesteps(num_inference_steps)`` plus the per-step float32 coefficients of ``DDPMScheduler.step``."""
    ac = noise_tables(config).alphas_cumprod
    ts = ddpm_timesteps(config, num_inference_steps)
    one = _f32(1)
    names = ("sqrt_alpha_prod", "sqrt_beta_prod", "x0_coeff", "sample_coeff", "std", "min_log", "max_log")
    arrays = {k: np.zeros(len(ts), np.float32) for k in names}
    for j, t in enumerate(ts):
        a_t = ac[t]
        a_prev = _prev_alpha(ac, t - config.num_train_timesteps // int(num_inference_steps), one)
        beta_t, beta_prev = _f32(one - a_t), _f32(one - a_prev)
        cur_alpha = _f32(a_t / a_prev)
        cur_beta = _f32(one - cur_alpha)
        arrays["sqrt_alpha_prod"][j] = np.sqrt(a_t)
        arrays["sqrt_beta_prod"][j] = np.sqrt(beta_t)
        arrays["x0_coeff"][j] = _f32(_f32(np.sqrt(a_prev) * cur_beta) / beta_t)
        arrays["sample_coeff"][j] = _f32(_f32(np.sqrt(cur_alpha) * beta_prev) / beta_t)
        variance = max(_f32(_f32(beta_prev / beta_t) * cur_beta), _f32(1e-20))  # posterior variance, clamped
        arrays["min_log"][j], arrays["max_log"][j] = _log32(variance), _log32(cur_beta)
        if config.variance_type == "fixed_small":
            arrays["std"][j] = np.sqrt(variance)
        elif config.variance_type == "fixed_small_log":
            arrays["std"][j] = _exp32(_f32(0.5) * _log32(variance))
        elif config.variance_type == "fixed_large":
            arrays["std"][j] = np.sqrt(cur_beta)
    return DDPMSchedule(
        config=config,
        timesteps=ts.astype(np.int32),
        has_noise=ts > 0,
        threshold_axes=tuple(threshold_axes),
        **arrays,
    )


# --------------------------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------------------------

_DDIM_ARRAYS = ("timesteps", "sqrt_alpha_prod", "sqrt_beta_prod", "sqrt_alpha_prev", "dir_coeff", "std")


@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
    """DDIM schedule (``eta`` fixed when the schedule is built): prev = sqrt(abar_prev) x0 + dir_coeff * eps
    (+ std * noise when eta > 0)."""

    config: DDIMConfig
    timesteps: np.ndarray | jax.Array  # int32 [S]
    sqrt_alpha_prod: np.ndarray | jax.Array  # float32 [S]
    sqrt_beta_prod: np.ndarray | jax.Array
    sqrt_alpha_prev: np.ndarray | jax.Array
    dir_coeff: np.ndarray | jax.Array  # sqrt(1 - abar_prev - std^2)
    std: np.ndarray | jax.Array  # eta * sigma_t
    eta: float = 0.0
    use_clipped_model_output: bool = False
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES

    init_noise_sigma: ClassVar[float] = 1.0
    uses_variance_channels: ClassVar[bool] = False

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def skip(self, t_start: int) -> DDIMSchedule:
        return _slice_fields(self, t_start, _DDIM_ARRAYS)

    def init_state(self, sample: jax.Array) -> tuple:
        del sample
        return ()

    def step(
        self,
        state: tuple,
        model_output: jax.Array,
        i: jax.Array | int,
        sample: jax.Array,
        *,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
        return_aux: bool = False,
    ):
        """One DDIM step from timesteps[i]; shapes as ``DDPMSchedule.step`` (noise only used when eta > 0)."""
        c, dtype = self.config, sample.dtype
        if model_output.shape[-1] == 2 * sample.shape[-1]:
            model_output = model_output[..., : sample.shape[-1]]  # drop learned-variance channels
        model_output = model_output.astype(dtype)
        sa, sb = _cast(self.sqrt_alpha_prod, i, dtype), _cast(self.sqrt_beta_prod, i, dtype)
        if c.prediction_type == "epsilon":
            x0, eps = (sample - sb * model_output) / sa, model_output
        elif c.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value, self.threshold_axes)
        elif c.clip_sample:
            x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        if self.use_clipped_model_output:
            eps = (sample - sa * x0) / sb
        prev = _cast(self.sqrt_alpha_prev, i, dtype) * x0 + _cast(self.dir_coeff, i, dtype) * eps
        if self.eta > 0:
            if noise is None:
                if key is None:
                    raise ValueError("DDIM with eta > 0 is stochastic: pass the step's noise or a PRNG key")
                noise = jax.random.normal(key, sample.shape, dtype)
            prev = prev + _cast(self.std, i, dtype) * noise.astype(dtype)
        if return_aux:
            return state, prev, {"x0_pred": x0}
        return state, prev


_register(DDIMSchedule, _DDIM_ARRAYS)


def ddim_schedule(
    config: DDIMConfig,
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    threshold_axes: tuple[int, ...] = DEFAULT_THRESHOLD_AXES,
) -> DDIMSchedule:
    """``set_timesteps(num_inference_steps)`` plus the per-step float32 coefficients of ``DDIMScheduler.step``."""
    if eta < 0:
        raise SchedulerConfigError(f"eta must be >= 0, got {eta}")
    ac = noise_tables(config).alphas_cumprod
    ts = ddim_timesteps(config, num_inference_steps)
    one = _f32(1)
    final = one if config.set_alpha_to_one else ac[0]
    names = ("sqrt_alpha_prod", "sqrt_beta_prod", "sqrt_alpha_prev", "dir_coeff", "std")
    arrays = {k: np.zeros(len(ts), np.float32) for k in names}
    for j, t in enumerate(ts):
        a_t = ac[t]
        a_prev = _prev_alpha(ac, t - config.num_train_timesteps // int(num_inference_steps), final)
        beta_t, beta_prev = _f32(one - a_t), _f32(one - a_prev)
        variance = _f32(_f32(beta_prev / beta_t) * _f32(one - _f32(a_t / a_prev)))
        std = _f32(_f32(eta) * np.sqrt(variance))
        arrays["sqrt_alpha_prod"][j], arrays["sqrt_beta_prod"][j] = np.sqrt(a_t), np.sqrt(beta_t)
        arrays["sqrt_alpha_prev"][j] = np.sqrt(a_prev)
        arrays["dir_coeff"][j] = np.sqrt(_f32(_f32(one - a_prev) - _f32(std * std)))
        arrays["std"][j] = std
    return DDIMSchedule(
        config=config,
        timesteps=ts.astype(np.int32),
        eta=float(eta),
        use_clipped_model_output=use_clipped_model_output,
        threshold_axes=tuple(threshold_axes),
        **arrays,
    )


def make_schedule(config: SchedulerConfig, num_inference_steps: int, **kwargs: Any) -> Schedule:
    """The schedule for any supported config (``dpm_schedule`` / ``ddpm_schedule`` / ``ddim_schedule``)."""
    if isinstance(config, DPMSolverMultistepConfig):
        return dpm_schedule(config, num_inference_steps, **kwargs)
    if isinstance(config, DDPMConfig):
        return ddpm_schedule(config, num_inference_steps, **kwargs)
    if isinstance(config, DDIMConfig):
        return ddim_schedule(config, num_inference_steps, **kwargs)
    raise SchedulerConfigError(f"not a scheduler config: {type(config).__name__}")
