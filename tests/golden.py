"""Discovery of reference cases made by the original PyTorch code.

Cases live under the folder named by ``SHOW1_GOLDEN`` (default ``../shared/golden`` next to the repository).
A model case is any folder with a ``meta.json`` whose ``kind`` names a model family; a scheduler case has a
``kind`` starting with ``scheduler_``; a pipeline case is any folder with a ``pipeline.json``. Nothing here knows
the names of the public cases, so any other case set made the same way runs through the same tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SHOW1_GOLDEN", REPO.parent / "shared" / "golden")).resolve()


def _metas() -> list[tuple[Path, dict]]:
    if not GOLDEN.is_dir():
        return []
    out = []
    for meta in sorted(GOLDEN.rglob("meta.json")):
        out.append((meta.parent, json.loads(meta.read_text())))
    return out


def model_cases(*kinds: str) -> list:
    """pytest params for every model case folder whose meta.json kind is one of ``kinds``."""
    cases = [
        pytest.param(folder, id=str(folder.relative_to(GOLDEN)))
        for folder, meta in _metas()
        if meta.get("kind") in kinds
    ]
    return cases or [pytest.param(None, marks=pytest.mark.skip(reason=f"no golden case of kind {kinds} in {GOLDEN}"))]


def scheduler_cases(*kinds: str) -> list:
    return model_cases(*kinds)


def pipeline_cases(*class_substrings: str) -> list:
    """pytest params for pipeline case folders whose pipeline class contains one of the given substrings."""
    found = []
    if GOLDEN.is_dir():
        for pj in sorted(GOLDEN.rglob("pipeline.json")):
            meta = json.loads(pj.read_text())
            cls = meta.get("pipeline_class", meta.get("class", ""))
            if not class_substrings or any(s in cls for s in class_substrings):
                found.append(pytest.param(pj.parent, id=str(pj.parent.relative_to(GOLDEN))))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"no pipeline case {class_substrings}"))]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def rel_err(actual, reference) -> float:
    """max|actual - reference| / max|reference|, the parity figure used throughout the tests."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    assert a.shape == r.shape, f"shape {a.shape} != reference {r.shape}"
    return float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))


def video_to_jax(x: np.ndarray) -> np.ndarray:
    """(B, C, F, H, W) PyTorch layout -> (B, F, H, W, C)."""
    return np.transpose(x, (0, 2, 3, 4, 1))


def image_to_jax(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) PyTorch layout -> (B, H, W, C)."""
    return np.transpose(x, (0, 2, 3, 1))


def to_jax_layout(x: np.ndarray) -> np.ndarray:
    """Channels-last for 4-D images and 5-D videos; anything else unchanged."""
    if x.ndim == 5:
        return video_to_jax(x)
    if x.ndim == 4:
        return image_to_jax(x)
    return x
