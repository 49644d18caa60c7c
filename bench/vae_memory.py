"""Peak memory of decoding a Show-1 SR2 video with the full-size VAE, from XLA's compiled memory analysis.

Nothing is allocated or executed: the VAE is built abstractly (``nnx.eval_shape``), its parameters are passed to
``jax.jit(decode_video).lower(...)`` as ShapeDtypeStructs, and the figures are those of ``compile().memory_analysis()``
for the backend JAX runs on (CPU unless an accelerator is present). Peak = argument (parameters + latents) + output +
temporaries - aliased bytes.

    python bench/vae_memory.py                     # 29 x 320 x 576 video, chunk sizes 1, 4, 29, float32 + bfloat16
    python bench/vae_memory.py --chunks 1 8 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from show1_jax.functional import pure  # noqa: E402
from show1_jax.loading import abstract_model, build_config  # noqa: E402
from show1_jax.vae import SD_KL_F8, VAEConfig  # noqa: E402

DEFAULT_CONFIG = REPO.parent / "shared" / "golden" / "manifests" / "sd_vae_kl_f8.config.json"
GIB = 2**30


def load_config(path: Path | None) -> tuple[VAEConfig, str]:
    """The VAE config from a config.json, or the SD KL-f8 preset when none is found."""
    if path is not None and path.is_file():
        _, cfg = build_config(json.loads(path.read_text()), str(path))
        return cfg, str(path)
    return SD_KL_F8, "preset SD_KL_F8"


def decode_memory(cfg: VAEConfig, shape: tuple[int, ...], dtype, frames_per_chunk: int | None) -> dict[str, float]:
    """Compile ``decode_video`` for latents of ``shape`` [B, F, h, w, C] and return XLA's memory figures (bytes)."""
    model = abstract_model("AutoencoderKL", cfg, dtype)
    graphdef, params = nnx.split(model)  # params: a State of ShapeDtypeStructs
    decode = pure(graphdef, "decode_video")
    fn = jax.jit(lambda p, z: decode(p, z, frames_per_chunk=frames_per_chunk))
    t0 = time.perf_counter()
    compiled = fn.lower(params, jax.ShapeDtypeStruct(shape, dtype)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    arg, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {"argument": arg, "output": out, "temp": temp, "peak": arg + out + temp - alias, "compile_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="VAE config.json (default: the manifest)")
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--height", type=int, default=320, help="output height in pixels")
    ap.add_argument("--width", type=int, default=576, help="output width in pixels")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 29], help="frames_per_chunk values")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    cfg, source = load_config(args.config)
    f = cfg.downsample_factor
    shape = (1, args.frames, args.height // f, args.width // f, cfg.latent_channels)
    print(f"VAE config: {source}; latents {list(shape)} -> video [1, {args.frames}, {args.height}, {args.width}, "
          f"{cfg.out_channels}]; backend {jax.default_backend()}, jax {jax.__version__}\n")  # fmt: skip
    print("| dtype | frames_per_chunk | parameters + latents (GiB) | output (GiB) | temporaries (GiB) | peak (GiB) |")
    print("|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for k in args.chunks:
            r = decode_memory(cfg, shape, dtype, k)
            print(
                f"| {dtype_name} | {k} | {r['argument'] / GIB:.3f} | {r['output'] / GIB:.3f} | {r['temp'] / GIB:.3f} "
                f"| {r['peak'] / GIB:.3f} |",
                flush=True,
            )
            print(f"compiled in {r['compile_s']:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
