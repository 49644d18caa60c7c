"""Convert released Show-1 PyTorch folders into show1-jax's format.

    python -m tools.convert_torch_weights SRC DST [--dtype float32|bfloat16] [--variant fp16]

SRC is a component folder (``show-1-base/unet``) or a whole pipeline folder (``show-1-base``). The same conversion
is available as ``show1 convert``.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from show1_jax.convert import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_torch_weights", description=__doc__.split("\n")[1])
    parser.add_argument("src", help="released component or pipeline folder")
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored parameter dtype")
    parser.add_argument("--variant", choices=["fp16"], default=None, help="read the fp16 weight files")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=jnp.dtype(args.dtype), variant=args.variant, log=print)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
