"""CLIP text transformer (the SR2 text encoder, SPEC.md §3.6 and §6.5) in Flax NNX.

transformers' ``CLIPTextModel``: token + learned position embeddings; pre-LN layers (LayerNorm -> causal
self-attention with q scaled by head_dim^-0.5 -> residual; LayerNorm -> fc1 -> activation -> fc2 -> residual); a
final LayerNorm. Returns ``last_hidden_state`` (what SR2 uses) and the pooled end-of-text state.

Sub-module names follow the state dict (``text_model.encoder.layers.i.self_attn.q_proj``, ...), so the key table in
``clip_params.py`` only renames leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from show1_jax.configs import ConfigError, config_from_dict
from show1_jax.layers import LayerNorm, dense, logical, stat_dtype

Array = jax.Array

# transformers' ``hidden_act`` names: ``gelu`` is exact (OpenCLIP ViT-H, SD-2), ``quick_gelu`` is OpenAI CLIP's.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# transformers pools at argmax(input_ids) when the config carries the legacy eos_token_id 2 (the SD-2 / OpenCLIP
# configs), else at the first eos_token_id.
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The keys of a transformers ``CLIPTextConfig``; defaults are the OpenCLIP ViT-H/14 text tower (SPEC.md §6.5)."""

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = _LEGACY_EOS_TOKEN_ID  # decides the pooled position
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # A diffusers pipeline passes the tokenizer's attention mask only when the encoder config sets this.
    use_attention_mask: bool = False
    # Read and ignored: the projection belongs to CLIPTextModelWithProjection; dropouts are inactive at inference.
    projection_dim: int | None = None
    attention_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"CLIP hidden_act `{self.hidden_act}` is not supported; supported: {', '.join(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by num_attention_heads"
                f" {self.num_attention_heads}: check config.json"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CLIPTextConfig:
        return config_from_dict(cls, raw)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: Array  # [B, L, D]
    pooler_output: Array  # [B, D]


class Embedding(nnx.Module):
    """A lookup table [num, dim] (parameter ``embedding``, the PyTorch ``weight`` unchanged)."""

    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs, stddev: float = 0.02, axes=("vocab", "embed")):
        init = (stddev * jax.random.normal(rngs.params(), (num, dim), jnp.float32)).astype(dtype)
        self.embedding = nnx.Param(init, **logical(axes))  # axes: logical names (show1_jax/sharding.py)

    def __call__(self, ids: Array) -> Array:
        """[...] int -> [..., dim]."""
        return jnp.take(self.embedding[...], ids, axis=0)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(
            config.max_position_embeddings, config.hidden_size, dtype=dtype, rngs=rngs, axes=(None, "embed")
        )

    def __call__(self, input_ids: Array) -> Array:
        """[B, L] -> [B, L, D]; positions 0..L-1."""
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.heads, self.dtype = config.num_attention_heads, dtype
        self.q_proj = dense(d, d, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.k_proj = dense(d, d, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.v_proj = dense(d, d, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.out_proj = dense(d, d, dtype=dtype, rngs=rngs, axes=("heads", "embed"))

    def __call__(self, x: Array, allowed: Array) -> Array:
        """Args:
          x: [B, L, D].
          allowed: [B or 1, 1, L, L] bool, True where query q may attend to key k (causal and optional key mask).

        Returns:
          [B, L, D]
        """
        b, length, dim = x.shape
        n = self.heads
        h = dim // n
        q = (self.q_proj(x) * jnp.asarray(h**-0.5, self.dtype)).reshape(b, length, n, h)  # scaled before QK, as torch
        k = self.k_proj(x).reshape(b, length, n, h)
        v = self.v_proj(x).reshape(b, length, n, h)
        logits = jnp.einsum("BQNH,BKNH->BNQK", q, k).astype(stat_dtype(self.dtype))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("BNQK,BKNH->BQNH", weights, v).reshape(b, length, dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = dense(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = dense(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        """[B, L, D] -> [B, L, D]."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x: Array, allowed: Array) -> Array:
        """[B, L, D] -> [B, L, D]."""
        x = x + self.self_attn(self.layer_norm1(x), allowed)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )


class CLIPTextTransformer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


def pooled_positions(input_ids: Array, eos_token_id: int | None) -> Array:
    """Index of the end-of-text token in each row: [B, L] -> [B].

    transformers' rule: with the legacy ``eos_token_id == 2`` (or none) the eos token is taken to be the largest id
    (argmax of the ids; true for the CLIP vocabularies, where <|endoftext|> is the last id); otherwise the first
    position holding ``eos_token_id`` (position 0 if a row has none).
    """
    if eos_token_id is None or eos_token_id == _LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nnx.Module):
    """transformers' ``CLIPTextModel``: token ids -> (last_hidden_state, pooler_output)."""

    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        """Args:
          input_ids: [B, L] integer token ids, L <= max_position_embeddings.
          attention_mask: optional [B, L], 0 at padding: masks those keys on top of the causal mask. The Show-1
            SR2 pipeline passes none (SPEC.md §3.6).

        Returns:
          CLIPTextOutput(last_hidden_state [B, L, D], pooler_output [B, D]).
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIP input has {length} tokens but the model has {self.config.max_position_embeddings} positions:"
                " tokenize with truncation to the tokenizer's model_max_length"
            )
        tm = self.text_model
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Q, K] causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
        x = tm.embeddings(input_ids)  # [B, L, D]
        for layer in tm.encoder.layers:
            x = layer(x, allowed)
        last = tm.final_layer_norm(x)
        pooled = jnp.take_along_axis(last, pooled_positions(input_ids, self.config.eos_token_id)[:, None, None], 1)
        return CLIPTextOutput(last, pooled[:, 0])
