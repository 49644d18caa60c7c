"""Captioned video datasets as tfds ArrayRecord files, and a deterministic, resumable, host-sharded batch reader.

Building. ``build_dataset`` reads a WebVid-style CSV of ``video_path, caption`` rows (paths relative to the CSV),
cuts one fixed-size clip per video (``videos.load_clip``: frames at a target fps, a seeded start, crop + resize)
and writes them with tfds' ``GeneratorBasedBuilder`` in the ArrayRecord format. This works without TensorFlow in
tfds 4.9.10: frames are a ``tfds.features.Tensor`` of uint8 (the Image/Video features would need TF), strings are
``Text``. Each example holds::

    video          uint8 [F, H, W, 3]
    caption        str
    video_path     str, as written in the CSV
    fps            float32, the clip's frame rate
    frame_indices  int32 [F], the source frames used
    embeddings     float16/float32 [L, D], only when an embedding table was given
    <extra>        str, one per requested extra CSV column (e.g. colour, shape, direction)

The dataset lands in ``<out_dir>/video_text/<name>/1.0.0/`` (tfds' layout) with ``dataset_info.json``,
``features.json`` and ``metadata.json`` (build settings and the skipped rows). Records keep the CSV order.

Bad rows (missing file, undecodable video, clip too short) raise by default, naming the path; with
``skip_bad=True`` they are left out and listed in the returned ``BuildReport`` and in ``metadata.json``.

Embeddings. Training need not load T5: pass ``embeddings=`` a mapping caption -> [L, D] array or a table file
written by ``save_caption_embeddings`` (``.npz``: ``captions`` [N] str and ``embeddings`` [N, L, D];
``.safetensors``: tensor ``embeddings`` [N, L, D] and the captions as a JSON list in the metadata key
``captions``).

Reading. ``VideoTextData(path)`` gives random access (tfds ``ArrayRecordDataSource``); ``.batches(...)`` iterates
batches with a seeded permutation per epoch, split across hosts, resumable from a small state dict.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from show1_jax.data.videos import Crop, Resample, VideoError, load_clip

DATASET_NAME = "video_text"
VERSION = "1.0.0"
_RESERVED = ("video", "caption", "video_path", "fps", "frame_indices", "embeddings", "index")

Progress = Any  # an object with .update(n) (tqdm) or a callable(done, total)


class CaptionCsvError(ValueError):
    """A caption CSV that cannot be used (missing columns, no CSV in a folder, no rows)."""


# --- the source: a caption CSV ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceRow:
    """One CSV row: ``row`` counts data rows from 0; ``path`` is resolved against the CSV's folder."""

    row: int
    video_path: str
    path: Path
    caption: str
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)


def find_caption_csv(source: str | Path) -> Path:
    """The CSV itself, or a folder's ``captions.csv`` (or its only ``*.csv``)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"caption source {source} does not exist: pass a CSV file or a folder holding one")
    if (source / "captions.csv").is_file():
        return source / "captions.csv"
    csvs = sorted(source.glob("*.csv"))
    if len(csvs) != 1:
        raise CaptionCsvError(
            f"folder {source} has {len(csvs)} CSV files {[p.name for p in csvs]} and no captions.csv: pass the CSV path"
        )
    return csvs[0]


def read_caption_csv(
    source: str | Path,
    *,
    video_column: str = "video_path",
    caption_column: str = "caption",
    extra_columns: Sequence[str] = (),
) -> list[SourceRow]:
    """Rows of a WebVid-style caption CSV (a file, or a folder holding ``captions.csv``).

    Raises:
      CaptionCsvError: a named column is missing (the message lists the columns the CSV has) or there are no rows.
    """
    csv_path = find_caption_csv(source)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        wanted = [("video_column", video_column), ("caption_column", caption_column)]
        for argument, name in wanted + [("extra_columns", c) for c in extra_columns]:
            if name not in columns:
                raise CaptionCsvError(
                    f"{csv_path} has no column {name!r} ({argument}); its columns are {columns}: pass {argument}="
                    " naming one of them, or fix the CSV header"
                )
        rows = [
            SourceRow(
                row=i,
                video_path=r[video_column],
                path=(csv_path.parent / r[video_column]) if r[video_column] else csv_path.parent / "<empty path>",
                caption=r[caption_column] or "",
                extra={c: r[c] or "" for c in extra_columns},
            )
            for i, r in enumerate(reader)
        ]
    if not rows:
        raise CaptionCsvError(f"{csv_path} has a header but no rows")
    return rows


# --- caption embedding tables -----------------------------------------------------------------------------------------


def save_caption_embeddings(path: str | Path, embeddings: Mapping[str, np.ndarray]) -> Path:
    """Write caption -> [L, D] embeddings as one table (``.npz`` or ``.safetensors``, by the suffix).

    All arrays must share one shape and dtype (float16 or float32), e.g. T5 embeddings padded to 77 tokens.
    """
    path = Path(path)
    captions = list(embeddings)
    table = np.stack([np.asarray(embeddings[c]) for c in captions])  # [N, L, D]
    if table.ndim != 3 or table.dtype not in (np.float16, np.float32):
        raise ValueError(
            f"embeddings must be float16/float32 [L, D] arrays of one shape, got {table.dtype} {table.shape[1:]}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, captions=np.asarray(captions, dtype=str), embeddings=table)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": table}, str(path), metadata={"captions": json.dumps(captions)})
    else:
        raise ValueError(f"embedding table {path} must end in .npz or .safetensors")
    return path


def load_caption_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Read a table written by ``save_caption_embeddings``: caption -> [L, D]."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "captions" not in data or "embeddings" not in data:
                raise ValueError(
                    f"{path} has arrays {list(data)}; an embedding table needs 'captions' and 'embeddings'"
                )
            captions, table = [str(c) for c in data["captions"]], np.asarray(data["embeddings"])
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "captions" not in meta or "embeddings" not in f.keys():
                raise ValueError(
                    f"{path} lacks tensor 'embeddings' or metadata 'captions': write it with save_caption_embeddings"
                )
            captions, table = json.loads(meta["captions"]), f.get_tensor("embeddings")
    else:
        raise ValueError(f"embedding table {path} must end in .npz or .safetensors")
    if len(captions) != len(table):
        raise ValueError(f"{path} has {len(captions)} captions but {len(table)} embeddings")
    return dict(zip(captions, table))


def _check_embeddings(
    embeddings: Mapping[str, np.ndarray], rows: Sequence[SourceRow], source: str
) -> tuple[tuple[int, int], np.dtype]:
    missing = sorted({r.caption for r in rows if r.caption not in embeddings})
    if missing:
        raise KeyError(
            f"{len(missing)} captions have no entry in the embeddings ({source}), e.g. {missing[:3]}: encode them"
            " (show1_jax.text) and add them to the table"
        )
    used = {r.caption for r in rows}
    shapes = {(np.asarray(v).shape, np.asarray(v).dtype) for c, v in embeddings.items() if c in used}
    if len(shapes) != 1:
        raise ValueError(f"embeddings ({source}) must share one shape and dtype, got {sorted(map(str, shapes))}")
    (shape, dtype) = shapes.pop()
    if len(shape) != 2 or dtype not in (np.float16, np.float32):
        raise ValueError(f"embeddings ({source}) must be float16/float32 [L, D], got {dtype} {shape}")
    return shape, dtype


# --- building ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row left out of the dataset: the CSV row, its video path and why (error class and message)."""

    row: int
    video_path: str
    error: str
    message: str


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """Where the dataset was written, how many examples it has and which rows were skipped."""

    path: Path
    num_examples: int
    skipped: tuple[BadRow, ...]


@dataclasses.dataclass(eq=False)
class VideoTextConfig(tfds.core.BuilderConfig):
    """Fixed clip settings of one dataset (tfds builder config). See ``build_dataset`` for the meaning."""

    frames: int = 8
    height: int = 40
    width: int = 64
    fps: float | None = None
    start: str | int = "random"
    crop: str = "center"
    resample: str = "bicubic"
    seed: int = 0


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on threads, in order, with a bounded number in flight."""
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _advance(progress: Progress | None, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(1)
    else:
        progress(done, total)


class VideoText(tfds.core.GeneratorBasedBuilder):
    """tfds builder for one caption CSV; use ``build_dataset`` rather than this class directly."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(VERSION)
    # tfds 4.9.10 resolves a packaged builder's source path through `importlib_resources`, which it does not depend
    # on; that path only locates download checksums, and this builder downloads nothing.
    code_path = None

    def __init__(
        self,
        *,
        rows: Sequence[SourceRow],
        split: str = "train",
        embeddings: Mapping[str, np.ndarray] | None = None,
        embedding_spec: tuple[tuple[int, int], np.dtype] | None = None,
        extra_columns: Sequence[str] = (),
        skip_bad: bool = False,
        num_workers: int = 2,
        progress: Progress | None = None,
        build_metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        self._rows, self._split = list(rows), split
        self._embeddings, self._embedding_spec = embeddings, embedding_spec
        self._extra_columns, self._skip_bad = tuple(extra_columns), skip_bad
        self._num_workers, self._progress = num_workers, progress
        self._build_metadata = dict(build_metadata or {})
        self.skipped: list[BadRow] = []
        super().__init__(**kwargs)

    # tfds prints these two lines to stdout; library code does not print.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        features = {
            "video": tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "video_path": tfds.features.Text(),
            "fps": tfds.features.Scalar(dtype=np.float32),
            "frame_indices": tfds.features.Tensor(shape=(c.frames,), dtype=np.int32),
        }
        if self._embedding_spec is not None:
            shape, dtype = self._embedding_spec
            features["embeddings"] = tfds.features.Tensor(shape=shape, dtype=dtype)
        for column in self._extra_columns:
            features[column] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned video clips with raw uint8 frames (show1_jax.data).",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(self._build_metadata),
            disable_shuffling=True,  # keep the CSV order; readers shuffle
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterable]:
        return {self._split: self._generate_examples()}

    def _load(self, row: SourceRow) -> dict[str, Any] | BadRow:
        c = self.builder_config
        start: Any = np.random.default_rng([c.seed, row.row]) if c.start == "random" else c.start
        start = 0 if start == "first" else start
        try:
            clip = load_clip(
                row.path, c.frames, fps=c.fps, start=start, height=c.height, width=c.width, crop=c.crop,
                resample=c.resample,
            )  # fmt: skip
        except VideoError as err:
            if not self._skip_bad:
                raise
            return BadRow(row.row, row.video_path, type(err).__name__, str(err))
        example = {
            "video": clip.frames,
            "caption": row.caption,
            "video_path": row.video_path,
            "fps": np.float32(clip.fps),
            "frame_indices": clip.indices.astype(np.int32),
            **row.extra,
        }
        if self._embeddings is not None:
            example["embeddings"] = np.asarray(self._embeddings[row.caption])
        return example

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        total = len(self._rows)
        results = _ordered_map(self._load, self._rows, self._num_workers)
        for done, (row, result) in enumerate(zip(self._rows, results), 1):
            if isinstance(result, BadRow):
                self.skipped.append(result)
            else:
                yield row.row, result
            _advance(self._progress, done, total)
        self.info.metadata["skipped"] = [dataclasses.asdict(b) for b in self.skipped]


def _config_name(frames: int, height: int, width: int, fps: float | None) -> str:
    name = f"f{frames}_{height}x{width}"
    return name if fps is None else name + f"_fps{fps:g}".replace(".", "p")


def build_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    frames: int = 8,
    height: int = 40,
    width: int = 64,
    fps: float | None = None,
    name: str | None = None,
    split: str = "train",
    video_column: str = "video_path",
    caption_column: str = "caption",
    extra_columns: Sequence[str] = (),
    embeddings: Mapping[str, np.ndarray] | str | Path | None = None,
    skip_bad: bool = False,
    start: str | int = "random",
    crop: Crop = "center",
    resample: Resample = "bicubic",
    seed: int = 0,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildReport:
    """Build a tfds ArrayRecord dataset of fixed-size clips from a caption CSV (or a folder holding one).

    Args:
      source: the CSV, or a folder with ``captions.csv`` (e.g. from ``synthetic.generate_dataset``).
      out_dir: tfds data dir; the dataset goes to ``<out_dir>/video_text/<name>/1.0.0``.
      frames, height, width: clip shape F, H, W of every example.
      fps: clip frame rate sampled from each file's timing; None takes consecutive frames at the file's rate.
      name: the tfds config name; default from the shape, e.g. ``f8_40x64_fps8``.
      split: the split name the records are written under.
      video_column, caption_column: CSV column names.
      extra_columns: further CSV columns stored as strings (e.g. ``("colour", "shape", "direction")``).
      embeddings: caption -> [L, D] float16/float32, or the path of a table (``save_caption_embeddings``).
      skip_bad: leave out rows whose video is missing, undecodable or too short, listing them in the report;
        by default the first such row raises its ``VideoError``.
      start: first frame of each clip: ``"random"`` (seeded by ``seed`` and the row), ``"first"``, ``"center"``, or
        a source frame index.
      crop, resample: see ``videos.resize_frames``.
      seed: seeds the random starts; the build is deterministic.
      num_workers: threads decoding videos.
      overwrite: replace an existing dataset of the same name (otherwise that is an error).
      progress: ``.update(1)`` per CSV row (tqdm), or a callable ``(done, total)``.

    Returns:
      a ``BuildReport``: the dataset directory, its example count and the skipped rows.
    """
    for column in extra_columns:
        if column in _RESERVED:
            raise ValueError(f"extra column {column!r} clashes with a stored field {_RESERVED}: rename it in the CSV")
    if not (isinstance(start, int) or start in ("random", "first", "center")):
        raise ValueError(f"start must be 'random', 'first', 'center' or a frame index, got {start!r}")
    csv_path = find_caption_csv(source)
    rows = read_caption_csv(
        csv_path, video_column=video_column, caption_column=caption_column, extra_columns=extra_columns
    )
    embedding_source = None
    embedding_spec = None
    if embeddings is not None:
        if isinstance(embeddings, (str, Path)):
            embedding_source = str(embeddings)
            embeddings = load_caption_embeddings(embeddings)
        embedding_spec = _check_embeddings(embeddings, rows, embedding_source or "the embeddings mapping")
    config = VideoTextConfig(
        name=name or _config_name(frames, height, width, fps), frames=frames, height=height, width=width, fps=fps,
        start=start, crop=crop, resample=resample, seed=seed,
    )  # fmt: skip
    dataset_dir = Path(out_dir) / DATASET_NAME / config.name / VERSION
    if dataset_dir.exists():
        if not overwrite:
            raise FileExistsError(f"dataset {dataset_dir} already exists: pass overwrite=True or another name/out_dir")
        shutil.rmtree(dataset_dir)
    metadata = {
        "source_csv": str(csv_path),
        "video_column": video_column,
        "caption_column": caption_column,
        "extra_columns": list(extra_columns),
        "embeddings": embedding_source,
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "start": start,
        "crop": crop,
        "resample": resample,
        "seed": seed,
    }
    builder = VideoText(
        rows=rows, split=split, embeddings=embeddings, embedding_spec=embedding_spec, extra_columns=extra_columns,
        skip_bad=skip_bad, num_workers=num_workers, progress=progress, build_metadata=metadata,
        data_dir=str(out_dir), config=config, file_format=tfds.core.FileFormat.ARRAY_RECORD,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as download_dir, _quiet_tfds():
        try:
            builder.download_and_prepare(download_dir=download_dir)
        except Exception as err:
            if len(builder.skipped) == len(rows):  # tfds refuses an empty split; say why it is empty
                raise ValueError(
                    f"all {len(rows)} rows of {csv_path} were skipped as bad videos, e.g. {builder.skipped[0].message}"
                ) from err
            raise
    num_examples = builder.info.splits[split].num_examples
    return BuildReport(Path(builder.data_dir), int(num_examples), tuple(builder.skipped))


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Turn tfds' tqdm bars off for the duration (library code does not print), then restore the setting."""
    from tensorflow_datasets.core.utils import tqdm_utils

    previous = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)


# --- reading ----------------------------------------------------------------------------------------------------------


def find_dataset_dir(path: str | Path) -> Path:
    """The dataset version folder (with ``dataset_info.json``) at or below ``path``; it must be unique."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("**/dataset_info.json"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path} holds {len(found)} datasets {[str(p) for p in found[:5]]}: pass the folder of one (where"
            " dataset_info.json is), e.g. BuildReport.path"
        )
    return found[0]


class VideoTextData:
    """Random access to a built dataset: ``len(data)``, ``data[i]`` (one example), ``data.batches(...)``.

    Args:
      path: the dataset folder (``BuildReport.path``) or a folder holding exactly one dataset.
      split: which split to read.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = find_dataset_dir(path)
        builder = tfds.builder_from_directory(self.path)
        if split not in builder.info.splits:
            raise KeyError(f"{self.path} has splits {list(builder.info.splits)}, not {split!r}")
        self.split = split
        self.info = builder.info
        self.source = builder.as_data_source(split=split)
        features = builder.info.features
        self.frames, self.height, self.width = features["video"].shape[:3]
        self.has_embeddings = "embeddings" in features
        self.text_keys = tuple(k for k, f in features.items() if isinstance(f, tfds.features.Text))
        self.metadata = dict(builder.info.metadata or {})

    def __len__(self) -> int:
        return len(self.source)

    def _decode(self, example: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.decode("utf-8") if k in self.text_keys else v) for k, v in example.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decode(self.source[index])

    def get_batch(self, indices: Sequence[int], *, as_float: bool = False) -> dict[str, Any]:
        """Examples ``indices`` stacked: ``video`` uint8 [B, F, H, W, 3] (float32 in [-1, 1] if ``as_float``),
        ``embeddings`` [B, L, D] when stored, ``fps`` float32 [B], ``frame_indices`` int32 [B, F], ``index`` int64
        [B], and every string field (``caption``, ``video_path``, extra columns) as ``list[str]``."""
        examples = [self._decode(e) for e in self.source.__getitems__([int(i) for i in indices])]
        batch: dict[str, Any] = {"index": np.asarray(indices, np.int64)}
        for key in examples[0]:
            values = [e[key] for e in examples]
            batch[key] = values if key in self.text_keys else np.stack(values)
        if as_float:
            batch["video"] = batch["video"].astype(np.float32) / 127.5 - 1.0
        return batch

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        as_float: bool = False,
        group_size: int = 1,
    ) -> BatchIterator:
        """A ``BatchIterator`` over this host's share of the data; see that class."""
        return BatchIterator(
            self, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
            process_count=process_count, drop_remainder=drop_remainder, as_float=as_float, group_size=group_size,
        )  # fmt: skip


class BatchIterator:
    """Deterministic, resumable, host-sharded batches.

    Epoch ``e`` visits the examples in the order ``permutation_e = default_rng([seed, e]).permutation(N)`` (or
    ``0..N-1`` without shuffling); host ``p`` of ``P`` takes ``permutation_e[p::P]``, so in every epoch the hosts'
    shares are disjoint and together cover all N examples. Batches run on across epoch boundaries, so with
    ``num_epochs=None`` (endless, for training) every batch is full. With a finite ``num_epochs`` the last batch
    is dropped if short, unless ``drop_remainder=False``.

    ``group_size`` g > 1 keeps runs of g consecutive examples (dataset order: the caption CSV's) together: the
    permutation shuffles the N / g groups, hosts take whole groups, and with ``batch_size`` a multiple of g every
    batch holds whole groups. For contrastive batches, e.g. the shapes recipe's direction quadruples (one colour and
    shape, all four direction words in one batch).

    State: ``get_state()`` is a small JSON-able dict (epoch, position within this host's epoch order, plus the
    seed/shard settings it is valid for). ``set_state`` on an iterator built with the same arguments resumes
    exactly: the following batches equal those of an uninterrupted run. Positions count examples, so a resumed
    run may also change the batch size. Each host saves its own state.
    """

    def __init__(
        self,
        data: VideoTextData,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        as_float: bool = False,
        group_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_size < 1 or batch_size % group_size or len(data) % group_size:
            raise ValueError(
                f"group_size {group_size} must be >= 1 and divide both the (per-host) batch size {batch_size} and the"
                f" number of examples {len(data)}: write the caption CSV in whole groups and pick a batch size that"
                " is a multiple of the group size"
            )
        if len(data) // group_size < process_count:
            raise ValueError(
                f"{len(data) // group_size} groups of {group_size} cannot be split over {process_count} hosts:"
                " use fewer hosts or smaller groups"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1} (process_count)")
        if len(data) < process_count:
            raise ValueError(f"{len(data)} examples cannot be split over {process_count} hosts: use fewer hosts")
        self.data, self.batch_size = data, batch_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.drop_remainder, self.as_float, self.group_size = drop_remainder, as_float, group_size
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def host_order(self, epoch: int) -> np.ndarray:
        """This host's example indices for ``epoch``, in visiting order: int64 [about N / process_count]."""
        if epoch != self._order_epoch:
            g = self.group_size
            n = len(self.data) // g
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            groups = order[self.process_index :: self.process_count]
            self._order, self._order_epoch = (groups[:, None] * g + np.arange(g)).reshape(-1), epoch
        return self._order

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        indices: list[int] = []
        epoch, position = self.epoch, self.position
        while len(indices) < self.batch_size:
            if self.num_epochs is not None and epoch >= self.num_epochs:
                break
            order = self.host_order(epoch)
            take = order[position : position + self.batch_size - len(indices)]
            indices.extend(take.tolist())
            position += len(take)
            if position >= len(order):
                epoch, position = epoch + 1, 0
        if not indices or (len(indices) < self.batch_size and self.drop_remainder):
            self.epoch, self.position = epoch, position
            raise StopIteration
        self.epoch, self.position = epoch, position
        return self.data.get_batch(indices, as_float=self.as_float)

    def _settings(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "num_examples": len(self.data),
            "process_index": self.process_index,
            "process_count": self.process_count,
            "group_size": self.group_size,
        }

    def get_state(self) -> dict[str, int]:
        """``{"epoch", "position", ...settings}``: where the next batch starts; JSON-serialisable."""
        return {"epoch": int(self.epoch), "position": int(self.position), **self._settings()}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Resume from ``get_state()``; the settings it records must match this iterator's."""
        for key, value in self._settings().items():
            if key in state and int(state[key]) != value:
                raise ValueError(
                    f"iterator state has {key}={state[key]} but this iterator has {key}={value}: resume with the"
                    " same dataset, seed, batch size and host layout the state was saved with"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.host_order(epoch)):
            raise ValueError(f"iterator state epoch={epoch}, position={position} is out of range for this host's data")
        self.epoch, self.position = epoch, position


__all__ = [
    "DATASET_NAME",
    "BadRow",
    "BatchIterator",
    "BuildReport",
    "CaptionCsvError",
    "SourceRow",
    "VideoText",
    "VideoTextConfig",
    "VideoTextData",
    "build_dataset",
    "find_caption_csv",
    "find_dataset_dir",
    "load_caption_embeddings",
    "read_caption_csv",
    "save_caption_embeddings",
]
