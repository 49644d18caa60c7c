"""The stages of the Show-1 cascade as pure, jitted functions (SPEC §3): keyframes -> interpolation -> SR1 -> SR2.

Every stage is ``stage(denoise, params, ..., inputs, *, noise or key) -> outputs``, channels-last (SPEC §1.1),
compiled once per shape (``denoise`` and the structural options are static; params, schedules, embeddings,
guidance scales, noise levels and noise are traced). ``denoise(params, x_in, t, cond)`` is any denoiser in the
sampler's convention (``show1_jax.sampler``): ``unet_denoiser(graphdef)`` for a UNet split with ``nnx.split``, or a
trace-replay function in the tests. ``text`` is always the CFG batch [2B, L, D] = [negative; positive] (SPEC §1.4,
``cfg_text``). Randomness: pass the reference's draws (``init_noise``, ``cond_noise``, ...; our layout) to replay a
run, or a ``key`` that is split per draw (see each stage). ``progress_token`` comes from ``progress_scope``.

API (keep stable: ``show1_jax/pipeline.py`` builds on it)::

    unet_denoiser(graphdef) -> denoise(params, x_in, t, cond)
        cond = {"text": [2B, L, D], optional "noise_level": [2B] int, optional "dropout_key": key}
    cfg_text(negative [B, L, D], positive [B, L, D]) -> [2B, L, D]
    resize_bilinear(x [..., h, w, C], (H, W)) -> [..., H, W, C]        torch bilinear, align_corners=True
    interpolation_cond(start [B, H, W, 3], end [B, H, W, 3], num_frames) -> [B, num_frames, H, W, 4]
    video_to_uint8(video [..., H, W, 3] float) -> uint8 (numpy, host)    the reference's tensor2vid
    resize_frames_bicubic(frames [..., H, W, 3] uint8, (H, W)) -> uint8  (numpy/PIL, host)
    latents_from_torch(noise [B*F, C, h, w], batch) -> [B, F, h, w, C]   the SR2 draws' layout (numpy, host)
    progress_scope(progress, steps, windows=None) -> context manager yielding progress_token

    keyframes(denoise, params, schedule, text, *, guidance_scale, noise=None | key=None, shape=(F, H, W),
              dropout_key=None, dtype=None, progress_token=None, return_trajectory=False)
        -> [B, F, H, W, 3]                                                          (SPEC §3.3)
    interpolation_window(denoise, params, schedule, text, start_frame [B, H, W, 3], end_frame [B, H, W, 3], *,
                         guidance_scale, init_noise=None | key=None, num_frames=5, dtype=None,
                         progress_token=None, return_trajectory=False)
        -> [B, num_frames, H, W, 3]                                                 (SPEC §3.4)
    interpolate(denoise, params, schedule, text, keyframes [B, K, H, W, 3], *, guidance_scale,
                init_noise=None | key=None, window_frames=5, batched=True, dtype=None, progress_token=None)
        -> [B, (K - 1) * (window_frames - 1) + 1, H, W, 3]                          (SPEC §3.4)
    first_frame_sr(denoise, params, schedule, noise_alphas_cumprod, text, image [B, h, w, 3], *, height, width,
                   guidance_scale, noise_level, init_noise=None, cond_noise=None, step_noise=None, key=None,
                   dtype=None, progress_token=None, return_trajectory=False)
        -> [B, height, width, 3]                                                    (SPEC §3.5 3a)
    sr1_window(denoise, params, schedule, noise_alphas_cumprod, text, video [B, F, h, w, 3],
               first_frame_cond [B, H, W, 3], *, guidance_scale, noise_level, init_noise=None, cond_noise=None,
               key=None, dtype=None, progress_token=None, return_trajectory=False)
        -> [B, F, H, W, 3]                                                          (SPEC §3.5 3b)
    super_resolve_sr1(denoise, params, schedule, noise_alphas_cumprod, text, video [B, N, h, w, 3],
                      first_frame [B, H, W, 3], *, guidance_scale, noise_level, window_size=8, stride=7,
                      init_noise=None [n_windows, B, window_size, H, W, 3], cond_noise=None, key=None,
                      dtype=None, progress_token=None)
        -> [B, N, H, W, 3]                                                          (SPEC §3.5)
    video_to_video_sr2(denoise, params, vae_graphdef, vae_params, schedule, text, frames [B, F, H, W, 3] uint8, *,
                       guidance_scale, strength, num_inference_steps=None, posterior_noise=None, noise=None,
                       key=None, frames_per_chunk=None, dtype=jnp.float32, progress_token=None,
                       return_trajectory=False)
        -> [B, F, H, W, 3] float32                                                  (SPEC §3.6)
    sr1_frame_counts(window_size=8, stride=7, up_to=64) -> the frame counts super_resolve_sr1 accepts

Schedules are ``show1_jax.schedulers.make_schedule(config, num_inference_steps)``; ``noise_alphas_cumprod`` is
``noise_tables(image_noising_scheduler_config).alphas_cumprod``. With ``return_trajectory=True`` a stage returns
``(output, trajectory [S, ...])``: the sample after every step (SR2: the latents [S, B, F, h, w, 4]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax import sampler as _sampler
from show1_jax.sampler import Denoiser, concat_cond_channels, sample
from show1_jax.schedulers import Schedule, add_noise, frame_correlated_noise, img2img_t_start, noise_tables

__all__ = [
    "UNetDenoiser",
    "cfg_text",
    "first_frame_sr",
    "interpolate",
    "interpolation_cond",
    "interpolation_window",
    "keyframes",
    "latents_from_torch",
    "progress_scope",
    "resize_bilinear",
    "resize_frames_bicubic",
    "sr1_frame_counts",
    "sr1_window",
    "super_resolve_sr1",
    "unet_denoiser",
    "video_to_uint8",
    "video_to_video_sr2",
]

Array = jax.Array
DType = Any

# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetDenoiser:
    """``denoise(params, x_in, t, cond)`` for a split UNet; hashable, so it can be a static jit argument.

    cond: {"text": [N, L, D] CFG-batched embeddings, optional "noise_level": [N] class labels (SR1, IF-II-L),
    optional "dropout_key": the keyframe stage's train-mode temporal-conv dropout (SPEC §1.6), folded with the step's
    timestep so every step draws new masks}. Other keys (conditioning channels) are for ``model_input_fn``.
    """

    graphdef: nnx.GraphDef

    def __call__(self, params: Any, x_in: Array, t: Array, cond: dict[str, Any]) -> Array:
        model = nnx.merge(self.graphdef, params)
        dropout_key = cond.get("dropout_key")
        if dropout_key is not None:
            dropout_key = jax.random.fold_in(dropout_key, t[0])
        return model(x_in, t, cond["text"], class_labels=cond.get("noise_level"), dropout_key=dropout_key)


def unet_denoiser(graphdef: nnx.GraphDef) -> UNetDenoiser:
    """The denoiser of a UNet: ``graphdef, params = nnx.split(unet)``; reuse one graphdef to reuse compilations."""
    return UNetDenoiser(graphdef)


def cfg_text(negative: Array, positive: Array) -> Array:
    """[B, L, D] negative and positive embeddings -> the CFG batch [2B, L, D] = [negative; positive] (SPEC §1.4)."""
    if negative.shape != positive.shape:
        raise ValueError(f"negative {negative.shape} and positive {positive.shape} embeddings must have one shape")
    return jnp.concatenate([negative, positive], axis=0)


def _align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, weight of i1) per output index for linear interpolation with align_corners=True (torch)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = scale * np.arange(n_out, dtype=np.float64)
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize with ``align_corners=True``, torch's ``F.interpolate(mode="bilinear")`` (SPEC §3.5).

    Args:
      x: [..., h, w, C] images (any leading axes: [B, h, w, C] or [B, F, h, w, C]).
      size: (H, W).
    Returns:
      [..., H, W, C] in x's dtype.
    """
    h, w = x.shape[-3], x.shape[-2]
    hi0, hi1, hl = _align_corners_taps(h, size[0])
    wi0, wi1, wl = _align_corners_taps(w, size[1])
    hl1 = jnp.asarray(hl, x.dtype)[:, None, None]  # [H, 1, 1]
    wl1 = jnp.asarray(wl, x.dtype)[:, None]  # [W, 1]
    r0, r1 = jnp.take(x, hi0, axis=-3), jnp.take(x, hi1, axis=-3)  # [..., H, w, C]
    top = (1 - wl1) * jnp.take(r0, wi0, axis=-2) + wl1 * jnp.take(r0, wi1, axis=-2)
    bottom = (1 - wl1) * jnp.take(r1, wi0, axis=-2) + wl1 * jnp.take(r1, wi1, axis=-2)
    return (1 - hl1) * top + hl1 * bottom


def video_to_uint8(video: Any) -> np.ndarray:
    """The reference's ``tensor2vid`` (SPEC §3.6 step 1), on the host: x*0.5 + 0.5, clamp to [0, 1], *255 truncated.

    Args:
      video: [..., H, W, 3] float in about [-1, 1] (e.g. [B, F, H, W, 3]); computed in its own float dtype.
    Returns:
      uint8 of the same shape.
    """
    x = np.asarray(video)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"video_to_uint8 takes a float video in [-1, 1], got dtype {x.dtype}")
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float32)  # bfloat16
    x = np.clip(x * x.dtype.type(0.5) + x.dtype.type(0.5), 0, 1)
    return (x * x.dtype.type(255)).astype(np.uint8)  # truncation, not rounding (SPEC §3.6)


def resize_frames_bicubic(frames: Any, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 frames on the host exactly as ``run_inference.py`` before SR2 (SPEC §3.6 step 2).

    ``Image.fromarray(frame).resize((W, H))`` with PIL's default filter (bicubic for RGB). The aspect ratio is not
    kept: 256x160 -> 576x320 stretches horizontally, as the reference does.

    Args:
      frames: uint8 [..., h, w, 3] (e.g. [F, h, w, 3] or [B, F, h, w, 3]).
      size: (H, W).
    Returns:
      uint8 [..., H, W, 3].
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 [..., H, W, 3] (video_to_uint8 first), got {frames.dtype} {frames.shape}"
        )
    height, width = size
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((width, height))) for f in flat])
    return out.reshape(*frames.shape[:-3], height, width, 3)


def latents_from_torch(noise: Any, batch: int) -> np.ndarray:
    """SR2's recorded draws (B*F, C, h, w), row = b*F + f (SPEC §1.7) -> our latent-video layout [B, F, h, w, C]."""
    noise = np.asarray(noise)
    if noise.ndim != 4 or noise.shape[0] % batch:
        raise ValueError(f"expected per-frame noise [B*F, C, h, w] with B={batch}, got {noise.shape}")
    frames = np.transpose(noise, (0, 2, 3, 1))
    return frames.reshape(batch, noise.shape[0] // batch, *frames.shape[1:])


def sr1_frame_counts(window_size: int = 8, stride: int = 7, up_to: int = 64) -> list[int]:
    """Frame counts the SR1 windows cover exactly: window_size + k*stride (SPEC §3.7: 29 works, 37 does not)."""
    return list(range(window_size, up_to + 1, stride))


def _check_sr1_windows(num_frames: int, window_size: int, stride: int) -> int:
    if not 1 <= stride < window_size:
        raise ValueError(
            f"SR1 windows need 1 <= stride < window_size so that consecutive windows share a frame (the first-frame "
            f"chaining of SPEC §3.5), got window_size={window_size}, stride={stride}"
        )
    if num_frames < window_size or (num_frames - window_size) % stride:
        valid = ", ".join(str(n) for n in sr1_frame_counts(window_size, stride, max(num_frames + stride, 64)))
        raise ValueError(
            f"SR1 windows of {window_size} frames with stride {stride} cannot cover {num_frames} frames: valid frame "
            f"counts are window_size + k*stride = {valid}, ... (SPEC §3.7); with 5-frame interpolation windows, "
            f"K keyframes give 4K - 3 frames (8 keyframes -> 29)"
        )
    return (num_frames - window_size) // stride + 1


class _WindowSink:
    """Forwards one window's increments to a shared progress object (tqdm-like ``update`` or ``(done, total)``)."""

    def __init__(self, shared: Any, total: int, lock: threading.Lock, counter: list[int]):
        self.shared, self.total, self.lock, self.counter = shared, total, lock, counter

    def update(self, n: int) -> None:
        with self.lock:
            self.counter[0] += n
            done = self.counter[0]
        if hasattr(self.shared, "update"):
            self.shared.update(n)
        else:
            self.shared(done, self.total)


@contextlib.contextmanager
def progress_scope(progress: Any, steps: int, windows: int | None = None) -> Iterator[Array]:
    """A progress token for stage calls: ``with progress_scope(bar, steps) as tok: stage(..., progress_token=tok)``.

    The stage's compiled loop advances ``progress`` (a tqdm-like object with ``update(n)``, or a callable
    ``(done, total)``) after every denoising step. Stages that loop over windows inside one compiled call
    (``super_resolve_sr1``, ``interpolate(batched=False)``) take one token per window: pass ``windows`` (the total is
    then steps * windows). The scope waits for every callback on exit; use the stage's output inside it.

    Args:
      progress: the progress sink.
      steps: denoising steps of one sampling loop (``len(schedule)``).
      windows: None for one loop (a scalar token), else the number of windows (a [windows] token array).
    """
    n = 1 if windows is None else windows
    lock, counter = threading.Lock(), [0]
    shared = _WindowSink(progress, steps * n, lock, counter)
    tokens = []
    # The sampler's progress registry is keyed by integer tokens that are traced arguments (see sampler.py).
    with _sampler._SINKS_LOCK:
        for _ in range(n):
            token = next(_sampler._TOKENS)
            _sampler._SINKS[token] = _sampler._ProgressSink(shared, steps)
            tokens.append(token)
    try:
        yield jnp.asarray(tokens[0] if windows is None else tokens, jnp.int32)
        jax.effects_barrier()  # every callback of the calls made in the scope has run
    finally:
        with _sampler._SINKS_LOCK:
            for token in tokens:
                _sampler._SINKS.pop(token, None)


def _token(progress_token: Array | None, windows: int | None = None) -> Array | None:
    """Check a progress token's shape: a scalar for one sampling loop, [windows] for a loop per window."""
    if progress_token is None:
        return None
    shape = () if windows is None else (windows,)
    if tuple(jnp.shape(progress_token)) != shape:
        how = "progress_scope(bar, steps)" if windows is None else f"progress_scope(bar, steps, windows={windows})"
        raise ValueError(
            f"this call runs {'one sampling loop' if windows is None else f'{windows} sampling loops'}: its "
            f"progress_token has shape {tuple(jnp.shape(progress_token))}, make it with {how}"
        )
    return progress_token


def _dtype(dtype: DType | None, *candidates: Any) -> DType:
    """The stage's compute dtype: ``dtype`` if given, else the first floating candidate's, else float32."""
    if dtype is not None:
        return jnp.dtype(dtype)
    for c in candidates:
        if c is not None and jnp.issubdtype(jnp.asarray(c).dtype, jnp.floating):
            return jnp.asarray(c).dtype
    return jnp.dtype(jnp.float32)


def _normal(key: Array | None, shape: tuple[int, ...], dtype: DType, what: str) -> Array:
    if key is None:
        raise ValueError(f"pass {what} (e.g. a recorded draw, to replay a reference run) or key= (a jax PRNG key)")
    return jax.random.normal(key, shape, dtype)


def _noise_or_draw(noise: Array | None, key: Array | None, shape: tuple[int, ...], dtype: DType, what: str) -> Array:
    if noise is None:
        return _normal(key, shape, dtype, what)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(noise.shape)}, expected {tuple(shape)} (channels last)")
    return noise.astype(dtype)


def _keys(key: Array | None, n: int) -> list[Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _cfg_labels(noise_level: Array | int, batch: int, guided: bool = True) -> Array:
    """Noise levels as class labels: one per element of both CFG halves (SPEC §1.4), or of the batch unguided."""
    return jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (2 * batch if guided else batch,))


def _check_text(text: Array, batch: int | None = None, guided: bool = True) -> int:
    """The batch size B of ``text``: [2B, L, D] = [negative; positive] with CFG, [B, L, D] without (guidance None)."""
    if not guided:
        if text.ndim != 3 or (batch is not None and text.shape[0] != batch):
            raise ValueError(f"without guidance text must be the prompts' embeddings [B, L, D] (B = {batch}), got "
                             f"{text.shape}")  # fmt: skip
        return text.shape[0]
    if text.ndim != 3 or text.shape[0] % 2:
        raise ValueError(f"text must be the CFG batch [2B, L, D] = [negative; positive] (cfg_text), got {text.shape}")
    if batch is not None and text.shape[0] != 2 * batch:
        raise ValueError(f"text has {text.shape[0]} rows, expected 2B = {2 * batch} for a batch of {batch}")
    return text.shape[0] // 2


def from_strength(schedule: Schedule, strength: float, noise: Array, start: Array) -> tuple[Schedule, Array]:
    """Where a conditioned stage's loop starts: (schedule, initial sample).

    ``strength`` 1.0 is the reference: the whole schedule from ``noise`` x init_noise_sigma. Below 1 the loop starts
    part-way (SDEdit, as SR2's img2img): the schedule's tail ``schedule.skip(img2img_t_start(n, strength))`` from
    ``start`` (the stage's conditioning frames, e.g. the keyframe blend or the upsampled video) noised to the tail's
    first timestep with ``noise``. Models whose noise prediction is imprecise at the highest noise levels (small,
    briefly trained ones such as Show-1 Shapes) lose their conditioning there; starting below them keeps it, in fewer
    steps.
    """
    if strength == 1.0:
        return schedule, noise * schedule.init_noise_sigma
    tail = schedule.skip(img2img_t_start(len(schedule), strength))
    t0 = jnp.broadcast_to(jnp.asarray(tail.timesteps)[0], (noise.shape[0],))
    return tail, add_noise(noise_tables(tail.config).alphas_cumprod, start.astype(noise.dtype), noise, t0)


def _with_channels(x_cfg: Array, cond: dict[str, Any]) -> Array:
    return concat_cond_channels(x_cfg, cond["channels"])


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: keyframes
# --------------------------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=0, static_argnames=("shape", "dtype", "return_trajectory", "frame_noise_correlation"))
def keyframes(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    text: Array,
    *,
    guidance_scale: Array | float,
    noise: Array | None = None,
    key: Array | None = None,
    shape: tuple[int, int, int] | None = None,
    dropout_key: Array | None = None,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    return_trajectory: bool = False,
    frame_noise_correlation: float = 0.0,
) -> Array | tuple[Array, Array]:
    """Stage 1, ``TextToVideoIFPipeline`` (SPEC §3.3): text -> keyframes.

    Initial noise x init_noise_sigma; per step CFG on the eps channels (the learned variance is taken from the
    conditional half and dropped or kept per the scheduler's ``variance_type``, SPEC §4.1); dynamic thresholding per
    frame (the schedule's default ``threshold_axes``). Returns the raw final sample, not clamped.

    Args:
      denoise, params: the base UNet (``unet_denoiser``).
      schedule: the DPM-Solver++ schedule (``make_schedule``).
      text: [2B, L, D] CFG batch [negative; positive].
      guidance_scale: 9.0 in the reference.
      noise: initial noise [B, F, H, W, 3]; or ``key`` with ``shape`` = (F, H, W).
      dropout_key: None (default, eval mode) or a key for the reference's train-mode temporal-conv dropout (SPEC
        §1.6); matches the released script statistically, never bit for bit.
      dtype: compute dtype (default: the noise's, else float32).
      frame_noise_correlation: when drawing from ``key``: the frames' shared part of the initial noise
        (``schedulers.frame_correlated_noise``), for a model trained with it (``diffusion.frame_noise_correlation``);
        0.0, the reference, draws independent frames.
    Returns:
      [B, F, H, W, 3] (with ``return_trajectory``: and the sample after every step [S, B, F, H, W, 3]).
    """
    batch = _check_text(text, guided=guidance_scale is not None)
    dtype = _dtype(dtype, noise)
    if noise is None and shape is None:
        raise ValueError("keyframes draws its noise from key: pass shape=(num_frames, height, width)")
    full = (batch, *(shape if noise is None else noise.shape[1:4]), 3)
    if noise is not None and frame_noise_correlation:
        raise ValueError("frame_noise_correlation applies to noise drawn from key; a given noise is used as it is")
    if noise is None and key is not None:  # 0: exactly jax.random.normal
        noise = frame_correlated_noise(key, full, dtype, frame_noise_correlation)
    x = _noise_or_draw(noise, key, full, dtype, "noise") * schedule.init_noise_sigma
    cond: dict[str, Any] = {"text": text}
    if dropout_key is not None:
        cond["dropout_key"] = dropout_key
    return sample(
        denoise,
        params,
        schedule,
        x,
        cond,
        guidance_scale=guidance_scale,
        progress_token=_token(progress_token),
        return_trajectory=return_trajectory,
    )


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: temporal interpolation
# --------------------------------------------------------------------------------------------------------------------


def interpolation_cond(start_frame: Array, end_frame: Array, num_frames: int) -> Array:
    """The interpolation conditioning channels [cond (3), mask (1)] of one window (SPEC §3.4).

    ``cond_interpolation=True`` trilinearly interpolates [start, end] to num_frames frames with align_corners=True:
    a linear blend in time, the identity in space. The mask is 1 on the first and last frame.

    Args:
      start_frame, end_frame: [B, H, W, 3] consecutive keyframes.
    Returns:
      [B, num_frames, H, W, 4].
    """
    i0, i1, lam = _align_corners_taps(2, num_frames)
    pair = jnp.stack([start_frame, end_frame], axis=1)  # [B, 2, H, W, 3]
    lam = jnp.asarray(lam, pair.dtype)[:, None, None, None]
    blend = (1 - lam) * jnp.take(pair, i0, axis=1) + lam * jnp.take(pair, i1, axis=1)
    mask = np.zeros((num_frames, 1, 1, 1))
    mask[[0, -1]] = 1
    mask = jnp.broadcast_to(jnp.asarray(mask, pair.dtype), blend.shape[:-1] + (1,))
    return jnp.concatenate([blend, mask], axis=-1)


def _interpolation_windows(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    text: Array,
    start: Array,
    end: Array,
    x: Array,
    guidance_scale: Array | float,
    progress_token: Array | None,
    return_trajectory: bool,
    strength: float = 1.0,
):
    # Input channel order [x_t (3), cond (3), mask (1)], the same conditioning for both CFG halves (SPEC §3.4).
    channels = interpolation_cond(start, end, x.shape[1]).astype(x.dtype)
    cond = {"text": text, "channels": channels}
    if strength != 1.0:  # the reference's init noise is NOT scaled by init_noise_sigma (1 for its DPM schedule)
        schedule, x = from_strength(schedule, strength, x, channels[..., :3])
    return sample(
        denoise,
        params,
        schedule,
        x,
        cond,
        guidance_scale=guidance_scale,
        model_input_fn=_with_channels,
        progress_token=progress_token,
        return_trajectory=return_trajectory,
    )


@partial(jax.jit, static_argnums=0, static_argnames=("num_frames", "dtype", "return_trajectory", "strength"))
def interpolation_window(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    text: Array,
    start_frame: Array,
    end_frame: Array,
    *,
    guidance_scale: Array | float,
    init_noise: Array | None = None,
    key: Array | None = None,
    num_frames: int = 5,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
) -> Array | tuple[Array, Array]:
    """One window of stage 2, ``TextToVideoIFInterpPipeline`` (SPEC §3.4): two keyframes -> num_frames frames.

    The initial noise is used as is, NOT scaled by init_noise_sigma (the reference passes ``init_noise``).

    Args:
      denoise, params: the interpolation UNet (7 input channels).
      schedule: the DPM-Solver++ schedule.
      text: [2B, L, D] CFG batch.
      start_frame, end_frame: [B, H, W, 3] keyframes K_i, K_{i+1}.
      guidance_scale: 4.0 in the reference.
      init_noise: [B, num_frames, H, W, 3]; or ``key``.
      strength: 1.0 (the reference) starts from the noise; below 1, from the keyframe blend noised part-way
        (:func:`from_strength`).
    Returns:
      [B, num_frames, H, W, 3]: all frames, the two ends included (the model's outputs replace the keyframes).
    """
    batch = _check_text(text, start_frame.shape[0], guidance_scale is not None)
    dtype = _dtype(dtype, start_frame)
    x = _noise_or_draw(init_noise, key, (batch, num_frames, *start_frame.shape[1:]), dtype, "init_noise")
    start, end = start_frame.astype(dtype), end_frame.astype(dtype)
    return _interpolation_windows(
        denoise, params, schedule, text, start, end, x, guidance_scale, _token(progress_token), return_trajectory,
        strength,
    )  # fmt: skip


@partial(jax.jit, static_argnums=0, static_argnames=("window_frames", "batched", "dtype", "strength"))
def interpolate(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    text: Array,
    keyframes: Array,
    *,
    guidance_scale: Array | float,
    init_noise: Array | None = None,
    key: Array | None = None,
    window_frames: int = 5,
    batched: bool = True,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    strength: float = 1.0,
) -> Array:
    """Stage 2 over a whole clip (SPEC §3.4): K keyframes -> (K-1)(window_frames-1) + 1 frames (8 -> 29).

    Window i interpolates K_i -> K_{i+1}; ONE shared ``init_noise`` is reused for every window. Its frames are written
    to positions 4i..4i+4 in window order, so each boundary frame comes from the later window and the keyframes
    themselves are replaced by model outputs, as in ``run_inference.py``.

    ``batched=True`` folds the K-1 windows into the batch axis and runs one sampling loop (fewer, larger UNet
    calls); ``batched=False`` runs them one after another (a ``lax.scan``; less memory). Both give the same frames.

    Args:
      keyframes: [B, K, H, W, 3].
      init_noise: [B, window_frames, H, W, 3] shared by all windows; or ``key``.
      progress_token: scalar (batched) or [K-1] (sequential) from ``progress_scope``.
      strength: as :func:`interpolation_window` (1.0: the reference).
    Returns:
      [B, (K - 1) * (window_frames - 1) + 1, H, W, 3].
    """
    batch, k = keyframes.shape[:2]
    if k < 2:
        raise ValueError(f"interpolation needs at least 2 keyframes, got keyframes of shape {keyframes.shape}")
    _check_text(text, batch, guidance_scale is not None)
    dtype = _dtype(dtype, keyframes)
    frames = keyframes.astype(dtype)
    n, windows = window_frames, k - 1
    noise = _noise_or_draw(init_noise, key, (batch, n, *frames.shape[2:]), dtype, "init_noise")
    starts = jnp.moveaxis(frames[:, :-1], 1, 0)  # [W, B, H, W, 3]
    ends = jnp.moveaxis(frames[:, 1:], 1, 0)
    if batched:
        # Row = w * B + b; the text follows the same folding within each CFG half.
        if guidance_scale is None:
            text_w = jnp.tile(text, (windows, 1, 1))
        else:
            negative, positive = jnp.split(text, 2, axis=0)
            text_w = jnp.concatenate([jnp.tile(negative, (windows, 1, 1)), jnp.tile(positive, (windows, 1, 1))], 0)
        x = jnp.tile(noise, (windows, 1, 1, 1, 1))
        fold = lambda a: a.reshape(windows * batch, *a.shape[2:])  # noqa: E731
        out = _interpolation_windows(
            denoise,
            params,
            schedule,
            text_w,
            fold(starts),
            fold(ends),
            x,
            guidance_scale,
            _token(progress_token),
            False,
            strength,
        )
        out = out.reshape(windows, batch, *out.shape[1:])  # [W, B, n, H, W, 3]
    else:
        tokens = _token(progress_token, windows)

        def one(_, xs):
            start, end, token = xs
            return None, _interpolation_windows(
                denoise, params, schedule, text, start, end, noise, guidance_scale, token, False, strength
            )

        _, out = jax.lax.scan(one, None, (starts, ends, tokens))
    video = jnp.zeros((batch, windows * (n - 1) + 1, *frames.shape[2:]), dtype)
    for i in range(windows):  # the reference's write-back order: later windows overwrite boundaries (SPEC §3.4)
        video = video.at[:, i * (n - 1) : i * (n - 1) + n].set(out[i])
    return video


# --------------------------------------------------------------------------------------------------------------------
# Stage 3a: first frame with IF-II-L
# --------------------------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=0, static_argnames=("height", "width", "dtype", "return_trajectory", "strength"))
def first_frame_sr(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    noise_alphas_cumprod: Array,
    text: Array,
    image: Array,
    *,
    height: int,
    width: int,
    guidance_scale: Array | float,
    noise_level: Array | int,
    init_noise: Array | None = None,
    cond_noise: Array | None = None,
    step_noise: Array | None = None,
    key: Array | None = None,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
) -> Array | tuple[Array, Array]:
    """Stage 3a, diffusers ``IFSuperResolutionPipeline`` with IF-II-L (SPEC §3.5 3a, §4.5): one frame -> high-res.

    Bilinear upsample (align_corners=True) to (height, width), ``add_noise`` at ``noise_level`` with the noising
    scheduler's table, UNet input [x_t (3), noised upsample (3)] with class_labels = noise_level, CFG on eps, the
    learned-range variance from the conditional half, DDPM steps with thresholding per image and variance noise.

    Draw order of the reference (SPEC §1.7): initial noise, upsample noise, then one draw per step with t > 0. With
    ``key`` the three are ``split(key, 3)`` (step i draws from ``fold_in(keys[2], i)``).

    Args:
      denoise, params: the IF-II-L 2D UNet.
      schedule: the DDPM (learned_range) schedule.
      noise_alphas_cumprod: [T] float32 table of the image-noising scheduler.
      text: [2B, L, D] CFG batch (the stage-0 T5 embeddings).
      image: [B, h, w, 3] low-res frame in [-1, 1].
      height, width: output size.
      guidance_scale: 4.0 in the reference; noise_level: 150 in the reference.
      init_noise: [B, H, W, 3]; cond_noise: [B, H, W, 3]; step_noise: [S, B, H, W, 3] (entries of t == 0 steps
        unused) or only the steps with t > 0, in order.
      strength: 1.0 (the reference) starts from the noise; below 1, from the clean upsampled image noised part-way
        (:func:`from_strength`).
    Returns:
      [B, height, width, 3], the raw sample (no clamp).
    """
    batch = _check_text(text, image.shape[0], guidance_scale is not None)
    dtype = _dtype(dtype, image)
    k_init, k_cond, k_steps = _keys(key, 3)
    shape = (batch, height, width, image.shape[-1])
    x = _noise_or_draw(init_noise, k_init, shape, dtype, "init_noise")
    clean = resize_bilinear(image.astype(dtype), (height, width))
    schedule, x = from_strength(schedule, strength, x, clean)
    labels = _cfg_labels(noise_level, batch, guidance_scale is not None)
    eps = _noise_or_draw(cond_noise, k_cond, shape, dtype, "cond_noise")
    upscaled = add_noise(noise_alphas_cumprod, clean, eps, labels[:batch])
    if step_noise is not None:
        step_noise = _per_step_noise(schedule, step_noise.astype(dtype))
    elif k_steps is None:
        raise ValueError("first_frame_sr's DDPM steps draw noise: pass step_noise [S, B, H, W, 3] or key=")
    cond = {"text": text, "noise_level": labels, "channels": upscaled}
    return sample(
        denoise,
        params,
        schedule,
        x,
        cond,
        guidance_scale=guidance_scale,
        model_input_fn=_with_channels,
        noise=step_noise,
        key=k_steps,
        progress_token=_token(progress_token),
        return_trajectory=return_trajectory,
    )


def _per_step_noise(schedule: Schedule, noise: Array) -> Array:
    """[S, ...] per-step noise; a stack of only the t > 0 draws (the reference's list) is spread over those steps."""
    steps = len(schedule)
    if noise.shape[0] == steps:
        return noise
    has_noise = jnp.asarray(schedule.timesteps) > 0
    index = jnp.clip(jnp.cumsum(has_noise) - 1, 0, noise.shape[0] - 1)
    return jnp.where(has_noise.reshape((-1,) + (1,) * (noise.ndim - 1)), noise[index], 0)


# --------------------------------------------------------------------------------------------------------------------
# Stage 3b: SR1 video windows
# --------------------------------------------------------------------------------------------------------------------


def _sr1(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    noise_alphas_cumprod: Array,
    text: Array,
    video: Array,
    first_frame_cond: Array,
    x: Array,
    eps: Array,
    guidance_scale: Array | float,
    noise_level: Array | int,
    progress_token: Array | None,
    return_trajectory: bool,
    strength: float = 1.0,
):
    batch = video.shape[0]
    labels = _cfg_labels(noise_level, batch, guidance_scale is not None)
    clean = resize_bilinear(video, x.shape[2:4])  # every frame, [B, F, H, W, 3]
    upscaled = add_noise(noise_alphas_cumprod, clean, eps, labels[:batch])
    # Conditioning frame 0 is the CLEAN first_frame_cond although class_labels say noise_level (SPEC §3.5 3b step 4).
    upscaled = upscaled.at[:, 0].set(first_frame_cond)
    cond = {"text": text, "noise_level": labels, "channels": upscaled}
    schedule, x = from_strength(schedule, strength, x, clean.at[:, 0].set(first_frame_cond))
    return sample(
        denoise,
        params,
        schedule,
        x,
        cond,
        guidance_scale=guidance_scale,
        model_input_fn=_with_channels,
        progress_token=progress_token,
        return_trajectory=return_trajectory,
    )


@partial(jax.jit, static_argnums=0, static_argnames=("dtype", "return_trajectory", "strength"))
def sr1_window(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    noise_alphas_cumprod: Array,
    text: Array,
    video: Array,
    first_frame_cond: Array,
    *,
    guidance_scale: Array | float,
    noise_level: Array | int,
    init_noise: Array | None = None,
    cond_noise: Array | None = None,
    key: Array | None = None,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
) -> Array | tuple[Array, Array]:
    """One window of stage 3b, ``TextToVideoIFSuperResolutionPipeline_Cond`` (SPEC §3.5 3b).

    Draw order (SPEC §1.7): the initial noise, then the conditioning noise; with ``key`` they are ``split(key, 2)``.
    Every frame is upsampled bilinearly (align_corners=True), the whole clip noised at ``noise_level``, then
    conditioning frame 0 replaced by the clean ``first_frame_cond``; UNet input [x_t (3), cond (3)], class_labels =
    noise_level for both CFG halves; the variance channels handled per the scheduler config; thresholding per frame.

    Args:
      denoise, params: the SR1 UNet (6 input channels, noise-level class embedding).
      schedule: the DPM-Solver++ schedule.
      noise_alphas_cumprod: [T] float32 table of the image-noising scheduler.
      text: [2B, L, D] CFG batch.
      video: [B, F, h, w, 3] low-res frames.
      first_frame_cond: [B, H, W, 3] the high-res frame 0 (sets the output size).
      guidance_scale: 7.0 in the reference; noise_level: 250 in the reference.
      init_noise, cond_noise: [B, F, H, W, 3] each.
      strength: 1.0 (the reference) starts from the noise; below 1, from the clean upsampled frames (frame 0:
        ``first_frame_cond``) noised part-way (:func:`from_strength`).
    Returns:
      [B, F, H, W, 3].
    """
    batch = _check_text(text, video.shape[0], guidance_scale is not None)
    dtype = _dtype(dtype, video)
    k_init, k_cond = _keys(key, 2)
    shape = (batch, video.shape[1], *first_frame_cond.shape[1:3], video.shape[-1])
    x = _noise_or_draw(init_noise, k_init, shape, dtype, "init_noise")
    eps = _noise_or_draw(cond_noise, k_cond, shape, dtype, "cond_noise")
    return _sr1(
        denoise,
        params,
        schedule,
        noise_alphas_cumprod,
        text,
        video.astype(dtype),
        first_frame_cond.astype(dtype),
        x,
        eps,
        guidance_scale,
        noise_level,
        _token(progress_token),
        return_trajectory,
        strength,
    )


@partial(jax.jit, static_argnums=0, static_argnames=("window_size", "stride", "dtype", "strength"))
def super_resolve_sr1(
    denoise: Denoiser,
    params: Any,
    schedule: Schedule,
    noise_alphas_cumprod: Array,
    text: Array,
    video: Array,
    first_frame: Array,
    *,
    guidance_scale: Array | float,
    noise_level: Array | int,
    window_size: int = 8,
    stride: int = 7,
    init_noise: Array | None = None,
    cond_noise: Array | None = None,
    key: Array | None = None,
    dtype: DType | None = None,
    progress_token: Array | None = None,
    strength: float = 1.0,
) -> Array:
    """Stage 3b over the clip (SPEC §3.5): windows [i*stride, i*stride + window_size), one after another.

    Window i's ``first_frame_cond`` is the output frame already written at its first position (window 0: the
    IF-II-L ``first_frame``); its output is written to [start, start + window_size), overwriting the overlap.

    Args:
      video: [B, N, h, w, 3] with N = window_size + k*stride (``sr1_frame_counts``), 29 in the reference.
      first_frame: [B, H, W, 3] from ``first_frame_sr``.
      init_noise, cond_noise: [n_windows, B, window_size, H, W, 3] each (the reference's two draws per window);
        or ``key``: window i uses ``fold_in(key, i)`` as ``sr1_window``'s key.
      progress_token: [n_windows] tokens from ``progress_scope(..., windows=n_windows)``.
      strength: as :func:`sr1_window` (1.0: the reference).
    Returns:
      [B, N, H, W, 3].
    """
    batch, num_frames = video.shape[:2]
    windows = _check_sr1_windows(num_frames, window_size, stride)
    _check_text(text, batch, guidance_scale is not None)
    dtype = _dtype(dtype, video)
    height, width = first_frame.shape[1:3]
    shape = (windows, batch, window_size, height, width, video.shape[-1])
    if (init_noise is None or cond_noise is None) and key is None:
        raise ValueError("pass init_noise and cond_noise [n_windows, B, window_size, H, W, 3], or key=")
    for name, noise in (("init_noise", init_noise), ("cond_noise", cond_noise)):
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(noise.shape)}, expected {shape} [n_windows, B, F, H, W, C]")
    video, first_frame = video.astype(dtype), first_frame.astype(dtype)
    tokens = _token(progress_token, windows)

    def window(out, xs):
        i, token = xs
        start = i * stride
        keys = _keys(None if key is None else jax.random.fold_in(key, i), 2)
        x = init_noise[i].astype(dtype) if init_noise is not None else _normal(keys[0], shape[1:], dtype, "")
        eps = cond_noise[i].astype(dtype) if cond_noise is not None else _normal(keys[1], shape[1:], dtype, "")
        clip = jax.lax.dynamic_slice_in_dim(video, start, window_size, axis=1)
        # The first-frame chaining of run_inference.py: the frame already written at `start` (SPEC §3.5).
        chained = jax.lax.dynamic_index_in_dim(out, start, axis=1, keepdims=False)
        ffc = jnp.where(i == 0, first_frame, chained)
        frames = _sr1(
            denoise,
            params,
            schedule,
            noise_alphas_cumprod,
            text,
            clip,
            ffc,
            x,
            eps,
            guidance_scale,
            noise_level,
            token,
            False,
            strength,
        )
        return jax.lax.dynamic_update_slice_in_dim(out, frames, start, axis=1), None

    out = jnp.zeros((batch, num_frames, height, width, video.shape[-1]), dtype)
    out, _ = jax.lax.scan(window, out, (jnp.arange(windows, dtype=jnp.int32), tokens))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Stage 4: SR2, latent video-to-video
# --------------------------------------------------------------------------------------------------------------------


# preprocess_video's float32 arithmetic (SPEC §3.6 step 3) per uint8 value: x / 255, then 2x - 1, each rounded to
# float32 as the reference does (a table, so XLA cannot turn the division into a multiplication).
_PREPROCESS_TABLE = np.float32(2.0) * (np.arange(256, dtype=np.float32) / np.float32(255.0)) - np.float32(1.0)


@partial(
    jax.jit,
    static_argnums=(0, 2),
    static_argnames=("strength", "num_inference_steps", "frames_per_chunk", "dtype", "return_trajectory"),
)
def video_to_video_sr2(
    denoise: Denoiser,
    params: Any,
    vae_graphdef: nnx.GraphDef,
    vae_params: Any,
    schedule: Schedule,
    text: Array,
    frames: Array,
    *,
    guidance_scale: Array | float,
    strength: float,
    num_inference_steps: int | None = None,
    posterior_noise: Array | None = None,
    noise: Array | None = None,
    key: Array | None = None,
    frames_per_chunk: int | None = None,
    dtype: DType = jnp.float32,
    progress_token: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Stage 4, diffusers ``VideoToVideoSDPipeline`` (SPEC §3.6, §6.7): uint8 frames -> float video.

    Frames -> [-1, 1] (x/255 in float32, then 2x - 1, as ``preprocess_video``); VAE encode per frame and SAMPLE the
    posterior; x scaling_factor; ``add_noise`` with the SR2 scheduler's table at timesteps[t_start], t_start =
    n - int(n*strength); CFG (negative prompt first) and DPM-Solver steps over timesteps[t_start:]; decode
    latents / scaling_factor frame by frame; cast to float32 as ``decode_latents`` does.

    Draw order (SPEC §1.7): the posterior-sample noise, then the add_noise noise, both per frame. The reference
    records them as (B*F, 4, h, w): convert with ``latents_from_torch``. With ``key`` they are ``split(key, 2)``.

    Args:
      denoise, params: the SR2 latent UNet.
      vae_graphdef, vae_params: ``nnx.split(vae)`` of the AutoencoderKL.
      schedule: the full DPM-Solver schedule of ``num_inference_steps`` (50 in the reference); the stage skips.
      text: [2B, L, D] CLIP CFG batch (negative "low resolution, blur" first).
      frames: uint8 [B, F, H, W, 3], already resized to the output size (``resize_frames_bicubic``).
      guidance_scale: 15.0 (the pipeline default); strength: 0.8 in the reference.
      num_inference_steps: the n of the strength formula (default ``len(schedule)``).
      posterior_noise, noise: [B, F, H/8, W/8, latent_channels] each.
      frames_per_chunk: decode (and encode) this many frames at a time (None: all at once; same result).
      dtype: compute dtype (float32; float64 for parity runs).
    Returns:
      [B, F, H, W, 3] float32, about [-1, 1] (not clamped); with ``return_trajectory`` also the latents after every
      step [S, B, F, H/8, W/8, C] in ``dtype``.
    """
    if frames.dtype != jnp.uint8 or frames.ndim != 5:
        raise ValueError(f"SR2 takes uint8 frames [B, F, H, W, 3] (video_to_uint8), got {frames.dtype} {frames.shape}")
    batch = _check_text(text, frames.shape[0], guidance_scale is not None)
    vae = nnx.merge(vae_graphdef, vae_params)
    n = len(schedule) if num_inference_steps is None else num_inference_steps
    tail = schedule.skip(img2img_t_start(n, strength))
    k_post, k_noise = _keys(key, 2)
    video = jnp.asarray(_PREPROCESS_TABLE, dtype)[frames]  # [B, F, H, W, 3] in [-1, 1]
    mean, logvar = vae.encode_video(video, frames_per_chunk=frames_per_chunk)
    eps = _noise_or_draw(posterior_noise, k_post, mean.shape, dtype, "posterior_noise")
    latents = vae.scale_latents(vae.sample_posterior(mean, logvar, noise=eps))
    noise = _noise_or_draw(noise, k_noise, latents.shape, dtype, "noise")
    t0 = jnp.broadcast_to(jnp.asarray(tail.timesteps)[0], (batch,))
    latents = add_noise(noise_tables(tail.config).alphas_cumprod, latents, noise, t0)
    out = sample(
        denoise,
        params,
        tail,
        latents,
        {"text": text},
        guidance_scale=guidance_scale,
        progress_token=_token(progress_token),
        return_trajectory=return_trajectory,
    )
    latents, trajectory = out if return_trajectory else (out, None)
    decoded = vae.decode_video(vae.unscale_latents(latents), frames_per_chunk=frames_per_chunk)
    decoded = decoded.astype(jnp.float32)  # decode_latents casts to float32 (SPEC §3.6)
    return (decoded, trajectory) if return_trajectory else decoded
