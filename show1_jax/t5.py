"""T5 v1.1 encoder (the Show-1 text stage, SPEC.md §3.2) in Flax NNX.

Pre-norm blocks: RMSNorm (no centring, no bias) -> self-attention with a relative-position bias and no
1/sqrt(d_kv) scaling -> residual; RMSNorm -> gated feed-forward ``act(wi_0 x) * (wi_1 x)`` -> ``wo`` -> residual;
a final RMSNorm. The position bias is computed once from block 0's table and shared by every block. The attention
mask masks keys only: padded query positions still produce outputs, which the Show-1 UNets consume.

Sub-module names follow the transformers state dict (``encoder.block.i.layer.0.SelfAttention.q``, ...), so the key
table in ``t5_params.py`` is a handful of renames.

Precision (golden README, "float32 islands"):
  * The reference computes RMSNorm's mean of squares and the attention softmax in float32 even in a float64 run.
    ``float32_islands=True`` does the same; the default ``False`` computes them in the model dtype (at least
    float32), which only changes float64 runs. Why off: torch's float32 rounding cannot be reproduced (its CPU exp
    is a vectorised approximation, 59% of its float32 exp values differ from the correctly rounded ones, measured;
    its reductions have their own order), so a float32 island here adds float32 noise independent of the
    reference's instead of cancelling it. Measured against float64 references (the golden case, and four more made
    with a torch re-implementation that matches the golden case bit for bit): off 2.9e-7..1.8e-6 relative, which is
    exactly the reference's own island noise; on 4.3e-7..2.3e-6.
  * Overflow: the residual stream is kept in ``promote(dtype, float32)`` — float32 for bfloat16/float16 models —
    while every matmul runs in the model dtype with float32 accumulation. This mirrors the reference's float16 load
    (transformers keeps ``wo`` in float32 for T5, which makes the residual float32) and needs no clamping; bfloat16
    also shares float32's exponent range, so activations that overflow float16 stay finite.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax.configs import ConfigError, config_from_dict
from show1_jax.layers import logical

Array = jax.Array

# transformers' activation names (``dense_act_fn``); ``gelu_new`` is the tanh approximation (SPEC.md §1.3).
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The keys of a transformers ``T5Config`` that shape the encoder; defaults are T5 v1.1 XXL (SPEC.md §3.2)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str | None = None  # None: derived from feed_forward_proj as transformers does
    is_gated_act: bool | None = None
    # Read and ignored: decoder-only, training-only or generation settings that do not change the encoder output.
    num_decoder_layers: int | None = None
    dropout_rate: float = 0.0
    classifier_dropout: float = 0.0
    n_positions: int | None = None
    output_past: bool | None = None
    scale_decoder_outputs: bool | None = None  # written by transformers 5: the decoder's output scaling

    def __post_init__(self):
        act = self.activation  # validates feed_forward_proj / dense_act_fn
        if act not in _ACTIVATIONS:
            raise ConfigError(f"T5 activation `{act}` is not supported; supported: {', '.join(_ACTIVATIONS)}")
        if not self.feed_forward_proj.startswith("gated-") or self.is_gated_act is False:
            raise ConfigError(
                f"T5 feed_forward_proj={self.feed_forward_proj!r}, is_gated_act={self.is_gated_act!r}: only the gated"
                " feed-forward of T5 v1.1 (`gated-gelu`, keys wi_0/wi_1/wo) is implemented; the Show-1 text encoder"
                " is T5 v1.1"
            )

    @property
    def activation(self) -> str:
        """The feed-forward activation: ``dense_act_fn`` if given, else transformers' reading of feed_forward_proj."""
        if self.dense_act_fn is not None:
            return self.dense_act_fn
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> T5Config:
        return config_from_dict(cls, raw)


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """T5's bucket of each relative position (key index - query index).

    Half the buckets per direction when bidirectional; within a direction, distances below half of those buckets
    are exact and larger ones are log-spaced up to ``max_distance`` (the last bucket takes everything beyond).
    The log is evaluated in float32 and truncated toward zero, as the reference does, so that bucket boundaries
    agree exactly. Computed in numpy: sequence lengths are static.

    Args:
      relative_position: integer array of any shape.

    Returns:
      int32 array of the same shape, values in [0, num_buckets).
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros(rel.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    # float32 throughout, as torch; positions below max_exact (log(0) included) take the exact branch.
    large = max_exact + np.trunc(np.where(is_small, 0.0, scaled)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class Linear(nnx.Module):
    """A bias-free projection ``x @ kernel``, kernel [in, out]; accumulates in ``out_dtype`` (default: the dtype).

    ``axes`` are the kernel's logical axis names (show1_jax/sharding.py).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, axes=("embed", "mlp")):
        self.dtype = dtype
        init = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) / math.sqrt(in_features)
        self.kernel = nnx.Param(init.astype(dtype), **logical(axes))

    def __call__(self, x: Array, out_dtype=None) -> Array:
        """[..., in] -> [..., out]."""
        return jnp.einsum(
            "...I,IO->...O", x.astype(self.dtype), self.kernel[...], preferred_element_type=out_dtype or self.dtype
        )


class Embedding(nnx.Module):
    """A lookup table [num, dim] (parameter ``embedding``, the PyTorch ``weight`` unchanged)."""

    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs, axes=("vocab", "embed")):
        init = jax.random.normal(rngs.params(), (num, dim), jnp.float32).astype(dtype)
        self.embedding = nnx.Param(init, **logical(axes))

    def __call__(self, ids: Array) -> Array:
        """[...] int -> [..., dim]."""
        return jnp.take(self.embedding[...], ids, axis=0)


class T5LayerNorm(nnx.Module):
    """RMSNorm: ``scale * x / sqrt(mean(x**2) + eps)``, no centring and no bias (parameter ``scale``)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), dtype), **logical(("norm",)))

    def __call__(self, x: Array, *, float32_islands: bool = False) -> Array:
        """[..., D] (any float dtype, e.g. the float32 residual) -> [..., D] in the model dtype."""
        stat = jnp.float32 if float32_islands else jnp.promote_types(x.dtype, jnp.float32)
        variance = jnp.mean(jnp.square(x.astype(stat)), axis=-1, keepdims=True)
        # float64 x times the float32 reciprocal promotes to float64, exactly as the reference's mixed product.
        y = x * jax.lax.rsqrt(variance + self.eps)
        # One rounding to a 16-bit dtype, after the scale (the reference rounds before and after it).
        return (self.scale[...].astype(y.dtype) * y).astype(self.dtype)


class T5Attention(nnx.Module):
    """Self-attention without logit scaling; block 0 also owns the relative-attention-bias table."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.k = Linear(config.d_model, inner, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.v = Linear(config.d_model, inner, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.o = Linear(inner, config.d_model, dtype=dtype, rngs=rngs, axes=("heads", "embed"))
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(
                config.relative_attention_num_buckets, config.num_heads, dtype=dtype, rngs=rngs, axes=(None, None)
            )

    def compute_bias(self, query_length: int, key_length: int) -> Array:
        """The relative-position bias [1, N, Q, K] (N heads) in the model dtype."""
        rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # [Q, K]: key - query
        buckets = relative_position_bucket(
            rel,
            bidirectional=True,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(jnp.asarray(buckets))  # [Q, K, N]
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(
        self, x: Array, position_bias: Array, key_mask: Array | None, *, float32_islands: bool, out_dtype
    ) -> Array:
        """Args:
          x: [B, L, D] normalised hidden states (model dtype).
          position_bias: [1, N, L, L].
          key_mask: [B, L] bool (True = attend) or None.

        Returns:
          [B, L, D] in ``out_dtype`` (the residual dtype).
        """
        b, length, _ = x.shape
        n, h = self.config.num_heads, self.config.d_kv
        acc = jnp.promote_types(self.dtype, jnp.float32)
        # Projections run in the model dtype; their results and the attention itself stay in `acc` (float32 for
        # 16-bit models), which costs little next to the projections (L is 77).
        q = self.q(x, acc).reshape(b, length, n, h)
        k = self.k(x, acc).reshape(b, length, n, h)
        v = self.v(x, acc).reshape(b, length, n, h)
        logits = jnp.einsum("BQNH,BKNH->BNQK", q, k) + position_bias.astype(acc)
        # float32_islands: the reference's softmax runs in float32 (scores.float()) even in float64 runs.
        soft = jnp.float32 if float32_islands else acc
        logits = logits.astype(soft)
        if key_mask is not None:
            # Keys only; the reference's finfo(float64).min becomes -inf in float32 -> weight exactly 0, as here.
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(soft).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(acc)
        out = jnp.einsum("BNQK,BKNH->BQNH", weights, v).reshape(b, length, n * h)
        return self.o(out, out_dtype)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, rngs=rngs
        )
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, h: Array, position_bias: Array, key_mask: Array | None, *, float32_islands: bool) -> Array:
        """[B, L, D] residual -> [B, L, D] residual."""
        normed = self.layer_norm(h, float32_islands=float32_islands)
        return h + self.SelfAttention(
            normed, position_bias, key_mask, float32_islands=float32_islands, out_dtype=h.dtype
        )


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)``."""

    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[config.activation]
        self.wi_0 = Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.wi_1 = Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.wo = Linear(config.d_ff, config.d_model, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x: Array, out_dtype) -> Array:
        """[B, L, D] -> [B, L, D] in ``out_dtype``; the gate product is formed in ``out_dtype`` too."""
        return self.wo(self.act(self.wi_0(x, out_dtype)) * self.wi_1(x, out_dtype), out_dtype)


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseGatedActDense(config, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, h: Array, *, float32_islands: bool) -> Array:
        """[B, L, D] residual -> [B, L, D] residual."""
        return h + self.DenseReluDense(self.layer_norm(h, float32_islands=float32_islands), h.dtype)


class T5Block(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(
                    config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, rngs=rngs
                ),
                T5LayerFF(config, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, h: Array, position_bias: Array, key_mask: Array | None, *, float32_islands: bool) -> Array:
        h = self.layer[0](h, position_bias, key_mask, float32_islands=float32_islands)
        return self.layer[1](h, float32_islands=float32_islands)


class T5Stack(nnx.Module):
    """``encoder``: the blocks and the final RMSNorm (the token table lives in the model as ``shared``)."""

    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        self.block = nnx.List(
            [
                T5Block(config, has_relative_attention_bias=(i == 0), dtype=dtype, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)


class T5EncoderModel(nnx.Module):
    """transformers' ``T5EncoderModel``: token ids -> ``last_hidden_state``.

    Attributes:
      float32_islands: compute RMSNorm's mean of squares and the softmax in float32 as the reference does, also in
        float64 models (default False: see the module docstring). Read at trace time.
    """

    config_class = T5Config

    def __init__(self, config: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs, float32_islands: bool = False):
        self.config, self.dtype = config, dtype
        self.float32_islands = float32_islands
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(config, dtype=dtype, rngs=rngs)

    def position_bias(self, query_length: int, key_length: int | None = None) -> Array:
        """Block 0's relative-position bias, shared by every block: [1, N, Q, K] (no mask)."""
        attention = self.encoder.block[0].layer[0].SelfAttention
        return attention.compute_bias(query_length, query_length if key_length is None else key_length)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Args:
          input_ids: [B, L] integer token ids.
          attention_mask: [B, L], 1 for tokens and 0 for padding (masks keys only), or None.

        Returns:
          last_hidden_state [B, L, D] in the model dtype (pad positions included).
        """
        islands = self.float32_islands
        length = input_ids.shape[1]
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        residual = jnp.promote_types(self.dtype, jnp.float32)
        h = self.shared(input_ids).astype(residual)  # [B, L, D]
        bias = self.position_bias(length)  # [1, N, L, L]
        for block in self.encoder.block:
            h = block(h, bias, key_mask, float32_islands=islands)
        return self.encoder.final_layer_norm(h, float32_islands=islands)
