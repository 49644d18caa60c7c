"""Training data: a synthetic captioned-shapes generator, video decoding, and tfds ArrayRecord datasets.

No module here imports jax (the top-level ``show1_jax`` package does, through ``show1_jax.loading``).
``synthetic`` and ``videos`` need only numpy, PIL and imageio; ``dataset`` adds tensorflow-datasets (without
TensorFlow).
"""

from show1_jax.data.dataset import (
    BadRow,
    BatchIterator,
    BuildReport,
    CaptionCsvError,
    VideoTextData,
    build_dataset,
    load_caption_embeddings,
    read_caption_csv,
    save_caption_embeddings,
)
from show1_jax.data.synthetic import (
    Combination,
    CombinationSplit,
    SyntheticConfig,
    attribute_combinations,
    generate_dataset,
    render_clip,
    split_combinations,
    write_direction_groups,
)
from show1_jax.data.videos import (
    Clip,
    ClipTooShortError,
    Video,
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
    load_clip,
    read_video,
    resize_frames,
    sample_frame_indices,
    write_video,
)

__all__ = [
    "BadRow",
    "BatchIterator",
    "BuildReport",
    "CaptionCsvError",
    "Clip",
    "ClipTooShortError",
    "Combination",
    "CombinationSplit",
    "SyntheticConfig",
    "Video",
    "VideoDecodeError",
    "VideoError",
    "VideoNotFoundError",
    "VideoTextData",
    "attribute_combinations",
    "build_dataset",
    "generate_dataset",
    "load_caption_embeddings",
    "load_clip",
    "read_caption_csv",
    "read_video",
    "render_clip",
    "resize_frames",
    "sample_frame_indices",
    "save_caption_embeddings",
    "split_combinations",
    "write_direction_groups",
    "write_video",
]
