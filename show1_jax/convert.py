"""Convert released PyTorch component folders into our format (config.json + orbax parameters).

A component folder (``unet/``, ``vae/``, ``text_encoder/``) is loaded with :func:`show1_jax.load_component`, which
checks every key, and written with :func:`show1_jax.loading.save_converted`. A whole pipeline folder (one with
``model_index.json``, e.g. a downloaded ``show-1-base``) is converted component by component; its other folders
(scheduler, tokenizer, ...) are copied unchanged.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp

from show1_jax.configs import read_json
from show1_jax.loading import CONVERTED_MARKER, FAMILIES, _atomic_folder, load_component, save_converted


def is_component(folder: Path) -> bool:
    """A folder whose config.json names a model class we can load (released or converted)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    raw = json.loads(cfg.read_text())
    name = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
    return CONVERTED_MARKER in raw or name in FAMILIES


def convert_component(src: str | Path, dst: str | Path, *, dtype=jnp.float32, variant: str | None = None) -> Path:
    """One released component folder -> one converted folder."""
    model = load_component(src, dtype=dtype, variant=variant)
    return save_converted(model, dst)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Convert a component folder or a whole pipeline folder (``model_index.json``) from ``src`` into ``dst``.

    Written atomically: ``dst`` appears only when everything converted.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder: pass a component folder (unet/) or a pipeline folder")
    if is_component(src):
        t0 = time.perf_counter()
        out = convert_component(src, dst, dtype=dtype, variant=variant)
        log(f"converted {src} -> {out} in {time.perf_counter() - t0:.1f} s")
        return out
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{src} has neither config.json (a component) nor model_index.json (a pipeline): "
            f"it contains {sorted(p.name for p in src.iterdir())}"
        )
    read_json(src / "model_index.json")  # refuse a malformed index early
    with _atomic_folder(dst) as tmp:
        for item in sorted(src.iterdir()):
            if item.is_dir() and is_component(item):
                t0 = time.perf_counter()
                convert_component(item, tmp / item.name, dtype=dtype, variant=variant)
                log(f"converted {item.name} in {time.perf_counter() - t0:.1f} s")
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
                log(f"copied {item.name}/")
            else:
                shutil.copy2(item, tmp / item.name)
    return dst.resolve()
