"""Throughput of the single-frame trainers (IF-II-L ``first_frame``, SR2's ``vae``) and the VAE's reconstruction error,
on synthetic captioned shapes (CPU), through ``show1 train``'s library and the shipped configs.

The script generates synthetic clips at the training size, builds the dataset from their caption CSV, trains the
tiny preset (``tiny_vae``: ``show1_jax.tiny.TINY_VAE``, 1.03 M parameters; ``tiny_if2``: ``TINY_IF2``, 1.00 M) from
its seeded random initialisation and reports the median step time, steps/s and, for the VAE, the reconstruction
error of the exported ``vae/`` (posterior mean, decoded) on every frame of the dataset's last 16 clips (training
clips: the synthetic set has no held-out split), as the mean absolute error on [-1, 1] and as PSNR on 8-bit frames,
next to the untrained initialisation's.

Usage::

    .venv/bin/python bench/train_single_frame.py --stage vae --steps 300 --height 64 --width 96
    .venv/bin/python bench/train_single_frame.py --stage vae --steps 20 --height 128 --width 192
    .venv/bin/python bench/train_single_frame.py --stage first_frame --steps 20 --height 64 --width 96

Measured (2 CPU cores shared with other jobs, load average 2-5, jax 0.10.2; batch 8 frames, AdamW lr 1e-3 constant,
no warmup, one device; step times are medians after the first, compiling, step)::

    vae 64x96, 300 steps:  0.91 steps/s (1.10 s a step, 7.3 frames/s); first step 18 s; 365 s wall
                           L1 rec (training loss) 0.184 over steps 1-20 -> 0.054 over steps 281-300
                           exported vae/: MAE 0.049 on [-1, 1], PSNR 20.0 dB (untrained: MAE 0.86, 7.0 dB);
                           scaling_factor 0.665 (latent std 1.50 over the 32 frames of the first batch)
    vae 128x192, 20 steps: 0.23 steps/s (4.44 s a step, 1.8 frames/s); first step 19 s
                           L1 rec 0.396 over steps 1-5 -> 0.079 over steps 16-20
    first_frame 64x96, 20 steps (tiny_if2; condition: 16x24 frames, low_res_factor 4, upsampled to 64x96):
                           0.47 steps/s (2.14 s a step, 3.7 frames/s); first step 64 s
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
    parser.add_argument("--stage", choices=("vae", "first_frame"), default="vae")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workdir", default="/tmp/show1_single_frame")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from show1_jax.data import SyntheticConfig, VideoTextData, generate_dataset, save_caption_embeddings
    from show1_jax.data.synthetic import read_metadata
    from show1_jax.loading import load_component
    from show1_jax.settings import load_settings
    from show1_jax.tiny import TINY_VAE, random_model
    from show1_jax.train import PrintLogger, run_training
    from show1_jax.train_settings import TrainSettings
    from show1_jax.vae import AutoencoderKL

    root = Path(args.workdir) / f"{args.height}x{args.width}"
    clips = root / "clips"
    if not (clips / "captions.csv").is_file():
        config = SyntheticConfig(height=args.height, width=args.width, num_frames=4)
        generate_dataset(clips, args.clips, config, seed=0)
    table = root / "embeddings.npz"
    if not table.is_file():
        captions = sorted({r["caption"] for r in read_metadata(clips)}) + [""]
        rng = np.random.default_rng(0)
        save_caption_embeddings(table, {c: rng.normal(size=(8, 64)).astype(np.float32) for c in captions})
    run = root / f"run_{args.stage}"
    if run.exists():
        shutil.rmtree(run)
    preset = "tiny_vae" if args.stage == "vae" else "tiny_if2"
    overrides = [
        f"workdir={run}",
        f"steps={args.steps}",
        "log_every=1",
        "mesh=data=1,fsdp=1",
        "model.pretrained=null",
        f"model.config={preset}",
        "model.remat=false",
        "data.path=null",
        f"data.source={clips}",
        f"data.build_dir={root / 'built'}",
        "data.frames=4",
        f"data.height={args.height}",
        f"data.width={args.width}",
        "data.fps=null",
        "data.num_workers=2",
        "data.text_encoder=null",
        f"data.embeddings={table}",
        f"data.batch_size={args.batch}",
        f"optim.learning_rate={args.lr!r}",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "optim.ema_decay=null",
        f"checkpoint.every={args.steps}",
    ]
    settings = load_settings(
        TrainSettings, Path(__file__).resolve().parents[1] / f"configs/train_{args.stage}.yaml", overrides
    )
    start = time.perf_counter()
    result = run_training(settings, logger=PrintLogger())
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    step_times = np.array([r["step_time_s"] for r in rows if "step_time_s" in r])
    median = float(np.median(step_times))
    report = {
        "stage": args.stage,
        "frames": f"{args.height}x{args.width}",
        "batch": args.batch,
        "steps": len(rows),
        "median_step_time_s": median,
        "steps_per_s": 1.0 / median,
        "frames_per_s": args.batch / median,
        "wall_s": wall,
    }
    if args.stage == "vae":
        rec = np.array([r["rec"] for r in rows])
        w = max(1, min(20, len(rec) // 4))
        report.update(first_mean_rec=float(rec[:w].mean()), last_mean_rec=float(rec[-w:].mean()), window=w)
        data = VideoTextData(root / "built")
        videos = data.get_batch(range(len(data) - 16, len(data)))["video"]  # [16, 4, H, W, 3] uint8
        frames = jnp.asarray(videos.reshape(-1, *videos.shape[2:]), jnp.float32) / 127.5 - 1.0
        trained = load_component(result.model_dir)
        graphdef, params = nnx.split(trained)
        _, initial = nnx.split(random_model(AutoencoderKL, TINY_VAE, seed=0))

        @jax.jit
        def reconstruct(params):
            model = nnx.merge(graphdef, params)
            return model.decode(model.encode(frames)[0])

        for name, p in (("trained", params), ("initial", initial)):
            recon = np.asarray(reconstruct(p))
            mae = float(np.abs(recon - np.asarray(frames)).mean())
            as_uint8 = np.clip(np.round((recon + 1.0) * 127.5), 0, 255)
            mse = float(np.mean(np.square(as_uint8 - videos.reshape(as_uint8.shape).astype(np.float64))))
            report[f"{name}_mae"] = mae
            report[f"{name}_psnr_db"] = 10 * np.log10(255.0**2 / max(mse, 1e-12))
        report["scaling_factor"] = trained.config.scaling_factor
    (root / f"report_{args.stage}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
