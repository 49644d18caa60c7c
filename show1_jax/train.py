"""Training the Show-1 cascade's models: per-stage objectives, a pure sharded train step, orbax checkpoints and
``show1 train``.

No training code was released for Show-1 (SPEC.md §9); this trainer follows what the released models and inference
pipelines imply, and states its own choices.

Objectives (one train step = one random timestep per clip, ``t ~ U[min_timestep, max_timestep]``):

- **ε (or v) MSE** on the prediction channels: mean over [F, H, W, C] per clip, then over the batch.
- **Learned variance** (the 6-channel pixel UNets, inherited from DeepFloyd IF): the improved-DDPM hybrid loss that
  IF was trained with, ``L = L_simple + w * (T / 1000) * L_vlb(t)``. ``L_vlb(t)`` is the KL between the true
  posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian, whose mean comes from the *stop-gradient* ε prediction
  and whose log-variance interpolates between log β_t and the clipped log β̃_t by the "learned_range" channels
  (``(v + 1) / 2``); at t = 0 it is the discretized-Gaussian decoder NLL (256 levels on [-1, 1]). Both are in bits
  per dimension. The stop-gradient keeps the variance term from disturbing the mean, which ``L_simple`` trains.
  ``w = 1`` (``diffusion.learned_variance_weight``) with the ``T / 1000`` factor is improved-DDPM's λ = 0.001 on
  the full-sequence VLB, the setting its ``RESCALED_MSE`` hybrid uses; we keep it because the released models'
  variance channels were trained that way upstream and IF-II-L's sampler (SPEC.md §4.5) consumes them. ``w = 0``
  trains the ε channels only (the released pixel schedulers now drop the variance channels, SPEC.md §4.1).
  The variance formula is improved-DDPM's (posterior variance at t = 0 clipped to β̃_1), not diffusers' sampler
  table (which clamps β̃_0 to 1e-20); the two differ only at t = 0.
- **Classifier-free-guidance dropout**: each clip's text embedding is replaced by the empty prompt's with
  probability ``diffusion.cfg_dropout`` (T5 "" for the pixel stages; the SR2 CLIP "" likewise; SPEC.md §1.4).

What each stage's UNet sees (SPEC.md §3):

- keyframes: ``x_t`` (3 channels) and the text;
- interpolation: ``[x_t (3), cond (3), mask (1)]``: the clip's first and last frame blended linearly in time and a
  mask that is 1 on them (``stages.interpolation_cond``, the same function inference uses, SPEC.md §3.4);
- SR1: ``[x_t (3), upsampled noised low-res (3)]``: the clip downsampled by ``sr1.low_res_factor``, upsampled
  bilinearly with align_corners as at inference, noised by the image-noising scheduler at a random level that is
  also ``class_labels``, and frame 0 replaced by the clean high-res frame 0 (the reference's ``first_frame_cond``);
- first_frame (IF-II-L, a 2D UNet): one random frame of each clip, ``[x_t (3), upsampled noised low-res (3)]`` made
  as SR1's (``low_res_condition``, shared) and as ``stages.first_frame_sr`` makes it at inference, the noise level as
  ``class_labels``; the learned-range DDPM of IF-II-L (SPEC.md §4.5) as the training schedule;
- SR2: the clip encoded by the frozen VAE (posterior sample times ``scaling_factor``), 4 latent channels, CLIP text;
  timesteps 0..900 by default (SPEC.md §9).

The autoencoder (stage ``vae``, ``vae_loss``): one random frame of each clip is encoded, a posterior sample decoded,
and ``(Σ rec + kl_weight · Σ KL) / (H·W·C)`` minimised per image, with ``rec`` = |x - x̂| (``vae.reconstruction_loss``
= l1, SD's choice) or (x - x̂)² and KL that of the diagonal posterior against N(0, I), both summed over the image as
SD's LPIPSWithDiscriminator does (so its ``kl_weight`` = 1e-6 carries over) and then normalised per pixel value. SD's
LPIPS and patch-GAN terms (and its learned output log-variance) are left out: reconstructions are blurrier, which
suits toy cascades; a production VAE should be the released one. At export ``scaling_factor`` = 1 / std of posterior
samples of every frame of the first training batch (SD's ``scale_by_std``), so SR2's latents have unit variance.

The train step (``make_train_step``; ``make_vae_train_step`` for the autoencoder, same signature) is a pure function
``(state, frozen, batch, null_text, vae_params) -> (state, metrics)`` under
``jax.jit`` with explicit in/out shardings on a mesh from ``show1_jax.sharding`` (parameters split by its rules,
the batch over ``data`` and ``fsdp``), the state donated. All randomness is ``fold_in(state.rng, state.step)``, so a
resumed run draws exactly what an uninterrupted one would. Only the trainable parameters (``optim.trainable``) are
differentiated, and only they have optimizer state and an EMA copy: frozen ones are a separate, read-only argument.

Rematerialisation (``model.remat``) wraps every down, mid and up block in ``jax.checkpoint`` on the merged model
(``_remat_blocks``), without touching ``unet3d.py``. A first-class hook there would be: a ``remat: bool`` field on
``UNet3DConditionModel`` and, in ``__call__``, ``block_fn = nnx.remat(_Block.down, static_argnums=(4,))`` (likewise
for ``up`` with ``static_argnums=(5, 6)`` and the mid block), called as ``block_fn(block, h, emb, context, f, key)``.

Checkpoints (orbax ``CheckpointManager``, async, the last N kept) hold the trainable parameters, optimizer state,
EMA, step, PRNG key and the data reader's position; they restore onto any mesh. Frozen parameters are not saved:
they are rebuilt from ``model.pretrained`` (or the seeded config) on resume.

API::

    run_training(settings: TrainSettings, *, logger=None, progress=None) -> TrainResult
    main(argv) -> int                      # show1 train CONFIG [key=value ...]
    make_train_step(view, objective, optimizer, ...) -> train_step   (pure; jit it with jit_train_step)
    make_vae_train_step(view, vae_settings, optimizer, ...) -> train_step
    diffusion_loss(output, x0, x_t, noise, t, tables, ...) -> (loss, parts)
    vae_loss(vae, images, key, vae_settings) -> (loss, parts)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from show1_jax import sharding as shd
from show1_jax.schedulers import add_noise, frame_correlated_noise, load_scheduler_config, noise_tables
from show1_jax.train_settings import (
    UNET_STAGES,
    DataSettings,
    LowResSettings,
    ModelSettings,
    OptimSettings,
    SR1Settings,
    TrainSettings,
    VAESettings,
)

Array = jax.Array
Params = dict[str, Array]  # dotted parameter path ('down_blocks.0.resnets.0.conv1.kernel') -> array

STAGE_IN_CHANNELS = {"keyframes": 3, "interpolation": 7, "first_frame": 6, "sr1": 6, "sr2": 4}
STAGE_PRESETS = {  # the tiny preset to suggest when a model does not fit its stage
    "keyframes": "tiny_base",
    "interpolation": "tiny_interpolation",
    "first_frame": "tiny_if2",
    "sr1": "tiny_sr1",
    "sr2": "tiny_sr2",
    "vae": "tiny_vae",
}
TEMPORAL_PARTS = ("temp_convs", "temp_attentions", "transformer_in")
DECODER_PARTS = ("decoder", "post_quant_conv")  # an AutoencoderKL's latent -> image half
DEFAULT_MAX_TIMESTEP = {"sr2": 900}  # "finetuned using diffusion timesteps 0-900" (SPEC.md §9)
DEFAULT_NUM_FRAMES = {"interpolation": 5}  # SPEC.md §3.4; other stages: the dataset's clips


# ---------------------------------------------------------------------------------------------------------------------
# Parameters as flat dicts; which of them train
# ---------------------------------------------------------------------------------------------------------------------


class ModelView:
    """A module split once into its structure and a flat parameter dict; ``merge(params)`` rebuilds it (traceable).

    Flat dicts keyed by dotted paths keep parameter selection, sharding and checkpoints simple and readable. The
    view holds no parameter values: ``ModelView.split(model)`` returns them separately.
    """

    def __init__(self, model: nnx.Module):
        self.config = getattr(model, "config", None)
        self.graphdef, state = nnx.split(model)
        flat = list(nnx.to_flat_state(state))
        self.keys = tuple(".".join(str(p) for p in path) for path, _ in flat)
        shapes = [jax.ShapeDtypeStruct(np.shape(var.get_value()), var.get_value().dtype) for _, var in flat]
        abstract = [(path, var.replace(shape)) for (path, var), shape in zip(flat, shapes)]
        self._template = tuple(abstract)
        self.state = nnx.from_flat_state(abstract)  # shapes + logical-axis metadata, for sharding.param_specs

    @classmethod
    def split(cls, model: nnx.Module) -> tuple[ModelView, Params]:
        """(view, params) of ``model``."""
        view = cls(model)
        _, state = nnx.split(model)
        return view, {k: var.get_value() for k, (_, var) in zip(view.keys, nnx.to_flat_state(state))}

    def merge(self, params: Mapping[str, Array]) -> nnx.Module:
        missing = [k for k in self.keys if k not in params]
        if missing:
            raise KeyError(f"{len(missing)} parameters missing, e.g. {missing[:3]}")
        flat = [(path, var.replace(params[k])) for k, (path, var) in zip(self.keys, self._template)]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def is_trainable(key: str, which: str) -> bool:
    """Whether parameter ``key`` trains under ``optim.trainable`` = ``which`` (all, temporal, temporal_attention,
    decoder)."""
    parts = key.split(".")
    if which == "all":
        return True
    if which == "decoder":
        return parts[0] in DECODER_PARTS
    if which == "temporal":
        return any(p in parts for p in TEMPORAL_PARTS)
    if which == "temporal_attention":
        return "temp_attentions" in parts
    raise ValueError(f"unknown trainable selection `{which}`: all, temporal, temporal_attention or decoder")


def partition_params(params: Params, which: str) -> tuple[Params, Params]:
    """(trainable, frozen) split of ``params`` by :func:`is_trainable`."""
    trainable = {k: v for k, v in params.items() if is_trainable(k, which)}
    if not trainable:
        raise ValueError(
            f"optim.trainable={which} selects no parameter of this model (temporal layers in a 2D model, or a"
            " decoder in a UNet?): use `all`"
        )
    return trainable, {k: v for k, v in params.items() if k not in trainable}


# ---------------------------------------------------------------------------------------------------------------------
# Rematerialisation of UNet blocks (a wrapper; unet3d.py is unchanged)
# ---------------------------------------------------------------------------------------------------------------------


def _checkpointed(module: nnx.Module, method: Callable[..., Any], static: tuple[int, ...]) -> Callable[..., Any]:
    """``method`` bound to ``module``, recomputed in the backward pass (static = positional indices of ints/tuples)."""
    graphdef, state = nnx.split(module)

    def pure(state: nnx.State, *args: Any) -> Any:
        return method(nnx.merge(graphdef, state), *args)

    return functools.partial(jax.checkpoint(pure, static_argnums=tuple(1 + i for i in static)), state)


class _CheckpointedCall:
    def __init__(self, module: nnx.Module, static: tuple[int, ...]):
        self._call = _checkpointed(module, type(module).__call__, static)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)


def _remat_blocks(model: nnx.Module) -> None:
    """Recompute each down/mid/up block of a *merged, traced* UNet in the backward pass (mutates ``model``).

    ``UNet3DConditionModel.__call__`` calls ``block.down(h, emb, context, frames, key)``,
    ``block.up(h, skips, emb, context, frames, size, key)`` and ``mid_block(h, emb, context, frames, key)``;
    instance attributes shadow those methods, so the forward runs unchanged with each block checkpointed.
    """
    for block in model.down_blocks:
        object.__setattr__(block, "down", _checkpointed(block, type(block).down, static=(3,)))
    for block in model.up_blocks:
        object.__setattr__(block, "up", _checkpointed(block, type(block).up, static=(4, 5)))
    if model.mid_block is not None:
        object.__setattr__(model, "mid_block", _CheckpointedCall(model.mid_block, static=(3,)))


def unet_apply(view: ModelView, *, remat: bool = False) -> Callable[..., Array]:
    """``apply(params, sample [B, F, H, W, Cin], t [B], text [B, L, D], class_labels [B] | None, dropout_key)``."""

    def apply(params: Params, sample: Array, t: Array, text: Array, class_labels: Array | None, dropout_key) -> Array:
        model = view.merge(params)
        if remat:
            _remat_blocks(model)
        return model(sample, t, text, class_labels=class_labels, dropout_key=dropout_key)

    return apply


# ---------------------------------------------------------------------------------------------------------------------
# Diffusion objective
# ---------------------------------------------------------------------------------------------------------------------


class DiffusionTables(NamedTuple):
    """float32 tables [T] of a training noise schedule (improved-DDPM's posterior quantities)."""

    alphas_cumprod: np.ndarray
    log_betas: np.ndarray
    posterior_log_variance_clipped: np.ndarray  # log β̃_t with β̃_0 replaced by β̃_1
    posterior_mean_coef1: np.ndarray  # of x_0
    posterior_mean_coef2: np.ndarray  # of x_t

    @classmethod
    def from_scheduler(cls, config: Any) -> DiffusionTables:
        tables = noise_tables(config)
        betas = tables.betas.astype(np.float64)
        abar = tables.alphas_cumprod.astype(np.float64)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        clipped = np.log(np.append(post_var[1], post_var[1:]))
        coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        return cls(tables.alphas_cumprod, f32(np.log(betas)), f32(clipped), f32(coef1), f32(coef2))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)


def _per_example(x: Array, ndim: int) -> Array:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _mean_per_example(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log p(x) of data in [-1, 1] quantised to 256 levels under N(mean, e^(2 log_scale)), elementwise, in nats."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def learned_range_vlb(eps: Array, var_values: Array, x0: Array, x_t: Array, t: Array, tables: DiffusionTables) -> Array:
    """The VLB term L_t of each clip, in bits per dimension: [B].

    Args:
      eps: [B, F, H, W, C] the ε prediction (pass it through ``stop_gradient`` for the hybrid loss).
      var_values: [B, F, H, W, C] the model's learned-range channels, nominally in [-1, 1].
      x0, x_t: [B, F, H, W, C] the clean and the noised sample.
      t: [B] int timesteps.
    """
    nd = x0.ndim
    at = lambda table: _per_example(jnp.asarray(table)[t], nd)  # noqa: E731
    abar = at(tables.alphas_cumprod)
    min_log, max_log = at(tables.posterior_log_variance_clipped), at(tables.log_betas)
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    x0_pred = (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    coef1, coef2 = at(tables.posterior_mean_coef1), at(tables.posterior_mean_coef2)
    model_mean = coef1 * x0_pred + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = _mean_per_example(normal_kl(true_mean, min_log, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_per_example(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def diffusion_loss(
    output: Array,
    x0: Array,
    x_t: Array,
    noise: Array,
    t: Array,
    tables: DiffusionTables,
    *,
    prediction_type: str = "epsilon",
    learned_variance_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """The training loss of one batch (see the module docstring).

    Args:
      output: [B, F, H, W, C] or [B, F, H, W, 2C] (prediction, learned-range variance channels); the 2D
        first-frame UNet's arrays are [B, H, W, ...] (every reduction is per example over the other axes).
      x0: [B, F, H, W, C] clean samples; x_t: the noised ones; noise: the ε that made x_t.
      t: [B] int timesteps.
    Returns:
      (scalar loss, {"mse": [], "vlb": [] (learned-variance models only)}), float32.
    """
    c = x0.shape[-1]
    output = output.astype(jnp.float32)
    x0, x_t, noise = (a.astype(jnp.float32) for a in (x0, x_t, noise))
    if output.shape[-1] == 2 * c:
        pred, var_values = output[..., :c], output[..., c:]
    elif output.shape[-1] == c:
        pred, var_values = output, None
    else:
        raise ValueError(f"UNet output has {output.shape[-1]} channels; expected {c} (ε) or {2 * c} (ε + variance)")
    abar = _per_example(jnp.asarray(tables.alphas_cumprod)[t], x0.ndim)
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        target, eps_pred = noise, pred
    elif prediction_type == "v_prediction":
        target, eps_pred = alpha * noise - sigma * x0, sigma * x_t + alpha * pred
    else:
        raise ValueError(f"prediction_type `{prediction_type}`: training supports epsilon and v_prediction")
    per_example = _mean_per_example(jnp.square(pred - target))
    parts = {"mse": jnp.mean(per_example)}
    if var_values is not None and learned_variance_weight > 0:
        vlb = learned_range_vlb(jax.lax.stop_gradient(eps_pred), var_values, x0, x_t, t, tables)
        vlb = vlb * (tables.num_train_timesteps / 1000.0)
        per_example = per_example + learned_variance_weight * vlb
        parts["vlb"] = jnp.mean(vlb)
    return jnp.mean(per_example), parts


# ---------------------------------------------------------------------------------------------------------------------
# What each stage's UNet sees
# ---------------------------------------------------------------------------------------------------------------------


def temporal_crop(video: Array, num_frames: int, key: Array) -> Array:
    """[B, F, ...] -> [B, num_frames, ...]: a window at a random offset per clip (the identity if F == num_frames)."""
    b, f = video.shape[:2]
    if num_frames == f:
        return video
    starts = jax.random.randint(key, (b,), 0, f - num_frames + 1)
    return jax.vmap(lambda v, s: jax.lax.dynamic_slice_in_dim(v, s, num_frames, axis=0))(video, starts)


def low_res_condition(
    images: Array, key: Array, noising_alphas_cumprod: np.ndarray, settings: LowResSettings
) -> tuple[Array, Array]:
    """A super-resolution UNet's conditioning from high-res frames, as the pipeline builds it (SPEC.md §3.5).

    Downsampled by ``settings.low_res_factor`` (antialiased), upsampled back with ``stages.resize_bilinear``
    (align_corners, as ``first_frame_sr`` and ``super_resolve_sr1``), noised at a random level per example.

    Args:
      images: [B, ..., H, W, 3] high-res frames in [-1, 1] ([B, H, W, 3] or clips [B, F, H, W, 3]); H and W
        divisible by ``settings.low_res_factor``.
    Returns:
      (cond of images' shape, noise_level [B] int32, the UNet's ``class_labels``).
    """
    from show1_jax.stages import resize_bilinear

    *lead, hh, ww, c = images.shape
    factor = settings.low_res_factor
    low = jax.image.resize(images, (*lead, hh // factor, ww // factor, c), method="linear", antialias=True)
    up = resize_bilinear(low, (hh, ww))
    k_level, k_noise = jax.random.split(key)
    level = jax.random.randint(k_level, (images.shape[0],), settings.noise_level_min, settings.noise_level_max + 1)
    return add_noise(noising_alphas_cumprod, up, jax.random.normal(k_noise, up.shape, up.dtype), level), level


def sr1_condition(
    video: Array, key: Array, noising_alphas_cumprod: np.ndarray, settings: SR1Settings
) -> tuple[Array, Array]:
    """SR1's conditioning channels and noise levels from high-res clips (SPEC.md §3.5 3b, as the pipeline builds them).

    Args:
      video: [B, F, H, W, 3] high-res clips in [-1, 1]; H and W divisible by ``settings.low_res_factor``.
    Returns:
      (cond [B, F, H, W, 3], noise_level [B] int32): upsampled low-res clip noised at noise_level, frame 0 clean.
    """
    k_cond, k_first = jax.random.split(key)
    cond, level = low_res_condition(video, k_cond, noising_alphas_cumprod, settings)
    clean_first = jax.random.bernoulli(k_first, settings.first_frame_cond_prob, (video.shape[0],))
    first = jnp.where(clean_first[:, None, None, None], video[:, 0], cond[:, 0])
    return cond.at[:, 0].set(first), level


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static part of a stage's objective (hashable; arrays live in ``DiffusionTables`` and the step's args)."""

    stage: str
    prediction_type: str
    min_timestep: int
    max_timestep: int
    num_frames: int | None
    learned_variance_weight: float
    cfg_dropout: float
    temporal_conv_dropout: bool
    low_res: LowResSettings = SR1Settings()  # first_frame: FirstFrameSettings; sr1: SR1Settings
    frame_noise_correlation: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer, state, step
# ---------------------------------------------------------------------------------------------------------------------


def learning_rate_schedule(optim: OptimSettings, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` (lr · (step + 1) / warmup), then constant or cosine to the end rate
    (reached at ``optim.decay_steps``, default ``total_steps``)."""
    lr, warmup, end = optim.learning_rate, optim.warmup_steps, optim.end_learning_rate
    total_steps = optim.decay_steps or total_steps

    def schedule(step: Array) -> Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        if optim.schedule == "constant":
            return warm
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        cosine = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def make_optimizer(optim: OptimSettings, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the trainable parameters."""
    chain = []
    if optim.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    )
    return optax.chain(*chain)


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (and checkpoints)."""

    step: Array  # int32 []: steps done
    params: Params  # the trainable parameters only
    opt_state: Any  # optax state over ``params``
    ema: Params | None  # EMA of ``params`` (None: off)
    rng: Array  # uint32 [2]: the run's key; step k uses fold_in(rng, k)


def init_train_state(params: Params, optimizer: optax.GradientTransformation, seed: int, *, ema: bool) -> TrainState:
    """A fresh state (jit it with ``out_shardings`` to create it in place)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.array, params) if ema else None,
        rng=jax.random.PRNGKey(seed),
    )


def encode_latents(vae_view: ModelView, vae_params: Params, video: Array, key: Array) -> Array:
    """SR2's training latents: VAE posterior sample of every frame times ``scaling_factor``: [B, F, h, w, 4]."""
    vae = vae_view.merge(vae_params)
    mean, logvar = vae.encode_video(video)
    return jax.lax.stop_gradient(vae.scale_latents(vae.sample_posterior(mean, logvar, key=key)))


def _apply_gradients(
    state: TrainState,
    loss_fn: Callable[[Params], tuple[Array, dict[str, Array]]],
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule | None,
    ema_decay: float | None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer (and EMA) update of ``state.params`` on ``loss_fn(trainable) -> (loss, parts)``."""
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        decay = jnp.float32(ema_decay)
        ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
    return TrainState(state.step + 1, params, opt_state, ema, state.rng), metrics


def _batch_video(batch: dict[str, Array]) -> Array:
    """The batch's uint8 clips as float32 in [-1, 1]: [B, F, H, W, 3]."""
    return shd.constrain(batch["video"], ("batch",)).astype(jnp.float32) / 127.5 - 1.0


def random_frame(video: Array, key: Array) -> Array:
    """[B, F, H, W, C] -> [B, H, W, C]: one frame at a random index per clip (the single-frame stages)."""
    return temporal_crop(video, 1, key)[:, 0]


def make_train_step(
    view: ModelView,
    objective: Objective,
    tables: DiffusionTables,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate: optax.Schedule | None = None,
    ema_decay: float | None = None,
    noising_alphas_cumprod: np.ndarray | None = None,
    vae_view: ModelView | None = None,
    remat: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """The pure train step ``(state, frozen, batch, null_text, vae_params) -> (state, metrics)`` of a UNet stage.

    Args of the returned function:
      state: :class:`TrainState`.
      frozen: the frozen parameters (flat dict; may be empty).
      batch: ``{"video": uint8 [B, F, H, W, 3], "text": float [B, L, D]}``.
      null_text: [L, D] the empty prompt's embedding (classifier-free-guidance dropout).
      vae_params: SR2's frozen VAE parameters (flat dict), else an empty dict.
    Metrics: loss, mse, (vlb), grad_norm, learning_rate; float32 scalars.
    """
    apply = unet_apply(view, remat=remat)
    stage = objective.stage

    def train_step(state: TrainState, frozen: Params, batch: dict[str, Array], null_text: Array, vae_params: Params):
        keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 7)
        video = _batch_video(batch)  # [B, F, H, W, 3]
        if stage == "first_frame":
            video = random_frame(video, keys[0])  # [B, H, W, 3]: IF-II-L is a 2D UNet
        elif objective.num_frames is not None:
            video = temporal_crop(video, objective.num_frames, keys[0])
        x0 = encode_latents(vae_view, vae_params, video, keys[1]) if stage == "sr2" else video
        b = x0.shape[0]
        text = batch["text"].astype(jnp.float32)
        drop = jax.random.bernoulli(keys[2], objective.cfg_dropout, (b,))
        text = jnp.where(drop[:, None, None], null_text.astype(jnp.float32)[None], text)
        t = jax.random.randint(keys[3], (b,), objective.min_timestep, objective.max_timestep + 1)
        noise = frame_correlated_noise(keys[4], x0.shape, x0.dtype, objective.frame_noise_correlation)
        noise = shd.constrain(noise, ("batch",))
        x_t = add_noise(tables.alphas_cumprod, x0, noise, t)
        class_labels = None
        if stage == "interpolation":
            from show1_jax.stages import interpolation_cond

            model_in = jnp.concatenate([x_t, interpolation_cond(x0[:, 0], x0[:, -1], x0.shape[1])], axis=-1)
        elif stage == "sr1":
            cond, class_labels = sr1_condition(x0, keys[5], noising_alphas_cumprod, objective.low_res)
            model_in = jnp.concatenate([x_t, cond], axis=-1)
        elif stage == "first_frame":
            cond, class_labels = low_res_condition(x0, keys[5], noising_alphas_cumprod, objective.low_res)
            model_in = jnp.concatenate([x_t, cond], axis=-1)
        else:
            model_in = x_t
        dropout_key = keys[6] if objective.temporal_conv_dropout else None

        def loss_fn(trainable: Params) -> tuple[Array, dict[str, Array]]:
            out = apply({**frozen, **trainable}, model_in, t, text, class_labels, dropout_key)
            return diffusion_loss(
                out,
                x0,
                x_t,
                noise,
                t,
                tables,
                prediction_type=objective.prediction_type,
                learned_variance_weight=objective.learned_variance_weight,
            )

        return _apply_gradients(state, loss_fn, optimizer, learning_rate, ema_decay)

    return train_step


# ---------------------------------------------------------------------------------------------------------------------
# The autoencoder (stage vae)
# ---------------------------------------------------------------------------------------------------------------------


def vae_loss(vae: nnx.Module, images: Array, key: Array, settings: VAESettings) -> tuple[Array, dict[str, Array]]:
    """The autoencoder's training loss of one batch (see the module docstring).

    Args:
      vae: an ``AutoencoderKL``.
      images: [B, H, W, 3] in [-1, 1], H and W multiples of the VAE's downsampling factor.
      key: draws the posterior sample.
    Returns:
      (scalar loss, {"rec": mean |x - x̂| (l1) or (x - x̂)² (mse) per pixel value, "kl": KL per image in nats
      (summed over the latent)}), float32.
    """
    k_degrade, key = jax.random.split(key)
    encoded = degrade_images(images, k_degrade, settings) if settings.degrade_prob > 0 else images
    mean, logvar = vae.encode(encoded)  # [B, h, w, 4] each
    recon = vae.decode(vae.sample_posterior(mean, logvar, key=key)).astype(jnp.float32)  # [B, H, W, 3]
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    diff = recon - images.astype(jnp.float32)
    rec = jnp.abs(diff) if settings.reconstruction_loss == "l1" else jnp.square(diff)
    pixel_values = math.prod(images.shape[1:])
    rec_sum = jnp.sum(rec, axis=(1, 2, 3))  # [B]
    kl_sum = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))  # [B]
    loss = jnp.mean(rec_sum + settings.kl_weight * kl_sum) / pixel_values
    return loss, {"rec": jnp.mean(rec_sum) / pixel_values, "kl": jnp.mean(kl_sum)}


def degrade_images(images: Array, key: Array, settings: VAESettings) -> Array:
    """``images`` [B, H, W, 3] in [-1, 1] with each, with probability ``settings.degrade_prob``, degraded as a latent
    upsampler's input is (:class:`VAESettings`): reduced ``degrade_factor`` times (linear, antialiased), resized
    back (bicubic), blurred by a Gaussian of standard deviation uniform in [0, ``degrade_blur``] pixels, dulled by
    :func:`desaturate` with a factor uniform in [1 - ``degrade_saturation``, 1]."""
    b, h, w, c = images.shape
    k_apply, k_sigma = jax.random.split(key)
    k_saturation = jax.random.fold_in(key, 2)
    x = images.astype(jnp.float32)
    factor = settings.degrade_factor
    if factor > 1:
        small = jax.image.resize(x, (b, max(1, h // factor), max(1, w // factor), c), "linear", antialias=True)
        x = jax.image.resize(small, (b, h, w, c), "cubic")
    if settings.degrade_blur > 0:
        sigma = jax.random.uniform(k_sigma, (b,), maxval=settings.degrade_blur)
        x = gaussian_blur(x, sigma, max_sigma=settings.degrade_blur)
    if settings.degrade_saturation > 0:
        x = desaturate(x, jax.random.uniform(k_saturation, (b,), minval=1.0 - settings.degrade_saturation))
    x = jnp.clip(x, -1.0, 1.0)
    chosen = jax.random.bernoulli(k_apply, settings.degrade_prob, (b,))[:, None, None, None]
    return jnp.where(chosen, x, images.astype(jnp.float32)).astype(images.dtype)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


def desaturate(images: Array, factor: Array) -> Array:
    """[B, H, W, 3] RGB with each image's chroma scaled by ``factor`` [B] about its BT.601 luma, which is kept:
    1 leaves the image as it is, 0 makes it grey. (SR1's generated frames come out this way, ~0.6-0.8.)"""
    x = images.astype(jnp.float32)
    luma = jnp.sum(x * jnp.asarray(LUMA_WEIGHTS, jnp.float32), axis=-1, keepdims=True)
    return luma + factor.astype(jnp.float32)[:, None, None, None] * (x - luma)


def gaussian_blur(images: Array, sigma: Array, *, max_sigma: float | None = None) -> Array:
    """Separable Gaussian blur of [B, H, W, C] with one standard deviation per image (``sigma`` [B], pixels; 0
    leaves the image as it is), edges replicated. The kernel reaches 3 ``max_sigma`` pixels (default: the largest
    of ``sigma``, which must then be concrete)."""
    reach = float(jnp.max(sigma)) if max_sigma is None else max_sigma
    radius = max(1, math.ceil(3.0 * reach))
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)  # [K]
    s = jnp.maximum(sigma.astype(jnp.float32), 1e-3)[:, None]  # [B, 1]
    weights = jnp.exp(-0.5 * jnp.square(offsets[None] / s))
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # [B, K]

    def along(x: Array, axis: int) -> Array:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="edge")
        size = x.shape[axis]
        out = jnp.zeros_like(x)
        for i in range(2 * radius + 1):
            window = jax.lax.slice_in_dim(padded, i, i + size, axis=axis)
            out = out + weights[:, i, None, None, None] * window
        return out

    return along(along(images, 1), 2)


def make_vae_train_step(
    view: ModelView,
    settings: VAESettings,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate: optax.Schedule | None = None,
    ema_decay: float | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """The autoencoder's pure train step, with :func:`make_train_step`'s signature (``null_text`` and
    ``vae_params`` unused; ``batch`` = ``{"video": uint8 [B, F, H, W, 3]}``). Metrics: loss, rec, kl, grad_norm,
    learning_rate."""

    def train_step(state: TrainState, frozen: Params, batch: dict[str, Array], null_text: Array, vae_params: Params):
        k_frame, k_sample = jax.random.split(jax.random.fold_in(state.rng, state.step))
        images = random_frame(_batch_video(batch), k_frame)  # [B, H, W, 3]

        def loss_fn(trainable: Params) -> tuple[Array, dict[str, Array]]:
            return vae_loss(view.merge({**frozen, **trainable}), images, k_sample, settings)

        return _apply_gradients(state, loss_fn, optimizer, learning_rate, ema_decay)

    return train_step


def latent_moments(view: ModelView, params: Params, video: Array, key: Array) -> Array:
    """[count, Σz, Σz²] (float32 [3]) of posterior samples of every frame of ``video`` [B, F, H, W, 3] in [-1, 1]
    (frame by frame, so memory stays that of a training batch)."""
    vae = view.merge(params)

    def frame(carry: Array, xs: tuple[Array, Array]) -> tuple[Array, None]:
        images, k = xs
        z = vae.sample_posterior(*vae.encode(images), key=k).astype(jnp.float32)
        return carry + jnp.stack([jnp.float32(z.size), jnp.sum(z), jnp.sum(jnp.square(z))]), None

    frames = jnp.moveaxis(video, 1, 0)  # [F, B, H, W, 3]
    keys = jax.random.split(key, frames.shape[0])
    return jax.lax.scan(frame, jnp.zeros((3,), jnp.float32), (frames, keys))[0]


def export_vae(view: ModelView, params: Params, out_dir: Path, scaling_factor: float | None = None) -> Path:
    """Write the autoencoder in the converted format, its config's ``scaling_factor`` replaced when given."""
    model = view.merge(params)
    if scaling_factor is not None:
        model.config = dataclasses.replace(model.config, scaling_factor=float(scaling_factor))
    return export_model(model, out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Shardings
# ---------------------------------------------------------------------------------------------------------------------


def flat_param_shardings(view: ModelView, mesh: Mesh, threshold: int | None = None) -> dict[str, NamedSharding]:
    """Each parameter's sharding under ``show1_jax.sharding``'s rules (logical axis names from the model)."""
    specs = shd.param_specs(view.state, mesh, threshold=threshold)
    flat = {".".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(specs)}
    return {k: NamedSharding(mesh, flat[k]) for k in view.keys}


def train_state_shardings(
    state: TrainState, param_shardings: Mapping[str, NamedSharding], optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Shardings of a (possibly abstract) TrainState: optimizer moments and EMA follow their parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = {k: param_shardings[k] for k in state.params}
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, state.opt_state, params, transform_non_params=lambda _: replicated
    )
    return TrainState(replicated, params, opt, None if state.ema is None else dict(params), replicated)


def jit_train_step(
    step_fn: Callable[..., Any],
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: Mapping[str, NamedSharding],
    vae_shardings: Mapping[str, NamedSharding],
    batch_keys: Sequence[str] = ("video", "text"),
) -> shd.ShardedFunction:
    """``step_fn`` jitted on ``mesh``: state and frozen parameters in their shardings, the batch (``batch_keys``)
    split over ``data``/``fsdp`` (logical ``batch``), the empty-prompt embedding replicated, the state donated."""
    batch_axes = {k: shd.BATCH for k in batch_keys}
    return shd.jit_sharded(
        step_fn,
        mesh,
        in_axes=(state_shardings, dict(frozen_shardings), batch_axes, None, dict(vae_shardings)),
        out_axes=(state_shardings, None),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _state_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


class TrainCheckpointer:
    """Orbax checkpoints of a run: the train state (pytree), the data reader's position and the run's settings (JSON).

    ``save`` is asynchronous when ``async_save`` (arrays are copied off the device before it returns, so the next
    step may donate them); the last ``keep`` checkpoints are kept. ``restore`` places every array into the
    shardings of the ``target`` state it is given, so a checkpoint written on one mesh restores onto another.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # The caller decides when to save; every requested save is written.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save, create=True
        )
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
        """Write checkpoint ``step`` (in the background when async); returns whether it was started."""
        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(dict(meta)),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """(state, data_state) of checkpoint ``step``; ``target`` holds ShapeDtypeStructs with shardings."""
        ocp = self._ocp
        abstract = _state_tree(target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
        )
        tree = restored["state"]
        state = TrainState(tree["step"], tree["params"], tree["opt_state"], tree.get("ema"), tree["rng"])
        return state, dict(restored["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or abstract values) placed in ``shardings`` (same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------------------
# Text embeddings on the host
# ---------------------------------------------------------------------------------------------------------------------


class CaptionEmbeddings:
    """caption -> [L, D] float32 embeddings from a table (``save_caption_embeddings``) and/or a cached text encoder.

    Args:
      table: caption -> [L, D] array, or None.
      encoder: a ``show1_jax.text.TextEncoder`` for captions not in the table, or None.
      cache: an ``EmbeddingCache`` for the encoder's results, or None.
    """

    def __init__(self, table: Mapping[str, np.ndarray] | None = None, encoder: Any = None, cache: Any = None):
        if table is None and encoder is None:
            raise ValueError(
                "no text embeddings: build the dataset with embeddings, or set data.embeddings (a table from"
                " save_caption_embeddings) or data.text_encoder (a text_encoder/ folder)"
            )
        self.table, self.encoder, self.cache = table, encoder, cache

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """[B, L, D] float32 for ``captions``."""
        found: dict[str, np.ndarray] = {}
        missing = []
        for caption in dict.fromkeys(captions):
            if self.table is not None and caption in self.table:
                found[caption] = np.asarray(self.table[caption], np.float32)
            else:
                missing.append(caption)
        if missing:
            if self.encoder is None:
                raise KeyError(
                    f"{len(missing)} captions have no embedding in data.embeddings, e.g. {missing[:3]}: add them to"
                    " the table (show1_jax.text + save_caption_embeddings) or set data.text_encoder"
                )
            encoded = self.cache.encode(self.encoder, missing) if self.cache else self.encoder.encode(missing)
            found.update({c: np.asarray(e, np.float32) for c, e in zip(missing, encoded)})
        return np.stack([found[c] for c in captions])


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


class TrainLogger(Protocol):
    """Where a run reports: free-text events and metrics. ``run_training`` never prints."""

    def info(self, message: str) -> None: ...

    def metrics(self, step: int, values: Mapping[str, float]) -> None: ...


class NullLogger:
    def info(self, message: str) -> None:
        pass

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        pass


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    step: int
    model_dir: Path  # the trained UNet (``<workdir>/unet``) or VAE (``<workdir>/vae``), converted format
    checkpoint_dir: Path
    metrics_path: Path  # one JSON object per logged step
    last_metrics: dict[str, float]
    skipped: tuple[Any, ...]  # data.BadRow of every video left out of the dataset


def prepare_dataset(data: DataSettings, workdir: Path, logger: TrainLogger) -> tuple[Path, tuple[Any, ...]]:
    """(dataset folder, skipped rows): ``data.path`` as is, or ``data.source`` built into ``data.build_dir``.

    Skipped rows (with ``data.skip_bad``) are logged with their path and reason and written to
    ``<workdir>/skipped_videos.json``; without it the first bad video stops the build with a ``TrainDataError``
    that names the file.
    """
    from show1_jax.data import BadRow, VideoError, build_dataset
    from show1_jax.data.dataset import find_dataset_dir

    if data.path is not None:
        try:
            return find_dataset_dir(data.path), ()
        except FileNotFoundError as err:
            raise TrainDataError(f"data.path: {err}") from None
    build_dir = Path(data.build_dir) if data.build_dir else workdir / "data"
    existing = sorted(build_dir.glob("**/dataset_info.json")) if build_dir.is_dir() else []
    if existing:
        path = find_dataset_dir(build_dir)
        from show1_jax.data import VideoTextData

        built = VideoTextData(path)
        if (built.frames, built.height, built.width) != (data.frames, data.height, data.width):
            raise TrainDataError(
                f"{path} was built with {built.frames}-frame clips at {built.height}x{built.width}, but data asks"
                f" for {data.frames} frames at {data.height}x{data.width}: set data.build_dir to a new folder"
            )
        skipped = tuple(BadRow(**row) for row in built.metadata.get("skipped", []))
        logger.info(f"reusing the dataset built earlier at {path} ({len(skipped)} videos were skipped then)")
    else:
        logger.info(f"building the dataset from {data.source} into {build_dir}")
        try:
            report = build_dataset(
                data.source,
                build_dir,
                frames=data.frames,
                height=data.height,
                width=data.width,
                fps=data.fps,
                video_column=data.video_column,
                caption_column=data.caption_column,
                skip_bad=data.skip_bad,
                num_workers=data.num_workers,
            )
        except VideoError as err:
            raise TrainDataError(
                f"{err} (while building the dataset from {data.source}): fix or remove that file, or set"
                " data.skip_bad=true to leave unreadable or too-short videos out (they are listed in the log)"
            ) from err
        path, skipped = report.path, report.skipped
        logger.info(f"built {report.num_examples} clips at {path}")
    for bad in skipped:
        logger.info(f"skipped video {bad.video_path} (CSV row {bad.row}): {bad.error}: {bad.message}")
    if skipped:
        (workdir / "skipped_videos.json").write_text(
            json.dumps([dataclasses.asdict(b) for b in skipped], indent=2, default=str)
        )
    return path, skipped


TINY_PRESETS = ("tiny_base", "tiny_interpolation", "tiny_if2", "tiny_sr1", "tiny_sr2", "tiny_vae")


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def tiny_preset(name: str) -> tuple[type, Any]:
    """(model class, config) of a tiny preset of ``show1_jax.tiny`` by its settings name (``TINY_PRESETS``)."""
    from show1_jax import tiny
    from show1_jax.unet3d import UNet2DConditionModel, UNet3DConditionModel
    from show1_jax.vae import AutoencoderKL

    presets = {
        "tiny_base": (UNet3DConditionModel, tiny.TINY_BASE),
        "tiny_interpolation": (UNet3DConditionModel, tiny.TINY_INTERP),
        "tiny_if2": (UNet2DConditionModel, tiny.TINY_IF2),
        "tiny_sr1": (UNet3DConditionModel, tiny.TINY_SR1),
        "tiny_sr2": (UNet3DConditionModel, tiny.TINY_SR2),
        "tiny_vae": (AutoencoderKL, tiny.TINY_VAE),
    }
    return presets[name]


def _config_json(source: str, stage: str) -> tuple[type, Any]:
    """(model class, config) from ``model.config`` = a config.json (or its folder); a file that names no class is
    read as the stage's kind of model."""
    from show1_jax.configs import read_json
    from show1_jax.loading import CONVERTED_MARKER, build_config, family_of

    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"model.config `{source}` is neither a preset ({', '.join(TINY_PRESETS)}) nor a config.json"
        )
    raw = read_json(path)
    if CONVERTED_MARKER not in raw and "_class_name" not in raw and "architectures" not in raw:
        raw["_class_name"] = "AutoencoderKL" if stage == "vae" else "UNet3DConditionModel"
    name, config = build_config(raw, str(path))
    if name == "UNet3DConditionModel" and not config.temporal:
        name = "UNet2DConditionModel"
    return family_of(name)[0], config


def build_model(
    model: ModelSettings, stage: str = "keyframes", sharding: Callable[..., Any] | None = None
) -> nnx.Module:
    """The model to train: loaded from ``model.pretrained`` (into ``sharding``), or randomly initialised from
    ``model.config`` (a preset or a config.json); checked against ``stage`` (:func:`check_stage`)."""
    from show1_jax import tiny
    from show1_jax.loading import load_component, with_overrides

    dtype = _dtype(model.dtype)
    if model.pretrained is not None:
        built = load_component(
            model.pretrained, dtype=dtype, sharding=sharding, config_overrides=model.config_overrides
        )
        check_stage(stage, built.config)
        return built
    if model.config in TINY_PRESETS:
        model_cls, config = tiny_preset(model.config)
    else:
        model_cls, config = _config_json(model.config, stage)
    if model.config_overrides:
        config = with_overrides(config, model.config_overrides, f"model.config={model.config}")
    check_stage(stage, config)
    return tiny.random_model(model_cls, config, seed=model.seed, dtype=dtype)


def build_vae(model: ModelSettings, sharding: Callable[..., Any] | None = None) -> nnx.Module:
    """SR2's frozen VAE: ``model.vae`` (a folder, e.g. a stage-``vae`` run's ``<workdir>/vae``, or ``tiny``), default
    the ``vae`` folder beside ``pretrained``."""
    from show1_jax import tiny
    from show1_jax.loading import load_component
    from show1_jax.vae import AutoencoderKL, VAEConfig

    source = model.vae
    if source is None and model.pretrained is not None:
        source = str(Path(model.pretrained).parent / "vae")
    if source is None:
        raise ValueError("stage sr2 encodes clips with a VAE: set model.vae (a vae/ folder, or `tiny` for tests)")
    if source in ("tiny", "tiny_vae"):
        return tiny.random_model(AutoencoderKL, tiny.TINY_VAE, seed=model.vae_seed)
    vae = load_component(source, dtype=jnp.float32, sharding=sharding)
    if not isinstance(vae.config, VAEConfig):
        raise ValueError(f"model.vae `{source}` holds a {type(vae).__name__}, not an AutoencoderKL: pass a vae/ folder")
    return vae


def _scheduler_config(explicit: str | None, pretrained: str | None, folder: str, preset: dict) -> Any:
    if explicit is not None:
        return load_scheduler_config(explicit)
    if pretrained is not None:
        beside = Path(pretrained).parent / folder / "scheduler_config.json"
        if beside.is_file():
            return load_scheduler_config(beside)
    return load_scheduler_config(preset)


def _text_dim(config: Any) -> int:
    if config.encoder_hid_dim is not None:
        return int(config.encoder_hid_dim)
    dims = config.cross_attention_dim
    return int(dims[0] if isinstance(dims, (tuple, list)) else dims)


def check_stage(stage: str, config: Any) -> None:
    """Raise if a model with ``config`` cannot be trained as ``stage``; the message names a model that can.

    UNet stages: a UNet config with the stage's input channels (a 2D UNet for first_frame, 3D otherwise); the
    super-resolution UNets need a noise-level (class) embedding, and IF-II-L the 6 output channels its learned-range
    sampler reads. Stage vae: an RGB ``AutoencoderKL``.
    """
    from show1_jax.unet3d import UNetConfig
    from show1_jax.vae import VAEConfig

    fix = f"load a {stage} model (model.pretrained) or use model.config={STAGE_PRESETS[stage]}"
    if stage == "vae":
        if not isinstance(config, VAEConfig):
            raise ValueError(f"stage vae trains an AutoencoderKL, but this model is a {type(config).__name__}: {fix}")
        if config.in_channels != 3 or config.out_channels != 3:
            raise ValueError(
                f"stage vae trains on RGB frames, but this AutoencoderKL has in_channels={config.in_channels},"
                f" out_channels={config.out_channels}: set both to 3"
            )
        return
    if not isinstance(config, UNetConfig):
        raise ValueError(
            f"stage {stage} trains a UNet, but this model is a {type(config).__name__} (train it with stage=vae): {fix}"
        )
    if stage == "first_frame" and config.temporal:
        raise ValueError(
            "stage first_frame trains IF-II-L's 2D UNet (UNet2DConditionModel, single frames), but this is a 3D"
            f" UNet with temporal layers: {fix}"
        )
    if stage != "first_frame" and not config.temporal:
        raise ValueError(
            f"stage {stage} trains a 3D video UNet, but this is a 2D UNet2DConditionModel (IF-II-L: train it with"
            f" stage=first_frame): {fix}"
        )
    want = STAGE_IN_CHANNELS[stage]
    if config.in_channels != want:
        raise ValueError(
            f"stage {stage} feeds the UNet {want} input channels but this UNet takes {config.in_channels}: {fix}"
        )
    if stage in ("first_frame", "sr1") and config.class_embed_type is None:
        raise ValueError(
            f"stage {stage} passes the noise level as class_labels, but this UNet has no class embedding: {fix}"
        )
    if stage == "first_frame" and config.out_channels != 6:
        raise ValueError(
            f"IF-II-L's sampler (DDPM, learned_range variance) reads 6 output channels (ε + variance), but this UNet"
            f" has out_channels={config.out_channels}: {fix}"
        )


def _mesh_for(spec: str, devices: Sequence[jax.Device] | None) -> Mesh:
    """``sharding.make_mesh``; a spec without -1 whose product is below the device count uses the first devices."""
    config = shd.MeshConfig.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = (config.data, config.fsdp, config.tensor)
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    return shd.make_mesh(config, devices=devices)


def _host_batch(batch: dict[str, Any], captions: CaptionEmbeddings | None, stage: str) -> dict[str, np.ndarray]:
    if stage == "vae":  # the autoencoder learns no text
        return {"video": np.asarray(batch["video"])}
    text = batch["embeddings"] if "embeddings" in batch else captions(batch["caption"])
    return {"video": np.asarray(batch["video"]), "text": np.asarray(text, np.float32)}


def build_objective(
    settings: TrainSettings, num_frames: int | None
) -> tuple[Objective, DiffusionTables, dict[str, Any], np.ndarray | None]:
    """(objective, noise tables, scheduler configs, the noising ᾱ table of first_frame and sr1, else None) of a UNet
    stage's run. The scheduler configs are exported beside the UNet: ``{"scheduler": training schedule}`` plus
    ``image_noising_scheduler`` for the super-resolution stages (the folders the pipeline reads)."""
    stage = settings.stage
    preset = _stage_scheduler_preset(stage)
    sched = _scheduler_config(settings.diffusion.scheduler, settings.model.pretrained, "scheduler", preset)
    if settings.diffusion.prediction_type and settings.diffusion.prediction_type != sched.prediction_type:
        # The exported scheduler must say what the model now predicts, or sampling reads its output wrongly.
        sched = dataclasses.replace(sched, prediction_type=settings.diffusion.prediction_type)
    tables = DiffusionTables.from_scheduler(sched)
    schedulers = {"scheduler": sched}
    noising, low_res = None, SR1Settings()
    if stage in ("first_frame", "sr1"):
        from show1_jax.tiny import NOISING_SCHEDULER

        low_res = settings.first_frame if stage == "first_frame" else settings.sr1
        nsched = _scheduler_config(
            low_res.noising_scheduler, settings.model.pretrained, "image_noising_scheduler", NOISING_SCHEDULER
        )
        schedulers["image_noising_scheduler"] = nsched
        noising = noise_tables(nsched).alphas_cumprod
    if settings.diffusion.frame_noise_correlation and stage != "keyframes":
        raise ValueError(
            f"diffusion.frame_noise_correlation is for stage keyframes (sampled with keyframes."
            f"frame_noise_correlation), not {stage}: set it to 0"
        )
    max_t = settings.diffusion.max_timestep
    max_t = DEFAULT_MAX_TIMESTEP.get(stage, tables.num_train_timesteps - 1) if max_t is None else max_t
    if max_t >= tables.num_train_timesteps:
        raise ValueError(f"diffusion.max_timestep={max_t} is beyond the schedule's {tables.num_train_timesteps} steps")
    objective = Objective(
        stage=stage,
        prediction_type=settings.diffusion.prediction_type or sched.prediction_type,
        min_timestep=settings.diffusion.min_timestep,
        max_timestep=max_t,
        num_frames=num_frames,
        learned_variance_weight=settings.diffusion.learned_variance_weight,
        cfg_dropout=settings.diffusion.cfg_dropout,
        temporal_conv_dropout=settings.model.temporal_conv_dropout,
        low_res=low_res,
        frame_noise_correlation=settings.diffusion.frame_noise_correlation,
    )
    return objective, tables, schedulers, noising


def run_training(
    settings: TrainSettings,
    *,
    logger: TrainLogger | None = None,
    progress: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Train one stage's model as ``settings`` says, resuming from ``<workdir>/checkpoints`` if there are any.

    Args:
      settings: the run (``configs/train_*.yaml``).
      logger: receives events (``info``) and metrics every ``log_every`` steps (loss, mse, vlb or, for the VAE,
        rec, kl; grad_norm, learning_rate, step_time_s, samples_per_s); also appended to ``<workdir>/metrics.jsonl``.
      progress: an object with ``update(n)`` (tqdm); ``set_postfix`` is used when present.
      devices: devices for the mesh (default all).
    Returns:
      a :class:`TrainResult`. A UNet is written to ``<workdir>/unet`` in the converted format with its scheduler
      folder(s) beside it (``scheduler``; first_frame and sr1 also ``image_noising_scheduler``), the layout of the
      released repositories; a VAE to ``<workdir>/vae``.
    """
    from show1_jax.data import VideoTextData
    from show1_jax.settings import to_mapping

    logger = logger or NullLogger()
    workdir = Path(settings.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stage = settings.stage
    if jax.process_index() == 0:
        import yaml

        (workdir / "settings.yaml").write_text(yaml.safe_dump(to_mapping(settings), sort_keys=False))

    # Data: build (reporting skipped videos) or open.
    data_path, skipped = prepare_dataset(settings.data, workdir, logger)
    data = VideoTextData(data_path)
    num_frames = settings.diffusion.num_frames or DEFAULT_NUM_FRAMES.get(stage)
    if num_frames is not None and num_frames > data.frames:
        raise TrainDataError(
            f"stage {stage} trains on {num_frames}-frame clips but {data_path} holds {data.frames}-frame clips:"
            f" rebuild it with more frames or set diffusion.num_frames <= {data.frames}"
        )
    if stage in ("first_frame", "sr1"):
        factor = getattr(settings, stage).low_res_factor
        if data.height % factor or data.width % factor:
            raise TrainDataError(
                f"{stage} clips of {data.height}x{data.width} are not divisible by {stage}.low_res_factor={factor}:"
                " rebuild the dataset at a multiple of it"
            )
    batch_size, hosts = settings.data.batch_size, jax.process_count()
    if batch_size % hosts:
        raise ValueError(f"data.batch_size={batch_size} must be divisible by the {hosts} processes")

    # Mesh and model.
    mesh = _mesh_for(settings.mesh, devices)
    logger.info(f"mesh {dict(mesh.shape)} over {mesh.size} device(s) ({mesh.devices.flat[0].platform})")
    param_sharder = shd.sharding_fn(mesh, threshold=settings.sharding_threshold)
    model = build_model(settings.model, stage, param_sharder)
    kind = "VAE" if stage == "vae" else "UNet"
    if stage == "vae":
        factor = model.config.downsample_factor
        if data.height % factor or data.width % factor:
            raise TrainDataError(
                f"the VAE downsamples by {factor} but {data_path} holds {data.height}x{data.width} frames: rebuild the"
                f" dataset at a multiple of {factor} so that decoded frames have the input's size"
            )
    view, params = ModelView.split(model)
    del model
    trainable, frozen = partition_params(params, settings.optim.trainable)
    shardings = flat_param_shardings(view, mesh, settings.sharding_threshold)
    frozen = {k: jax.device_put(v, shardings[k]) for k, v in frozen.items()}
    trainable = {k: jax.device_put(v, shardings[k]) for k, v in trainable.items()}
    n_train = sum(int(np.prod(v.shape)) for v in trainable.values())
    n_all = n_train + sum(int(np.prod(v.shape)) for v in frozen.values())
    logger.info(f"{kind}: {n_all:,} parameters, {n_train:,} trainable ({settings.optim.trainable})")
    summary = shd.summarize(view.state, mesh, threshold=settings.sharding_threshold)
    logger.info(
        f"parameter bytes: {summary.total_bytes} in total, {summary.per_device_bytes} on the most loaded device"
    )

    vae_view, vae_params, vae_shardings = None, {}, {}
    if stage == "sr2":
        vae_view, vae_params = ModelView.split(build_vae(settings.model, param_sharder))
        if vae_view.config.latent_channels != view.config.in_channels:
            raise ValueError(
                f"model.vae has {vae_view.config.latent_channels} latent channels but the sr2 UNet takes"
                f" {view.config.in_channels}: pair them (tiny_sr2 and tiny_vae both use 4)"
            )
        vae_shardings = flat_param_shardings(vae_view, mesh, settings.sharding_threshold)
        vae_params = {k: jax.device_put(v, vae_shardings[k]) for k, v in vae_params.items()}

    # Text (the UNet stages).
    captions, null_text = None, np.zeros((1, 1), np.float32)
    if stage in UNET_STAGES:
        objective, tables, schedulers, noising = build_objective(settings, num_frames)
        captions = _caption_embeddings(settings.data, workdir)
        null_text = _empty_prompt_embedding(settings.data, data, captions, settings.diffusion.cfg_dropout)
        if null_text.shape[-1] != _text_dim(view.config):
            raise ValueError(
                f"text embeddings have width {null_text.shape[-1]} but this UNet takes {_text_dim(view.config)}: use"
                " the stage's text encoder (T5 for the pixel stages, CLIP for sr2)"
            )

    # Optimizer, state, checkpoints.
    optimizer = make_optimizer(settings.optim, settings.steps)
    lr_schedule = learning_rate_schedule(settings.optim, settings.steps)
    use_ema = settings.optim.ema_decay is not None
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, settings.seed, ema=use_ema), trainable)
    state_sh = train_state_shardings(abstract, shardings, optimizer, mesh)
    checkpointer = TrainCheckpointer(
        workdir / "checkpoints",
        keep=settings.checkpoint.keep,
        async_save=settings.checkpoint.async_save,
    )
    iterator = data.batches(
        batch_size // hosts,
        seed=settings.data.seed,
        process_index=jax.process_index(),
        process_count=hosts,
        group_size=settings.data.batch_group_size,
    )
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state = checkpointer.restore(start, abstract_with_shardings(abstract, state_sh))
        # Every host reads the same number of clips per step, so process 0's saved position is every host's.
        iterator.set_state({**data_state, "process_index": jax.process_index()})
        logger.info(f"resumed from step {start} ({checkpointer.directory})")
    else:
        init = jax.jit(
            lambda p: init_train_state(p, optimizer, settings.seed, ema=use_ema),
            in_shardings=({k: shardings[k] for k in trainable},),
            out_shardings=state_sh,
        )
        state, start = init(trainable), 0
    del trainable

    if stage == "vae":
        step_fn = make_vae_train_step(
            view, settings.vae, optimizer, learning_rate=lr_schedule, ema_decay=settings.optim.ema_decay
        )
    else:
        step_fn = make_train_step(
            view,
            objective,
            tables,
            optimizer,
            learning_rate=lr_schedule,
            ema_decay=settings.optim.ema_decay,
            noising_alphas_cumprod=noising,
            vae_view=vae_view,
            remat=settings.model.remat,
        )
    frozen_sh = {k: shardings[k] for k in frozen}
    batch_keys = ("video",) if stage == "vae" else ("video", "text")
    train_step = jit_train_step(step_fn, mesh, state_sh, frozen_sh, vae_shardings, batch_keys)
    null_text = jax.device_put(jnp.asarray(null_text, jnp.float32), NamedSharding(mesh, PartitionSpec()))
    meta = {"stage": stage, "settings": to_mapping(settings)}

    # The loop.
    metrics_path = workdir / "metrics.jsonl"
    if progress is not None and start:
        progress.update(start)
    last: dict[str, float] = {}
    step = start
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        while step < settings.steps:
            host = _host_batch(next(iterator), captions, stage)
            batch = {k: shd.host_local_to_global(v, mesh, ("batch",)) for k, v in host.items()}
            if step == start:
                compile_start = time.perf_counter()
            state, metrics = train_step(state, frozen, batch, null_text, vae_params)
            step += 1
            interval_steps += 1
            if step == start + 1:
                jax.block_until_ready(metrics)
                logger.info(f"first step (compile + run) took {time.perf_counter() - compile_start:.1f} s")
                interval_start, interval_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if step % settings.checkpoint.every == 0 or step == settings.steps:
                checkpointer.save(step, state, iterator.get_state(), meta)
            if step % settings.log_every == 0 or step == settings.steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                if interval_steps:
                    step_time = (now - interval_start) / interval_steps
                    last.update(step_time_s=step_time, samples_per_s=batch_size / step_time)
                interval_start, interval_steps = now, 0
                logger.metrics(step, last)
                if jax.process_index() == 0:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": step, **last}) + "\n")
                if progress is not None and hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
        checkpointer.wait()
    finally:
        checkpointer.close()

    # Export the trained model where load_component (and the pipeline) reads it.
    final = {**frozen, **(state.ema if (settings.export_ema and state.ema is not None) else state.params)}
    if stage == "vae":
        scaling = None
        if settings.vae.fit_scaling_factor:
            scaling = _fit_scaling_factor(view, final, data, settings, mesh, logger)
        model_dir = export_vae(view, final, workdir / "vae", scaling)
    else:
        model_dir = export_model(view.merge(final), workdir / "unet")
        for folder, config in schedulers.items():
            _write_scheduler(config, workdir / folder)
    logger.info(f"wrote the trained {kind} to {model_dir}")
    return TrainResult(step, model_dir, checkpointer.directory, metrics_path, last, skipped)


def _fit_scaling_factor(
    view: ModelView, params: Params, data: Any, settings: TrainSettings, mesh: Mesh, logger: TrainLogger
) -> float:
    """1 / std of VAE posterior samples of every frame of the first training batch (SD's ``scale_by_std``)."""
    hosts = jax.process_count()
    first = next(
        data.batches(
            settings.data.batch_size // hosts,
            seed=settings.data.seed,
            process_index=jax.process_index(),
            process_count=hosts,
        )
    )
    video = shd.host_local_to_global(np.asarray(first["video"]), mesh, ("batch",))
    moments = jax.jit(lambda p, v, k: latent_moments(view, p, v.astype(jnp.float32) / 127.5 - 1.0, k))(
        params, video, jax.random.fold_in(jax.random.PRNGKey(settings.seed), settings.steps)
    )
    count, total, squares = (float(v) for v in jax.device_get(moments))
    std = math.sqrt(max(squares / count - (total / count) ** 2, 1e-12))
    logger.info(
        f"VAE latents of {video.shape[0] * video.shape[1]} training frames: std {std:.4g} -> scaling_factor"
        f" {1.0 / std:.6g}"
    )
    return 1.0 / std


def _stage_scheduler_preset(stage: str) -> dict:
    from show1_jax.tiny import IF2_DDPM_SCHEDULER, PIXEL_DPM_SCHEDULER, SR2_DPM_SCHEDULER

    return {"sr2": SR2_DPM_SCHEDULER, "first_frame": IF2_DDPM_SCHEDULER}.get(stage, PIXEL_DPM_SCHEDULER)


def _caption_embeddings(data: DataSettings, workdir: Path) -> CaptionEmbeddings | None:
    from show1_jax.data import load_caption_embeddings

    table = load_caption_embeddings(data.embeddings) if data.embeddings else None
    encoder = cache = None
    if data.text_encoder:
        from show1_jax.text import EmbeddingCache, TextEncoder

        encoder, cache = TextEncoder(data.text_encoder), EmbeddingCache(workdir / "text_cache")
    if table is None and encoder is None:
        return None
    return CaptionEmbeddings(table, encoder, cache)


def _empty_prompt_embedding(
    data: DataSettings, dataset: Any, captions: CaptionEmbeddings | None, cfg_dropout: float
) -> np.ndarray:
    """[L, D] embedding of ``data.empty_prompt`` (classifier-free-guidance dropout; zeros when that is off)."""
    if captions is None and not dataset.has_embeddings:
        raise TrainDataError(
            f"{dataset.path} stores no text embeddings: set data.embeddings (a caption table) or data.text_encoder"
            " (a text_encoder/ folder)"
        )
    try:
        if captions is None:
            raise KeyError(data.empty_prompt)
        return captions([data.empty_prompt])[0]
    except KeyError:
        if cfg_dropout == 0.0 and dataset.has_embeddings:
            return np.zeros(dataset.info.features["embeddings"].shape, np.float32)  # never used
        raise TrainDataError(
            f"classifier-free-guidance dropout needs the embedding of the empty prompt {data.empty_prompt!r}: add it"
            " to the data.embeddings table, set data.text_encoder, or set diffusion.cfg_dropout=0"
        ) from None


def export_model(model: nnx.Module, out_dir: Path) -> Path:
    """Write ``model`` in the converted format (replacing an earlier export of this run)."""
    from show1_jax.loading import save_converted

    if out_dir.exists():
        shutil.rmtree(out_dir)
    return save_converted(model, out_dir)


def _write_scheduler(config: Any, folder: Path) -> None:
    raw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "ignored_keys"}
    raw["_class_name"] = type(config).class_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(raw, indent=2, sort_keys=True, default=list))


# ---------------------------------------------------------------------------------------------------------------------
# Command line: show1 train CONFIG [key=value ...]
# ---------------------------------------------------------------------------------------------------------------------


class PrintLogger:
    """Prints events and metrics lines (the command line's logger)."""

    def __init__(self, write: Callable[[str], None] = print):
        self.write = write

    def info(self, message: str) -> None:
        self.write(message)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.write(f"step {step}: {shown}")


def add_train_arguments(parser: Any) -> None:
    """The ``show1 train`` arguments (for ``show1_jax.cli``)."""
    parser.add_argument("config", help="training settings YAML, e.g. configs/train_keyframes.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 optim.learning_rate=3e-5")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train(args: Any) -> int:
    """Run ``show1 train`` from parsed arguments."""
    from show1_jax.settings import load_settings

    settings = load_settings(TrainSettings, args.config, args.overrides)
    logger = PrintLogger()
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=settings.steps, desc=f"train {settings.stage}", unit="step")
        logger = PrintLogger(progress.write)
    try:
        result = run_training(settings, logger=logger, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    print(f"trained {settings.stage} to step {result.step}; model: {result.model_dir}; metrics: {result.metrics_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``show1 train CONFIG [key=value ...]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="show1 train", description="train a model of the Show-1 cascade")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
