"""The denoising loop: classifier-free guidance plus a scheduler, compiled as one ``lax.scan``.

The sampler never imports a network. The denoiser is a function

    denoise(params, x_in, t, cond) -> model_output
      x_in  [N, ..., C_in]   the model input (N = 2B with CFG: [negative; positive], SPEC §1.4)
      t     [N] int32        the timestep of every batch element
      cond  any pytree       whatever the network needs (text embeddings, noise levels, ...), already CFG-batched
      model_output [N, ..., C_out]   C_out = C (eps) or 2C (eps + learned variance)

``model_input_fn(x_cfg, cond) -> x_in`` builds the model input from the CFG-duplicated sample, e.g. concatenates
the interpolation cond+mask or the SR upsampled video on the last axis (``concat_cond_channels``).

Example: replaying a recorded trace (golden ``pipelines/*/trace.npz``), the way a stage test drives the sampler
without a UNet. ``unet_output`` [S, 2B, F, H, W, 6] is the recorded CFG-batch output of step k and
``step_timesteps`` the t of each step; the denoiser finds its step from t::

    def replay(trace, x_in, t, cond):
        k = jnp.argmax(trace["step_timesteps"] == t[0])
        return trace["unet_output"][k]

    config = load_scheduler_config(folder / "scheduler")           # DPM-Solver++, thresholding
    schedule = make_schedule(config, num_inference_steps=4)
    sampler = Sampler(replay)
    x = sampler(trace, schedule, noise0 * schedule.init_noise_sigma, cond=None, guidance_scale=9.0)

For SR1 the stage would pass ``cond={"text": ..., "upscaled": up_cfg, "noise_level": ...}`` and
``model_input_fn=lambda x, c: concat_cond_channels(x, c["upscaled"])``; for SR2 (img2img) it passes
``schedule.skip(img2img_t_start(50, 0.8))`` and the noised latents as ``x_init``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from show1_jax.schedulers import Schedule

__all__ = [
    "Denoiser",
    "ModelInputFn",
    "Sampler",
    "apply_guidance",
    "concat_cond_channels",
    "sample",
    "sample_step",
]

Denoiser = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
ModelInputFn = Callable[[jax.Array, Any], jax.Array]
Progress = Any  # an object with .update(n) (tqdm) or a callable(done, total)


def concat_cond_channels(x: jax.Array, cond_channels: jax.Array) -> jax.Array:
    """[N, ..., C] sample and [N or N/2, ..., Cc] conditioning -> [N, ..., C + Cc] (reference channel order).

    A conditioning batch of half the sample's is duplicated for the CFG halves (both get the same conditioning).
    """
    if cond_channels.shape[0] * 2 == x.shape[0]:
        cond_channels = jnp.concatenate([cond_channels, cond_channels], axis=0)
    return jnp.concatenate([x, cond_channels.astype(x.dtype)], axis=-1)


def apply_guidance(
    model_output: jax.Array,
    guidance_scale: jax.Array | float | None,
    channels: int,
    keep_variance: bool,
) -> jax.Array:
    """Classifier-free guidance on the eps channels (SPEC §1.4).

    Args:
      model_output: [2B, ..., C_out] for the CFG batch [negative; positive], or [B, ..., C_out] without CFG.
      guidance_scale: s in eps = eps_u + s (eps_c - eps_u); None for no CFG.
      channels: C, the number of eps channels (the sample's channels).
      keep_variance: keep the learned-variance channels (taken from the conditional half) for the scheduler.
    Returns:
      [B, ..., C] or [B, ..., C_out] with ``keep_variance``.
    """
    if guidance_scale is None:
        return model_output if keep_variance else model_output[..., :channels]
    uncond, text = jnp.split(model_output, 2, axis=0)
    g = jnp.asarray(guidance_scale).astype(model_output.dtype)
    eps = uncond[..., :channels] + g * (text[..., :channels] - uncond[..., :channels])
    if keep_variance and model_output.shape[-1] > channels:
        return jnp.concatenate([eps, text[..., channels:]], axis=-1)
    return eps


def sample_step(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    carry: tuple[jax.Array, Any],
    i: jax.Array | int,
    cond: Any = None,
    *,
    guidance_scale: jax.Array | float | None = None,
    model_input_fn: ModelInputFn | None = None,
    noise: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """One sampler step: model input, denoiser, guidance, scheduler step. Pure.

    Args:
      carry: (x [B, ..., C], scheduler state).
      i: index into ``schedule.timesteps`` (may be traced).
      noise: this step's variance noise [B, ..., C] for stochastic schedulers; else drawn from
        ``fold_in(key, i)``.
    Returns:
      the new carry.
    """
    x, state = carry
    t = jnp.asarray(schedule.timesteps)[i]
    x_in = x if guidance_scale is None else jnp.concatenate([x, x], axis=0)
    if model_input_fn is not None:
        x_in = model_input_fn(x_in, cond)
    t_in = jnp.full((x_in.shape[0],), t, jnp.int32)
    out = denoise(params, x_in, t_in, cond).astype(x.dtype)
    model_output = apply_guidance(out, guidance_scale, x.shape[-1], schedule.uses_variance_channels)
    if schedule.needs_noise and noise is None:
        if key is None:
            raise ValueError(
                f"{type(schedule).__name__} is stochastic: pass noise [S, ...] (to replay a run) or a PRNG key"
            )
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    state, x = schedule.step(state, model_output, i, x, noise=noise)
    return x, state


# Progress sinks are looked up by an integer token that is a traced argument, so a new progress bar per call does
# not recompile. The callback is unordered: ordered debug callbacks are refused for computations spanning more than
# one device. Unordered calls may repeat or arrive out of order, so sinks only move forward.
_SINKS: dict[int, _ProgressSink] = {}
_SINKS_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


class _ProgressSink:
    def __init__(self, progress: Progress, total: int):
        self.progress, self.total, self.done = progress, total, 0
        self.lock = threading.Lock()

    def advance_to(self, done: int) -> None:
        with self.lock:
            if done <= self.done:
                return
            delta, self.done = done - self.done, done
        if hasattr(self.progress, "update"):
            self.progress.update(delta)
        else:
            self.progress(done, self.total)


def _report_progress(token: Any, done: Any) -> None:
    sink = _SINKS.get(int(token))
    if sink is not None:
        sink.advance_to(int(done))


def sample(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    x_init: jax.Array,
    cond: Any = None,
    *,
    guidance_scale: jax.Array | float | None = None,
    model_input_fn: ModelInputFn | None = None,
    noise: jax.Array | None = None,
    key: jax.Array | None = None,
    progress_token: jax.Array | int | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The whole denoising loop as one ``lax.scan`` over ``schedule.timesteps``. Pure; jit it (``Sampler`` does).

    Args:
      denoise: the network, see the module docstring.
      params: passed to ``denoise`` unchanged.
      schedule: a scheduler schedule (``make_schedule``), possibly ``.skip(t_start)`` for img2img.
      x_init: the starting sample [B, F, H, W, C] (or [B, H, W, C]), already scaled by init_noise_sigma or noised.
      cond: pytree passed to ``denoise`` and ``model_input_fn``.
      guidance_scale: CFG scale (traced: changing it does not recompile); None runs without CFG.
      model_input_fn: builds the model input from the (CFG-duplicated) sample and ``cond``.
      noise: per-step variance noise [S, B, ..., C] for stochastic schedulers (entries of steps with t == 0 are
        unused), to replay a reference run. Otherwise stochastic steps draw from ``fold_in(key, i)``.
      key: PRNG key for stochastic schedulers when ``noise`` is None.
      progress_token: a registered progress sink (``Sampler`` manages these); None compiles no callback.
      return_trajectory: also return x after every step [S, B, ..., C].
    Returns:
      x after the last step [B, ..., C] (and the trajectory).
    """
    steps = len(schedule)
    if noise is not None and noise.shape[0] != steps:
        raise ValueError(f"noise has {noise.shape[0]} steps, the schedule has {steps}: pass noise [S, B, ...]")

    def body(carry, xs):
        i, step_noise = xs
        carry = sample_step(
            denoise,
            params,
            schedule,
            carry,
            i,
            cond,
            guidance_scale=guidance_scale,
            model_input_fn=model_input_fn,
            noise=step_noise,
            key=key,
        )
        if progress_token is not None:
            jax.debug.callback(_report_progress, progress_token, i + 1)
        return carry, (carry[0] if return_trajectory else None)

    carry = (x_init, schedule.init_state(x_init))
    (x, _), trajectory = jax.lax.scan(body, carry, (jnp.arange(steps, dtype=jnp.int32), noise))
    return (x, trajectory) if return_trajectory else x


class Sampler:
    """A compiled sampler for one denoiser: the scan loop under one ``jax.jit``, and a Python-loop variant.

    Everything that changes between calls (params, schedule arrays, x_init, cond, guidance scale, noise, key, the
    progress bar) is a traced argument, so one compilation serves every call with the same shapes, dtypes and
    schedule length. The progress callback costs well under 1% of a step (``bench/bench_sampler_overhead.py``).

    Args:
      denoise: ``denoise(params, x_in, t, cond) -> model_output``.
      model_input_fn: see ``sample``.
      report_progress: compile the per-step progress callback in (a call without a progress bar then costs one
        no-op host callback per step).
      return_trajectory: also return x after every step.
    """

    def __init__(
        self,
        denoise: Denoiser,
        *,
        model_input_fn: ModelInputFn | None = None,
        report_progress: bool = True,
        return_trajectory: bool = False,
    ):
        self.denoise = denoise
        self.model_input_fn = model_input_fn
        self.report_progress = report_progress
        self.return_trajectory = return_trajectory
        self.jitted = jax.jit(self._run)
        self.jitted_step = jax.jit(self._step)

    def _run(self, params, schedule, x_init, cond, guidance_scale, noise, key, token):
        return sample(
            self.denoise,
            params,
            schedule,
            x_init,
            cond,
            guidance_scale=guidance_scale,
            model_input_fn=self.model_input_fn,
            noise=noise,
            key=key,
            progress_token=token,
            return_trajectory=self.return_trajectory,
        )

    def _step(self, params, schedule, carry, i, cond, guidance_scale, noise, key):
        return sample_step(
            self.denoise,
            params,
            schedule,
            carry,
            i,
            cond,
            guidance_scale=guidance_scale,
            model_input_fn=self.model_input_fn,
            noise=noise,
            key=key,
        )

    @staticmethod
    def _scale(guidance_scale: float | jax.Array | None) -> jax.Array | None:
        # Always an array, so a Python float and an array hit the same compiled function.
        return None if guidance_scale is None else jnp.asarray(guidance_scale, jnp.result_type(float))

    def __call__(
        self,
        params: Any,
        schedule: Schedule,
        x_init: jax.Array,
        cond: Any = None,
        *,
        guidance_scale: float | jax.Array | None = None,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
        progress: Progress | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Run the compiled loop; see ``sample`` for the arguments. ``progress``: a tqdm-like object (advanced with
        ``update(n)``) or a callable ``(done, total)``, advanced from inside the compiled loop after every step.
        With a progress bar the call waits for the result before returning."""
        guidance_scale = self._scale(guidance_scale)
        if not self.report_progress:
            if progress is not None:
                raise ValueError("this Sampler was built with report_progress=False: build it with True")
            return self.jitted(params, schedule, x_init, cond, guidance_scale, noise, key, None)
        if progress is None:
            return self.jitted(params, schedule, x_init, cond, guidance_scale, noise, key, jnp.int32(0))
        token = next(_TOKENS)
        with _SINKS_LOCK:
            _SINKS[token] = _ProgressSink(progress, len(schedule))
        try:
            out = self.jitted(params, schedule, x_init, cond, guidance_scale, noise, key, jnp.int32(token))
            jax.block_until_ready(out)
            jax.effects_barrier()  # every callback of this call has run
        finally:
            with _SINKS_LOCK:
                del _SINKS[token]
        return out

    def python_loop(
        self,
        params: Any,
        schedule: Schedule,
        x_init: jax.Array,
        cond: Any = None,
        *,
        guidance_scale: float | jax.Array | None = None,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
        progress: Progress | None = None,
    ) -> jax.Array:
        """The same computation as ``__call__`` with the loop in Python around one jitted step (one compilation
        for all steps). For debugging and for callers that need to act between steps."""
        guidance_scale = self._scale(guidance_scale)
        sink = None if progress is None else _ProgressSink(progress, len(schedule))
        carry = (x_init, schedule.init_state(x_init))
        for i in range(len(schedule)):
            step_noise = None if noise is None else noise[i]
            carry = self.jitted_step(params, schedule, carry, jnp.int32(i), cond, guidance_scale, step_noise, key)
            if sink is not None:
                sink.advance_to(i + 1)
        return carry[0]

    def cache_size(self) -> int:
        """Number of compiled versions of the scan loop (for recompilation checks)."""
        return self.jitted._cache_size()
