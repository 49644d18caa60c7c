"""The trainer: objectives, trainable selection, rematerialisation, checkpoints (resume after SIGKILL, other mesh),
sharded-vs-single-device training, bad-video reporting, and the single-frame models (IF-II-L's first-frame UNet,
SR2's VAE) trained from scratch and exported where the pipeline loads them.

Most tests train a "micro" pixel UNet (one IF-style block at 32 channels, the keyframe layout) for a few steps on
synthetic clips of 4 frames at 16x24, batch 2, with identical settings, so that they share one compiled train step
through a per-session persistent compilation cache (subprocesses included). The loss-curve acceptance run on the
tiny keyframe model is ``bench/train_loss_curve.py``. The first-frame and VAE tests use their own micro models
(``MICRO_IF2``, ``MICRO_VAE``: one or two blocks) so that each compiles its step in ~10-20 s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.experimental.compilation_cache import compilation_cache

from show1_jax.configs import config_to_dict
from show1_jax.data import CaptionCsvError, SyntheticConfig, generate_dataset, save_caption_embeddings
from show1_jax.data.synthetic import read_metadata
from show1_jax.loading import flat_params, load_component
from show1_jax.schedulers import load_scheduler_config
from show1_jax.settings import load_settings, to_mapping
from show1_jax.tiny import NOISING_SCHEDULER, PIXEL_DPM_SCHEDULER, TINY_BASE, TINY_IF2, TINY_VAE, random_model
from show1_jax.train import (
    DiffusionTables,
    ModelView,
    TrainCheckpointer,
    TrainDataError,
    abstract_with_shardings,
    build_model,
    build_vae,
    diffusion_loss,
    init_train_state,
    is_trainable,
    learning_rate_schedule,
    low_res_condition,
    make_optimizer,
    run_training,
    sr1_condition,
    temporal_crop,
    train_state_shardings,
    unet_apply,
)
from show1_jax.train_settings import FirstFrameSettings, ModelSettings, OptimSettings, SR1Settings, TrainSettings
from show1_jax.unet3d import UNet2DConditionModel, UNet3DConditionModel
from show1_jax.vae import AutoencoderKL

REPO = Path(__file__).resolve().parents[1]
MICRO = dataclasses.replace(
    TINY_BASE,
    down_block_types=("SimpleCrossAttnDownBlock3D",),
    up_block_types=("SimpleCrossAttnUpBlock3D",),
    block_out_channels=(32,),
)
TEXT_LEN, TEXT_DIM = 8, MICRO.encoder_hid_dim
# IF-II-L's layout (2D, class embedding, 6 in/out channels) with one resnet block and the cross-attention mid block.
MICRO_IF2 = dataclasses.replace(
    TINY_IF2,
    down_block_types=("ResnetDownsampleBlock2D",),
    up_block_types=("ResnetUpsampleBlock2D",),
    block_out_channels=(32,),
)
# Two blocks (downsampling factor 2) without mid-block attention: the VAE trainer's paths at the least compile time.
MICRO_VAE = dataclasses.replace(
    TINY_VAE,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    norm_num_groups=8,
    mid_block_add_attention=False,
)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module (and its subprocesses), restored afterwards."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    cache = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(cache))
    yield cache
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Synthetic clips (6 frames, 16x24), a caption CSV, an embedding table with "", and the micro config.json."""
    root = tmp_path_factory.mktemp("train")
    generate_dataset(root / "clips", 8, SyntheticConfig(height=16, width=24, num_frames=6, speed=1), seed=1)
    captions = sorted({r["caption"] for r in read_metadata(root / "clips")}) + [""]
    rng = np.random.default_rng(0)
    table = {c: rng.normal(size=(TEXT_LEN, TEXT_DIM)).astype(np.float32) for c in captions}
    save_caption_embeddings(root / "embeddings.npz", table)
    config = {"_class_name": "UNet3DConditionModel", **config_to_dict(MICRO)}
    (root / "micro.json").write_text(json.dumps(config))
    (root / "micro_if2.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **config_to_dict(MICRO_IF2)})
    )
    (root / "micro_vae.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config_to_dict(MICRO_VAE)}))
    return root


DATA_OVERRIDES = (  # the workspace's clips, as micro_settings builds them
    "data.path=null",
    "data.frames=4",
    "data.height=16",
    "data.width=24",
    "data.fps=null",
    "data.text_encoder=null",
    "data.batch_size=2",
)


def micro_settings(workspace: Path, workdir: Path, *overrides: str) -> TrainSettings:
    """The shared test run: micro UNet, keyframes, batch 2, one device, lr 1e-3, checkpoints every 2 steps."""
    base = [
        "stage=keyframes",
        f"workdir={workdir}",
        "steps=4",
        "log_every=1",
        "mesh=data=1,fsdp=1",
        f"model.config={workspace / 'micro.json'}",
        "data.path=null",
        f"data.source={workspace / 'clips'}",
        f"data.build_dir={workspace / 'built'}",
        "data.frames=4",
        "data.height=16",
        "data.width=24",
        f"data.embeddings={workspace / 'embeddings.npz'}",
        "data.batch_size=2",
        "optim.learning_rate=0.001",
        "checkpoint.every=2",
        "model.temporal_conv_dropout=false",  # fewer ops: the shared step compiles in ~30 s instead of ~45 s
    ]
    return load_settings(TrainSettings, None, base + list(overrides))


def losses(result) -> list[float]:
    return [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]


class Events:
    def __init__(self):
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def metrics(self, step, values) -> None:
        pass


# --- objective -----------------------------------------------------------------------------------------------------


def test_learned_variance_term_is_zero_at_the_true_posterior_and_does_not_train_the_mean():
    tables = DiffusionTables.from_scheduler(load_scheduler_config(PIXEL_DPM_SCHEDULER))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 2, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([1, 500, 999])
    abar = jnp.asarray(tables.alphas_cumprod)[t][:, None, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise
    # A perfect ε and variance channels -1 (log variance = the true posterior's): KL = 0, MSE = 0.
    perfect = jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)
    loss, parts = diffusion_loss(perfect, x0, x_t, noise, t, tables)
    assert float(parts["mse"]) == 0.0
    assert abs(float(parts["vlb"])) < 1e-5 and abs(float(loss)) < 1e-5
    # Any other variance raises the VLB term (a KL is >= 0).
    _, parts = diffusion_loss(perfect.at[..., 3:].set(0.5), x0, x_t, noise, t, tables)
    assert float(parts["vlb"]) > 1e-3
    # Stop-gradient on the mean: the ε channels' gradient is the MSE's alone, whatever the VLB weight.
    output = jnp.concatenate([noise + 0.3, jnp.zeros_like(noise)], axis=-1)

    def grad(weight):
        fn = lambda out: diffusion_loss(out, x0, x_t, noise, t, tables, learned_variance_weight=weight)[0]  # noqa: E731
        return jax.grad(fn)(output)

    with_vlb, without = grad(1.0), grad(0.0)
    np.testing.assert_array_equal(with_vlb[..., :3], without[..., :3])
    assert float(jnp.abs(with_vlb[..., 3:]).max()) > 0 and float(jnp.abs(without[..., 3:]).max()) == 0
    # v-prediction: target alpha * eps - sigma * x0.
    v = jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
    _, parts = diffusion_loss(v, x0, x_t, noise, t, tables, prediction_type="v_prediction")
    assert float(parts["mse"]) == 0.0


def test_stage_conditioning_sr1_and_temporal_crop():
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.uniform(-1, 1, (2, 5, 8, 12, 3)), jnp.float32)
    alphas = load_scheduler_config(NOISING_SCHEDULER)
    from show1_jax.schedulers import noise_tables

    abar = noise_tables(alphas).alphas_cumprod
    # IF-II-L's conditioning (one frame per example) is SR1's without the clean first frame: the same helper.
    frames = video[:, 2]
    cond, level = low_res_condition(frames, jax.random.key(0), abar, FirstFrameSettings(noise_level_max=0))
    assert cond.shape == frames.shape and level.tolist() == [0, 0]
    from show1_jax.stages import resize_bilinear

    low = jax.image.resize(frames, (2, 2, 3, 3), method="linear", antialias=True)
    np.testing.assert_allclose(cond, resize_bilinear(low, (8, 12)), atol=0.05)  # level 0: abar = 0.99996
    cond, level = sr1_condition(video, jax.random.key(0), abar, SR1Settings(low_res_factor=4, noise_level_max=0))
    assert cond.shape == video.shape and level.tolist() == [0, 0]
    np.testing.assert_array_equal(cond[:, 0], video[:, 0])  # the clean high-res first frame
    # Level 0 (abar = 0.99996): the rest is the 4x-downsampled clip upsampled back, smooth and close to the video.
    assert float(jnp.abs(cond[:, 1:] - video[:, 1:]).mean()) < 0.6
    cond, level = sr1_condition(video, jax.random.key(1), abar, SR1Settings(noise_level_min=200, noise_level_max=300))
    assert all(200 <= v <= 300 for v in level.tolist())
    clip = temporal_crop(video, 3, jax.random.key(2))
    assert clip.shape == (2, 3, 8, 12, 3)
    for b in range(2):  # a contiguous window of each clip
        start = [s for s in range(3) if np.array_equal(clip[b], video[b, s : s + 3])]
        assert len(start) == 1


def test_remat_gives_the_same_gradients():
    model = random_model(UNet3DConditionModel, MICRO, seed=0)
    view, params = ModelView.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 4, 8, 8, 3)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(1, TEXT_LEN, TEXT_DIM)), jnp.float32)
    t = jnp.array([300])

    def grads(remat):
        apply = unet_apply(view, remat=remat)
        loss = lambda p: jnp.mean(apply(p, x, t, text, None, jax.random.key(0)) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(False), grads(True)
    for key in plain:
        np.testing.assert_allclose(remat[key], plain[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_cosine_schedule_decays_over_decay_steps_when_set_so_a_run_can_stop_part_way():
    optim = OptimSettings(learning_rate=1e-3, schedule="cosine", warmup_steps=10, end_learning_rate=1e-4)
    full = learning_rate_schedule(optim, 100)
    assert float(full(4)) == pytest.approx(1e-3 * 5 / 10)  # warmup
    assert float(full(55)) == pytest.approx(5.5e-4, rel=1e-5)  # half-way: the mean of lr and end
    assert float(full(100)) == pytest.approx(1e-4, rel=1e-5)
    # a 40-step run on the 100-step schedule follows it exactly where it stops
    part = learning_rate_schedule(dataclasses.replace(optim, decay_steps=100), 40)
    for step in (0, 9, 25, 39):
        assert float(part(step)) == pytest.approx(float(full(step)), rel=1e-6)
    assert float(learning_rate_schedule(optim, 40)(39)) < float(part(39))  # its own horizon decays sooner
    with pytest.raises(ValueError, match="decay_steps"):
        OptimSettings(warmup_steps=10, decay_steps=10)


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoints_keep_the_last_n_survive_donation_and_restore_onto_another_mesh(tmp_path):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from show1_jax.sharding import make_mesh

    params = {"a.kernel": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), "a.bias": jnp.ones((32,))}
    optimizer = make_optimizer(OptimSettings(ema_decay=0.9), 10)
    state = init_train_state(params, optimizer, 0, ema=True)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, s), donate_argnums=0)
    checkpointer = TrainCheckpointer(tmp_path / "ckpt", keep=2, async_save=True)
    expected = {}
    for step in range(1, 5):
        state = bump(state)  # donates the arrays the previous (async) save was given
        expected[step] = jax.tree.map(np.array, state)
        checkpointer.save(step, state, {"epoch": 0, "position": 2 * step}, {"stage": "test"})
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 4]
    mesh = make_mesh("data=2,fsdp=4")  # written on one device, restored onto 8
    shardings = {"a.kernel": NamedSharding(mesh, P("fsdp")), "a.bias": NamedSharding(mesh, P())}
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0, ema=True), params)
    target = abstract_with_shardings(abstract, train_state_shardings(abstract, shardings, optimizer, mesh))
    for step in (3, 4):
        restored, data_state = checkpointer.restore(step, target)
        assert data_state == {"epoch": 0, "position": 2 * step}
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, expected[step])
    assert restored.params["a.kernel"].sharding == shardings["a.kernel"]
    assert restored.ema["a.kernel"].sharding == shardings["a.kernel"]
    checkpointer.close()


# --- training runs -------------------------------------------------------------------------------------------------


def test_bad_videos_are_reported_with_their_path_and_skipped_by_option(workspace, tmp_path):
    import csv
    import shutil

    source = tmp_path / "clips"
    shutil.copytree(workspace / "clips", source)
    (source / "videos" / "broken.mp4").write_bytes(b"this is not a video")
    with open(source / "captions.csv", "a", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videos/broken.mp4", "a red circle moving left", "red", "circle", "left"])
        writer.writerow(["videos/missing.mp4", "a red circle moving left", "red", "circle", "left"])
    overrides = (f"data.source={source}", f"data.build_dir={tmp_path / 'built'}")
    # Default: the first bad file stops the run before training, naming the file and the option.
    with pytest.raises(TrainDataError, match=r"broken\.mp4.*data\.skip_bad=true"):
        run_training(micro_settings(workspace, tmp_path / "strict", *overrides))
    # A clip too short for the requested frames is reported the same way.
    with pytest.raises(TrainDataError, match=r"videos/0000\d\.mp4"):
        run_training(micro_settings(workspace, tmp_path / "long", *overrides, "data.frames=12", "data.skip_bad=false"))
    # skip_bad: both are left out, listed (path and reason) in the log and in skipped_videos.json; training runs.
    events = Events()
    result = run_training(
        micro_settings(workspace, tmp_path / "lenient", *overrides, "data.skip_bad=true", "steps=1"), logger=events
    )
    assert result.step == 1 and np.isfinite(result.last_metrics["loss"])
    assert {Path(b.video_path).name for b in result.skipped} == {"broken.mp4", "missing.mp4"}
    logged = [m for m in events.messages if m.startswith("skipped video")]
    assert any("broken.mp4" in m and "VideoDecodeError" in m for m in logged)
    assert any("missing.mp4" in m and "VideoNotFoundError" in m for m in logged)
    assert len(json.loads((tmp_path / "lenient" / "skipped_videos.json").read_text())) == 2
    # A caption column that is not there: the error names the column and the columns the CSV has.
    with pytest.raises(CaptionCsvError, match=r"no column 'text'.*'video_path', 'caption'"):
        run_training(
            micro_settings(
                workspace,
                tmp_path / "cols",
                *overrides,
                f"data.build_dir={tmp_path / 'b2'}",
                "data.caption_column=text",
            )
        )


def test_temporal_attention_finetuning_touches_nothing_else(workspace, tmp_path):
    settings = micro_settings(workspace, tmp_path / "motion", "optim.trainable=temporal_attention", "steps=2")
    result = run_training(settings)
    before = flat_params(random_model(UNet3DConditionModel, MICRO, seed=0))
    after = flat_params(load_component(result.model_dir))
    trained = [k for k in before if is_trainable(k, "temporal_attention")]
    assert trained and all("temp_attentions" in k for k in trained)
    for key, value in before.items():
        if key in trained:
            continue
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=key)  # bitwise unchanged
    assert sum(not np.array_equal(after[k], before[k]) for k in trained) > len(trained) // 2
    # The checkpoint holds optimizer state for the temporal attention parameters only.
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(result.checkpoint_dir / "2" / "state")
    tree = getattr(meta, "item_metadata", meta)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(tree))[0]]
    per_param = [
        p for p in paths if p.startswith(("['opt_state']", "['params']")) and p.endswith(("kernel']", "bias']"))
    ]
    assert any(p.startswith("['opt_state']") for p in per_param)
    assert all("temp_attentions" in p for p in per_param), [p for p in per_param if "temp_attentions" not in p][:3]


def test_show1_train_command_reduces_the_loss(workspace, tmp_path, capsys):
    """``show1 train`` end to end (progress bar, metrics lines, export), and a fast proxy of the loss-curve
    acceptance run (bench/train_loss_curve.py): 24 steps at lr 1e-3 bring the mean loss of the last 6 steps well
    below that of the first 6 (measured 0.51x)."""
    from show1_jax.train import main

    settings = micro_settings(workspace, tmp_path / "cli", "checkpoint.every=100")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(to_mapping(settings)))
    assert main([str(config), "steps=24"]) == 0
    out = capsys.readouterr()
    assert "step 24: " in out.out and "samples_per_s=" in out.out and "step_time_s=" in out.out
    assert "24/24" in out.err  # the progress bar
    curve = [json.loads(line)["loss"] for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == 24 and all(np.isfinite(curve))
    assert np.mean(curve[-6:]) < 0.75 * np.mean(curve[:6]), curve
    unet = load_component(tmp_path / "cli" / "unet")  # the converted format
    assert unet.config == MICRO
    # A bad override is an error that names the known keys, not a crash.
    assert main([str(config), "optim.learning_rte=0.1"]) == 1
    assert "learning_rate" in capsys.readouterr().err


RESUME_SCRIPT = """
import sys, time
from show1_jax.settings import load_settings
from show1_jax.train import TrainSettings, run_training

class SlowFromStep3:  # keeps the run alive after its first checkpoint, so the kill lands mid-run
    n = 0
    def update(self, n):
        self.n += n
        print("step", self.n, flush=True)
        if self.n >= 3:
            time.sleep(2.0)

run_training(load_settings(TrainSettings, sys.argv[1]), progress=SlowFromStep3())
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(workspace, tmp_path, compile_cache):
    """~60 s on 2 cores: a subprocess is killed after its step-2 checkpoint, resumed here to step 6."""
    steps = ("steps=6",)
    reference = run_training(micro_settings(workspace, tmp_path / "straight", *steps))
    killed = micro_settings(workspace, tmp_path / "killed", *steps)
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(to_mapping(killed)))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "2"  # orbax renames the folder into place on commit
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert first_checkpoint.is_dir()
    assert not (tmp_path / "killed" / "unet").exists()  # it never finished
    resumed = run_training(killed)
    assert resumed.step == 6
    assert losses(resumed)[-1] == losses(reference)[-1]
    a, b = flat_params(load_component(reference.model_dir)), flat_params(load_component(resumed.model_dir))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=key)


@pytest.mark.slow
def test_eight_devices_with_data_and_fsdp_match_one_device(workspace, tmp_path):
    """~80 s on 2 cores: compiling the 8-device step (~45 s) and running it on 8 virtual devices (~5 s a step)."""
    import shutil

    assert jax.device_count() >= 8, "tests/conftest.py sets 8 virtual CPU devices"
    sharded = ("mesh=data=2,fsdp=4", "sharding_threshold=1024")
    single = run_training(micro_settings(workspace, tmp_path / "single", "steps=3"))  # checkpoints at 2 and 3
    events = Events()
    multi = run_training(micro_settings(workspace, tmp_path / "multi", "steps=2", *sharded), logger=events)
    np.testing.assert_allclose(losses(multi), losses(single)[:2], rtol=2e-5)
    # Parameters above the threshold were split over fsdp: the most loaded device holds well under the total.
    (summary,) = [m for m in events.messages if m.startswith("parameter bytes")]
    total, per_device = (int(v) for v in re.findall(r"(\d+) ", summary)[:2])
    assert per_device < 0.5 * total, summary
    # The one-device checkpoint of step 2 resumes on the 8-device mesh and takes step 3 as the one device did.
    shutil.copytree(single.checkpoint_dir / "2", tmp_path / "moved" / "checkpoints" / "2")
    events = Events()
    resumed = run_training(micro_settings(workspace, tmp_path / "moved", "steps=3", *sharded), logger=events)
    assert any(m.startswith("resumed from step 2") for m in events.messages)
    np.testing.assert_allclose(losses(resumed), losses(single)[2:], rtol=2e-5)


# --- the single-frame models: IF-II-L's first-frame UNet and SR2's VAE ---------------------------------------------


def test_first_frame_stage_trains_if2_and_exports_the_folders_the_pipeline_samples_from(workspace, tmp_path):
    """IF-II-L from scratch (configs/train_first_frame.yaml, a micro 2D UNet), 3 steps; the exported unet/,
    scheduler/ and image_noising_scheduler/ are then loaded and sampled exactly as the pipeline's sr1 stage does."""
    from show1_jax import stages
    from show1_jax.generate_settings import Weights
    from show1_jax.pipeline import Show1Pipeline

    settings = load_settings(
        TrainSettings,
        REPO / "configs" / "train_first_frame.yaml",
        [
            f"workdir={tmp_path / 'ff'}",
            "steps=3",
            "log_every=1",
            "mesh=data=1,fsdp=1",
            "model.pretrained=null",
            f"model.config={workspace / 'micro_if2.json'}",
            "model.remat=false",
            f"data.source={workspace / 'clips'}",
            f"data.build_dir={workspace / 'built'}",
            f"data.embeddings={workspace / 'embeddings.npz'}",
            *DATA_OVERRIDES,
            "optim.learning_rate=0.001",
            "optim.warmup_steps=0",
            "optim.ema_decay=null",
            "checkpoint.every=100",
        ],
    )
    result = run_training(settings)
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite([r["loss"], r["mse"], r["vlb"]]).all() for r in rows)
    repo = result.model_dir.parent  # the IF-II-L repository layout
    assert result.model_dir == repo / "unet"
    assert {"unet", "scheduler", "image_noising_scheduler"} <= {p.name for p in repo.iterdir()}
    unet = load_component(result.model_dir)
    assert isinstance(unet, UNet2DConditionModel) and unet.config == MICRO_IF2
    assert load_scheduler_config(repo / "scheduler").variance_type == "learned_range"
    # What Show1Pipeline.run_stage("sr1") does for the first frame, on a 4x6 frame (the 16x24 training size / 4).
    pipe = Show1Pipeline(Weights(first_frame=str(repo)), dtype=jnp.float32)
    graphdef, params = pipe.model("first_frame")
    text = jnp.asarray(np.random.default_rng(0).normal(size=(2, TEXT_LEN, TEXT_DIM)), jnp.float32)  # [neg; pos]
    low = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 3)), jnp.float32)
    first = stages.first_frame_sr(
        stages.unet_denoiser(graphdef),
        params,
        pipe.scheduler("first_frame", 2),
        pipe.noising_table("first_frame"),
        text,
        low,
        height=16,
        width=24,
        guidance_scale=4.0,
        noise_level=150,
        key=jax.random.key(0),
    )
    assert first.shape == (1, 16, 24, 3) and bool(jnp.isfinite(first).all())


def test_vae_stage_learns_fits_its_scaling_factor_and_feeds_sr2(workspace, tmp_path, capsys):
    """``show1 train configs/train_vae.yaml`` on a micro VAE: 30 steps at lr 2e-3 cut the L1 reconstruction error
    (measured: mean of the last 5 steps 0.106, 0.13x the first 5); the exported vae/ loads, reconstructs better than
    its seeded initialisation, carries scaling_factor = 1 / std of its latents, and is the VAE SR2's trainer uses."""
    from flax import nnx

    from show1_jax.train import ModelView, encode_latents, main

    workdir = tmp_path / "vae"
    overrides = [
        f"workdir={workdir}",
        "steps=30",
        "log_every=1",
        "mesh=data=1,fsdp=1",
        f"model.config={workspace / 'micro_vae.json'}",
        f"data.source={workspace / 'clips'}",
        f"data.build_dir={workspace / 'built'}",
        *DATA_OVERRIDES,
        "optim.learning_rate=0.002",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "checkpoint.every=100",
    ]
    assert main([str(REPO / "configs" / "train_vae.yaml"), *overrides]) == 0
    out = capsys.readouterr()
    assert "step 30: " in out.out and "rec=" in out.out and "kl=" in out.out and "scaling_factor" in out.out
    assert "30/30" in out.err  # the progress bar
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rec = np.array([r["rec"] for r in rows])
    assert len(rows) == 30 and np.isfinite([[r["loss"], r["rec"], r["kl"]] for r in rows]).all()
    assert rec[-5:].mean() < 0.5 * rec[:5].mean(), rec

    vae = load_component(workdir / "vae")
    assert isinstance(vae, AutoencoderKL)
    scaling = vae.config.scaling_factor
    assert vae.config == dataclasses.replace(MICRO_VAE, scaling_factor=scaling) and scaling != MICRO_VAE.scaling_factor
    # The first training batch (every frame), as the export saw it: the scaled latents have unit variance.
    from show1_jax.data import VideoTextData

    data = VideoTextData(workspace / "built")
    video = jnp.asarray(next(data.batches(2, seed=0))["video"], jnp.float32) / 127.5 - 1.0  # [2, 4, 16, 24, 3]
    frames = video.reshape(-1, 16, 24, 3)
    graphdef, trained = nnx.split(vae)
    _, initial = nnx.split(random_model(AutoencoderKL, MICRO_VAE, seed=0))

    @jax.jit
    def stats(params):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(frames)
        recon = model.decode(mean)  # [8, 16, 24, 3]
        second = jnp.mean(jnp.square(mean) + jnp.exp(logvar))  # E[z^2] of a posterior sample
        return jnp.mean(jnp.abs(recon - frames)), jnp.sqrt(second - jnp.square(jnp.mean(mean)))

    (err, std), (err0, _) = stats(trained), stats(initial)
    assert float(err) < 0.5 * float(err0), (float(err), float(err0))
    np.testing.assert_allclose(1.0 / scaling, float(std), rtol=0.05)
    # SR2 takes the folder as model.vae: build_vae loads it, and its training latents are ~unit variance.
    sr2_vae = build_vae(ModelSettings(config="tiny_sr2", vae=str(workdir / "vae")))
    view, params = ModelView.split(sr2_vae)
    latents = encode_latents(view, params, video, jax.random.key(0))
    assert latents.shape == (2, 4, 8, 12, 4)
    assert 0.8 < float(jnp.std(latents)) < 1.25


def test_vae_decoder_finetune_on_degraded_inputs_keeps_the_latent_space(workspace, tmp_path):
    """``optim.trainable=decoder`` with ``vae.degrade_prob``: the encoder (and so every latent) is bitwise what it
    was, the decoder trains; the config's scaling factor is kept (``fit_scaling_factor=false``)."""
    workdir = tmp_path / "restore"
    overrides = [
        "stage=vae",
        f"workdir={workdir}",
        "steps=3",
        "mesh=data=1,fsdp=1",
        f"model.config={workspace / 'micro_vae.json'}",
        f"data.source={workspace / 'clips'}",
        f"data.build_dir={workspace / 'built'}",
        *DATA_OVERRIDES,
        "optim.trainable=decoder",
        "optim.learning_rate=0.002",
        "vae.fit_scaling_factor=false",
        "vae.degrade_prob=1.0",
        "vae.degrade_blur=1.5",
        "checkpoint.every=100",
    ]
    result = run_training(load_settings(TrainSettings, None, overrides))
    before = flat_params(random_model(AutoencoderKL, MICRO_VAE, seed=0))
    after = load_component(result.model_dir)
    assert after.config == MICRO_VAE
    after = flat_params(after)
    decoder = [k for k in before if is_trainable(k, "decoder")]
    assert decoder and all(k.startswith(("decoder.", "post_quant_conv.")) for k in decoder)
    assert any(k.startswith("encoder.") for k in before) and any(k.startswith("quant_conv.") for k in before)
    for key, value in before.items():
        if key not in decoder:
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=key)
    assert sum(not np.array_equal(after[k], before[k]) for k in decoder) > len(decoder) // 2
    # A UNet has no decoder to train: the error says so.
    with pytest.raises(ValueError, match=r"optim.trainable=decoder selects no parameter.*use `all`"):
        run_training(micro_settings(workspace, tmp_path / "unet", "optim.trainable=decoder", "steps=1"))


def test_degrade_images_resizes_and_blurs_as_configured():
    from show1_jax.train import degrade_images, gaussian_blur
    from show1_jax.train_settings import VAESettings

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (4, 16, 24, 3)), jnp.float32)
    key = jax.random.key(3)
    # Probability 0, or nothing to do: the images come back unchanged.
    for settings in (VAESettings(degrade_prob=0.0, degrade_blur=2.0), VAESettings(degrade_prob=1.0, degrade_factor=1)):
        np.testing.assert_array_equal(np.asarray(degrade_images(images, key, settings)), np.asarray(images))
    # x2 down and back: a smooth image survives, a checkerboard (Nyquist) is averaged away to its mean.
    yy, xx = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
    smooth = jnp.asarray(np.broadcast_to((0.5 * np.sin(xx / 6.0))[None, ..., None], (1, 16, 24, 3)), jnp.float32)
    checker = jnp.asarray(np.broadcast_to((((yy + xx) % 2) - 0.5)[None, ..., None], (1, 16, 24, 3)), jnp.float32)
    halve = VAESettings(degrade_prob=1.0, degrade_factor=2)
    assert float(jnp.max(jnp.abs(degrade_images(smooth, key, halve) - smooth))) < 0.05
    assert float(jnp.max(jnp.abs(degrade_images(checker, key, halve)[:, 2:-2, 2:-2]))) < 0.05
    # The blur: an impulse spreads with the requested standard deviation and keeps its mass; sigma 0 is identity.
    impulse = jnp.zeros((2, 21, 21, 1)).at[:, 10, 10].set(1.0)
    blurred = np.asarray(gaussian_blur(impulse, jnp.asarray([0.0, 1.5])))
    np.testing.assert_allclose(blurred[0], np.asarray(impulse[0]), atol=1e-6)
    profile = blurred[1, 10, :, 0] / blurred[1, 10, :, 0].sum()
    offsets = np.arange(21) - 10
    np.testing.assert_allclose(np.sqrt((profile * offsets**2).sum()), 1.5, rtol=0.02)
    np.testing.assert_allclose(blurred[1].sum(), 1.0, rtol=1e-5)
    # degrade_prob 0.5 over many images: about half change.
    many = jnp.asarray(rng.uniform(-1, 1, (64, 8, 8, 3)), jnp.float32)
    changed = np.asarray(jnp.any(degrade_images(many, key, VAESettings(degrade_prob=0.5, degrade_blur=1.0)) != many,
                                 axis=(1, 2, 3)))  # fmt: skip
    assert 20 <= changed.sum() <= 44, changed.sum()
    # Desaturation keeps the BT.601 luma and scales the chroma: factor 1 is identity, 0 grey, 0.5 half-way.
    from show1_jax.train import desaturate

    colours = jnp.asarray(rng.uniform(-1, 1, (3, 2, 2, 3)), jnp.float32)
    out = np.asarray(desaturate(colours, jnp.asarray([1.0, 0.0, 0.5])))
    luma = np.asarray(colours) @ np.asarray([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out[0], np.asarray(colours[0]), atol=1e-6)
    np.testing.assert_allclose(out[1], np.repeat(luma[1][..., None], 3, -1), atol=1e-6)
    np.testing.assert_allclose(
        out[2] - luma[2][..., None], 0.5 * (np.asarray(colours[2]) - luma[2][..., None]), atol=1e-6
    )
    np.testing.assert_allclose(out @ np.asarray([0.299, 0.587, 0.114]), luma, atol=1e-6)
    # In degrade_images, with nothing else configured: each image's chroma scaled by one factor in [1 - s, 1].
    green = jnp.broadcast_to(jnp.asarray([-0.76, 0.57, -0.69]), (256, 4, 4, 3))
    dull = np.asarray(
        degrade_images(green, key, VAESettings(degrade_prob=1.0, degrade_factor=1, degrade_saturation=0.4))
    )
    green_luma = float(np.asarray([-0.76, 0.57, -0.69]) @ np.asarray([0.299, 0.587, 0.114]))
    factors = (dull[:, 0, 0, 1] - green_luma) / (0.57 - green_luma)
    np.testing.assert_allclose(dull - dull[:, :1, :1], 0.0, atol=1e-6)  # one factor per image
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.0 + 1e-5 and factors.max() - factors.min() > 0.3
    # Probability, resizing and blur draw the same numbers as without desaturation (a run's other draws are kept).
    blurry = VAESettings(degrade_prob=0.5, degrade_blur=1.0)
    both = VAESettings(degrade_prob=0.5, degrade_blur=1.0, degrade_saturation=0.3)
    grey = jnp.broadcast_to(jnp.mean(many, axis=-1, keepdims=True), many.shape)
    np.testing.assert_allclose(degrade_images(grey, key, both), degrade_images(grey, key, blurry), atol=1e-6)


def test_single_frame_stages_refuse_models_and_settings_that_do_not_fit(workspace, tmp_path):
    from show1_jax.settings import SettingsError

    def json_config(name: str, class_name: str, config) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"_class_name": class_name, **config_to_dict(config)}))
        return str(path)

    wrong = [
        ("first_frame", "tiny_sr1", r"2D UNet .*3D UNet with temporal layers.*model.config=tiny_if2"),
        ("first_frame", str(workspace / "micro.json"), r"first_frame trains IF-II-L's 2D UNet"),
        ("sr1", "tiny_if2", r"2D UNet2DConditionModel.*stage=first_frame"),
        ("vae", "tiny_base", r"stage vae trains an AutoencoderKL.*model.config=tiny_vae"),
        ("sr2", "tiny_vae", r"stage sr2 trains a UNet.*stage=vae"),
        ("vae", json_config("vae4", "AutoencoderKL", dataclasses.replace(MICRO_VAE, in_channels=4)), r"RGB.*=4"),
        (
            "first_frame",
            json_config("if2_out3", "UNet2DConditionModel", dataclasses.replace(MICRO_IF2, out_channels=3)),
            r"6 output channels.*out_channels=3",
        ),
        (
            "first_frame",
            json_config("if2_in4", "UNet2DConditionModel", dataclasses.replace(MICRO_IF2, in_channels=4)),
            r"6 input channels but this UNet takes 4",
        ),
    ]
    for stage, config, match in wrong:
        with pytest.raises(ValueError, match=match):
            build_model(ModelSettings(config=config), stage)
    assert isinstance(build_model(ModelSettings(config="tiny_if2"), "first_frame"), UNet2DConditionModel)
    assert isinstance(build_model(ModelSettings(config="tiny_vae"), "vae"), AutoencoderKL)

    bad_settings = [
        (["stage=vae", "vae.kl_weight=-1.0"], r"vae.kl_weight must be >= 0"),
        (["stage=vae", "vae.reconstruction_loss=l2"], r"choose one of \('l1', 'mse'\)"),
        (["stage=vae", "vae.degrade_prob=1.5"], r"vae.degrade_prob is a probability"),
        (["stage=vae", "vae.degrade_factor=0"], r"vae.degrade_factor must be >= 1"),
        (["stage=vae", "vae.degrade_blur=-1"], r"vae.degrade_blur is a standard deviation"),
        (["stage=vae", "vae.degrade_saturation=1.5"], r"vae.degrade_saturation is the largest fraction"),
        (["optim.trainable=encoder"], r"choose one of \('all', 'temporal', 'temporal_attention', 'decoder'\)"),
        (["stage=vae", "model.vae=tiny"], r"model.vae is SR2's frozen VAE"),
        (["stage=first_frame", "first_frame.low_res_factor=0"], r"first_frame.low_res_factor must be >= 1"),
        (["stage=first_frame", "diffusion.num_frames=4"], r"single frames.*diffusion.num_frames=null"),
    ]
    for overrides, match in bad_settings:
        with pytest.raises(SettingsError, match=match):
            load_settings(TrainSettings, None, overrides)
    # Frames the model cannot take stop the run before anything compiles, naming the fix.
    with pytest.raises(TrainDataError, match=r"16x24 are not divisible by first_frame.low_res_factor=5"):
        run_training(
            micro_settings(
                workspace,
                tmp_path / "ff5",
                "stage=first_frame",
                "model.config=tiny_if2",
                "first_frame.low_res_factor=5",
            )
        )
    blocks = 5  # downsampling factor 16
    vae16 = dataclasses.replace(
        MICRO_VAE,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(16,) * blocks,
    )
    with pytest.raises(TrainDataError, match=r"downsamples by 16 but .* 16x24 frames"):
        run_training(
            micro_settings(
                workspace,
                tmp_path / "vae16",
                "stage=vae",
                f"model.config={json_config('vae16', 'AutoencoderKL', vae16)}",
            )
        )


def test_a_changed_prediction_type_is_what_the_exported_scheduler_says(workspace, tmp_path):
    """diffusion.prediction_type overrides the schedule's; the scheduler written beside the UNet must say so, or the
    pipeline would read a v-prediction model's output as noise."""
    from show1_jax.train import build_objective

    plain, _, schedulers, _ = build_objective(micro_settings(workspace, tmp_path / "a"), None)
    assert plain.prediction_type == schedulers["scheduler"].prediction_type == "epsilon"
    settings = micro_settings(workspace, tmp_path / "b", "diffusion.prediction_type=v_prediction")
    objective, _, schedulers, _ = build_objective(settings, None)
    assert objective.prediction_type == schedulers["scheduler"].prediction_type == "v_prediction"


def test_batch_groups_reach_the_trainers_iterator(workspace, tmp_path):
    """data.batch_group_size is checked against the batch size when read and against the row count (8 clips) by the
    trainer's iterator, before anything compiles."""
    with pytest.raises(ValueError, match="batch_group_size 3 must be >= 1 and divide data.batch_size 2"):
        micro_settings(workspace, tmp_path / "a", "data.batch_group_size=3")
    settings = micro_settings(workspace, tmp_path / "b", "data.batch_size=3", "data.batch_group_size=3")
    with pytest.raises(ValueError, match="group_size 3 must .* number of examples 8: write the caption CSV in whole"):
        run_training(settings)


def test_config_overrides_reach_a_fresh_model_and_name_unknown_fields():
    coded = ModelSettings(config="tiny_base", config_overrides={"temporal_position_embedding": "sinusoidal"})
    assert build_model(coded).config.temporal_position_embedding == "sinusoidal"
    with pytest.raises(ValueError, match=r"\['frame_code'\] are not fields of model.config=tiny_base's model"):
        build_model(ModelSettings(config="tiny_base", config_overrides={"frame_code": 1}))


def test_frame_noise_correlation_trains_keyframes_only(workspace, tmp_path, monkeypatch):
    """diffusion.frame_noise_correlation reaches the train step's noise draw; other stages and values outside [0, 1)
    are refused with the setting named."""
    from show1_jax import train
    from show1_jax.train import build_objective

    with pytest.raises(ValueError, match=r"frame_noise_correlation must be in \[0, 1\)"):
        micro_settings(workspace, tmp_path / "a", "diffusion.frame_noise_correlation=1.0")
    settings = micro_settings(workspace, tmp_path / "b", "diffusion.frame_noise_correlation=0.5")
    assert build_objective(settings, 4)[0].frame_noise_correlation == 0.5
    interp = micro_settings(workspace, tmp_path / "c", "stage=interpolation", "diffusion.frame_noise_correlation=0.5")
    with pytest.raises(ValueError, match="for stage keyframes .* not interpolation: set it to 0"):
        build_objective(interp, 5)

    class Drawn(Exception):
        pass

    def record(key, shape, dtype, correlation):
        raise Drawn(tuple(shape), correlation)

    monkeypatch.setattr(train, "frame_correlated_noise", record)
    with pytest.raises(Drawn) as drawn:
        run_training(settings)
    assert drawn.value.args == ((2, 4, 16, 24, 3), 0.5)
