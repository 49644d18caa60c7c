"""Writing videos and arrays: mp4 (imageio-ffmpeg), GIF and .npz, each written to a temporary name and renamed.

A failed or interrupted write never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] in [-1, 1] -> uint8, the reference's ``tensor2vid``: (x/2 + 1/2) clamped, x255 truncated."""
    video = np.asarray(video, dtype=np.float32)
    return (np.clip(video * 0.5 + 0.5, 0.0, 1.0) * 255).astype(np.uint8)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to ``path``; it is renamed to ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path.parent}: {err}; choose a writable output folder") from err
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{path.parent} is not writable: choose another output folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: float) -> Path:
    """uint8 [F, H, W, 3] -> H.264 mp4 at the exact size (odd sizes use yuv444p, which needs no even dimensions)."""
    import imageio.v2 as iio

    frames = _check_frames(frames)
    odd = frames.shape[1] % 2 or frames.shape[2] % 2
    with atomic_path(path) as tmp:
        writer = iio.get_writer(
            tmp,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=1,
            pixelformat="yuv444p" if odd else "yuv420p",
            ffmpeg_log_level="error",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def write_gif(path: str | Path, frames: np.ndarray, *, fps: float) -> Path:
    """uint8 [F, H, W, 3] -> looping GIF."""
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0
        )
    return Path(path)


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """Any mp4/GIF -> uint8 [F, H, W, 3]."""
    import imageio.v3 as iio

    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:
        frames = frames[None]
    return frames[..., :3]
