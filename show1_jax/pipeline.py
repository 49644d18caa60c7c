"""The Show-1 cascade for users: text -> keyframes -> interpolation -> SR1 -> SR2 (SPEC.md §3).

``Show1Pipeline`` holds the component folders (released or converted) and loads each model when a stage needs it,
stage by stage, so peak memory is one stage's models. Its call runs the requested stages with the stage functions
of :mod:`show1_jax.stages` and returns every stage's frames as arrays. ``generate`` adds what the command line
needs: per-stage results on disk, ``resume``, videos, the settings and seed next to every output, and a report.

Randomness: stage s draws from ``fold_in(key(seed), s)``, so rerunning a later stage (``resume``) reproduces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax import stages
from show1_jax.generate_settings import STAGES, GenerateSettings, Weights, interpolated_frames
from show1_jax.layers import set_attention_chunk
from show1_jax.loading import load_component
from show1_jax.schedulers import img2img_t_start, load_scheduler_config, make_schedule, noise_tables
from show1_jax.settings import to_mapping
from show1_jax.text import EmbeddingCache, TextEncoder, encode_prompts

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass
class StageReport:
    """What one stage cost: wall time, time spent compiling, peak device memory (None where not reported)."""

    stage: str
    wall_s: float
    compile_s: float
    peak_bytes: int | None
    output_shape: tuple[int, ...]


class _CompileTimer:
    """Sums XLA compile durations reported through ``jax.monitoring`` while active."""

    EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")

    def __init__(self):
        self.total = 0.0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event in self.EVENTS:
            self.total += duration

    @contextlib.contextmanager
    def measure(self):
        self.total, self.active = 0.0, True
        try:
            yield self
        finally:
            self.active = False


_COMPILE_TIMER: _CompileTimer | None = None


def _guided(text: jax.Array, guidance_scale: float | None) -> jax.Array:
    """The stage's text batch: the CFG batch [negative; positive], or only the prompts' half when guidance is None
    (no classifier-free guidance: one UNet pass per step instead of two)."""
    return text if guidance_scale is not None else jnp.split(text, 2, axis=0)[1]


def _steps_run(schedule: Any, strength: float) -> int:
    """Denoising steps a stage runs: all of them, or the img2img tail below strength 1."""
    return len(schedule) if strength == 1.0 else len(schedule.skip(img2img_t_start(len(schedule), strength)))


def _progress_scope(progress: Any, steps: int, windows: int | None = None):
    """``stages.progress_scope`` when there is a progress sink, else no token (no callbacks compiled in)."""
    if progress is None:
        return contextlib.nullcontext(None)
    if hasattr(progress, "reset"):  # a tqdm bar learns its total here
        progress.reset(total=steps * (windows or 1))
    return stages.progress_scope(progress, steps, windows)


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


class Show1Pipeline:
    """The four-stage cascade over component folders.

    Args:
      weights: the repository folders (see :class:`show1_jax.generate_settings.Weights`).
      dtype: parameter and compute dtype of every model.
      keep_loaded: keep models in memory between calls (default: free each stage's models after it ran).
      cache_dir: an embedding cache folder: prompts encoded once are not encoded (nor T5 loaded) again.
      sharding: ``(param_path, shape) -> Sharding`` placing parameters (see ``show1_jax.sharding``).
      attention_chunk: at most this many attention logits at once (exact; None: unbounded).
    """

    def __init__(
        self,
        weights: Weights,
        *,
        dtype=jnp.bfloat16,
        keep_loaded: bool = False,
        cache_dir: str | Path | None = None,
        sharding: Callable | None = None,
        attention_chunk: int | None = 2**27,
    ):
        self.weights, self.dtype, self.keep_loaded, self.sharding = weights, dtype, keep_loaded, sharding
        self.attention_chunk = attention_chunk
        self.cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
        self._models: dict[Path, tuple[nnx.GraphDef, Any]] = {}
        self._encoders: dict[Path, TextEncoder] = {}

    @classmethod
    def from_pretrained(cls, weights: Weights | dict[str, str], **kwargs: Any) -> Show1Pipeline:
        """Build from repository folders; checks that each one exists before anything is loaded."""
        if isinstance(weights, dict):
            weights = Weights(**weights)
        return cls(weights, **kwargs)

    # -- components ----------------------------------------------------------------------------------------------

    def folder(self, repo: str, *parts: str) -> Path:
        path = Path(getattr(self.weights, repo)).joinpath(*parts)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: set weights.{repo} to the downloaded (or converted) {repo} folder"
            )
        return path

    def model(self, repo: str, component: str = "unet") -> tuple[nnx.GraphDef, Any]:
        """(graphdef, params) of one component, loaded on first use."""
        path = self.folder(repo, component)
        if path not in self._models:
            model = load_component(path, dtype=self.dtype, variant=self.weights.variant, sharding=self.sharding)
            # Exact blocked attention: bounds SR2's 3.1e10 spatial-attention logits (docs/scaling.md).
            set_attention_chunk(model, self.attention_chunk)
            self._models[path] = nnx.split(model)
        return self._models[path]

    NEEDS = {
        "keyframes": [("base", "unet"), ("base", "scheduler"), ("base", "text_encoder"), ("base", "tokenizer")],
        "interpolation": [("interpolation", "unet"), ("interpolation", "scheduler"), ("base", "text_encoder")],
        "sr1": [("first_frame", "unet"), ("first_frame", "scheduler"), ("first_frame", "image_noising_scheduler"),
                ("sr1", "unet"), ("sr1", "scheduler"), ("sr1", "image_noising_scheduler"), ("base", "text_encoder")],
        "sr2": [("sr2", "unet"), ("sr2", "vae"), ("sr2", "text_encoder"), ("sr2", "tokenizer"), ("sr2", "scheduler")],
    }  # fmt: skip

    def check_folders(self, stages_to_run: Sequence[str]) -> None:
        """Fail early, naming the setting to fix, if a folder a stage needs is missing."""
        for stage in stages_to_run:
            for repo, component in self.NEEDS[stage]:
                self.folder(repo, component)

    def scheduler(self, repo: str, steps: int, name: str = "scheduler"):
        return make_schedule(load_scheduler_config(self.folder(repo, name)), steps)

    def noising_table(self, repo: str) -> jax.Array:
        return jnp.asarray(
            noise_tables(load_scheduler_config(self.folder(repo, "image_noising_scheduler"))).alphas_cumprod
        )

    def release(self) -> None:
        """Free every loaded model."""
        self._models.clear()
        for enc in self._encoders.values():
            enc.release()

    def _text_encoder(self, repo: str) -> TextEncoder:
        path = self.folder(repo, "text_encoder")
        if path not in self._encoders:
            self._encoders[path] = TextEncoder(path, self.folder(repo, "tokenizer"), dtype=self.dtype,
                                               variant=self.weights.variant)  # fmt: skip
        return self._encoders[path]

    def encode_t5(self, prompts: Sequence[str], negative_prompt: str) -> jax.Array:
        """The pixel stages' CFG text batch [2B, 77, D] = [negative; positive] (SPEC.md §3.2)."""
        emb = encode_prompts(self._text_encoder("base"), list(prompts), negative_prompt, cache=self.cache)
        return stages.cfg_text(jnp.asarray(emb.negative_prompt_embeds), jnp.asarray(emb.prompt_embeds))

    def encode_clip(self, prompts: Sequence[str], negative_prompt: str) -> jax.Array:
        """SR2's CFG text batch from the raw prompts (SPEC.md §3.6)."""
        emb = encode_prompts(self._text_encoder("sr2"), list(prompts), negative_prompt, cache=self.cache)
        return stages.cfg_text(jnp.asarray(emb.negative_prompt_embeds), jnp.asarray(emb.prompt_embeds))

    # -- stages -------------------------------------------------------------------------------------------------

    def run_stage(
        self,
        stage: str,
        previous: np.ndarray | None,
        prompts: Sequence[str],
        settings: GenerateSettings,
        *,
        progress: Any = None,
    ) -> np.ndarray:
        """Run one stage on the previous stage's frames (None for keyframes); returns float frames [B, F, H, W, 3]."""
        key = jax.random.fold_in(jax.random.key(settings.seed), STAGES.index(stage))
        dtype = self.dtype
        if stage in ("keyframes", "interpolation", "sr1"):
            text = self.encode_t5(prompts, settings.negative_prompt).astype(dtype)
        if stage == "keyframes":
            s = settings.keyframes
            graphdef, params = self.model("base")
            schedule = self.scheduler("base", s.steps)
            dropout_key = jax.random.fold_in(key, 1) if s.train_mode_dropout else None
            with _progress_scope(progress, len(schedule)) as token:
                out = stages.keyframes(stages.unet_denoiser(graphdef), params, schedule,
                                       _guided(text, s.guidance_scale), guidance_scale=s.guidance_scale, key=key,
                                       dtype=dtype,
                                       shape=(s.num_frames, s.height, s.width), dropout_key=dropout_key,
                                       progress_token=token,
                                       frame_noise_correlation=s.frame_noise_correlation)  # fmt: skip
                out = np.asarray(out.astype(jnp.float32))
            self._done_with("base")
            return out
        if previous is None:
            raise ValueError(f"stage {stage} needs the previous stage's frames")
        frames = jnp.asarray(previous, dtype)
        if stage == "interpolation":
            s = settings.interpolation
            graphdef, params = self.model("interpolation")
            schedule = self.scheduler("interpolation", s.steps)
            windows = None if s.batched else frames.shape[1] - 1
            with _progress_scope(progress, _steps_run(schedule, s.strength), windows) as token:
                out = stages.interpolate(stages.unet_denoiser(graphdef), params, schedule,
                                         _guided(text, s.guidance_scale), frames,
                                         guidance_scale=s.guidance_scale, key=key, batched=s.batched, dtype=dtype,
                                         progress_token=token, strength=s.strength)  # fmt: skip
                out = np.asarray(out.astype(jnp.float32))
            self._done_with("interpolation")
            return out
        if stage == "sr1":
            s, ff = settings.sr1, settings.first_frame
            graphdef, params = self.model("first_frame")
            schedule = self.scheduler("first_frame", ff.steps)
            with _progress_scope(progress, _steps_run(schedule, ff.strength)) as token:
                first = stages.first_frame_sr(stages.unet_denoiser(graphdef), params, schedule,
                                              self.noising_table("first_frame"), _guided(text, ff.guidance_scale),
                                              frames[:, 0],
                                              height=s.height, width=s.width, guidance_scale=ff.guidance_scale,
                                              noise_level=ff.noise_level, key=jax.random.fold_in(key, 1),
                                              dtype=dtype, progress_token=token, strength=ff.strength)  # fmt: skip
                first = jax.block_until_ready(first)
            self._done_with("first_frame")
            graphdef, params = self.model("sr1")
            schedule = self.scheduler("sr1", s.steps)
            n_windows = (frames.shape[1] - s.window) // s.stride + 1
            with _progress_scope(progress, _steps_run(schedule, s.strength), n_windows) as token:
                out = stages.super_resolve_sr1(stages.unet_denoiser(graphdef), params, schedule,
                                               self.noising_table("sr1"), _guided(text, s.guidance_scale), frames,
                                               first,
                                               guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                                               window_size=s.window, stride=s.stride, key=jax.random.fold_in(key, 2),
                                               dtype=dtype, progress_token=token, strength=s.strength)  # fmt: skip
                out = np.asarray(out.astype(jnp.float32))
            self._done_with("sr1")
            return out
        if stage == "sr2":
            s = settings.sr2
            text = self.encode_clip(prompts, s.negative_prompt).astype(dtype)
            # tensor2vid, then PIL bicubic to the output size on the host, as run_inference.py (SPEC.md §3.6).
            uint8 = stages.resize_frames_bicubic(stages.video_to_uint8(previous), (s.height, s.width))
            graphdef, params = self.model("sr2")
            vae_graphdef, vae_params = self.model("sr2", "vae")
            schedule = self.scheduler("sr2", s.steps)
            with _progress_scope(progress, _steps_run(schedule, s.strength)) as token:
                out = stages.video_to_video_sr2(stages.unet_denoiser(graphdef), params, vae_graphdef, vae_params,
                                                schedule, _guided(text, s.guidance_scale), jnp.asarray(uint8),
                                                guidance_scale=s.guidance_scale,
                                                strength=s.strength, key=key, frames_per_chunk=s.decode_chunk,
                                                dtype=dtype, progress_token=token)  # fmt: skip
                out = np.asarray(out.astype(jnp.float32))
            self._done_with("sr2")
            self._done_with("sr2", "vae")
            return out
        raise ValueError(f"unknown stage `{stage}`; the stages are {list(STAGES)}")

    def _done_with(self, repo: str, component: str = "unet") -> None:
        if not self.keep_loaded:
            self._models.pop(self.folder(repo, component), None)

    def __call__(
        self,
        prompts: str | Sequence[str],
        settings: GenerateSettings | None = None,
        *,
        progress_factory: Callable[[str], Any] | None = None,
        reports: list[StageReport] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``settings.stages`` for the prompts; returns {stage: float frames [B, F, H, W, 3]}."""
        settings = settings or GenerateSettings()
        prompts = check_prompts(prompts)
        out, previous = {}, None
        for stage in settings.stages:
            previous = self._timed(stage, previous, prompts, settings, progress_factory, reports)
            out[stage] = previous
        return out

    def _timed(self, stage, previous, prompts, settings, progress_factory, reports) -> np.ndarray:
        global _COMPILE_TIMER
        _COMPILE_TIMER = _COMPILE_TIMER or _CompileTimer()
        progress = progress_factory(stage) if progress_factory is not None else None
        t0 = time.perf_counter()
        with _COMPILE_TIMER.measure() as timer:
            try:
                result = self.run_stage(stage, previous, prompts, settings, progress=progress)
            finally:
                if progress is not None and hasattr(progress, "close"):
                    progress.close()
        if reports is not None:
            reports.append(StageReport(stage, time.perf_counter() - t0, timer.total, _peak_bytes(), result.shape))
        return result


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompt given: pass at least one prompt")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompt(s) {empty} are empty: an empty prompt is the negative prompt; write what to show")
    return prompts


# --- runs on disk: per-stage results, resume, videos ----------------------------------------------------------------

RUN_FILE = "run.json"
STAGE_DIR = "stages"


def _identity(settings: GenerateSettings, prompts: list[str]) -> dict:
    """What every stage depends on; a resume folder made with another identity cannot be continued."""
    return {"prompts": prompts, "seed": settings.seed, "negative_prompt": settings.negative_prompt,
            "dtype": settings.dtype, "weights": to_mapping(settings.weights)}  # fmt: skip


def stage_fingerprints(settings: GenerateSettings, prompts: list[str]) -> dict[str, str]:
    """A fingerprint per stage of everything its output depends on (its settings and all earlier stages')."""
    parts = {"keyframes": ["keyframes"], "interpolation": ["interpolation"], "sr1": ["first_frame", "sr1"],
             "sr2": ["sr2"]}  # fmt: skip
    acc = json.dumps(_identity(settings, prompts), sort_keys=True)
    out = {}
    for stage in STAGES:
        acc += json.dumps({p: to_mapping(getattr(settings, p)) for p in parts[stage]}, sort_keys=True)
        out[stage] = hashlib.sha256(acc.encode()).hexdigest()[:16]
    return out


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    frames: dict[str, np.ndarray]
    reused: list[str]
    reports: list[StageReport]
    files: list[Path]


def generate(
    pipeline: Show1Pipeline,
    prompts: str | Sequence[str],
    settings: GenerateSettings,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress_factory: Callable[[str], Any] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> RunResult:
    """Run the cascade into ``output_dir``: per-stage results (``stages/<stage>.npz``), videos, ``run.json``.

    With ``resume``, ``output_dir`` must hold a run of the same prompts, seed, negative prompt, dtype and weights;
    each stage whose own and earlier settings are unchanged is read back instead of recomputed, so e.g. SR2 can be
    rerun with another strength. Every file is written under a temporary name and renamed.
    """
    from show1_jax.video_io import atomic_path, to_uint8, write_gif, write_mp4, write_npz

    prompts = check_prompts(prompts)
    out = Path(output_dir)
    run_file = out / RUN_FILE
    identity = _identity(settings, prompts)
    fingerprints = stage_fingerprints(settings, prompts)
    saved: dict[str, str] = {}
    if resume:
        if not run_file.is_file():
            raise FileNotFoundError(f"{out} holds no {RUN_FILE}: nothing to resume (run without --resume)")
        previous_run = json.loads(run_file.read_text())
        if previous_run.get("identity") != identity:
            diff = sorted(k for k in identity if previous_run.get("identity", {}).get(k) != identity[k])
            raise ValueError(
                f"{out} was made with another {', '.join(diff)}: resume only continues the same run; "
                "use a new --output folder"
            )
        saved = previous_run.get("fingerprints", {})
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new --output folder, or pass --resume to continue it")
    to_run = [s for s in settings.stages if not (resume and saved.get(s) == fingerprints[s])]
    pipeline.check_folders(to_run)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {out}: {err}; choose a writable --output") from err
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out} is not writable: choose another --output")

    frames: dict[str, np.ndarray] = {}
    reused: list[str] = []
    reports: list[StageReport] = []
    files: list[Path] = []
    previous = None
    still_valid = True
    last = settings.stages[-1]
    for stage in STAGES[: STAGES.index(last) + 1]:
        stage_file = out / STAGE_DIR / f"{stage}.npz"
        can_reuse = still_valid and saved.get(stage) == fingerprints[stage] and stage_file.is_file()
        if stage not in settings.stages and not can_reuse:
            raise ValueError(
                f"stage {stage} is not requested and {out} holds no matching result of it: add it to stages, "
                "or resume a run that has it with the same settings"
            )
        if can_reuse:
            with np.load(stage_file) as data:
                previous = data["frames"]
            reused.append(stage)
            log(f"{stage}: reusing {stage_file}")
        else:
            still_valid = False
            previous = pipeline._timed(stage, previous, prompts, settings, progress_factory, reports)
            write_npz(stage_file, frames=previous)
            saved[stage] = fingerprints[stage]
            saved = {k: v for k, v in saved.items() if STAGES.index(k) <= STAGES.index(stage)}
            record = {
                "identity": identity,
                "fingerprints": saved,
                "settings": to_mapping(settings),
                "seed": settings.seed,
            }
            with atomic_path(run_file) as tmp:
                tmp.write_text(json.dumps(record, indent=2))
        frames[stage] = previous
        if stage in settings.stages:
            video = to_uint8(previous)
            fps = settings.output.fps.get(stage, 8)
            for i in range(video.shape[0]):
                stem = out / f"prompt{i:02d}_{stage}"
                if "mp4" in settings.output.formats:
                    files.append(write_mp4(stem.with_suffix(".mp4"), video[i], fps=fps))
                if "gif" in settings.output.formats:
                    files.append(write_gif(stem.with_suffix(".gif"), video[i], fps=fps))
            if settings.output.save_npz:
                files.append(write_npz(out / f"{stage}_frames.npz", frames=previous))
    report = [dataclasses.asdict(r) for r in reports]
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps({"stages": report, "reused": reused, "prompts": prompts}, indent=2))
    return RunResult(out, frames, reused, reports, files)


def expected_shapes(settings: GenerateSettings, batch: int) -> dict[str, tuple[int, ...]]:
    """Output shape of every stage under ``settings`` (for checks and for planning)."""
    k = settings.keyframes
    n = interpolated_frames(k.num_frames)
    return {
        "keyframes": (batch, k.num_frames, k.height, k.width, 3),
        "interpolation": (batch, n, k.height, k.width, 3),
        "sr1": (batch, n, settings.sr1.height, settings.sr1.width, 3),
        "sr2": (batch, n, settings.sr2.height, settings.sr2.width, 3),
    }
