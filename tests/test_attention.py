"""Attention implementations (show1_jax.layers.ATTENTION_IMPLEMENTATIONS) against the plain jnp version.

Every variant must agree with ``"xla"`` within 1e-5 relative in float32, chunked or not, under vmap and in
gradients; ``"auto"`` must pick the compiled kernel on the CPU and never lower it for another platform.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from show1_jax import kernels
from show1_jax.layers import ATTENTION_IMPLEMENTATIONS, Attention, attention, set_attention_implementation

VARIANTS = [impl for impl in ATTENTION_IMPLEMENTATIONS if impl != "xla"]
# (N, heads, Lq, Lk, head_dim): head dims of the released models (40, 64, 128) and tiny ones; lengths that are not
# multiples of the kernel's 16-float vectors or 32-row blocks; one key; text-length keys (cross-attention).
SHAPES = [(2, 3, 37, 19, 5), (3, 2, 50, 33, 24), (1, 4, 65, 1, 8), (2, 2, 96, 77, 40), (1, 2, 40, 40, 64)]


def qkv(n, heads, lq, lk, d, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, lq, heads * d)) * scale
    k, v = (rng.normal(size=(n, lk, heads * d)) * scale for _ in range(2))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("implementation", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_variants_match_plain(implementation, shape):
    n, heads, lq, lk, d = shape
    q, k, v = qkv(*shape, scale=3.0)  # large logits: the softmax is far from uniform
    ref = jax.jit(lambda q, k, v: attention(q, k, v, heads, implementation="xla"))(q, k, v)
    out = jax.jit(lambda q, k, v: attention(q, k, v, heads, implementation=implementation))(q, k, v)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert rel(out, ref) < 1e-5
    chunk = max(1, n * heads * lq * lk // 5)  # several query blocks in a fori_loop
    chunked = jax.jit(lambda q, k, v: attention(q, k, v, heads, chunk=chunk, implementation=implementation))(q, k, v)
    assert rel(chunked, ref) < 1e-5


def test_kernel_handles_extreme_logits_and_nan():
    q, k, v = qkv(1, 2, 33, 20, 16, seed=1, scale=30.0)  # logits ~ 1e4: exp underflows for all but the max
    ref = attention(q, k, v, 2, implementation="xla")
    assert rel(attention(q, k, v, 2, implementation="cpu_kernel"), ref) < 1e-5
    out = attention(q.at[0, 3, 0].set(jnp.nan), k, v, 2, implementation="cpu_kernel")
    assert bool(jnp.isnan(out[0, 3, :16]).all()) and bool(jnp.isfinite(out[0, 4]).all())  # only the NaN row's head


def test_kernel_vmap_and_grad():
    q, k, v = qkv(2, 2, 21, 18, 8, seed=2)
    batched = [jnp.stack([x, x * 0.5]) for x in (q, k, v)]
    out = jax.vmap(lambda q, k, v: attention(q, k, v, 2, implementation="cpu_kernel"))(*batched)
    ref = jax.vmap(lambda q, k, v: attention(q, k, v, 2, implementation="xla"))(*batched)
    assert rel(out, ref) < 1e-5

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, 2, implementation=impl)))

    grads = jax.grad(loss("cpu_kernel"), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, expected):
        assert rel(g, e) < 1e-5


def test_auto_picks_the_kernel_on_cpu_only():
    q, k, v = qkv(2, 2, 16, 16, 8)
    traced = jax.jit(lambda q, k, v: attention(q, k, v, 2)).trace(q, k, v)
    assert kernels.TARGET in traced.lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("cuda", "tpu"):  # accelerators keep their own paths
        assert kernels.TARGET not in traced.lower(lowering_platforms=(platform,)).as_text()
    with jax.enable_x64(True):  # float64 (the golden tests) stays on the jnp version
        q64 = q.astype(jnp.float64)
        assert kernels.TARGET not in jax.jit(lambda q: attention(q, q, q, 2)).lower(q64).as_text()


def test_set_attention_implementation_and_bad_names():
    layer = Attention(16, 2, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 16)), jnp.float32)
    ref = layer(x)
    assert set_attention_implementation(layer, "cpu_kernel") == 1
    assert rel(layer(x), ref) < 1e-5
    with pytest.raises(ValueError, match="choose from"):
        set_attention_implementation(layer, "flash")
    with pytest.raises(ValueError, match="choose from"):
        attention(x, x, x, 2, implementation="fast")
    with pytest.raises(ValueError, match="float32"):
        attention(x.astype(jnp.bfloat16), x, x, 2, implementation="cpu_kernel")


def test_build_caches_and_reports_compiler_errors(tmp_path):
    first = kernels.build(out_dir=tmp_path)
    assert first.is_file() and kernels.build(out_dir=tmp_path) == first  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'no such luck' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="no such luck"):
        kernels.build(compiler=str(bad), out_dir=tmp_path / "other")
    assert not list((tmp_path / "other").iterdir())


def test_disabled_kernel_falls_back_to_xla(tmp_path):
    code = (
        "import jax, jax.numpy as jnp\n"
        "from show1_jax import kernels\nfrom show1_jax.layers import attention\n"
        "assert kernels.cpu_attention_kernel() is None\n"
        "q = jnp.ones((1, 4, 8))\n"
        "assert kernels.TARGET not in jax.jit(lambda q: attention(q, q, q, 2)).lower(q).as_text()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SHOW1_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
