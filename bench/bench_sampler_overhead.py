"""Per-step overhead of the compiled sampler over a bare denoiser call.

A small stand-in denoiser (1x1 projection, two 3x3 convs, SiLU, 1x1 projection to 2C channels, on the CFG batch
of a [1, 8, 32, 32, 3] video, i.e. 16 images of 32x32 at 64 channels) takes a few tens of ms per call on a CPU
core. We time, in one process, median over repeats after warm-up:

- bare: one jitted denoiser call on the CFG batch (what a step cannot avoid);
- step: the scheduler step alone (DPM-Solver++ order 2 with per-frame dynamic thresholding);
- loop: the whole compiled loop (``Sampler.__call__``, one ``lax.scan``) divided by the number of steps;
- loop + progress: the same with a tqdm bar advanced from inside the loop (``jax.debug.callback``);
- python loop: ``Sampler.python_loop`` (a jitted step called from Python) per step.

Overheads are relative to ``bare``; the progress overhead is (loop + progress) / loop - 1, end to end (noisy on a
shared machine) and isolated (the callback alone in an otherwise empty scan). Compile times (first call minus a
steady call) are reported separately; "loop + progress" shows ~0 because it reuses the loop's compilation.
Run: ``.venv/bin/python bench/bench_sampler_overhead.py [--steps 20 --repeats 15]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from show1_jax import schedulers as S
from show1_jax.sampler import Sampler


def make_denoiser(width: int):
    def denoise(params, x_in, t, cond):
        n, f, h, w, c = x_in.shape  # [2B, F, H, W, C]
        x = x_in.reshape(n * f, h, w, c) @ params["w_in"]  # [2B*F, H, W, width]
        temb = jnp.repeat(jnp.sin(t.astype(x.dtype) / 1000.0 + cond["text"]), f)[:, None, None, None]
        for k in params["convs"]:
            x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.silu(x + temb)
        out = x @ params["w_out"]  # [2B*F, H, W, 2C]
        return out.reshape(n, f, h, w, -1)

    return denoise


def make_params(width: int, channels: int, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "w_in": jax.random.normal(k1, (channels, width)) / np.sqrt(channels),
        "convs": [jax.random.normal(k, (3, 3, width, width)) / np.sqrt(9 * width) for k in (k2, k3)],
        "w_out": jax.random.normal(k4, (width, 2 * channels)) / np.sqrt(width),
    }


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    config = S.DPMSolverMultistepConfig(
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        lambda_min_clipped=-5.1,
        variance_type="fixed_small",
    )
    schedule = S.dpm_schedule(config, args.steps)
    key = jax.random.key(0)
    params = make_params(args.width, 3, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, args.frames, args.size, args.size, 3))
    cond = {"text": jnp.asarray([0.0, 0.3])}
    denoise = make_denoiser(args.width)

    bare = jax.jit(denoise)
    x_cfg, t_cfg = jnp.concatenate([x, x]), jnp.full((2,), 995, jnp.int32)
    step = jax.jit(lambda st, m, i, x: schedule.step(st, m, i, x))
    state, eps = schedule.init_state(x), x * 0.1
    sampler = Sampler(denoise)

    def loop_progress():
        with tqdm(total=args.steps, file=io.StringIO()) as bar:  # tqdm's defaults, output discarded
            return sampler(params, schedule, x, cond, guidance_scale=9.0, progress=bar)

    cases = {
        "bare": lambda: bare(params, x_cfg, t_cfg, cond),
        "step": lambda: step(state, eps, jnp.int32(3), x),
        "loop": lambda: sampler(params, schedule, x, cond, guidance_scale=9.0),
        "loop + progress": loop_progress,
        "python loop": lambda: sampler.python_loop(params, schedule, x, cond, guidance_scale=9.0),
    }
    per_call = {"bare": 1, "step": 1, "loop": args.steps, "loop + progress": args.steps, "python loop": args.steps}

    first = {name: timed(fn) for name, fn in cases.items()}  # includes compilation
    for fn in cases.values():  # warm-up
        timed(fn)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    inner = max(1, args.steps // 4)
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every case alike
        for name, fn in cases.items():
            reps = inner if per_call[name] == 1 else 1
            samples[name].append(sum(timed(fn) for _ in range(reps)) / (reps * per_call[name]))
    median = {name: statistics.median(v) for name, v in samples.items()}
    # Ratios of measurements taken back to back within one repeat are steadier than ratios of medians.
    paired = {
        name: statistics.median(a / b for a, b in zip(samples[name], samples["bare"], strict=True)) - 1
        for name in cases
    }
    progress_paired = statistics.median(
        a / b - 1 for a, b in zip(samples["loop + progress"], samples["loop"], strict=True)
    )
    callback_s = callback_cost()

    print(f"devices: {jax.devices()}")
    print(
        f"sample [1, {args.frames}, {args.size}, {args.size}, 3], CFG batch 2, width {args.width}, "
        f"{args.steps} steps, {args.repeats} repeats"
    )
    print(f"{'':16s} {'ms/step':>8s} {'min..max':>15s} {'vs bare':>8s} {'compile s':>10s}")
    for name in cases:
        lo, hi = min(samples[name]), max(samples[name])
        compile_s = first[name] - median[name] * per_call[name]
        print(
            f"{name:16s} {1e3 * median[name]:8.2f} {1e3 * lo:7.2f}..{1e3 * hi:<7.2f} {100 * paired[name]:+7.1f}% "
            f"{compile_s:10.2f}"
        )
    print(f"progress overhead, end to end (median of paired runs): {100 * progress_paired:+.2f}% of a step")
    print(
        f"progress overhead, isolated: {1e6 * callback_s:.0f} us per step = "
        f"{100 * callback_s / median['bare']:.2f}% of a bare denoiser call"
    )
    print(
        f"loop overhead over the bare denoiser (CFG + scheduler step + scan): "
        f"{1e3 * (median['loop'] - median['bare']):+.2f} ms/step"
    )


def callback_cost(steps: int = 2000, repeats: int = 7) -> float:
    """Seconds per step that the progress callback adds to a scan whose body is otherwise trivial."""
    from show1_jax.sampler import _report_progress

    def run(with_callback: bool):
        def body(carry, i):
            if with_callback:
                jax.debug.callback(_report_progress, jnp.int32(0), i + 1)
            return carry * 1.0001, None

        fn = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps))[0])
        timed(fn, jnp.ones(()))
        return statistics.median(timed(fn, jnp.ones(())) for _ in range(repeats)) / steps

    return run(True) - run(False)


if __name__ == "__main__":
    main()
