"""Layers shared by the UNets and the VAE (channels-last, Flax NNX).

Names of sub-modules follow the reference's state-dict names so the key tables stay short. Every module takes one
``dtype`` that is both its parameter and its compute dtype; normalisation statistics and softmaxes run in at least
float32 (see ``stat_dtype``). SPEC.md §1.3 lists the statistics axes, group counts and epsilons reproduced here.

Every parameter carries logical axis names (``out_sharding`` metadata, see :func:`logical`); the one table in
``show1_jax/sharding.py`` maps them to mesh axes. Attention can run in chunks (:func:`set_attention_chunk`) and picks
its implementation per backend (:data:`ATTENTION_IMPLEMENTATIONS`, :func:`set_attention_implementation`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax import kernels
from show1_jax.sharding import constrain

Array = jax.Array

# Logical axes of activations (show1_jax/sharding.py); `constrain` is a no-op outside a sharded jit.
ROWS = ("batch", "height", "width", "channels")  # [N (= B * F), H, W, C]
TOKENS = ("batch", "length", "channels")  # [N, L, C]


def stat_dtype(dtype) -> jnp.dtype:
    """Dtype for statistics and softmax: float32 for 16-bit compute, the compute dtype otherwise."""
    return jnp.promote_types(dtype, jnp.float32)


def activation(name: str) -> Callable[[Array], Array]:
    """diffusers' activation names. ``gelu`` is the exact (erf) GELU (SPEC.md §1.3)."""
    acts = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
        "relu": jax.nn.relu,
    }
    if name not in acts:
        raise ValueError(f"unknown activation `{name}`; supported: {', '.join(acts)}")
    return acts[name]


# Logical axis names of parameters (the sharding rules in show1_jax/sharding.py map them to mesh axes).
CONV_AXES = (None, None, "conv_in", "conv_out")  # [kh, kw, Cin, Cout]


def logical(axes: tuple[str | None, ...]) -> dict:
    """Variable metadata naming each axis of a parameter logically (flax's ``out_sharding``).

    ``eager_sharding=False``: the names are only read by ``show1_jax.sharding`` (and ``nnx.get_partition_spec``);
    building a model needs no mesh.
    """
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def dense(
    in_features: int,
    out_features: int,
    *,
    dtype,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
) -> nnx.Linear:
    """nnx.Linear with kernel [in, out] named ``axes`` and bias [out] named ``axes[1]``."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
        kernel_metadata=logical(axes),
        bias_metadata=logical(axes[1:]),
    )


def conv2d(
    in_features: int, out_features: int, kernel: int, *, dtype, rngs: nnx.Rngs, stride: int = 1, padding=None
) -> nnx.Conv:
    """A 2-D conv on [N, H, W, C]; ``padding`` defaults to (kernel - 1) // 2 on every side, as the reference."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)) if isinstance(pad, int) else pad,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
        kernel_metadata=logical(CONV_AXES),
        bias_metadata=logical(CONV_AXES[-1:]),
    )


class GroupNorm(nnx.Module):
    """GroupNorm over every axis but the first, channels last.

    On [N, H, W, C] this is the per-image (per-frame) norm; on [B, F, H, W, C] its statistics span frames (the
    temporal layers' behaviour). Callers choose by the shape they pass (SPEC.md §1.3).
    """

    def __init__(self, num_groups: int, channels: int, *, eps: float, dtype, rngs: nnx.Rngs | None = None):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((channels,), dtype), **logical(("norm",)))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype), **logical(("norm",)))

    def __call__(self, x: Array) -> Array:
        shape = x.shape
        g = self.num_groups
        xs = x.astype(stat_dtype(self.dtype)).reshape(shape[0], -1, g, shape[-1] // g)
        mean = xs.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xs - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xs - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (torch semantics: biased variance, eps inside the square root)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), dtype), **logical(("norm",)))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), **logical(("norm",)))

    def __call__(self, x: Array) -> Array:
        xs = x.astype(stat_dtype(self.dtype))
        mean = xs.mean(-1, keepdims=True)
        var = jnp.square(xs - mean).mean(-1, keepdims=True)
        y = (xs - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel", "dot_product_attention")
"""How :func:`attention` computes one block (every choice gives the same softmax attention):

- ``"auto"`` (default): per backend, at lowering time (``lax.platform_dependent``): on the CPU the compiled kernel
  (show1_jax/kernels) for float32 when it is available and the CPU is the default backend, else ``"xla"``; on
  CUDA/ROCm GPUs ``jax.nn.dot_product_attention`` (cuDNN's fused flash attention where it applies); elsewhere
  (TPU) ``"xla"``, which XLA:TPU fuses itself.
- ``"xla"``: the plain jnp version ([N, H, L, D] matmuls and a float32-or-wider softmax). The reference for tests,
  used for float64, and by ``show1 plan`` (whose FLOP count reads the matmuls).
- ``"cpu_kernel"``: the compiled CPU kernel (float32; an error where it cannot be built or on another backend).
- ``"dot_product_attention"``: ``jax.nn.dot_product_attention`` with its own backend choice.

The compiled kernel is forward only: gradients are the plain version's (``jax.custom_vjp``).
"""


def attention(
    q: Array, k: Array, v: Array, heads: int, *, chunk: int | None = None, implementation: str = "auto"
) -> Array:
    """Multi-head softmax attention with scale 1/sqrt(head_dim), no mask.

    Args:
      q: [N, Lq, H*D]; k, v: [N, Lk, H*D] (channel index = head * D + d, SPEC.md §1.5).
      implementation: one of :data:`ATTENTION_IMPLEMENTATIONS`.
      chunk: at most this many logits [N, H, Lq, Lk] at once (None: all at once). Larger problems run in a
        ``fori_loop`` over blocks of queries of every sequence (or, if even one query per sequence is too much, over
        groups of sequences); every query row's softmax is unchanged, so results equal the unchunked ones (see
        :func:`set_attention_chunk`).

    Returns:
      [N, Lq, H*D]
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose from {ATTENTION_IMPLEMENTATIONS}")
    n, lq, hd = q.shape
    lk = k.shape[1]
    compute = functools.partial(_attention_block, heads=heads, implementation=implementation)
    if chunk is None or n * heads * lq * lk <= chunk:
        return compute(q, k, v)
    if n * heads * lk <= chunk:  # every sequence in each step, in blocks of queries
        rows, block = n, _largest_divisor(lq, chunk // (n * heads * lk))
    else:  # groups of sequences, one query at a time
        rows, block = _largest_divisor(n, chunk // (heads * lk)), 1
    groups, blocks = n // rows, lq // block
    # Step (g, b) takes rows {r * groups + g} (spread over the whole batch, so a batch split over devices stays
    # split inside the loop; usually all rows) and query block b. Results overwrite the (copied) queries in place:
    # no stacked output buffer, whose zero-initialised copies XLA would keep alive from the program's start.
    qs = q.reshape(rows, groups, blocks, block, hd).transpose(1, 2, 0, 3, 4)  # [G, NB, R, block, H*D]
    ks = k.reshape(rows, groups, lk, hd).swapaxes(0, 1)  # [G, R, Lk, H*D]
    vs = v.reshape(rows, groups, lk, hd).swapaxes(0, 1)

    def step(i: Array, out: Array) -> Array:
        g, b = i // blocks, i % blocks
        qi = jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(out, g, 0, False), b, 0, False)
        ki, vi = (jax.lax.dynamic_index_in_dim(x, g, 0, False) for x in (ks, vs))
        res = compute(qi, ki, vi)  # [R, block, H*D]
        return jax.lax.dynamic_update_slice(out, res[None, None], (g, b, 0, 0, 0))

    out = jax.lax.fori_loop(0, groups * blocks, step, qs)
    return out.transpose(2, 0, 1, 3, 4).reshape(n, lq, hd)


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most`` (at least 1)."""
    for d in range(min(n, max(at_most, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def _attention_block(q: Array, k: Array, v: Array, *, heads: int, implementation: str) -> Array:
    """:func:`attention` in one piece, by ``implementation``."""
    if implementation == "xla" or q.dtype == jnp.float64 or k.shape[1] == 0:
        return _attention(q, k, v, heads)
    if implementation == "dot_product_attention":
        return _dot_product_attention(q, k, v, heads)
    if implementation == "cpu_kernel":
        if q.dtype != jnp.float32 or kernels.cpu_attention_kernel() is None:
            raise ValueError(
                f"attention implementation 'cpu_kernel' needs float32 inputs and a C++ compiler (got {q.dtype}; "
                "see show1_jax/kernels): use 'auto' or 'xla'"
            )
        return _cpu_kernel_attention(q, k, v, heads)
    per_head = lambda f: functools.partial(f, heads=heads)
    branches = {"cuda": per_head(_dot_product_attention), "rocm": per_head(_dot_product_attention)}
    # The kernel is built only where the CPU is the default backend (no compile on GPU/TPU hosts).
    if q.dtype == jnp.float32 and jax.default_backend() == "cpu" and kernels.cpu_attention_kernel() is not None:
        branches["cpu"] = per_head(_cpu_kernel_attention)
    return jax.lax.platform_dependent(q, k, v, **branches, default=per_head(_attention))


def _dot_product_attention(q: Array, k: Array, v: Array, heads: int) -> Array:
    """``jax.nn.dot_product_attention`` on [N, L, H, D] views (its layout is ours split by head)."""
    n, lq, hd = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, hd // heads)
    return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(n, lq, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_kernel_attention(q: Array, k: Array, v: Array, heads: int) -> Array:
    """The compiled CPU kernel (show1_jax/kernels/cpu_attention.cc); float32, forward only."""
    call = jax.ffi.ffi_call(kernels.TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="broadcast_all")
    return call(q, k, v, heads=np.int64(heads), scale=np.float32((q.shape[-1] // heads) ** -0.5))


def _cpu_kernel_fwd(q, k, v, heads):
    return _cpu_kernel_attention(q, k, v, heads), (q, k, v)


def _cpu_kernel_bwd(heads, residuals, grad):
    return jax.vjp(lambda q, k, v: _attention(q, k, v, heads), *residuals)[1](grad)


_cpu_kernel_attention.defvjp(_cpu_kernel_fwd, _cpu_kernel_bwd)


def _attention(q: Array, k: Array, v: Array, heads: int) -> Array:
    """:func:`attention` in one piece, in jnp (the ``"xla"`` implementation)."""
    n, lq, hd = q.shape
    d = hd // heads
    q = q.reshape(n, lq, heads, d).transpose(0, 2, 1, 3)  # [N, H, Lq, D]: measured faster than BLHD on XLA-CPU
    k = k.reshape(n, -1, heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(n, -1, heads, d).transpose(0, 2, 1, 3)
    logits = jnp.einsum("NHQD,NHKD->NHQK", q * jnp.asarray(d**-0.5, q.dtype), k)
    weights = jax.nn.softmax(logits.astype(stat_dtype(q.dtype)), axis=-1).astype(v.dtype)
    out = jnp.einsum("NHQK,NHKD->NHQD", weights, v)
    return out.transpose(0, 2, 1, 3).reshape(n, lq, hd)


# --- time embeddings -------------------------------------------------------------------------------------------------


def sinusoidal_frequencies(dim: int, freq_shift: float) -> np.ndarray:
    """The reference's float32 frequency table (golden README, "Sinusoidal timestep projection").

    torch computes the exponent in float32 and exp in float32 (correctly rounded for these sizes); the float64
    exp rounded to float32 reproduces it.
    """
    half = dim // 2
    exponent = np.float32(-np.log(10000.0)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, dtype) -> Array:
    """Sinusoidal projection of integer timesteps / noise levels, as the reference computes it.

    Args:
      t: [B] timesteps.

    Returns:
      [B, dim] in ``dtype``: float32 argument (float32(t) * float32 freqs), sin/cos, rounded to float32 first.
    """
    freqs = jnp.asarray(sinusoidal_frequencies(dim, freq_shift))
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]  # float32 product, as torch
    wide = arg.astype(stat_dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
    sin, cos = jnp.sin(wide).astype(jnp.float32), jnp.cos(wide).astype(jnp.float32)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(dtype)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2."""

    def __init__(self, in_dim: int, dim: int, *, act: str, dtype, rngs: nnx.Rngs):
        self.linear_1 = dense(in_dim, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = dense(dim, dim, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(x)))


class AttentionPooling(nnx.Module):
    """Text pooling of the IF ``add_embedding``: a mean-token query attends over [query; tokens]."""

    def __init__(self, heads: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.heads, self.dtype = heads, dtype
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, dim), dtype) / dim**0.5, **logical((None, "embed"))
        )
        self.q_proj = dense(dim, dim, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.k_proj = dense(dim, dim, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.v_proj = dense(dim, dim, dtype=dtype, rngs=rngs, axes=("embed", "heads"))

    def __call__(self, x: Array) -> Array:
        """x: [B, L, D] -> [B, D]."""
        b, _, dim = x.shape
        d = dim // self.heads
        cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)  # pads included
        tokens = jnp.concatenate([cls, x], axis=1)  # [B, 1 + L, D]
        scale = jnp.asarray(d**-0.25, x.dtype)  # q and k each scaled by head_dim^-1/4
        q = (self.q_proj(cls) * scale).reshape(b, 1, self.heads, d)
        k = (self.k_proj(tokens) * scale).reshape(b, -1, self.heads, d)
        v = self.v_proj(tokens).reshape(b, -1, self.heads, d)
        logits = jnp.einsum("BQHD,BKHD->BHQK", q, k)
        # The reference computes this softmax in float32 whatever the model dtype (golden README, float32 islands).
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        return jnp.einsum("BHQK,BKHD->BQHD", weights, v).reshape(b, dim)


class TextTimeEmbedding(nnx.Module):
    """``add_embedding`` for addition_embed_type 'text': norm1 -> pool -> proj -> norm2."""

    def __init__(self, encoder_dim: int, time_dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(encoder_dim, eps=1e-5, dtype=dtype)
        self.pool = AttentionPooling(heads, encoder_dim, dtype=dtype, rngs=rngs)
        self.proj = dense(encoder_dim, time_dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(time_dim, eps=1e-5, dtype=dtype)

    def __call__(self, encoder_hidden_states: Array) -> Array:
        """[B, L, D_text] -> [B, D_time]."""
        return self.norm2(self.proj(self.pool(self.norm1(encoder_hidden_states))))


# --- resnets and resamplers ----------------------------------------------------------------------------------------


def upsample_nearest(x: Array, size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour x2 (or to ``size``) on [N, H, W, C], torch's 'nearest' index rule."""
    n, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    oh, ow = size
    rows = (np.arange(oh) * h // oh).astype(np.int32)
    cols = (np.arange(ow) * w // ow).astype(np.int32)
    return x[:, rows][:, :, cols]


def avg_pool2(x: Array) -> Array:
    """2x2 average pool, stride 2, on [N, H, W, C] (torch AvgPool2d floors odd sizes)."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D, per frame, channels last.

    ``time_scale_shift`` 'scale_shift': norm2(h) * (1 + scale) + shift with (scale, shift) from time_emb_proj
    (scale first); 'default': h + time_emb_proj(act(emb)) before norm2. ``up``/``down`` resample the branch AND the
    shortcut (nearest x2 / 2x2 average), as the IF-style resamplers do (SPEC.md §5.4).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        *,
        groups: int,
        eps: float,
        act: str,
        time_scale_shift: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        up: bool = False,
        down: bool = False,
        dtype,
        rngs: nnx.Rngs,
    ):
        if time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift `{time_scale_shift}` is not supported (default, scale_shift)")
        self.time_scale_shift, self.skip_time_act = time_scale_shift, skip_time_act
        self.output_scale_factor, self.up, self.down = output_scale_factor, up, down
        self.act = activation(act)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        if temb_channels is not None:
            proj_out = 2 * out_channels if time_scale_shift == "scale_shift" else out_channels
            self.time_emb_proj = dense(temb_channels, proj_out, dtype=dtype, rngs=rngs)
        else:
            self.time_emb_proj = None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        """x: [N, H, W, Cin]; temb: [N, D] -> [N, H', W', Cout]."""
        shortcut = x = constrain(x, ROWS)
        h = self.act(self.norm1(x))
        if self.up:
            shortcut, h = upsample_nearest(shortcut), upsample_nearest(h)
        elif self.down:
            shortcut, h = avg_pool2(shortcut), avg_pool2(h)
        h = constrain(self.conv1(h), ROWS)
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, None, None, :]
        if t is not None and self.time_scale_shift == "default":
            h = h + t
        h = self.norm2(h)
        if t is not None and self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(shortcut)
        out = constrain(shortcut + h, ROWS)
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """``downsamplers.0.conv``: 3x3 stride-2 conv; padding 0 means the VAE's asymmetric (0, 1) zero pad."""

    def __init__(self, channels: int, *, padding: int = 1, dtype, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """``upsamplers.0.conv``: nearest x2 (or to the skip's size) then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
        return self.conv(upsample_nearest(x, size))


# --- temporal layers -----------------------------------------------------------------------------------------------


class TemporalConvLayer(nnx.Module):
    """Four GroupNorm(32) -> SiLU -> (dropout) -> Conv(3 over frames) stages, added to the input.

    Group count is hard-coded to 32 and the activation is SiLU whatever the config says; statistics span frames
    (SPEC.md §5.4). ``dropout`` is the reference's train-mode Dropout(0.1) before conv2..conv4 (SPEC.md §1.6): it
    is applied only when a PRNG key is passed.
    """

    GROUPS = 32

    def __init__(self, channels: int, *, dropout: float = 0.1, dtype, rngs: nnx.Rngs):
        self.dropout = dropout
        for i in range(1, 5):
            setattr(self, f"norm{i}", GroupNorm(self.GROUPS, channels, eps=1e-5, dtype=dtype))
            setattr(
                self,
                f"conv{i}",
                nnx.Conv(
                    channels,
                    channels,
                    kernel_size=(3, 1),
                    padding=((1, 1), (0, 0)),
                    dtype=dtype,
                    param_dtype=dtype,
                    rngs=rngs,
                    kernel_metadata=logical(CONV_AXES),
                    bias_metadata=logical(CONV_AXES[-1:]),
                ),
            )

    def __call__(self, x: Array, num_frames: int, dropout_key: Array | None = None) -> Array:
        """x: [B*F, H, W, C] -> same."""
        bf, hh, ww, c = x.shape
        v = x.reshape(bf // num_frames, num_frames, hh * ww, c)  # [B, F, H*W, C]
        h = v
        for i in range(1, 5):
            h = jax.nn.silu(getattr(self, f"norm{i}")(h))
            if i > 1 and dropout_key is not None and self.dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, i), 1 - self.dropout, h.shape)
                h = jnp.where(keep, h / (1 - self.dropout), 0).astype(h.dtype)
            h = getattr(self, f"conv{i}")(h)
        return constrain((v + h).reshape(x.shape), ROWS)


class Attention(nnx.Module):
    """Plain diffusers Attention (AttnProcessor2_0): to_q / to_k / to_v (no bias by default), to_out with bias."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dtype,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads = heads
        self.attention_chunk: int | None = None  # see set_attention_chunk
        self.attention_implementation = "auto"  # see set_attention_implementation
        qkv = ("embed", "heads")
        self.to_q = dense(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs, axes=qkv)
        self.to_k = dense(context_dim or query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs, axes=qkv)
        self.to_v = dense(context_dim or query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs, axes=qkv)
        self.to_out = dense(inner, query_dim, use_bias=out_bias, dtype=dtype, rngs=rngs, axes=("heads", "embed"))

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        """x: [N, L, D]; context: [N, S, Dc] or None (self-attention) -> [N, L, D]."""
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return self.to_out(
            attention(q, k, v, self.heads, chunk=self.attention_chunk, implementation=self.attention_implementation)
        )


class FeedForward(nnx.Module):
    """GEGLU feed-forward: ``proj`` (ff.net.0.proj) D -> 2*4D split [value, gate]; value * gelu(gate); ``out``."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, rngs: nnx.Rngs):
        self.proj = dense(dim, 2 * mult * dim, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.out = dense(mult * dim, dim, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """norm1 -> attn1 (self) -> norm2 -> attn2 (cross, or self when ``context_dim`` is None) -> norm3 -> GEGLU."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int | None, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn1 = Attention(dim, heads, head_dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.cross = context_dim is not None

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context if self.cross else None) + x
        return self.ff(self.norm3(x)) + x


def frame_position_embedding(num_frames: int, dim: int, max_period: float = 10000.0) -> Array:
    """[num_frames, dim] float32: sin of frame index x geometric frequencies in the first half, cos in the second
    (the transformer's fixed encoding; odd ``dim`` gets a zero last column)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = jnp.arange(num_frames, dtype=jnp.float32)[:, None] * freqs[None, :]
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(table, ((0, 0), (0, dim - 2 * half)))


class TransformerTemporalModel(nnx.Module):
    """Temporal attention (``temp_attentions.{j}``, ``transformer_in``): attention over frames at every pixel.

    GroupNorm (statistics across frames, eps 1e-6) -> tokens [B*H*W, F, C] -> proj_in -> one BasicTransformerBlock
    whose attn2 is also self-attention (double_self_attention) -> proj_out -> + input. No positional encoding over
    time (SPEC.md §5.4), unless ``position_embedding="sinusoidal"`` (not the reference; see
    ``UNetConfig.temporal_position_embedding``): ``frame_position_embedding`` added to the tokens after proj_in.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        groups: int,
        position_embedding: str | None = None,
        dtype,
        rngs: nnx.Rngs,
    ):
        if position_embedding not in (None, "sinusoidal"):
            raise ValueError(f"position_embedding must be None or 'sinusoidal', got {position_embedding!r}")
        self.position_embedding = position_embedding
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.proj_in = dense(channels, inner, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim=None, dtype=dtype, rngs=rngs)]
        )
        self.proj_out = dense(inner, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, num_frames: int) -> Array:
        """x: [B*F, H, W, C] -> same."""
        bf, hh, ww, c = x.shape
        b = bf // num_frames
        h = self.norm(x.reshape(b, num_frames, hh, ww, c))
        h = h.transpose(0, 2, 3, 1, 4).reshape(b * hh * ww, num_frames, c)  # [B*H*W, F, C]
        h = self.proj_in(constrain(h, TOKENS))
        if self.position_embedding == "sinusoidal":
            h = h + frame_position_embedding(num_frames, h.shape[-1]).astype(h.dtype)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.reshape(b, hh, ww, num_frames, c).transpose(0, 3, 1, 2, 4).reshape(x.shape)
        return constrain(h + x, ROWS)


class Transformer2DModel(nnx.Module):
    """Spatial transformer of the ModelScope-style blocks (SR2): GroupNorm(eps 1e-6) -> proj_in -> blocks with
    cross-attention to the text -> proj_out -> + input. ``proj_in``/``proj_out`` are per-pixel linear maps whether
    the checkpoint stores them as Linear or 1x1 Conv (use_linear_projection); the key table converts both.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int,
        groups: int,
        num_layers: int = 1,
        dtype,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.proj_in = dense(channels, inner, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(inner, heads, head_dim, context_dim=context_dim, dtype=dtype, rngs=rngs)
                for _ in range(num_layers)
            ]
        )
        self.proj_out = dense(inner, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, context: Array) -> Array:
        """x: [N, H, W, C]; context: [N, S, Dc] -> [N, H, W, C]."""
        n, hh, ww, c = x.shape
        h = self.proj_in(constrain(self.norm(x).reshape(n, hh * ww, c), TOKENS))
        for block in self.transformer_blocks:
            h = block(h, context)
        return constrain(self.proj_out(h).reshape(x.shape) + x, ROWS)


class AddedKVAttention(nnx.Module):
    """The IF spatial attention (AttnAddedKVProcessor): image tokens attend over [text; image] keys.

    group_norm on the image tokens (per frame); text keys/values from add_k_proj/add_v_proj of norm_cross(context),
    norm_cross being GroupNorm(32) over (channel groups, tokens); keys ordered [text, image]; output to_out + the
    un-normalised input (SPEC.md §5.4).
    """

    CROSS_GROUPS = 32

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int,
        groups: int,
        cross_attention_norm: str | None,
        only_cross_attention: bool = False,
        dtype,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.only_cross_attention = heads, only_cross_attention
        self.group_norm = GroupNorm(groups, channels, eps=1e-5, dtype=dtype)
        if cross_attention_norm == "group_norm":
            self.norm_cross = GroupNorm(self.CROSS_GROUPS, context_dim, eps=1e-5, dtype=dtype)
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = LayerNorm(context_dim, eps=1e-5, dtype=dtype)
        elif cross_attention_norm is None:
            self.norm_cross = None
        else:
            raise ValueError(f"cross_attention_norm `{cross_attention_norm}` is not supported")
        self.attention_chunk: int | None = None  # see set_attention_chunk
        self.attention_implementation = "auto"  # see set_attention_implementation
        qkv = ("embed", "heads")
        self.to_q = dense(channels, inner, dtype=dtype, rngs=rngs, axes=qkv)
        if not only_cross_attention:
            self.to_k = dense(channels, inner, dtype=dtype, rngs=rngs, axes=qkv)
            self.to_v = dense(channels, inner, dtype=dtype, rngs=rngs, axes=qkv)
        self.add_k_proj = dense(context_dim, inner, dtype=dtype, rngs=rngs, axes=qkv)
        self.add_v_proj = dense(context_dim, inner, dtype=dtype, rngs=rngs, axes=qkv)
        self.to_out = dense(inner, channels, dtype=dtype, rngs=rngs, axes=("heads", "embed"))

    def __call__(self, x: Array, context: Array) -> Array:
        """x: [N, H, W, C]; context: [N, S, Dc] -> [N, H, W, C]."""
        n, hh, ww, c = x.shape
        tokens = constrain(self.group_norm(x).reshape(n, hh * ww, c), TOKENS)
        ctx = context if self.norm_cross is None else self.norm_cross(context)
        q = self.to_q(tokens)
        k, v = self.add_k_proj(ctx), self.add_v_proj(ctx)
        if not self.only_cross_attention:
            k = jnp.concatenate([k, self.to_k(tokens)], axis=1)
            v = jnp.concatenate([v, self.to_v(tokens)], axis=1)
        out = self.to_out(
            attention(q, k, v, self.heads, chunk=self.attention_chunk, implementation=self.attention_implementation)
        )
        return constrain(out.reshape(x.shape) + x, ROWS)


def set_attention_chunk(model: nnx.Module, chunk: int | None) -> int:
    """Run every :class:`Attention` / :class:`AddedKVAttention` of ``model`` in chunks of at most ``chunk`` logits.

    ``chunk`` counts elements of the [N, H, Lq, Lk] logits computed at once (None: all at once, the default).
    E.g. ``2**27`` bounds the softmax of one chunk to 512 MiB in float32, which keeps SR2's spatial attention
    (58 images x 64 heads x 2880 x 2880 tokens = 3.1e10 logits) within a 16 GB accelerator. Results equal the
    unchunked ones. The setting is static (part of the graph definition): split the model after setting it.

    Returns:
      The number of attention modules set.
    """
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"attention chunk must be None or a positive number of logits, got {chunk!r}")
    return _set_on_attention_modules(model, "attention_chunk", chunk)


def set_attention_implementation(model: nnx.Module, implementation: str) -> int:
    """Compute every :class:`Attention` / :class:`AddedKVAttention` of ``model`` with ``implementation``.

    One of :data:`ATTENTION_IMPLEMENTATIONS` (default ``"auto"``). Static, like :func:`set_attention_chunk`.

    Returns:
      The number of attention modules set.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose from {ATTENTION_IMPLEMENTATIONS}")
    return _set_on_attention_modules(model, "attention_implementation", implementation)


def _set_on_attention_modules(model: nnx.Module, name: str, value: object) -> int:
    """Set ``name`` on every :class:`Attention` / :class:`AddedKVAttention` of ``model``; how many there were."""
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (Attention, AddedKVAttention)):
            setattr(node, name, value)
            count += 1
    return count
