"""Show-1 Shapes: a small four-stage cascade trained here on the synthetic shapes dataset (the default model).

Every model has the released architecture at the toy widths of :mod:`show1_jax.tiny` and is trained from scratch by
``show1 train`` (:func:`show1_jax.train.run_training`) on clips of :data:`DATASET` drawn from the *training* triples
of :func:`show1_jax.data.split_combinations`; the held-out triples (colour, shape and direction never seen together)
are kept for :func:`evaluate`. Sizes, chosen so that every stage trains on 2 CPU cores and the shapes stay readable
at the keyframe size (the alignment metric needs a radius of about 4 pixels, i.e. 20x32):

    T5 (tiny, random, fixed) -> 8 keyframes at 20x32 -> 29 frames -> SR1 (x2) 40x64 -> SR2 (latent, x2) 80x128

The text encoders are not trained: a fixed random tiny T5 (and CLIP for SR2) with a tokenizer trained on the
dataset's captions gives every word its own embedding, which the UNets learn to read. The recipe is
``configs/shapes/train_<run>.yaml`` (one file per training run, :data:`STAGES`); :func:`train_recipe`
(``show1 shapes train``) runs it from an empty folder and :func:`assemble` writes the five repositories in the
released layout and the converted format (float16), which :class:`show1_jax.pipeline.Show1Pipeline` loads exactly
like converted released weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from show1_jax.data.synthetic import (
    Combination,
    SyntheticConfig,
    attribute_combinations,
    caption_for,
    generate_dataset,
    split_combinations,
    write_caption_rows,
    write_direction_groups,
)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES_CONFIGS = REPO_CONFIGS / "shapes"
GENERATE_CONFIG = SHAPES_CONFIGS / "generate.yaml"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "show1-shapes"

DATASET = SyntheticConfig(
    height=80,
    width=128,
    num_frames=32,
    fps=8.0,
    speed=2,
    colours=("red", "green", "blue", "yellow", "white", "purple"),
    shapes=("circle", "square", "triangle", "cross"),
)
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLIPS = 1536

# The clip sets the runs train on (a run's `data.source` names one; rendered into the recipe's workdir on first use).
# `clips`: shapes start anywhere. The keyframe model is then moved to sets whose paths say more about the direction:
# starting near the centre (start_spread, pixels at 80x128), slower (speed 1), and finally fixed by the direction
# (start_spread 0). `clips_quad` is no new clips but a caption CSV over clips_c0 in direction groups
# (`write_direction_groups`: one colour and shape, the four directions), read with data.batch_group_size 4.
CLIP_SETS = {
    "clips": DATASET,
    "clips_c": dataclasses.replace(DATASET, start_spread=8.0),
    "clips_c1": dataclasses.replace(DATASET, start_spread=6.0, speed=1),
    "clips_c0": dataclasses.replace(DATASET, start_spread=0.0, speed=1),
}
DIRECTION_GROUP_SETS = {"clips_quad": "clips_c0"}
# `clips_splice`: clips_quad's rows, half of them captioned with a spliced embedding (`write_spliced_captions`): the
# direction word's tokens as T5 encodes them in another training caption (same direction, another colour and shape).
# Name -> (source set, probability, seed).
SPLICED_SETS = {"clips_splice": ("clips_quad", 0.5, 0)}

# The recipe's training runs in order, one configs/shapes/train_<run>.yaml each (its `stage:` is the trainer stage;
# its file says why the run is there). A finetune (FINETUNES) starts from its parent run's export (model.pretrained
# filled in): the VAE trains longer; the keyframe UNet is trained first to predict noise, switched to v-prediction
# (whose predictions stay accurate at the highest noise levels, where this small model's epsilon left a noisy
# background), then moved through the clip sets above and taught the direction word with direction groups (at high
# noise, then at all noise levels). SR2 trains in the latent space of run 2's VAE (vae_more), whose decoder alone is
# then taught to restore blurry, upsampled inputs (vae_restore) and SR1's duller colours (vae_vivid: same latent
# space, so the shipped VAE); sr2_more trains SR2's UNet on at the low noise levels it samples at.
KEYFRAME_RUNS = ("keyframes", "keyframes_v", "keyframes_long", "keyframes_c", "keyframes_c1", "keyframes_pe",
                 "keyframes_c0", "keyframes_quad", "keyframes_quad2", "keyframes_quad3",
                 "keyframes_splice", "keyframes_splice_b")  # fmt: skip
STAGES = ("vae", "vae_more", "vae_restore", "vae_vivid", *KEYFRAME_RUNS, "interpolation", "first_frame", "sr1", "sr2",
          "sr2_more")  # fmt: skip
FINETUNES = {"vae_more": "vae", "vae_restore": "vae_more", "vae_vivid": "vae_restore", "sr2_more": "sr2",
             **dict(zip(KEYFRAME_RUNS[1:], KEYFRAME_RUNS[:-1]))}  # fmt: skip
SR2_VAE_RUN = "vae_more"
# Where each shipped model comes from and goes in the released layout.
REPOS = {
    KEYFRAME_RUNS[-1]: ("show-1-base", "unet"),
    "interpolation": ("show-1-interpolation", "unet"),
    "first_frame": ("IF-II-L", "unet"),
    "sr1": ("show-1-sr1", "unet"),
    "sr2_more": ("show-1-sr2", "unet"),
    "vae_vivid": ("show-1-sr2", "vae"),
}


WEIGHT_KEYS = {"base": "show-1-base", "interpolation": "show-1-interpolation", "sr1": "show-1-sr1",
               "first_frame": "IF-II-L", "sr2": "show-1-sr2"}  # fmt: skip
SCHEDULER_FOLDERS = ("scheduler", "image_noising_scheduler")


def component(run: str) -> str:
    """The folder a run exports its model to: ``vae`` for a run of trainer stage ``vae``, else ``unet``."""
    from show1_jax.settings import read_yaml

    return "vae" if read_yaml(SHAPES_CONFIGS / f"train_{run}.yaml")["stage"] == "vae" else "unet"


def split(config: SyntheticConfig = DATASET):
    """The demo's training / held-out triples (deterministic)."""
    return split_combinations(config, held_out_fraction=HELD_OUT_FRACTION, seed=SPLIT_SEED)


def validation_combinations() -> tuple[Combination, ...]:
    """Every fourth training triple, as many as the held-out ones (19): the prompts generation settings are chosen
    on (`show1 shapes eval --split validation`), so that the held-out score is not tuned on."""
    parts = split()
    return tuple(parts.train[::4][: len(parts.held_out)])


def all_captions(config: SyntheticConfig = DATASET) -> list[str]:
    """Every caption of the vocabulary (the tokenizers are trained on these; held-out words all occur in training)."""
    return [caption_for(c, config.caption_template) for c in attribute_combinations(config)]


def write_text_encoders(root: str | Path, *, seed: int = 0, config: SyntheticConfig = DATASET) -> dict[str, Path]:
    """The fixed random tiny T5 and CLIP with tokenizers for the captions, in the released layout under ``root``.

    Returns {"t5": show-1-base/text_encoder, "clip": show-1-sr2/text_encoder}.
    """
    from show1_jax.clip import CLIPTextModel
    from show1_jax.loading import save_converted
    from show1_jax.t5 import T5EncoderModel
    from show1_jax.tiny import (
        TINY_CLIP,
        TINY_T5,
        TOKENIZER_SENTENCES,
        random_model,
        write_clip_tokenizer,
        write_t5_tokenizer,
    )

    root = Path(root)
    sentences = all_captions(config) + TOKENIZER_SENTENCES  # a few other sentences: enough pieces for 64 ids
    base, sr2 = root / "show-1-base", root / "show-1-sr2"
    if not (base / "text_encoder" / "config.json").is_file():
        save_converted(random_model(T5EncoderModel, TINY_T5, seed=seed * 100 + 2), base / "text_encoder")
    if not (base / "tokenizer").is_dir():
        write_t5_tokenizer(base / "tokenizer", sentences, vocab_size=48)  # <= TINY_T5.vocab_size; what they allow
    if not (sr2 / "text_encoder" / "config.json").is_file():
        save_converted(random_model(CLIPTextModel, TINY_CLIP, seed=seed * 100 + 8), sr2 / "text_encoder")
    if not (sr2 / "tokenizer").is_dir():
        write_clip_tokenizer(sr2 / "tokenizer", sentences)
    return {"t5": base / "text_encoder", "clip": sr2 / "text_encoder"}


def stage_settings(run: str, workdir: Path, *, steps_scale: float = 1.0, overrides: Sequence[str] = ()):
    """The :class:`~show1_jax.train_settings.TrainSettings` of one run of the recipe, paths filled in.

    ``data.source`` names a clip set (:data:`CLIP_SETS`, :data:`DIRECTION_GROUP_SETS`), found in ``workdir``;
    runs of one trainer stage on one clip set share its built dataset (``data/<stage>``, or
    ``data/<stage>_<set>`` for a set other than ``clips``); a finetune starts from its parent run's export."""
    from show1_jax.settings import load_settings, read_yaml
    from show1_jax.train_settings import TrainSettings

    path = SHAPES_CONFIGS / f"train_{run}.yaml"
    raw = read_yaml(path)  # a finetune's own file is incomplete (no model) until its parent is filled in
    stage = raw["stage"]
    clip_set = _check_clip_set(str(raw.get("data", {}).get("source", "clips")), f"{path}: data.source: ")
    text = {"sr2": workdir / "text" / "show-1-sr2" / "text_encoder", "vae": None}.get(
        stage, workdir / "text" / "show-1-base" / "text_encoder"
    )
    filled = [
        f"workdir={workdir / 'runs' / run}",
        f"data.source={workdir / clip_set}",
        f"data.build_dir={workdir / 'data' / (stage if clip_set == 'clips' else f'{stage}_{clip_set}')}",
        f"steps={max(1, round(int(raw['steps']) * steps_scale))}",
    ]
    if text is not None:
        filled.append(f"data.text_encoder={text}")
    if clip_set in SPLICED_SETS:
        filled.append(f"data.embeddings={workdir / clip_set / 'embeddings.npz'}")
    if run in FINETUNES:
        parent = FINETUNES[run]
        filled += [f"model.pretrained={workdir / 'runs' / parent / component(parent)}", "model.config=null"]
    if stage == "sr2":
        filled.append(f"model.vae={workdir / 'runs' / SR2_VAE_RUN / 'vae'}")
    return load_settings(TrainSettings, path, [*filled, *overrides])


def _check_clip_set(name: str, where: str = "") -> str:
    """``name`` if it is a clip set of the recipe, else a ValueError listing them (``where``: a message prefix)."""
    known = [*CLIP_SETS, *DIRECTION_GROUP_SETS, *SPLICED_SETS]
    if name not in known:
        raise ValueError(f"{where}unknown clip set `{name}`: choose from {sorted(known)}")
    return name


def prepare_clip_set(
    workdir: str | Path, name: str, *, num_clips: int = NUM_CLIPS, log: Callable[[str], None] = print
) -> Path:
    """``workdir/name``: clip set ``name`` rendered from the training triples (:data:`CLIP_SETS`) or grouped over
    its source set (:data:`DIRECTION_GROUP_SETS`, which is prepared first); an existing ``captions.csv`` is kept."""
    from tqdm import tqdm

    folder = Path(workdir) / name
    if (folder / "captions.csv").is_file():
        return folder
    if name in SPLICED_SETS:
        parent, probability, seed = SPLICED_SETS[name]
        source = prepare_clip_set(workdir, parent, num_clips=num_clips, log=log)
        log(f"writing {name}: {source.name} with spliced direction embeddings")
        encoder = Path(workdir) / "text" / "show-1-base" / "text_encoder"
        write_spliced_captions(source, folder, encoder, probability=probability, seed=seed)
        return folder
    if name in DIRECTION_GROUP_SETS:
        source = prepare_clip_set(workdir, DIRECTION_GROUP_SETS[name], num_clips=num_clips, log=log)
        log(f"writing {name}: {source.name} in direction groups")
        write_direction_groups(source, folder)
        return folder
    _check_clip_set(name)
    log(f"rendering {num_clips} training clips of {len(split().train)} triples into {folder}")
    with tqdm(total=num_clips, desc=name, unit="clip") as bar:
        generate_dataset(folder, num_clips, CLIP_SETS[name], combinations=split().train, seed=0, progress=bar)
    return folder


def direction_token_count(tokenizer: Any, caption: str, direction: str) -> int:
    """How many of ``caption``'s tokens (EOS excluded) spell its last word ``direction``: the caption's tokens are
    those of the caption without it, then these (a ValueError if the tokenizer merges across the space)."""
    from show1_jax.text import tokenize_t5

    if not caption.endswith(" " + direction):
        raise ValueError(f"caption {caption!r} does not end with its direction {direction!r}")
    full, stem = (tokenize_t5(tokenizer, t) for t in (caption, caption[: -len(direction) - 1]))
    n_full, n_stem = int(np.sum(full.attention_mask)), int(np.sum(stem.attention_mask))
    if list(np.asarray(full.input_ids)[0, : n_stem - 1]) != list(np.asarray(stem.input_ids)[0, : n_stem - 1]):
        raise ValueError(f"the tokenizer does not keep {caption!r}'s direction word in tokens of its own")
    return n_full - n_stem


def write_spliced_captions(
    source: str | Path, out_dir: str | Path, text_encoder: str | Path, *, probability: float = 0.5, seed: int = 0
) -> Path:
    """``source``'s caption CSV with some captions' direction tokens taken from another caption: a contrast for the
    direction word that held-out prompts need.

    T5 encodes the direction word in the context of the colour and shape before it, so a held-out triple's direction
    tokens are ones the keyframe UNet never saw; it read them as the nearest training caption's (same colour and
    shape, another direction). With ``probability``, a row's caption becomes a key ``"<caption> | <donor>"`` whose
    embedding is the caption's with its direction tokens replaced by those of a training caption with the same
    direction and another (colour, shape), written to ``out_dir/embeddings.npz`` (``data.embeddings``). Rows keep
    their order (direction groups stay whole); videos stay where they are.

    Returns:
      the written ``captions.csv``.
    """
    import csv
    import random

    from show1_jax.data import save_caption_embeddings
    from show1_jax.text import TextEncoder

    source, out_dir = Path(source), Path(out_dir)
    with open(source / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = split().train
    captions = {c: caption_for(c, DATASET.caption_template) for c in train}
    encoder = TextEncoder(text_encoder)
    embeds = dict(zip(captions.values(), encoder.encode(list(captions.values()))))
    lengths = {t: int(np.sum(encoder.tokenize(t).attention_mask)) for t in captions.values()}  # EOS included
    spans = {t: direction_token_count(encoder.tokenizer, t, c.direction) for c, t in captions.items()}
    rng = random.Random(seed)
    table: dict[str, np.ndarray] = {}
    for row in rows:
        if rng.random() >= probability:
            continue
        direction = row["direction"]
        donors = [c for c in train if c.direction == direction and (c.colour, c.shape) != (row["colour"], row["shape"])]
        donor = captions[rng.choice(donors)]
        own = row["caption"]
        if own not in embeds:
            raise ValueError(f"{source}: caption {own!r} is not a training caption of the recipe")
        n = spans[own]
        spliced = embeds[own].copy()
        spliced[lengths[own] - 1 - n : lengths[own] - 1] = embeds[donor][lengths[donor] - 1 - n : lengths[donor] - 1]
        key = f"{own} | {donor}"
        table[key] = spliced
        row["caption"] = key
    save_caption_embeddings(out_dir / "embeddings.npz", table)
    return write_caption_rows(source, out_dir, rows)  # last: an existing captions.csv means the set is complete


def train_recipe(
    workdir: str | Path,
    out: str | Path,
    *,
    stages: Sequence[str] = STAGES,
    steps_scale: float = 1.0,
    num_clips: int = NUM_CLIPS,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """Train the whole cascade from nothing into ``workdir`` and write the shipped layout to ``out``.

    Resumable: clips, text encoders, built datasets and finished stages (their exported model) are reused; a stage
    interrupted mid-run resumes from its last checkpoint. ``steps_scale`` multiplies every stage's steps (for
    quick checks); ``overrides`` (``key=value``) apply to every stage. ``out`` must not exist (checked before any
    training).

    Returns:
      ``out``, written atomically by :func:`assemble`.
    """
    from tqdm import tqdm

    from show1_jax.train import PrintLogger, run_training

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}: choose from {list(STAGES)}")
    if Path(out).exists():  # checked now, not after hours of training
        raise FileExistsError(f"{out} exists: choose a new output folder or remove it first")
    workdir = Path(workdir).resolve()
    write_text_encoders(workdir / "text")
    timings_path = workdir / "timings.json"  # seconds per run, kept across resumed invocations
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in stages:
        settings = stage_settings(stage, workdir, steps_scale=steps_scale, overrides=overrides)
        exported = Path(settings.workdir) / ("vae" if settings.stage == "vae" else "unet")
        if (exported / "config.json").is_file():
            log(f"{stage}: using the trained model in {exported}")
            continue
        prepare_clip_set(workdir, Path(settings.data.source).name, num_clips=num_clips, log=log)
        log(f"{stage}: training {settings.steps} steps (configs/shapes/train_{stage}.yaml) in {settings.workdir}")
        start = time.perf_counter()
        with tqdm(total=settings.steps, desc=stage, unit="step") as bar:
            run_training(settings, logger=PrintLogger(lambda m: bar.write(m)), progress=bar)
        timings[stage] = time.perf_counter() - start
        log(f"{stage}: {timings[stage] / 60:.1f} min")
        timings_path.write_text(json.dumps(timings, indent=2))
    return assemble(workdir, out)


def assemble(workdir: str | Path, out: str | Path, *, dtype=jnp.float16) -> Path:
    """Write the five repositories (converted format, ``dtype`` weights) from a finished :func:`train_recipe` run."""
    from show1_jax.loading import _atomic_folder, load_component, save_converted

    workdir, out = Path(workdir), Path(out)
    missing = [r for r, (_, comp) in REPOS.items() if not (workdir / "runs" / r / comp / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{workdir} has no trained model for {missing}: run the recipe for those stages first")
    with _atomic_folder(out) as tmp:
        for name, (repo, comp) in REPOS.items():
            run = workdir / "runs" / name
            save_converted(load_component(run / comp, dtype=dtype), tmp / repo / comp)
            for folder in SCHEDULER_FOLDERS:
                if (run / folder).is_dir() and comp == "unet":
                    shutil.copytree(run / folder, tmp / repo / folder)
        for repo in ("show-1-base", "show-1-sr2"):
            encoder = workdir / "text" / repo
            save_converted(load_component(encoder / "text_encoder", dtype=dtype), tmp / repo / "text_encoder")
            shutil.copytree(encoder / "tokenizer", tmp / repo / "tokenizer")
        shutil.copyfile(GENERATE_CONFIG, tmp / "generate.yaml")  # the settings the model is shipped with
        info = {"dataset": dataclasses.asdict(DATASET), "held_out": [list(c) for c in split().held_out]}
        (tmp / "show1_shapes.json").write_text(json.dumps(info, indent=2))
    return out


def generate_config(root: str | Path) -> Path:
    """The generate settings of a Show-1 Shapes folder: its own ``generate.yaml`` (written by :func:`assemble`, so
    that an installed package needs no ``configs/``), else ``configs/shapes/generate.yaml``."""
    own = Path(root) / "generate.yaml"
    return own if own.is_file() else GENERATE_CONFIG


def weight_overrides(root: str | Path) -> list[str]:
    """``weights.*=`` overrides pointing the generate settings at a Show-1 Shapes folder."""
    root = Path(root).resolve()
    return [f"weights.{key}={root / repo}" for key, repo in WEIGHT_KEYS.items()]


def random_cascade(root: str | Path, *, seed: int = 1) -> Path:
    """The untrained cascade (same architectures and text encoders, random UNets/VAE): the metric's floor."""
    from show1_jax.tiny import build_tiny_show1

    root = Path(root)
    if not root.exists():
        build_tiny_show1(root, seed=seed)
        for repo in ("show-1-base", "show-1-sr2"):  # the demo's own tokenizers and encoders
            shutil.rmtree(root / repo / "tokenizer")
            shutil.rmtree(root / repo / "text_encoder")
        write_text_encoders(root)
    return root


def _score(videos: Sequence[tuple[np.ndarray, Combination]]) -> dict[str, Any]:
    from show1_jax.data.alignment import evaluate as score

    return score(videos, colours=DATASET.colours, shapes=DATASET.shapes, directions=DATASET.directions)


def _pipeline(weights: str | Path, overrides: Sequence[str]):
    from show1_jax.generate_settings import GenerateSettings, Weights
    from show1_jax.pipeline import Show1Pipeline
    from show1_jax.settings import load_settings

    settings = load_settings(GenerateSettings, generate_config(weights), [*weight_overrides(weights), *overrides])
    return settings, Show1Pipeline(Weights(**dataclasses.asdict(settings.weights)), dtype=jnp.float32, keep_loaded=True)


def evaluate_stages(
    weights: str | Path,
    combos: Sequence[Combination],
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Generate one video per (combination, seed) with the cascade in ``weights`` and score every stage it runs.

    Returns {stage: :func:`show1_jax.data.alignment.evaluate`'s report (per-attribute and overall accuracy,
    confusions) of that stage's frames, plus ``"seconds"``, the whole run's time}.
    """
    from show1_jax.stages import video_to_uint8

    settings, pipe = _pipeline(weights, overrides)
    start = time.perf_counter()
    prompts = [caption_for(c, DATASET.caption_template) for c in combos]
    videos: dict[str, list] = {stage: [] for stage in settings.stages}
    for seed in seeds:
        out = pipe(prompts, dataclasses.replace(settings, seed=int(seed)))
        for stage, frames in out.items():
            videos[stage] += list(zip(video_to_uint8(np.asarray(frames)), combos))
        log(f"seed {seed}: {len(combos)} videos")
    seconds = time.perf_counter() - start
    return {stage: {**_score(v), "seconds": seconds} for stage, v in videos.items()}


def evaluate(
    weights: str | Path,
    combos: Sequence[Combination],
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    stage: str = "sr2",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`evaluate_stages`'s report of one stage (the final video by default)."""
    reports = evaluate_stages(weights, combos, seeds=seeds, overrides=overrides, log=log)
    if stage not in reports:
        raise ValueError(f"stage {stage} is not run by these settings (stages: {list(reports)})")
    return reports[stage]


def direction_steering(
    generate: Callable[[str, int], np.ndarray],
    pairs: Sequence[tuple[str, str]],
    *,
    seeds: Sequence[int] = (0,),
    directions: Sequence[str] = DATASET.directions,
) -> dict[str, float]:
    """Whether the direction word steers the motion, or the noise does: per seed and (colour, shape), the same
    noise is sampled once with each direction word.

    Args:
      generate: ``(prompt, seed) -> uint8 [F, H, W, 3]``, one video whose noise depends on the seed only.
      pairs: (colour, shape) pairs to prompt with.
    Returns:
      ``accuracy``: fraction of (seed, pair, word) whose recognised direction is the word; ``distinct``: mean
      fraction of distinct recognised directions among one seed's words (1.0: each word its own motion;
      1 / len(directions): the same motion whatever the word, i.e. the noise alone decides).
    """
    from show1_jax.data.alignment import recognise

    hits, distinct, count = 0, [], 0
    for seed in seeds:
        for colour, shape in pairs:
            found = []
            for word in directions:
                video = generate(caption_for(Combination(colour, shape, word), DATASET.caption_template), int(seed))
                seen = recognise(
                    video, colours=DATASET.colours, shapes=DATASET.shapes, directions=DATASET.directions
                ).direction
                found.append(seen)
                hits += seen == word
                count += 1
            distinct.append(len(set(found)) / len(directions))
    return {"accuracy": hits / count, "distinct": float(np.mean(distinct))}


def keyframe_steering(
    weights: str | Path,
    pairs: Sequence[tuple[str, str]],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """:func:`direction_steering` of the keyframe stage in ``weights`` (one prompt per call, so a seed's noise is
    the same for every word)."""
    from show1_jax.stages import video_to_uint8

    settings, pipe = _pipeline(weights, [*overrides, "stages=[keyframes]"])

    def generate(prompt: str, seed: int) -> np.ndarray:
        return video_to_uint8(np.asarray(pipe([prompt], dataclasses.replace(settings, seed=seed))["keyframes"]))[0]

    return direction_steering(generate, pairs, seeds=seeds)


def real_stage_inputs(
    combos: Sequence[Combination], settings: Any, *, seed: int = 0
) -> tuple[list[Combination], dict[str, np.ndarray]]:
    """Real dataset clips of ``combos`` shaped as each later stage's input under the generate ``settings``.

    Returns (the clips' combinations, {stage: float frames in [-1, 1]}): ``interpolation`` gets K keyframes at the
    keyframe size (every (window - 1)-th frame of a (K - 1)(window - 1) + 1 frame clip), ``sr1`` all those frames at
    the keyframe size, ``sr2`` at SR1's size; resized with PIL bicubic as the training datasets are.
    """
    from show1_jax.data.synthetic import clip_specs, render_clip
    from show1_jax.data.videos import resize_frames
    from show1_jax.generate_settings import interpolated_frames

    length = interpolated_frames(settings.keyframes.num_frames)
    step = (length - 1) // (settings.keyframes.num_frames - 1)  # the keyframes are every step-th interpolated frame
    config = dataclasses.replace(DATASET, num_frames=length)
    specs = clip_specs(len(combos), config, combinations=combos, seed=seed)
    clips = [render_clip(spec, config) for spec in specs]

    def sized(height: int, width: int) -> np.ndarray:
        frames = np.stack([resize_frames(c, height, width, crop="none") for c in clips])
        return frames.astype(np.float32) / 127.5 - 1.0

    small = sized(settings.keyframes.height, settings.keyframes.width)
    inputs = {"interpolation": small[:, ::step], "sr1": small, "sr2": sized(settings.sr1.height, settings.sr1.width)}
    return [spec.combination for spec in specs], inputs


def evaluate_real_inputs(
    weights: str | Path,
    combos: Sequence[Combination],
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Each later stage alone, fed real clips (:func:`real_stage_inputs`) in place of the previous stage's output.

    Shows which stage loses what: the metric on real inputs is 100%, so a stage's score here is its own loss.
    Per seed, fresh clip positions and sampling noise. Returns {stage: report plus ``"seconds"``}.
    """
    from show1_jax.stages import video_to_uint8

    settings, pipe = _pipeline(weights, overrides)
    videos: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for seed in seeds:
        run = dataclasses.replace(settings, seed=int(seed))
        drawn, inputs = real_stage_inputs(combos, run, seed=int(seed))
        prompts = [caption_for(c, DATASET.caption_template) for c in drawn]
        for stage, frames in inputs.items():
            start = time.perf_counter()
            out = pipe.run_stage(stage, frames, prompts, run)
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
            videos.setdefault(stage, []).extend(zip(video_to_uint8(np.asarray(out)), drawn))
        log(f"seed {seed}: {len(combos)} clips through {', '.join(inputs)}")
    return {stage: {**_score(v), "seconds": seconds[stage]} for stage, v in videos.items()}


def ceiling(combos: Sequence[Combination], *, n_per_combo: int = 2, size: tuple[int, int] | None = None) -> dict:
    """The metric on real dataset clips of ``combos`` (29 frames, as generated videos have), resized to ``size``."""
    from show1_jax.data.alignment import ceiling as real_ceiling

    config = dataclasses.replace(DATASET, num_frames=29)
    return real_ceiling(config, combos, n_per_combo=n_per_combo, seed=1, size=size)


def stage_size(overrides: Sequence[str] = (), root: str | Path = DEFAULT_WEIGHTS) -> tuple[int, int]:
    """(height, width) of the final (SR2) video under the generate settings of the folder ``root`` and
    ``overrides``."""
    from show1_jax.generate_settings import GenerateSettings
    from show1_jax.settings import load_settings

    settings = load_settings(GenerateSettings, generate_config(root), [*weight_overrides(root), *overrides])
    return settings.sr2.height, settings.sr2.width
