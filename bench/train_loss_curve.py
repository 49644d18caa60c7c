"""Loss curve of the tiny keyframe UNet trained on synthetic captioned shapes (CPU), through ``show1 train``'s library.

Acceptance check (a) of the trainer: the loss falls by at least half within a few hundred steps. The script
generates the synthetic clips, builds the dataset from their caption CSV (the ``data.source`` path of the train
command), gives every caption a fixed random [8, 64] "text embedding" (plus the empty prompt's, for CFG dropout),
trains ``tiny_base`` (``show1_jax.tiny.TINY_BASE``, 1.54 M parameters) from its seeded random initialisation with
the default keyframe objective (ε-MSE + learned-variance VLB, CFG dropout 0.1, train-mode temporal dropout) and
reports the mean loss of the first and last steps, step time and throughput.

Usage::

    .venv/bin/python bench/train_loss_curve.py [--steps 300] [--workdir /tmp/show1_loss_curve]

Measured (2 CPU cores shared with other jobs, jax 0.10.2; defaults: 64 clips of 8 frames at 20x32, batch 4, AdamW
lr 3e-4 after 20 warmup steps, 300 steps, one device)::

    mean loss, steps 1-30:    1.067   (ε-MSE 1.045)      loss per 50 steps: 0.92, 0.33, 0.20, 0.13, 0.10, 0.11
    mean loss, steps 271-300: 0.098   (ε-MSE 0.094)      -> 0.09x; the 30-step mean halves by step 68
    first step (compile + run) 45.7 s; then 1.88 s a step (median), 2.1 samples/s; 672 s wall in all
    PASS

The loss is noisy step to step (one random timestep per clip, batch 4); the windows average it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--window", type=int, default=30, help="steps averaged at each end of the curve")
    parser.add_argument("--workdir", default="/tmp/show1_loss_curve")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first (otherwise a run resumes)")
    args = parser.parse_args()

    from show1_jax.data import SyntheticConfig, generate_dataset, save_caption_embeddings
    from show1_jax.data.synthetic import read_metadata
    from show1_jax.settings import load_settings
    from show1_jax.train import PrintLogger, run_training
    from show1_jax.train_settings import TrainSettings

    root = Path(args.workdir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    clips = root / "clips"
    if not (clips / "captions.csv").is_file():
        generate_dataset(clips, args.clips, SyntheticConfig(height=40, width=64, num_frames=args.frames), seed=0)
    table = root / "embeddings.npz"
    if not table.is_file():
        captions = sorted({r["caption"] for r in read_metadata(clips)}) + [""]
        rng = np.random.default_rng(0)
        save_caption_embeddings(table, {c: rng.normal(size=(8, 64)).astype(np.float32) for c in captions})

    settings = load_settings(
        TrainSettings,
        Path(__file__).resolve().parents[1] / "configs" / "train_keyframes.yaml",
        [
            f"workdir={root / 'run'}",
            f"steps={args.steps}",
            "log_every=1",
            "mesh=data=1,fsdp=1",
            "model.pretrained=null",
            "model.config=tiny_base",
            "data.path=null",
            f"data.source={clips}",
            f"data.build_dir={root / 'built'}",
            f"data.frames={args.frames}",
            f"data.height={args.height}",
            f"data.width={args.width}",
            "data.fps=null",
            "data.num_workers=2",
            f"data.embeddings={table}",
            "data.text_encoder=null",
            f"data.batch_size={args.batch}",
            f"optim.learning_rate={args.lr!r}",
            "optim.warmup_steps=20",
            "optim.schedule=constant",
            "optim.ema_decay=null",
            "model.remat=false",
            "checkpoint.every=100",
        ],
    )
    start = time.perf_counter()
    result = run_training(settings, logger=PrintLogger())
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    loss = np.array([r["loss"] for r in rows])
    mse = np.array([r["mse"] for r in rows])
    w = min(args.window, len(loss) // 2)
    first, last = loss[:w].mean(), loss[-w:].mean()
    step_times = np.array([r["step_time_s"] for r in rows if "step_time_s" in r])
    report = {
        "steps": int(len(loss)),
        "first_mean_loss": float(first),
        "last_mean_loss": float(last),
        "ratio": float(last / first),
        "first_mean_mse": float(mse[:w].mean()),
        "last_mean_mse": float(mse[-w:].mean()),
        "window": int(w),
        "median_step_time_s": float(np.median(step_times)) if len(step_times) else None,
        "samples_per_s": float(args.batch / np.median(step_times)) if len(step_times) else None,
        "wall_s": wall,
        "curve_every_25": [float(v) for v in loss[::25]],
    }
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    verdict = "PASS" if last <= 0.5 * first else "FAIL"
    print(f"{verdict}: mean loss of the last {w} steps is {last / first:.2f}x that of the first {w} (need <= 0.5)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
