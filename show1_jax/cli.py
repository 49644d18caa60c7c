"""The ``show1`` command line: a thin layer over the library (the only module that parses arguments and prints)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def cmd_convert(args: argparse.Namespace) -> int:
    from show1_jax.convert import convert

    convert(args.src, args.dst, dtype=_dtype(args.dtype), variant=args.variant, log=print)
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Build a tiny random keyframe UNet, write it as released, convert it, load both and run a jitted forward."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from show1_jax import functional, load_component
    from show1_jax.convert import convert
    from show1_jax.loading import save_released
    from show1_jax.unet3d import UNet3DConditionModel, UNetConfig

    out = Path(args.output)
    cfg = UNetConfig(
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"),
        up_block_types=("SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"),
        mid_block_type="UNetMidBlock3DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        act_fn="gelu",
        attention_head_dim=16,
        cross_attention_dim=64,
        encoder_hid_dim=32,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift",
        cross_attention_norm="group_norm",
    )
    model = UNet3DConditionModel(cfg, rngs=nnx.Rngs(args.seed))
    released = save_released(model, out / "released" / "unet")
    print(f"wrote a tiny random Show-1 keyframe UNet in the released format: {released}")
    t0 = time.perf_counter()
    converted = convert(released, out / "converted" / "unet")
    print(f"converted it to show1-jax's format in {time.perf_counter() - t0:.2f} s: {converted}")
    a, b = load_component(released), load_component(converted)
    graphdef, params = functional.split(b)
    fwd = jax.jit(functional.pure(graphdef))
    rng = np.random.default_rng(args.seed)
    video = jnp.asarray(rng.normal(size=(1, 8, 40, 64, 3)), jnp.float32)  # keyframes: 8 frames at 40x64
    text = jnp.asarray(rng.normal(size=(1, 77, 32)), jnp.float32)
    t0 = time.perf_counter()
    eps = jax.block_until_ready(fwd(params, video, jnp.array([999]), text))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eps = jax.block_until_ready(fwd(params, video, jnp.array([500]), text))
    run_s = time.perf_counter() - t0
    diff = float(jnp.max(jnp.abs(a(video, jnp.array([500]), text) - eps)))
    print(
        f"jitted forward {tuple(video.shape)} -> {tuple(eps.shape)}: first call {compile_s:.2f} s, then {run_s:.3f} s"
    )
    print(f"released and converted weights agree: max |difference| = {diff:.2e}")
    print("Text-to-video generation with a trained default model is not shipped yet; this checked the model stack.")
    return 0 if diff < 1e-4 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="show1", description="Show-1 text-to-video in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert released PyTorch folders into show1-jax's format")
    p.add_argument("src", help="a component folder (show-1-base/unet) or a pipeline folder (show-1-base)")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored parameter dtype")
    p.add_argument("--variant", choices=["fp16"], default=None, help="read the fp16 weight files")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("selfcheck", help="build, save, convert, load and run a tiny random UNet end to end")
    p.add_argument("--output", required=True, help="output folder (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
