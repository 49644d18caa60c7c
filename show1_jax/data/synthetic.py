"""A synthetic captioned video dataset: one coloured shape moving in a stated direction on a plain background.

Each clip shows one shape (``circle``, ``square``, ...) of one colour moving ``left``/``right``/``up``/``down`` at a
fixed ``speed`` in pixels per frame, captioned from a template, by default ``"a red circle moving left"``.

Motion wraps around: the frame is a torus, so a shape leaving one edge re-enters at the opposite edge and keeps
moving the captioned way. (Bouncing would reverse the motion and contradict the caption.) Shapes are drawn from
toroidal distances to their centre, so a shape straddling an edge is split across both edges.

Compositional evaluation. ``attribute_combinations`` lists every (colour, shape, direction) triple;
``split_combinations`` holds out a deterministic subset such that every single attribute value and every *pair*
of values (colour+shape, colour+direction, shape+direction) still occurs in the training triples, so a held-out
triple is new only as a combination. Generate the training folder from ``split.train`` and the evaluation folder
from ``split.held_out``.

Folder layout written by ``generate_dataset`` (WebVid-style)::

    out_dir/captions.csv      video_path,caption,colour,shape,direction   (paths relative to the CSV)
    out_dir/metadata.jsonl    one JSON object per clip: the full ``ClipSpec`` plus size, frame count and fps
    out_dir/videos/00000.mp4  (or .gif)
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from show1_jax.data.videos import gif_frame_ms, write_video

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (150, 50, 210),
    "orange": (250, 140, 10),
    "cyan": (20, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)

Progress = Any  # an object with .update(n) (tqdm) or a callable(done, total)


class Combination(NamedTuple):
    colour: str
    shape: str
    direction: str


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """How clips look. Sizes in pixels; ``radius`` None means ``round(0.18 * min(height, width))``.

    ``start_spread`` None: a clip's start centre is uniform over the frame (anywhere on the torus). A number s: the
    path is centred instead, its middle frame's centre uniform within s pixels of the frame's centre on each axis,
    so the shape crosses the middle the captioned way: where the shape is in each frame then follows from the
    caption up to +-s pixels (a narrower task for a small model).

    mp4 needs an even height and width. GIF frame delays are whole centiseconds, so a GIF's stored fps is
    ``1000 / gif_frame_ms(fps)`` (8 fps is stored as 8.33); ``metadata.jsonl`` records the stored rate.
    """

    height: int = 40
    width: int = 64
    num_frames: int = 8
    fps: float = 8.0
    speed: int = 3  # pixels per frame
    radius: int | None = None
    background: tuple[int, int, int] = (0, 0, 0)
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    directions: tuple[str, ...] = tuple(DIRECTIONS)
    caption_template: str = "{article} {colour} {shape} moving {direction}"  # article: "a" or "an" by the colour
    video_format: Literal["mp4", "gif"] = "mp4"
    start_spread: float | None = None

    def __post_init__(self):
        for kind, names, known in (
            ("colour", self.colours, COLOURS),
            ("shape", self.shapes, SHAPES),
            ("direction", self.directions, DIRECTIONS),
        ):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(f"unknown or no {kind}s {unknown}: choose from {list(known)}")
        if self.video_format not in ("mp4", "gif"):
            raise ValueError(f"video_format must be 'mp4' or 'gif', got {self.video_format!r}")
        if self.video_format == "mp4" and (self.height % 2 or self.width % 2):
            raise ValueError(f"mp4 needs an even size, got {self.height}x{self.width}: pick even sizes or gif")
        if self.speed < 1 or self.num_frames < 2:
            raise ValueError(
                f"need speed >= 1 and num_frames >= 2 for visible motion, got {self.speed}, {self.num_frames}"
            )
        if self.start_spread is not None and not 0 <= self.start_spread <= min(self.height, self.width) / 2:
            raise ValueError(
                f"start_spread must be None (anywhere) or in [0, {min(self.height, self.width) / 2}] pixels (half the"
                f" smaller side), got {self.start_spread}"
            )

    @property
    def shape_radius(self) -> int:
        return self.radius if self.radius is not None else max(2, round(0.18 * min(self.height, self.width)))

    @property
    def stored_fps(self) -> float:
        """The frame rate the video files carry (GIF rounds the frame delay to centiseconds)."""
        return 1000.0 / gif_frame_ms(self.fps) if self.video_format == "gif" else float(self.fps)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One clip: its attributes, the shape's centre in frame 0 (pixels) and its caption."""

    colour: str
    shape: str
    direction: str
    center_y: float
    center_x: float
    caption: str

    @property
    def combination(self) -> Combination:
        return Combination(self.colour, self.shape, self.direction)


@dataclasses.dataclass(frozen=True)
class CombinationSplit:
    """Disjoint training and held-out attribute triples (together: all of them)."""

    train: tuple[Combination, ...]
    held_out: tuple[Combination, ...]


def caption_for(combination: Combination, template: str = SyntheticConfig.caption_template) -> str:
    """The caption of a combination, e.g. ``"a red circle moving left"``, ``"an orange square moving up"``.

    ``template`` may use ``{colour}``, ``{shape}``, ``{direction}`` and ``{article}`` ("a"/"an" for the colour).
    """
    article = "an" if combination.colour[0] in "aeiou" else "a"
    return template.format(article=article, **combination._asdict())


def attribute_combinations(config: SyntheticConfig = SyntheticConfig()) -> list[Combination]:
    """Every (colour, shape, direction) triple of the config, in a fixed order."""
    return [Combination(*c) for c in itertools.product(config.colours, config.shapes, config.directions)]


def split_combinations(
    config: SyntheticConfig = SyntheticConfig(), *, held_out_fraction: float = 0.2, seed: int = 0
) -> CombinationSplit:
    """Hold out about ``held_out_fraction`` of the triples, deterministically from ``seed``.

    Every pair of attribute values (colour+shape, colour+direction, shape+direction) keeps at least one training
    triple, so held-out triples test composition, not unseen words. Triples are visited in a seeded random order
    and held out greedily while that holds.

    Raises:
      ValueError: the fraction cannot be reached under that constraint (it names the most that could).
    """
    combos = attribute_combinations(config)
    target = int(round(held_out_fraction * len(combos)))
    pair_keys = lambda c: (("cs", c.colour, c.shape), ("cd", c.colour, c.direction), ("sd", c.shape, c.direction))
    train_count: dict[tuple[str, str, str], int] = {}
    for c in combos:
        for key in pair_keys(c):
            train_count[key] = train_count.get(key, 0) + 1
    held: set[Combination] = set()
    for i in np.random.default_rng(seed).permutation(len(combos)):
        if len(held) == target:
            break
        c = combos[i]
        if all(train_count[key] > 1 for key in pair_keys(c)):
            held.add(c)
            for key in pair_keys(c):
                train_count[key] -= 1
    if len(held) < target:
        raise ValueError(
            f"could hold out only {len(held)} of {len(combos)} combinations while keeping every attribute pair in"
            f" training, {target} asked: lower held_out_fraction or add colours/shapes/directions"
        )
    return CombinationSplit(
        train=tuple(c for c in combos if c not in held), held_out=tuple(c for c in combos if c in held)
    )


def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` from (toroidal) offsets to its centre; r is the circumradius-ish half size.

    ``dy`` and ``dx`` broadcast against each other; ``r`` is a scalar. ``alignment`` renders its templates with it.
    """
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (ady <= 0.8 * r) & (adx <= 0.8 * r)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= 0.8 * r) & (adx <= (dy + r) / 1.8)  # half-width 0 at the apex, r at the base
    if shape == "diamond":
        return ady + adx <= r
    if shape == "cross":
        arm = max(1.0, 0.3 * r)
        return ((ady <= arm) & (adx <= r)) | ((adx <= arm) & (ady <= r))
    raise ValueError(f"unknown shape {shape!r}: choose from {list(SHAPES)}")


def render_clip(spec: ClipSpec, config: SyntheticConfig = SyntheticConfig()) -> np.ndarray:
    """Frames of one clip: uint8 [F, H, W, 3]. Frame t has the centre at start + t * speed * direction (mod size)."""
    f, h, w = config.num_frames, config.height, config.width
    step_y, step_x = DIRECTIONS[spec.direction]
    ys = np.arange(h, dtype=np.float64)[:, None]  # [H, 1]
    xs = np.arange(w, dtype=np.float64)[None, :]  # [1, W]
    frames = np.empty((f, h, w, 3), np.uint8)
    frames[:] = np.asarray(config.background, np.uint8)
    colour = np.asarray(COLOURS[spec.colour], np.uint8)
    for t in range(f):
        cy = spec.center_y + t * config.speed * step_y
        cx = spec.center_x + t * config.speed * step_x
        dy = (ys - cy + h / 2) % h - h / 2  # toroidal offsets: the wrap-around
        dx = (xs - cx + w / 2) % w - w / 2
        frames[t][shape_mask(spec.shape, dy, dx, config.shape_radius)] = colour
    return frames


def clip_specs(
    num_clips: int,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    combinations: Sequence[Combination] | None = None,
    seed: int = 0,
) -> list[ClipSpec]:
    """``num_clips`` clip descriptions, deterministic from ``seed``.

    Combinations are dealt evenly: each pass over ``combinations`` (all of the config's by default) is a fresh
    seeded permutation, so counts differ by at most one. Start centres are uniform over the frame, or with
    ``config.start_spread`` set, such that the middle frame's centre is within that many pixels of the frame's.
    """
    combos = list(attribute_combinations(config) if combinations is None else combinations)
    if not combos:
        raise ValueError("no combinations to draw clips from")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < num_clips:
        order.extend(rng.permutation(len(combos)).tolist())
    specs = []
    for i in order[:num_clips]:
        c = Combination(*combos[i])
        if config.start_spread is None:
            cy, cx = rng.uniform(0, config.height), rng.uniform(0, config.width)
        else:
            (step_y, step_x), half_path = DIRECTIONS[c.direction], config.speed * (config.num_frames - 1) / 2
            jy, jx = rng.uniform(-config.start_spread, config.start_spread, size=2)
            cy = (config.height / 2 + jy - step_y * half_path) % config.height
            cx = (config.width / 2 + jx - step_x * half_path) % config.width
        specs.append(
            ClipSpec(
                c.colour, c.shape, c.direction, round(cy, 2), round(cx, 2), caption_for(c, config.caption_template)
            )
        )
    return specs


def _advance(progress: Progress | None, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(1)
    else:
        progress(done, total)


def generate_dataset(
    out_dir: str | Path,
    num_clips: int,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    combinations: Sequence[Combination] | None = None,
    seed: int = 0,
    num_workers: int = 2,
    progress: Progress | None = None,
) -> list[ClipSpec]:
    """Render and write ``num_clips`` clips plus ``captions.csv`` and ``metadata.jsonl`` into ``out_dir``.

    Args:
      out_dir: created if missing; existing files of the same names are overwritten.
      num_clips: how many clips.
      config: sizes, frame count, fps, attribute vocabularies, video format.
      combinations: the triples to draw from (e.g. ``split_combinations(config).train``); all by default.
      seed: fixes attributes and start positions.
      num_workers: threads encoding videos (ffmpeg runs as a subprocess, so threads run in parallel).
      progress: ``.update(1)`` per written clip (tqdm), or a callable ``(done, total)``.

    Returns:
      the clip specs, in CSV order.
    """
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    specs = clip_specs(num_clips, config, combinations=combinations, seed=seed)
    names = [f"videos/{i:05d}.{config.video_format}" for i in range(num_clips)]

    def write(i: int) -> None:
        write_video(out_dir / names[i], render_clip(specs[i], config), config.fps)

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for done, _ in enumerate(pool.map(write, range(num_clips)), 1):
            _advance(progress, done, num_clips)

    with open(out_dir / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "caption", "colour", "shape", "direction"])
        for name, s in zip(names, specs):
            writer.writerow([name, s.caption, s.colour, s.shape, s.direction])
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name, s in zip(names, specs):
            record = {"video_path": name, **dataclasses.asdict(s), "speed": config.speed,
                      "radius": config.shape_radius, "height": config.height, "width": config.width,
                      "num_frames": config.num_frames, "fps": config.stored_fps}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return specs


def read_metadata(folder: str | Path) -> list[dict[str, Any]]:
    """The per-clip records of ``metadata.jsonl`` in a generated folder."""
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_direction_groups(
    source: str | Path, out_dir: str | Path, *, groups_per_pair: int = 16, seed: int = 0
) -> Path:
    """A caption CSV over ``source``'s clips in direction groups: contrastive batches for the direction word.

    For every (colour, shape) pair of ``source`` (a :func:`generate_dataset` folder), ``groups_per_pair`` runs of
    one clip per direction (in ``DIRECTIONS`` order), each drawn at random from ``source``'s clips of that triple.
    A triple ``source`` lacks (a held-out one) is filled with a clip of the same shape, another colour (else the
    same colour, another shape), so every run has all the directions. Trained with ``data.batch_group_size`` =
    ``len(DIRECTIONS)``, each batch then holds whole runs. The videos stay where they are: ``out_dir/captions.csv``
    refers to them by relative paths.

    Returns:
      the written ``captions.csv``.
    """
    source, out_dir = Path(source), Path(out_dir)
    records = read_metadata(source)
    by_triple: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_triple.setdefault((r["colour"], r["shape"], r["direction"]), []).append(r)
    rng = random.Random(seed)
    rows = []
    for colour, shape in sorted({(r["colour"], r["shape"]) for r in records}):
        for _ in range(groups_per_pair):
            for direction in DIRECTIONS:
                pool = (
                    by_triple.get((colour, shape, direction))
                    or [r for (c, s, d), rs in by_triple.items() if d == direction and s == shape for r in rs]
                    or [r for (c, s, d), rs in by_triple.items() if d == direction and c == colour for r in rs]
                )
                if not pool:
                    raise ValueError(
                        f"{source} has no clip moving {direction} of shape {shape} or colour {colour} to fill a"
                        " group with: generate more clips"
                    )
                rows.append(rng.choice(pool))
    return write_caption_rows(source, out_dir, rows)


def write_caption_rows(source: str | Path, out_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``out_dir/captions.csv`` of ``rows`` (video_path relative to ``source``, caption, colour, shape, direction):
    a caption set over another folder's clips, its paths rebased onto ``out_dir``. Written last and atomically, so
    an existing ``captions.csv`` means a complete set."""
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = Path(os.path.relpath(source.resolve(), out_dir.resolve()))
    target = out_dir / "captions.csv"
    tmp = target.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "caption", "colour", "shape", "direction"])
        for r in rows:
            path = Path(os.path.normpath(prefix / r["video_path"])).as_posix()
            writer.writerow([path, r["caption"], r["colour"], r["shape"], r["direction"]])
    os.replace(tmp, target)
    return target


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "ClipSpec",
    "Combination",
    "CombinationSplit",
    "SyntheticConfig",
    "attribute_combinations",
    "caption_for",
    "clip_specs",
    "generate_dataset",
    "read_metadata",
    "write_caption_rows",
    "render_clip",
    "shape_mask",
    "split_combinations",
    "write_direction_groups",
]
