"""Video files in and out: decoding, frame sampling at a target frame rate, resizing, writing.

Frames are uint8 [F, H, W, 3] RGB everywhere. Decoding goes through imageio: the ffmpeg plugin (bundled with
imageio-ffmpeg) for mp4 and every other container, the pillow plugin for GIF.

Timing. A decoded video carries one timestamp per frame (seconds). For ffmpeg containers they are ``i / fps`` from
the stream's nominal frame rate (constant frame rate is assumed, as for WebVid); for GIFs they are the running sum of
the per-frame durations (GIF stores centiseconds; a missing or zero duration counts as 100 ms, as browsers do).
Sampling ``num_frames`` at ``fps`` picks, for target times ``t_k = t_start + k / fps``, the frame on screen at
``t_k`` (the last frame whose timestamp is <= ``t_k``). A target rate above the source's repeats frames.

Resizing. Frames are first center-cropped to the target aspect ratio (``crop="center"``; ``crop="none"``
stretches), then resized with PIL. The default filter is bicubic: PIL widens the filter support by the scale factor
when it shrinks, so downscaling is antialiased (like torchvision's ``antialias=True``) and upscaling is plain
bicubic. ``resample="area"`` (PIL's box filter, exact area averaging when shrinking) and ``"bilinear"`` are the
alternatives.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

GIF_DEFAULT_FRAME_MS = 100  # what browsers show for a GIF frame with no (or a zero) delay
_DECODE_WHOLE_BYTES = 256 * 2**20  # videos estimated below this are decoded in one pass, longer ones streamed
_TIME_EPS = 1e-6  # seconds; absorbs float error when a target time lands exactly on a frame's timestamp

Resample = Literal["bicubic", "area", "bilinear"]
Crop = Literal["center", "none"]
Start = int | Literal["center"] | np.random.Generator

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
}


def _reason(cause: BaseException | str) -> str:
    """One or two lines about a decoder failure; ffmpeg's stderr dump is cut to its last two lines."""
    if isinstance(cause, str):
        return cause
    text = str(cause)
    head, sep, stderr = text.partition("=== stderr ===")
    if sep:
        tail = [line.strip() for line in stderr.splitlines() if line.strip()][-2:]
        text = head.strip() + (" (ffmpeg: " + " / ".join(tail) + ")" if tail else "")
    return f"{type(cause).__name__}: {text}"


class VideoError(Exception):
    """A video that cannot serve as a training clip; ``path`` names the file."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(message)
        self.path = str(path)


class VideoDecodeError(VideoError):
    """A file that cannot be opened or decoded; ``cause`` is the underlying error."""

    def __init__(self, path: str | Path, cause: BaseException | str):
        super().__init__(path, f"cannot decode video {path}: {_reason(cause)}")
        self.cause = cause


class VideoNotFoundError(VideoDecodeError):
    """A video path that does not exist (a decode error: catching ``VideoDecodeError`` covers both)."""

    def __init__(self, path: str | Path):
        VideoError.__init__(
            self, path, f"video file {path} does not exist: check the path column and that it is relative to the CSV"
        )
        self.cause = FileNotFoundError(str(path))


class ClipTooShortError(VideoError):
    """A video with too few frames (at the requested frame rate) for the requested clip."""

    def __init__(self, path: str | Path, num_frames: int, requested: int, detail: str = ""):
        super().__init__(
            path,
            f"video {path} is too short: it has {num_frames} frames, {requested} requested{detail}; lower the frame"
            " count or frame rate, or skip such videos",
        )
        self.num_frames = num_frames
        self.requested = requested


@dataclasses.dataclass(frozen=True)
class Video:
    """A decoded video.

    Attributes:
      frames: uint8 [F, H, W, 3] RGB.
      timestamps: float64 [F], seconds from the first frame (0.0).
      duration: seconds the whole video plays (the last timestamp plus the last frame's display time).
      fps: the nominal frame rate (ffmpeg's stream rate; for GIFs ``F / duration``).
      path: the file it came from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    duration: float
    fps: float
    path: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclasses.dataclass(frozen=True)
class Clip:
    """Frames sampled from a video.

    Attributes:
      frames: uint8 [F, H, W, 3], resized if a size was asked for.
      fps: the clip's frame rate (the requested rate, or the source's when none was requested).
      indices: int64 [F], the source frame each clip frame came from.
      path: the source file.
    """

    frames: np.ndarray
    fps: float
    indices: np.ndarray
    path: str


def _is_gif(path: Path) -> bool:
    return path.suffix.lower() == ".gif"


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise VideoNotFoundError(path)


def _gif_durations_ms(path: Path) -> list[int]:
    with Image.open(path) as im:
        durations = []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            durations.append(int(im.info.get("duration") or 0) or GIF_DEFAULT_FRAME_MS)
    return durations


def _read_gif(path: Path) -> Video:
    import imageio.v3 as iio

    with iio.imopen(path, "r", plugin="pillow") as f:
        frames = np.stack([np.asarray(x, np.uint8) for x in f.iter(mode="RGB")])  # [F, H, W, 3]
    durations = np.asarray(_gif_durations_ms(path), np.float64) / 1000.0
    if len(durations) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(durations)} frame durations")
    timestamps = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    duration = float(durations.sum())
    return Video(frames, timestamps, duration, len(frames) / duration, str(path))


def _ffmpeg_reader(path: Path):
    import imageio.v2 as iio2

    return iio2.get_reader(path, format="FFMPEG")


def _ffmpeg_fps(reader) -> float:
    fps = float(reader.get_meta_data().get("fps") or 0.0)
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"the stream reports no frame rate (fps={fps})")
    return fps


def _read_ffmpeg(path: Path) -> Video:
    reader = _ffmpeg_reader(path)
    try:
        fps = _ffmpeg_fps(reader)
        frames = [np.asarray(x, np.uint8) for x in reader.iter_data()]
    finally:
        reader.close()
    if not frames:
        raise ValueError("the stream has no frames")
    frames = np.stack(frames)  # [F, H, W, 3]
    n = len(frames)
    return Video(frames, np.arange(n) / fps, n / fps, fps, str(path))


def read_video(path: str | Path) -> Video:
    """Decode every frame of an mp4 (or any ffmpeg container) or GIF file.

    Returns a ``Video`` with frames uint8 [F, H, W, 3]. Raises ``VideoNotFoundError`` for a missing file and
    ``VideoDecodeError`` (naming the path and the underlying error) for one that cannot be decoded.
    """
    path = Path(path)
    _check_exists(path)
    try:
        video = _read_gif(path) if _is_gif(path) else _read_ffmpeg(path)
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported as this file's fault
        raise VideoDecodeError(path, err) from err
    if video.frames.ndim != 4 or video.frames.shape[-1] != 3 or video.num_frames == 0:
        raise VideoDecodeError(path, f"decoded to shape {video.frames.shape}, expected [F, H, W, 3] with F > 0")
    return video


def sample_frame_indices(
    timestamps: np.ndarray,
    duration: float,
    num_frames: int,
    *,
    fps: float | None = None,
    start: Start = 0,
    path: str | Path = "<video>",
) -> np.ndarray:
    """Source frame indices for a clip of ``num_frames`` frames at ``fps``.

    Args:
      timestamps: float [N], seconds, increasing, of the source frames.
      duration: seconds the source plays (last timestamp + last frame's display time).
      num_frames: clip length F.
      fps: target frame rate; None takes consecutive source frames (the source rate).
      start: the first source frame: an int, ``"center"`` (the clip centred in the video) or a numpy Generator
        (uniform over every start for which the clip fits).
      path: names the video in errors.

    Returns:
      int64 [F] indices into the source frames.

    Raises:
      ClipTooShortError: no start lets the clip fit, or a fixed ``start`` is too late for it.
    """
    timestamps = np.asarray(timestamps, np.float64)
    n = len(timestamps)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is None:
        valid_starts = np.arange(max(n - num_frames + 1, 0))
        offsets = None
    else:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        offsets = np.arange(num_frames) / fps  # [F] seconds after the start frame
        # The last target time must fall before the end of the video.
        valid_starts = np.nonzero(timestamps + offsets[-1] < duration - _TIME_EPS)[0]
    if len(valid_starts) == 0:
        detail = (
            "" if fps is None else f" at {fps:g} fps ({offsets[-1]:.3f} s needed, the video plays {duration:.3f} s)"
        )
        raise ClipTooShortError(path, n, num_frames, detail)
    if isinstance(start, np.random.Generator):
        first = int(valid_starts[start.integers(len(valid_starts))])
    elif start == "center":
        first = int(valid_starts[len(valid_starts) // 2])
    else:
        first = int(start)
        if first < 0 or first > valid_starts[-1]:
            raise ClipTooShortError(
                path, n, num_frames, f" from start frame {first} (last possible start {valid_starts[-1]})"
            )
    if offsets is None:
        return np.arange(first, first + num_frames, dtype=np.int64)
    targets = timestamps[first] + offsets + _TIME_EPS
    return (np.searchsorted(timestamps, targets, side="right") - 1).astype(np.int64)


def resize_frames(
    frames: np.ndarray, height: int, width: int, *, crop: Crop = "center", resample: Resample = "bicubic"
) -> np.ndarray:
    """Resize uint8 [F, h, w, 3] frames to [F, height, width, 3] (center-crop to the aspect ratio first by default)."""
    if crop not in ("center", "none"):
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    if resample not in _PIL_FILTERS:
        raise ValueError(f"resample must be one of {sorted(_PIL_FILTERS)}, got {resample!r}")
    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    box = (0, 0, w, h)
    if crop == "center":
        # The largest centred window with the target aspect ratio.
        if w * height > h * width:
            cw = h * width / height
            box = ((w - cw) / 2, 0, (w + cw) / 2, h)
        else:
            ch = w * height / width
            box = (0, (h - ch) / 2, w, (h + ch) / 2)
    out = np.empty((f, height, width, 3), np.uint8)
    for i in range(f):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((width, height), _PIL_FILTERS[resample], box=box))
    return out


def _decode_selected_ffmpeg(
    path: Path, num_frames: int, fps: float | None, start: Start
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode the frames a clip needs. A short video is decoded whole in one pass; a long one is counted first and
    then streamed, keeping only the needed frames, so it is never held in memory whole."""
    reader = _ffmpeg_reader(path)
    try:
        meta = reader.get_meta_data()
        source_fps = _ffmpeg_fps(reader)
        w, h = meta.get("size") or (0, 0)
        sample = lambda n: sample_frame_indices(
            np.arange(n) / source_fps, n / source_fps, num_frames, fps=fps, start=start, path=path
        )
        estimate = float(meta.get("duration") or np.inf) * source_fps * w * h * 3
        if estimate <= _DECODE_WHOLE_BYTES:
            frames = [np.asarray(x, np.uint8) for x in reader.iter_data()]
            if not frames:
                raise ValueError("the stream has no frames")
            indices = sample(len(frames))
            return np.stack([frames[i] for i in indices.tolist()]), indices, source_fps
        n = int(reader.count_frames())
        if n == 0:
            raise ValueError("the stream has no frames")
        indices = sample(n)
        wanted = set(indices.tolist())
        last = int(indices.max())
        kept: dict[int, np.ndarray] = {}
        for i, frame in enumerate(reader.iter_data()):
            if i in wanted:
                kept[i] = np.asarray(frame, np.uint8)
            if i >= last:
                break
    finally:
        reader.close()
    if len(kept) != len(wanted):
        raise ValueError(f"the stream ended before frame {last} (counted {n} frames)")
    return np.stack([kept[i] for i in indices.tolist()]), indices, source_fps


def load_clip(
    path: str | Path,
    num_frames: int,
    *,
    fps: float | None = None,
    start: Start = 0,
    height: int | None = None,
    width: int | None = None,
    crop: Crop = "center",
    resample: Resample = "bicubic",
) -> Clip:
    """Decode, sample and resize one training clip.

    Args:
      path: an mp4 (or other ffmpeg container) or GIF file.
      num_frames: F, the clip length.
      fps: the clip's frame rate (sampled from the file's timing); None keeps consecutive source frames.
      start: first source frame: int, ``"center"``, or a numpy Generator for a uniformly random start.
      height, width: output size; both None keeps the source size.
      crop, resample: see ``resize_frames``.

    Returns:
      a ``Clip`` with frames uint8 [F, height, width, 3].

    Raises:
      VideoNotFoundError, VideoDecodeError, ClipTooShortError: each naming ``path``.
    """
    path = Path(path)
    if (height is None) != (width is None):
        raise ValueError(f"give both height and width or neither, got height={height}, width={width}")
    _check_exists(path)
    if _is_gif(path):
        video = read_video(path)
        indices = sample_frame_indices(video.timestamps, video.duration, num_frames, fps=fps, start=start, path=path)
        frames, source_fps = video.frames[indices], video.fps
    else:
        try:
            frames, indices, source_fps = _decode_selected_ffmpeg(path, num_frames, fps, start)
        except ClipTooShortError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is reported as this file's fault
            raise VideoDecodeError(path, err) from err
    if height is not None:
        frames = resize_frames(frames, height, width, crop=crop, resample=resample)
    return Clip(frames, float(source_fps if fps is None else fps), indices, str(path))


def gif_frame_ms(fps: float) -> int:
    """The frame delay a GIF stores for ``fps``: whole centiseconds, so the stored rate is ``1000 / gif_frame_ms``."""
    return max(10, int(round(100.0 / fps)) * 10)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 [F, H, W, 3] frames as mp4 (H.264, near-lossless, yuv420p) or GIF, chosen by the suffix.

    mp4 needs even H and W (yuv420p). GIF delays are whole centiseconds (see ``gif_frame_ms``), and Pillow merges
    identical consecutive frames into one longer frame: the timing survives, the frame count does not, so sample
    such GIFs with an ``fps``.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_gif(path):
        import imageio.v3 as iio

        iio.imwrite(path, frames, plugin="pillow", duration=gif_frame_ms(fps), loop=0)
        return path
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs an even height and width, got {h}x{w}: pick an even size or write .gif")
    import imageio.v2 as iio2

    # crf 10: near-lossless, so colours and edges survive for tests and small-model training.
    iio2.mimwrite(
        path, frames, format="FFMPEG", fps=fps, codec="libx264", quality=None, pixelformat="yuv420p",
        macro_block_size=1, output_params=["-crf", "10"],
    )  # fmt: skip
    return path


__all__ = [
    "GIF_DEFAULT_FRAME_MS",
    "Clip",
    "ClipTooShortError",
    "Video",
    "VideoDecodeError",
    "VideoError",
    "VideoNotFoundError",
    "gif_frame_ms",
    "load_clip",
    "read_video",
    "resize_frames",
    "sample_frame_indices",
    "write_video",
]
