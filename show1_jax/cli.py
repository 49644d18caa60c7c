"""The ``show1`` command line: a thin layer over the library (the only module that parses arguments and prints)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def cmd_convert(args: argparse.Namespace) -> int:
    from show1_jax.convert import convert

    convert(args.src, args.dst, dtype=_dtype(args.dtype), variant=args.variant, log=print)
    return 0


STAGE_DEFAULTS = (("keyframes", 75, 9.0), ("interpolation", 75, 4.0), ("first_frame", 70, 4.0), ("sr1", 125, 7.0),
                  ("sr2", 50, 15.0))  # fmt: skip
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _split_prompts_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    prompts = [x for x in items if not _OVERRIDE.match(x)]
    return prompts, [x for x in items if _OVERRIDE.match(x)]


def cmd_generate(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from show1_jax.generate_settings import GenerateSettings, Weights
    from show1_jax.pipeline import DTYPES, Show1Pipeline, generate
    from show1_jax.settings import load_settings

    prompts, overrides = _split_prompts_and_overrides(args.items)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    flag_overrides = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "dtype": args.dtype,
        "keyframes.num_frames": args.num_keyframes,
        "stages": f"[{args.stages}]" if args.stages else None,
        "weights.base": args.base,
        "weights.interpolation": args.interpolation,
        "weights.sr1": args.sr1,
        "weights.first_frame": args.first_frame,
        "weights.sr2": args.sr2,
    }
    for stage in ("keyframes", "interpolation", "first_frame", "sr1", "sr2"):
        flag_overrides[f"{stage}.steps"] = getattr(args, f"{stage}_steps")
        flag_overrides[f"{stage}.guidance_scale"] = getattr(args, f"{stage}_guidance")
    overrides = [f"{k}={json.dumps(v) if isinstance(v, str) and k != 'stages' else v}"
                 for k, v in flag_overrides.items() if v is not None] + overrides  # fmt: skip
    out = Path(args.output)
    config = args.config
    if args.resume:
        saved = out / "run.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{out} holds no run.json: nothing to resume (run without --resume)")
        run = json.loads(saved.read_text())
        prompts = prompts or run["identity"]["prompts"]
        base_settings = run["settings"]
    if args.random_tiny_weights:
        from show1_jax.tiny import build_tiny_show1

        config = config or str(REPO_CONFIGS / "tiny_random.yaml")
        weights_dir = out.parent / f".{out.name}-tiny-weights"
        tiny = build_tiny_show1(weights_dir) if not weights_dir.exists() else None
        root = weights_dir.resolve()
        print(f"{'built' if tiny else 'using'} a tiny random cascade (untrained: the video is noise) in {root}")
        overrides = [f"weights.{k}={root / v}" for k, v in {
            "base": "show-1-base", "interpolation": "show-1-interpolation", "sr1": "show-1-sr1",
            "first_frame": "IF-II-L", "sr2": "show-1-sr2"}.items()] + overrides  # fmt: skip
    explicit_weights = any(getattr(args, r) for r in ("base", "interpolation", "sr1", "first_frame", "sr2")) or any(
        o.startswith("weights.") for o in overrides
    )
    if not (args.random_tiny_weights or args.resume or config or explicit_weights):
        from show1_jax import demo

        if demo.DEFAULT_WEIGHTS.is_dir():  # the shipped Show-1 Shapes model (show1_jax/demo.py)
            print(f"using the shipped Show-1 Shapes model ({demo.DEFAULT_WEIGHTS}); --config or weights for others")
            config = str(demo.generate_config(demo.DEFAULT_WEIGHTS))
            overrides = demo.weight_overrides(demo.DEFAULT_WEIGHTS) + overrides
    if args.resume and not args.random_tiny_weights and config is None:
        from show1_jax.settings import apply_overrides, from_mapping

        settings = from_mapping(GenerateSettings, apply_overrides(base_settings, overrides))
    else:
        settings = load_settings(GenerateSettings, config or str(REPO_CONFIGS / "show1.yaml"), overrides)
    if not prompts:
        raise ValueError("no prompt given: pass a prompt (or --prompts-file)")
    pipe = Show1Pipeline(Weights(**vars(settings.weights)), dtype=DTYPES[settings.dtype], cache_dir=args.cache_dir)

    def bar(stage: str):
        return tqdm(desc=stage, unit="step", leave=True, dynamic_ncols=True)

    print(f"generating {len(prompts)} prompt(s), stages {', '.join(settings.stages)}, seed {settings.seed}, "
          f"{settings.dtype} on {jax.devices()[0].platform}")  # fmt: skip
    result = generate(pipe, prompts, settings, out, resume=args.resume, progress_factory=bar, log=print)
    for r in result.reports:
        peak = "n/a on this backend" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f} GiB"
        print(f"{r.stage:>13}: {r.wall_s:7.1f} s wall, {r.compile_s:6.1f} s compiling, peak memory {peak}, "
              f"frames {r.output_shape}")  # fmt: skip
    for stage in result.reused:
        print(f"{stage:>13}: reused from {out / 'stages'}")
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


def cmd_shapes_train(args: argparse.Namespace) -> int:
    from show1_jax import demo

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(demo.STAGES)
    out = Path(args.output) if args.output else Path(args.workdir) / "show1-shapes"
    written = demo.train_recipe(
        args.workdir, out, stages=stages, steps_scale=args.steps_scale, overrides=args.overrides,
        num_clips=args.clips or demo.NUM_CLIPS,
    )  # fmt: skip
    print(f"wrote Show-1 Shapes to {written}")
    return 0


def cmd_shapes_eval(args: argparse.Namespace) -> int:
    import tempfile

    from show1_jax import demo

    weights = Path(args.weights) if args.weights else demo.DEFAULT_WEIGHTS
    if not (weights / "show1_shapes.json").is_file():
        raise FileNotFoundError(f"{weights} is not a Show-1 Shapes folder: train one with `show1 shapes train`")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    combos = list(demo.validation_combinations() if args.split == "validation" else getattr(demo.split(), args.split))
    per_stage = demo.evaluate_stages(weights, combos, seeds=seeds, overrides=args.overrides)
    final = list(per_stage)[-1]
    reports = {"model": per_stage[final]}
    if not args.no_floor:
        with tempfile.TemporaryDirectory() as tmp:
            floor = demo.random_cascade(Path(tmp) / "untrained")
            reports["untrained (floor)"] = demo.evaluate(
                floor, combos, seeds=seeds, overrides=args.overrides, stage=final
            )
    frames, height, width = 29, *demo.stage_size(args.overrides, weights)
    reports["real clips (ceiling)"] = demo.ceiling(combos, n_per_combo=len(seeds), size=(height, width))
    print(f"{len(combos)} {args.split.replace('_', '-')} prompts x {len(seeds)} seeds, {frames} frames at "
          f"{height}x{width}")  # fmt: skip
    print(f"{'':>22} {'colour':>7} {'shape':>7} {'direction':>9} {'overall':>8}")
    for name, r in reports.items():
        print(f"{name:>22} {r['colour']:7.1%} {r['shape']:7.1%} {r['direction']:9.1%} {r['overall']:8.1%}")
    if args.per_stage:
        real = demo.evaluate_real_inputs(weights, combos, seeds=seeds, overrides=args.overrides)
        print("per stage (the metric on real clips is 100% at every stage's size):")
        print(f"{'':>26} {'colour':>7} {'shape':>7} {'direction':>9} {'overall':>8}")
        rows = {f"{s} (prompts)": r for s, r in per_stage.items()}
        rows.update({f"{s} (real input)": r for s, r in real.items()})
        for name, r in rows.items():
            print(f"{name:>26} {r['colour']:7.1%} {r['shape']:7.1%} {r['direction']:9.1%} {r['overall']:8.1%}")
        reports["per stage, from the prompts"] = per_stage
        reports["per stage, fed real clips"] = real
    if args.steering:
        pairs = sorted({(c.colour, c.shape) for c in combos})
        steering = demo.keyframe_steering(weights, pairs, seeds=seeds, overrides=args.overrides)
        print(f"keyframes, one noise per seed and (colour, shape) with each direction word: direction"
              f" {steering['accuracy']:.1%}, distinct motions per noise {steering['distinct']:.0%}"
              f" ({1 / len(demo.DATASET.directions):.0%}: the noise alone decides)")  # fmt: skip
        reports["keyframe direction steering"] = steering
    if args.report:
        Path(args.report).write_text(json.dumps(reports, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="show1", description="Show-1 text-to-video in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate",
        help="text to video with the Show-1 cascade",
        description="Text to video with the Show-1 cascade. Settings come from a YAML file (default "
        "configs/show1.yaml: the released models with run_inference.py's settings); any setting can be overridden "
        "with key=value after the prompt, e.g. sr1.steps=50 'stages=[keyframes,interpolation]'.",
    )
    p.add_argument("items", nargs="*", metavar="PROMPT or key=value", help="prompt(s), then key=value overrides")
    p.add_argument("--output", required=True, help="output folder (new, or an earlier run's with --resume)")
    p.add_argument("--config", default=None,
                   help="settings YAML (default: the shipped Show-1 Shapes model with configs/shapes/generate.yaml "
                   "when no weights are given, else configs/show1.yaml)")  # fmt: skip
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help='negative prompt of the pixel stages (default "")')
    p.add_argument("--seed", type=int, default=None, help="random seed (default 345, as the reference)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="parameter and compute dtype")
    p.add_argument("--stages", default=None, help="comma-separated subset of keyframes,interpolation,sr1,sr2")
    p.add_argument("--num-keyframes", type=int, default=None, help="keyframes (8; 15 also fills the SR1 windows)")
    for stage, default_steps, default_cfg in STAGE_DEFAULTS:
        flag = stage.replace("_", "-")
        p.add_argument(f"--{flag}-steps", type=int, default=None, help=f"{stage} denoising steps ({default_steps})")
        p.add_argument(f"--{flag}-guidance", type=float, default=None, help=f"{stage} guidance scale ({default_cfg})")
    for repo in ("base", "interpolation", "sr1", "first_frame", "sr2"):
        p.add_argument(f"--{repo.replace('_', '-')}", default=None, metavar="DIR",
                       help=f"the {repo} repository folder, released or converted")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue --output: rerun only stages whose settings changed")
    p.add_argument("--cache-dir", default=None, help="prompt-embedding cache folder (T5 is not loaded again)")
    p.add_argument("--random-tiny-weights", action="store_true",
                   help="build and use a tiny random cascade (no download; untrained, the video is noise)")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "plan",
        add_help=False,
        help="memory, FLOPs and a roofline estimate per stage at full size, compiled abstractly (show1 plan --help)",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: __import__("show1_jax.plan", fromlist=["main"]).main(args.rest))

    from show1_jax.train import add_train_arguments, cmd_train

    p = sub.add_parser("train", help="train or finetune a stage's UNet or SR2's VAE (configs/train_*.yaml)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("shapes", help="Show-1 Shapes, the small default model: train it from scratch or evaluate it")
    shapes = p.add_subparsers(dest="shapes_command", required=True)
    q = shapes.add_parser("train", help="run the recipe configs/shapes/train_*.yaml and write the shipped layout")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every stage's settings")
    q.add_argument("--workdir", default="runs/shapes", help="clips, datasets, checkpoints (resumable)")
    q.add_argument(
        "--output", default=None, help="where the five repositories go (must not exist; default: WORKDIR/show1-shapes)"
    )
    q.add_argument("--stages", default=None, help="comma-separated subset of the recipe's runs (show1_jax.demo.STAGES)")
    q.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (quick checks)")
    q.add_argument("--clips", type=int, default=None, help="training clips to render (default 1536)")
    q.set_defaults(func=cmd_shapes_train)
    q = shapes.add_parser("eval", help="alignment accuracy on held-out prompts, with the metric's floor and ceiling")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="generate settings overrides")
    q.add_argument("--weights", default=None, help="a Show-1 Shapes folder (default: the shipped one)")
    q.add_argument("--seeds", default="0,1", help="comma-separated seeds; one video per held-out prompt and seed")
    q.add_argument("--split", choices=["held_out", "train", "validation"], default="held_out",
                   help="prompts to generate (validation: 19 training triples, to choose settings on)")  # fmt: skip
    q.add_argument("--no-floor", action="store_true", help="skip the untrained cascade (the floor)")
    q.add_argument("--report", default=None, help="also write the reports as JSON here")
    q.add_argument("--per-stage", action="store_true",
                   help="also score every stage's frames, and each later stage fed real clips instead of the previous"
                   " stage's output (which stage loses what)")  # fmt: skip
    q.add_argument("--steering", action="store_true",
                   help="also sample the keyframes of one noise with every direction word: does the word or the"
                   " noise decide the motion")  # fmt: skip
    q.set_defaults(func=cmd_shapes_eval)

    p = sub.add_parser("convert", help="convert released PyTorch folders into show1-jax's format")
    p.add_argument("src", help="a component folder (show-1-base/unet) or a pipeline folder (show-1-base)")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored parameter dtype")
    p.add_argument("--variant", choices=["fp16"], default=None, help="read the fp16 weight files")
    p.set_defaults(func=cmd_convert)

    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # imageio-ffmpeg starts ffmpeg with subprocess; the child execs at once, so JAX's fork warning does not apply.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # the planner owns its arguments (and must set XLA flags before JAX starts)
        from show1_jax.plan import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # prompts and key=value overrides may come after options
        if getattr(args, "command", None) != "generate" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items = list(args.items) + extra
    try:
        return args.func(args)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
