"""The SD KL-f8 ``AutoencoderKL`` of the SR2 stage (SPEC.md §3.6, §6.6), channels-last, Flax NNX.

Built from the diffusers ``config.json``: an encoder (``conv_in`` -> ``DownEncoderBlock2D`` x n -> mid block ->
GroupNorm -> SiLU -> ``conv_out``) to a diagonal Gaussian posterior over ``latent_channels``, and a decoder
(``conv_in`` -> mid block -> ``UpDecoderBlock2D`` x n -> GroupNorm -> SiLU -> ``conv_out``). Every GroupNorm has
eps 1e-6 and normalises per image (per frame for videos); the mid block's attention is single-head with
head_dim = C; the encoder downsamplers zero-pad right/bottom by one before a 3x3 stride-2 conv without padding
(golden README, "Weight layout facts": AutoencoderKL).

Scaling: ``encode``/``sample_posterior``/``decode`` and the video helpers work on **unscaled** latents, as
diffusers' ``AutoencoderKL`` does. The caller applies ``scaling_factor`` explicitly with :meth:`scale_latents`
(after sampling the posterior) and :meth:`unscale_latents` (before decoding); nothing in this module scales
implicitly.

Memory: :meth:`AutoencoderKL.encode_video` and :meth:`AutoencoderKL.decode_video` fold frames into the batch and,
with ``frames_per_chunk``, run the per-image network over chunks of frames with ``lax.map`` (one compiled loop
body, so XLA's peak activation memory is that of one chunk); results equal the unchunked ones because every layer
acts per image. ``bench/vae_memory.py`` reports the compiled peak for a 29-frame 320x576 video.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from show1_jax.configs import ConfigError, config_from_dict
from show1_jax.layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    stat_dtype,
)

Array = jax.Array

VAE_EPS = 1e-6  # every GroupNorm of the VAE (SPEC.md §1.3)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps the log-variance

# Keys of later diffusers AutoencoderKL configs that we do not model, with the value that makes them a no-op.
_NEUTRAL = {"latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """config.json of a diffusers ``AutoencoderKL`` (key names as released; defaults are diffusers' constructor's).

    ``force_upcast`` is advisory in diffusers (pipelines upcast a float16 VAE to float32 to decode); here the
    caller picks the dtype at load time, so it is kept only for the record. ``shift_factor`` (None = 0) enters only
    :meth:`AutoencoderKL.scale_latents` / :meth:`AutoencoderKL.unscale_latents`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VAEConfig:
        cfg = config_from_dict(cls, raw, neutral=_NEUTRAL)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("AutoencoderKL config: block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"AutoencoderKL config has {len(self.down_block_types)} down_block_types, "
                f"{len(self.up_block_types)} up_block_types and {n} block_out_channels: they must agree"
            )
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ConfigError(
                f"AutoencoderKL block types {sorted(set(bad))} are not supported: only DownEncoderBlock2D / "
                "UpDecoderBlock2D (the SD KL-f8 VAE) are implemented"
            )
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ConfigError(
                f"AutoencoderKL config: layers_per_block must be a positive int, got {self.layers_per_block}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"AutoencoderKL config: block_out_channels {list(self.block_out_channels)} must all be multiples "
                    f"of norm_num_groups={self.norm_num_groups} (GroupNorm)"
                )
        if self.act_fn not in ("silu", "swish", "gelu", "mish", "relu"):
            raise ConfigError(f"AutoencoderKL config: act_fn `{self.act_fn}` is not supported (silu, gelu, mish, relu)")
        if not self.scaling_factor:
            raise ConfigError("AutoencoderKL config: scaling_factor must be non-zero (SD KL-f8: 0.18215)")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each spatial axis: 2 ** (number of blocks - 1); 8 for KL-f8."""
        return 2 ** (len(self.block_out_channels) - 1)


# The released SD KL-f8 VAE (manifests/sd_vae_kl_f8.config.json; [inferred] for show-1-sr2/vae, SPEC.md §6.6).
SD_KL_F8 = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
)


class MidBlockAttention(Attention):
    """The VAE mid-block self-attention: GroupNorm -> one head with head_dim = C over the H*W tokens -> + input.

    Parameters ``group_norm``, ``to_q``/``to_k``/``to_v`` (with bias) and ``to_out``; the key table also accepts the
    legacy names ``query``/``key``/``value``/``proj_attn``.
    """

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
        super().__init__(channels, 1, channels, qkv_bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=VAE_EPS, dtype=dtype)

    def __call__(self, x: Array) -> Array:  # type: ignore[override]
        """x: [N, H, W, C] -> [N, H, W, C]."""
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, h * w, c)  # [N, H*W, C]
        return super().__call__(tokens).reshape(x.shape) + x


class UNetMidBlock2D(nnx.Module):
    """resnets.0 -> attentions.0 -> resnets.1, no time embedding."""

    def __init__(self, channels: int, *, groups: int, act: str, add_attention: bool, dtype, rngs: nnx.Rngs):
        def resnet() -> ResnetBlock2D:
            return ResnetBlock2D(channels, channels, None, groups=groups, eps=VAE_EPS, act=act, dtype=dtype, rngs=rngs)

        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List(
            [MidBlockAttention(channels, groups=groups, dtype=dtype, rngs=rngs)] if add_attention else []
        )

    def __call__(self, x: Array) -> Array:
        """x: [N, H, W, C] -> [N, H, W, C]."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """``layers`` resnets, then (except in the last block) the asymmetric-pad stride-2 ``downsamplers.0``."""

    def __init__(self, cin: int, cout: int, *, layers: int, add_downsample: bool, cfg: VAEConfig, dtype, rngs):
        g, act = cfg.norm_num_groups, cfg.act_fn
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if i == 0 else cout, cout, None, groups=g, eps=VAE_EPS, act=act, dtype=dtype,
                              rngs=rngs)
                for i in range(layers)
            ]
        )  # fmt: skip
        # padding=0: the VAE pads (0, 1) on H and W before the stride-2 conv (golden README, AutoencoderKL).
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)] if add_downsample else [])

    def __call__(self, x: Array) -> Array:
        """x: [N, H, W, Cin] -> [N, H', W', Cout] (H' = floor((H - 2) / 2) + 1 when downsampling)."""
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """``layers`` resnets, then (except in the last block) nearest x2 + 3x3 conv ``upsamplers.0``."""

    def __init__(self, cin: int, cout: int, *, layers: int, add_upsample: bool, cfg: VAEConfig, dtype, rngs):
        g, act = cfg.norm_num_groups, cfg.act_fn
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if i == 0 else cout, cout, None, groups=g, eps=VAE_EPS, act=act, dtype=dtype,
                              rngs=rngs)
                for i in range(layers)
            ]
        )  # fmt: skip
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, x: Array) -> Array:
        """x: [N, h, w, Cin] -> [N, 2h, 2w, Cout] when upsampling, else [N, h, w, Cout]."""
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nnx.Module):
    """[N, H, W, in_channels] -> [N, h, w, 2 * latent_channels] (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, boc[0], 3, dtype=dtype, rngs=rngs)
        blocks, cout = [], boc[0]
        for i, width in enumerate(boc):
            cin, cout = cout, width
            blocks.append(
                DownEncoderBlock2D(cin, cout, layers=cfg.layers_per_block, add_downsample=i < len(boc) - 1, cfg=cfg,
                                   dtype=dtype, rngs=rngs)
            )  # fmt: skip
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(
            boc[-1], groups=g, act=cfg.act_fn, add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs
        )
        self.conv_norm_out = GroupNorm(g, boc[-1], eps=VAE_EPS, dtype=dtype)
        self.conv_out = conv2d(boc[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        # SiLU here whatever act_fn says: the reference hard-codes conv_act = SiLU in Encoder and Decoder.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """[N, h, w, latent_channels] (after ``post_quant_conv``) -> [N, H, W, out_channels]."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = tuple(reversed(boc))
        self.conv_in = conv2d(cfg.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(
            rev[0], groups=g, act=cfg.act_fn, add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs
        )
        blocks, cout = [], rev[0]
        for i, width in enumerate(rev):
            cin, cout = cout, width
            blocks.append(
                UpDecoderBlock2D(cin, cout, layers=cfg.layers_per_block + 1, add_upsample=i < len(rev) - 1, cfg=cfg,
                                 dtype=dtype, rngs=rngs)
            )  # fmt: skip
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(g, boc[0], eps=VAE_EPS, dtype=dtype)
        self.conv_out = conv2d(boc[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


def _map_chunks(fn: Callable[[Array], Any], x: Array, frames_per_chunk: int | None) -> Any:
    """``fn`` over the leading axis of ``x`` [N, ...] in chunks of ``frames_per_chunk`` rows.

    Full chunks run through ``lax.map`` (one loop body: XLA keeps one chunk's activations alive); a last partial
    chunk runs once more on its own, so no padded rows are computed. None, or a chunk at least N, is one call.
    """
    n = x.shape[0]
    if frames_per_chunk is None or frames_per_chunk >= n:
        return fn(x)
    k = frames_per_chunk
    full = n // k * k
    head = jax.lax.map(fn, x[:full].reshape(n // k, k, *x.shape[1:]))  # [N // k, k, ...] per output
    out = jax.tree.map(lambda o: o.reshape(full, *o.shape[2:]), head)
    if full < n:
        tail = fn(x[full:])
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), out, tail)
    return out


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` (SD KL-f8 for SR2), channels-last.

    Images are [N, H, W, in_channels] in [-1, 1]; latents are [N, H / f, W / f, latent_channels] with
    f = ``config.downsample_factor`` (8); videos are [B, F, H, W, C] and latent videos [B, F, h, w, C]
    (SPEC.md §1.1). Latents are unscaled throughout (see the module docstring).
    """

    config_class = VAEConfig

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        lat = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = conv2d(2 * lat, 2 * lat, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(lat, lat, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

    # -- shape checks ---------------------------------------------------------------------------------------------

    def _check_images(self, images: Array, what: str = "encode", hint: str = "") -> None:
        cfg = self.config
        if images.ndim != 4:
            raise ValueError(
                f"{what} takes images [N, H, W, {cfg.in_channels}] (channels last), "
                f"got shape {tuple(images.shape)}{hint}"
            )
        n, h, w, c = images.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"{what}: images have {c} channels on the last axis, the VAE expects in_channels={cfg.in_channels}: "
                f"inputs are channels-last [N, H, W, C]; transpose a PyTorch [N, C, H, W] array with (0, 2, 3, 1)"
            )
        f = cfg.downsample_factor
        if h < f or w < f:
            raise ValueError(
                f"{what}: images of {h}x{w} pixels are too small for {len(cfg.block_out_channels) - 1} stride-2 "
                f"downsamplers: H and W must be at least {f} (normally multiples of {f})"
            )

    def _check_latents(self, latents: Array, what: str = "decode", hint: str = "") -> None:
        lat = self.config.latent_channels
        if latents.ndim != 4:
            raise ValueError(
                f"{what} takes latents [N, h, w, {lat}] (channels last), got shape {tuple(latents.shape)}{hint}"
            )
        if latents.shape[-1] != lat:
            raise ValueError(
                f"{what}: latents have {latents.shape[-1]} channels on the last axis, the VAE expects "
                f"latent_channels={lat}: latents are channels-last [N, h, w, C]; transpose a PyTorch [N, C, h, w] "
                "array with (0, 2, 3, 1)"
            )

    @staticmethod
    def _check_chunk(frames_per_chunk: int | None) -> None:
        if frames_per_chunk is not None and (not isinstance(frames_per_chunk, int) or frames_per_chunk < 1):
            raise ValueError(
                f"frames_per_chunk must be None (all frames at once) or a positive int, got {frames_per_chunk!r}"
            )

    # -- images ---------------------------------------------------------------------------------------------------

    def encode(self, images: Array) -> tuple[Array, Array]:
        """The posterior of each image.

        Args:
          images: [N, H, W, in_channels] in [-1, 1].

        Returns:
          (mean, logvar), each [N, h, w, latent_channels] with h = floor((H - 2) / 2) + 1 per downsampler (H / 8 for
          multiples of 8); logvar is clamped to [-30, 20] as the reference's DiagonalGaussianDistribution.
        """
        self._check_images(images, hint="; for videos [B, F, H, W, C] use encode_video")
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # the first latent_channels channels are the mean
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @staticmethod
    def sample_posterior(mean: Array, logvar: Array, *, key: Array | None = None, noise: Array | None = None) -> Array:
        """mean + exp(0.5 * logvar) * noise, the reference's ``latent_dist.sample``.

        Args:
          mean, logvar: [..., latent_channels] from :meth:`encode` / :meth:`encode_video`.
          key: a JAX PRNG key; noise = ``jax.random.normal(key, mean.shape, float32)`` cast to mean's dtype (float64
            under float64).
          noise: explicit standard-normal noise of mean's shape, e.g. the reference's recorded draw (in our layout).

        Returns:
          An (unscaled) latent sample of mean's shape and dtype.
        """
        if (key is None) == (noise is None):
            raise ValueError("sample_posterior needs exactly one of key= (a jax.random key) or noise= (an array)")
        if mean.shape != logvar.shape:
            raise ValueError(f"sample_posterior: mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        if noise is None:
            noise = jax.random.normal(key, mean.shape, stat_dtype(mean.dtype))
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(
                f"sample_posterior: noise has shape {tuple(noise.shape)}, expected {tuple(mean.shape)} (channels "
                "last; the reference's SR2 draw is [B*F, C, h, w]: transpose it with (0, 2, 3, 1) and reshape to "
                "[B, F, h, w, C])"
            )
        std = jnp.exp(0.5 * logvar)
        return mean + std * jnp.asarray(noise).astype(mean.dtype)

    def decode(self, latents: Array) -> Array:
        """Decode unscaled latents.

        Args:
          latents: [N, h, w, latent_channels] (divide SR2 latents by ``scaling_factor`` first: unscale_latents).

        Returns:
          [N, h * f, w * f, out_channels] images, nominally in [-1, 1] (not clipped), f = config.downsample_factor.
        """
        self._check_latents(latents, hint="; for latent videos [B, F, h, w, C] use decode_video")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- videos ---------------------------------------------------------------------------------------------------

    def encode_video(self, video: Array, *, frames_per_chunk: int | None = None) -> tuple[Array, Array]:
        """Encode every frame as an image.

        Args:
          video: [B, F, H, W, in_channels] in [-1, 1].
          frames_per_chunk: None encodes all B*F frames in one batch; k runs chunks of k frames through ``lax.map``
            (bounded memory, identical results).

        Returns:
          (mean, logvar), each [B, F, h, w, latent_channels]; sample with :meth:`sample_posterior`.
        """
        if video.ndim != 5:
            raise ValueError(
                f"encode_video takes videos [B, F, H, W, C] (channels last), got shape {tuple(video.shape)}; "
                "for images [N, H, W, C] use encode"
            )
        self._check_chunk(frames_per_chunk)
        b, f = video.shape[:2]
        frames = video.reshape(b * f, *video.shape[2:])  # row = b * F + f, the reference's order
        self._check_images(frames, "encode_video")
        mean, logvar = _map_chunks(self.encode, frames, frames_per_chunk)
        return mean.reshape(b, f, *mean.shape[1:]), logvar.reshape(b, f, *logvar.shape[1:])

    def decode_video(self, latents: Array, *, frames_per_chunk: int | None = None) -> Array:
        """Decode every frame as an image (the reference decodes frame by frame: VAE slicing, SPEC.md §3.6).

        Args:
          latents: [B, F, h, w, latent_channels], unscaled.
          frames_per_chunk: None decodes all B*F frames in one batch; k runs chunks of k frames through ``lax.map``
            (bounded memory, identical results). See bench/vae_memory.py for the peak memory per chunk size.

        Returns:
          [B, F, h * f, w * f, out_channels].
        """
        if latents.ndim != 5:
            raise ValueError(
                f"decode_video takes latent videos [B, F, h, w, C] (channels last), got shape {tuple(latents.shape)}; "
                "for latents [N, h, w, C] use decode"
            )
        self._check_chunk(frames_per_chunk)
        b, f = latents.shape[:2]
        frames = latents.reshape(b * f, *latents.shape[2:])
        self._check_latents(frames, "decode_video")
        out = _map_chunks(self.decode, frames, frames_per_chunk)
        return out.reshape(b, f, *out.shape[1:])

    # -- scaling --------------------------------------------------------------------------------------------------

    def scale_latents(self, latents: Array) -> Array:
        """(latents - shift_factor) * scaling_factor: posterior samples -> the diffusion model's latents."""
        shift = self.config.shift_factor or 0.0
        return (latents - shift) * self.config.scaling_factor

    def unscale_latents(self, latents: Array) -> Array:
        """latents / scaling_factor + shift_factor: the diffusion model's latents -> decoder input."""
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift
