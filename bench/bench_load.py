"""Load time of a released-format folder against the same weights converted by tools/convert_torch_weights.

Builds a random UNet with the show-1-base block structure at a reduced width (the full model is 6.9 GB in float32),
writes it in the released format (config.json + safetensors), converts it, and times ``load_component`` on both,
in one process, after a warm-up of each path. Prints medians and the ratio.

    python bench/bench_load.py [--width 160] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from show1_jax import load_component
from show1_jax.convert import convert
from show1_jax.loading import build_config, param_count, save_released
from show1_jax.tiny import random_model
from show1_jax.unet3d import UNet3DConditionModel

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "golden" / "manifests" / "base.config.json"


def timed_load(folder: Path, dtype) -> float:
    t0 = time.perf_counter()
    model = load_component(folder, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model)))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=160, help="block_out_channels[0] (the released model: 320)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    raw = json.loads(MANIFEST.read_text())
    _, cfg = build_config(raw)
    w = args.width
    cfg = dataclasses.replace(cfg, block_out_channels=(w, 2 * w, 3 * w, 4 * w), attention_head_dim=w // 5)
    model = random_model(UNet3DConditionModel, cfg, seed=0)
    n = param_count(model)
    with tempfile.TemporaryDirectory() as tmp:
        released = save_released(model, Path(tmp) / "released")
        del model
        t0 = time.perf_counter()
        converted = convert(released, Path(tmp) / "converted", dtype=dtype)
        convert_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in released.rglob("*") if f.is_file())
        timed_load(released, dtype), timed_load(converted, dtype)  # warm-up: imports, first compiles
        a = [timed_load(released, dtype) for _ in range(args.repeats)]
        b = [timed_load(converted, dtype) for _ in range(args.repeats)]
    ra, rb = statistics.median(a), statistics.median(b)
    print(f"UNet with the show-1-base structure at width {w}: {n / 1e6:.1f}M parameters, {size / 2**30:.2f} GiB")
    print(f"conversion (once): {convert_s:.2f} s")
    print(f"| path | load time (median of {args.repeats}) |")
    print("|---|---|")
    print(f"| released folder (safetensors, transposed on load) | {ra:.2f} s |")
    print(f"| converted folder (orbax, our layout, {args.dtype}) | {rb:.2f} s |")
    print(f"converted / released = {rb / ra:.2f}")


if __name__ == "__main__":
    main()
