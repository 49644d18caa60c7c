"""Text-video alignment on the synthetic shapes dataset, read from pixels with no learned model.

``recognise`` names the colour, shape and motion direction of the one shape in a video; ``evaluate`` compares
those with the prompts' attributes over many videos; ``ceiling`` runs the same metric on real dataset clips, so a
model's score can be read against what the metric achieves on the data itself.

How a video is read (frames on a torus, as ``synthetic`` draws them):

- Foreground: pixels farther from the background colour than half the distance to the nearest candidate colour
  (about 5 sigma of 20/255 pixel noise). Per frame, the circular mean of the foreground's coordinates is the shape's
  centre whatever the wrap-around; specks far from it are dropped.
- Colour: the median of the strongest half of the foreground pixels (the core, not the blurred rim), nearest
  candidate in CIELAB.
- Shape: the frames, rolled so the shape sits in the middle, are averaged (noise averages out; a whole-pixel motion
  stacks exactly) and cut where they are half-way to the colour. That mask is compared with templates drawn by the
  dataset's own ``shape_mask`` at sizes fitted to the mask's area and sub-pixel shifts, blurred like the video's
  edges when those are soft; the best IoU wins. Large (upscaled) shapes are first averaged down to about 8 pixels.
- Direction: per consecutive pair of frames, the centre's displacement on the torus (taken into
  ``[-size/2, size/2)``); the median over pairs, projected on each candidate direction, picks the largest.

Limit: at a radius of 3 pixels (16x24 frames) a square and a circle can draw the same pixels, so even real clips
score below 100% on shape there; ``ceiling`` measures what the data allows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from show1_jax.data.synthetic import (
    COLOURS,
    DIRECTIONS,
    Combination,
    SyntheticConfig,
    attribute_combinations,
    clip_specs,
    render_clip,
    shape_mask,
)
from show1_jax.data.videos import resize_frames

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "direction")
NONE = "none"  # the confusion tables' name for "nothing recognised"

_DEFAULT = SyntheticConfig()
_RADIUS_FACTORS = np.linspace(0.85, 1.2, 8)  # around the radius fitted from the mask's area
_SHIFTS = np.array([-1 / 3, 0.0, 1 / 3])  # sub-pixel template offsets, pixels
_BLUR_FACTORS = np.array([0.5, 0.7, 0.85, 1.0, 1.2, 1.45])  # template blurs around the estimated one


@dataclasses.dataclass(frozen=True)
class Recognition:
    """What ``recognise`` read from one video; attributes are None when nothing could be read.

    Diagnostics: ``foreground_fraction`` of all pixels; ``rgb`` the median core colour and ``colour_distance`` its
    CIELAB distance to the chosen colour; ``shape_ious`` each candidate shape's best template IoU with the stacked
    mask, ``radius`` the chosen template's size and ``blur`` the edges' estimated Gaussian sigma (pixels);
    ``displacement`` the median motion (dy, dx) per frame in pixels.
    """

    colour: str | None
    shape: str | None
    direction: str | None
    foreground_fraction: float
    rgb: tuple[float, float, float] | None = None
    colour_distance: float | None = None
    shape_ious: dict[str, float] = dataclasses.field(default_factory=dict)
    radius: float | None = None
    blur: float | None = None
    displacement: tuple[float, float] | None = None

    @property
    def shape_iou(self) -> float | None:
        """The chosen shape's template IoU (1.0: the stacked mask is exactly a template)."""
        return self.shape_ious.get(self.shape) if self.shape is not None else None

    def correct(self, expected: Combination) -> dict[str, bool]:
        """Per attribute, whether it matches ``expected`` (None never does)."""
        return {a: getattr(self, a) is not None and getattr(self, a) == getattr(expected, a) for a in ATTRIBUTES}


def recognise(
    frames: np.ndarray,
    background: Sequence[int] = _DEFAULT.background,
    *,
    colours: Sequence[str] = _DEFAULT.colours,
    shapes: Sequence[str] = _DEFAULT.shapes,
    directions: Sequence[str] = _DEFAULT.directions,
    min_speed: float = 0.25,
) -> Recognition:
    """Read colour, shape and direction from a video of one shape on a plain background.

    Args:
      frames: uint8 [F, H, W, 3], any size; F >= 2 for a direction.
      background: the plain background's RGB colour.
      colours, shapes, directions: the candidates (names from ``synthetic``); the config's by default.
      min_speed: pixels per frame: when the median motion along every candidate direction is below this (a still
        video, or one moving none of the candidate ways), the direction is None.

    Returns:
      a ``Recognition``; all attributes None when no frame has foreground.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}: convert floats in [0, 1] with"
            " (frames * 255).round().clip(0, 255).astype(np.uint8)"
        )
    SyntheticConfig(colours=tuple(colours), shapes=tuple(shapes), directions=tuple(directions))  # checks the names
    bg = np.asarray(background, np.float32)
    palette = np.asarray([COLOURS[c] for c in colours], np.float32)  # [K, 3]
    gap = float(np.linalg.norm(palette - bg, axis=-1).min())
    if gap < 40:
        raise ValueError(
            f"colour {colours[int(np.linalg.norm(palette - bg, axis=-1).argmin())]!r} is (nearly) the background"
            f" {tuple(background)}: remove it from colours or change the background"
        )
    f, h, w, _ = frames.shape
    distance = np.linalg.norm(frames.astype(np.float32) - bg, axis=-1)  # [F, H, W]
    foreground = distance > gap / 2
    fraction = float(foreground.mean())

    centres: list[tuple[float, float] | None] = []
    masks: list[np.ndarray | None] = []
    for t in range(f):
        mask, centre = _isolate(foreground[t])
        masks.append(mask)
        centres.append(centre)
    if all(m is None for m in masks):
        return Recognition(None, None, None, fraction)

    # Colour: the core (strongest half) of the shape's pixels, not its blurred rim.
    pixels = np.concatenate([frames[t][m] for t, m in enumerate(masks) if m is not None]).astype(np.float32)
    strength = np.concatenate([distance[t][m] for t, m in enumerate(masks) if m is not None])
    rgb = np.median(pixels[strength >= np.median(strength)], axis=0)  # [3]
    lab_distance = np.linalg.norm(_lab(palette) - _lab(rgb[None]), axis=-1)  # [K]
    colour = colours[int(lab_distance.argmin())]

    # Shape: the frames stacked on the shape's centre (noise averages out), matched with templates once.
    towards = rgb - bg
    alpha = (frames.astype(np.float32) - bg) @ (towards / (towards @ towards))  # [F, H, W], 0 background, 1 colour
    stacked = _stack(alpha, centres)  # [H, W], the shape in the middle
    # Large shapes (upscaled videos) are matched at a working scale with an area radius of at most 8 pixels.
    scale = max(1, int(np.ceil(np.sqrt((stacked > 0.5).sum() / np.pi) / 8)))
    if scale > 1:
        sh, sw = h // scale, w // scale
        stacked = stacked[: sh * scale, : sw * scale].reshape(sh, scale, sw, scale).mean(axis=(1, 3))
    mask, centre = _isolate(stacked > 0.5)
    shape, fits, blur = None, {}, None
    if mask is not None:
        blur = _estimate_blur(stacked, mask, centre)
        fits = _fit_shapes(mask, centre, shapes, blur)  # shape -> (iou, radius)
        shape = max(shapes, key=lambda s: fits[s][0])  # an exact tie goes to the first candidate
        blur *= scale

    # Direction: the median displacement between consecutive frames, on the torus.
    steps = [
        ((b[0] - a[0] + h / 2) % h - h / 2, (b[1] - a[1] + w / 2) % w - w / 2)
        for a, b in zip(centres[:-1], centres[1:])
        if a is not None and b is not None
    ]
    direction, displacement = None, None
    if steps:
        dy, dx = np.median(np.asarray(steps), axis=0)
        displacement = (float(dy), float(dx))
        speed = {d: DIRECTIONS[d][0] * dy + DIRECTIONS[d][1] * dx for d in directions}  # along each candidate
        best = max(speed, key=speed.get)
        direction = best if speed[best] >= min_speed else None

    return Recognition(
        colour=colour,
        shape=shape,
        direction=direction,
        foreground_fraction=fraction,
        rgb=tuple(float(v) for v in rgb),
        colour_distance=float(lab_distance.min()),
        shape_ious={s: iou for s, (iou, _) in fits.items()},
        radius=fits[shape][1] * scale if shape is not None else None,
        blur=blur,
        displacement=displacement,
    )


def evaluate(
    videos_and_expected: Iterable[tuple[np.ndarray, Combination]],
    background: Sequence[int] = _DEFAULT.background,
    *,
    colours: Sequence[str] = _DEFAULT.colours,
    shapes: Sequence[str] = _DEFAULT.shapes,
    directions: Sequence[str] = _DEFAULT.directions,
    min_speed: float = 0.25,
) -> dict[str, Any]:
    """Alignment of videos with their prompts' attributes.

    Args:
      videos_and_expected: (frames uint8 [F, H, W, 3], the prompt's ``Combination``) pairs.
      background, colours, shapes, directions, min_speed: as for ``recognise``.

    Returns:
      ``{"colour": accuracy, "shape": ..., "direction": ..., "overall": mean over every (video, attribute),
      "count": videos, "no_foreground": videos where nothing was found, "confusion": {attribute: {expected:
      {predicted: count}}}}``; an attribute that was not recognised is predicted as ``"none"`` and counts as wrong.
    """
    correct = {a: 0 for a in ATTRIBUTES}
    confusion: dict[str, dict[str, dict[str, int]]] = {a: {} for a in ATTRIBUTES}
    count = no_foreground = 0
    for frames, expected in videos_and_expected:
        expected = Combination(*expected)
        found = recognise(
            frames, background, colours=colours, shapes=shapes, directions=directions, min_speed=min_speed
        )
        count += 1
        no_foreground += found.colour is None
        for attribute, ok in found.correct(expected).items():
            correct[attribute] += ok
            row = confusion[attribute].setdefault(getattr(expected, attribute), {})
            predicted = getattr(found, attribute) or NONE
            row[predicted] = row.get(predicted, 0) + 1
    if count == 0:
        raise ValueError("no videos to evaluate: videos_and_expected was empty")
    report: dict[str, Any] = {a: correct[a] / count for a in ATTRIBUTES}
    report["overall"] = sum(correct.values()) / (count * len(ATTRIBUTES))
    report.update(count=count, no_foreground=no_foreground, confusion=confusion)
    return report


def ceiling(
    config: SyntheticConfig = _DEFAULT,
    combos: Sequence[Combination] | None = None,
    n_per_combo: int = 1,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``evaluate``'s report on real clips of ``config``: the metric's ceiling, its score on the data itself.

    1.0 from 20x32 frames (radius 4) up, bicubic-upscaled or not; at 16x24 (radius 3) squares read as circles.

    Args:
      config: the dataset's settings (size, speed, vocabularies, background).
      combos: the triples to render (e.g. ``split_combinations(config).held_out``); all of the config's by default.
      n_per_combo: clips per triple, at seeded random start positions.
      seed: fixes the start positions.
      size: (H, W) to resize the clips to with PIL bicubic, as generated videos are upscaled; None keeps them.
    """
    combos = list(attribute_combinations(config) if combos is None else combos)
    specs = clip_specs(n_per_combo * len(combos), config, combinations=combos, seed=seed)

    def clips():
        for spec in specs:
            frames = render_clip(spec, config)
            if size is not None:
                frames = resize_frames(frames, size[0], size[1], crop="none")
            yield frames, spec.combination

    return evaluate(
        clips(), config.background, colours=config.colours, shapes=config.shapes, directions=config.directions
    )


def _circular_mean(mask: np.ndarray, axis: int) -> float:
    """The mean coordinate along ``axis`` of a [H, W] mask's pixels, on a circle of that axis' length."""
    n = mask.shape[axis]
    counts = mask.sum(axis=1 - axis)  # pixels per row (axis 0) or column (axis 1)
    angle = np.angle(np.sum(counts * np.exp(2j * np.pi * np.arange(n) / n)))
    return float(angle * n / (2 * np.pi) % n)


def _offsets(n: int, centre: float) -> np.ndarray:
    """Toroidal offsets of coordinates 0..n-1 from ``centre``, in [-n/2, n/2)."""
    return (np.arange(n) - centre + n / 2) % n - n / 2


def _isolate(foreground: np.ndarray, min_pixels: int = 3) -> tuple[np.ndarray | None, tuple[float, float] | None]:
    """The shape's pixels in one [H, W] frame, without specks far from it, and its centre on the torus."""
    if foreground.sum() < min_pixels:
        return None, None
    h, w = foreground.shape
    cy, cx = _circular_mean(foreground, 0), _circular_mean(foreground, 1)
    # Every shape lies within 1.6x its area-equivalent radius of its centroid (the triangle's apex); allow 2x + 2.
    reach = 2 * np.sqrt(foreground.sum() / np.pi) + 2
    oy, ox = _offsets(h, cy)[:, None], _offsets(w, cx)[None, :]
    mask = foreground & (oy**2 + ox**2 <= reach**2)
    if mask.sum() < min_pixels:
        return None, None
    cy, cx = _circular_mean(mask, 0), _circular_mean(mask, 1)
    # Once unwrapped, the plain mean is the centroid the templates are aligned to.
    oy, ox = _offsets(h, cy)[:, None], _offsets(w, cx)[None, :]
    n = mask.sum()
    return mask, ((cy + (oy * mask).sum() / n) % h, (cx + (ox * mask).sum() / n) % w)


@functools.cache
def _template_geometry(shape: str) -> tuple[float, float]:
    """(area / r^2, centroid's dy / r) of a large ``shape_mask`` (the centroid's dx is 0 for every shape)."""
    r = 200.0
    grid = np.arange(-1.5 * r, 1.5 * r + 1)
    mask = shape_mask(shape, grid[:, None], grid[None, :], r)
    return float(mask.sum() / r**2), float((grid[:, None] * mask).sum() / mask.sum() / r)


def _fit_shapes(
    mask: np.ndarray, centre: tuple[float, float], shapes: Sequence[str], blur: float
) -> dict[str, tuple[float, float]]:
    """Per shape, (best IoU of its templates with the [H, W] mask, that template's radius).

    Templates are drawn by ``shape_mask`` on a window around the mask's centroid, with offsets taken on the torus as
    ``render_clip`` does and the template's centroid on the mask's, at radii around the one whose area matches the
    mask and at sub-pixel shifts. When the edges are blurred, each template is blurred by sigmas around ``blur`` and
    cut at half height, as the shape's mask was.
    """
    h, w = mask.shape
    area = float(mask.sum())
    fitted = {s: np.sqrt(area / _template_geometry(s)[0]) for s in shapes}
    r_max = max(fitted.values()) * _RADIUS_FACTORS[-1]
    reach = int(np.ceil(1.4 * r_max + 3 * blur * _BLUR_FACTORS[-1])) + 2
    rows = np.arange(h) if 2 * reach + 1 >= h else (round(centre[0]) + np.arange(-reach, reach + 1)) % h
    cols = np.arange(w) if 2 * reach + 1 >= w else (round(centre[1]) + np.arange(-reach, reach + 1)) % w
    window = mask[np.ix_(rows, cols)]  # [h', w']
    oy, ox = _offsets(h, centre[0])[rows], _offsets(w, centre[1])[cols]
    blurs = [(_gaussian(oy, b), _gaussian(ox, b)) for b in blur * _BLUR_FACTORS] if blur > 0 else [None]
    fits = {}
    for s in shapes:
        centroid_dy = _template_geometry(s)[1]
        best = (-1.0, 0.0)
        for r in fitted[s] * _RADIUS_FACTORS:
            dy = (oy[None, :] + centroid_dy * r - _SHIFTS[:, None])[:, None, :, None]  # [S, 1, h', 1]
            dx = (ox[None, :] - _SHIFTS[:, None])[None, :, None, :]  # [1, S, 1, w']
            sharp = shape_mask(s, dy, dx, float(r))  # [S, S, h', w']
            for gaussians in blurs:
                templates = sharp
                if gaussians is not None:
                    templates = gaussians[0] @ sharp.astype(np.float32) @ gaussians[1].T > 0.5
                inter = (templates & window).sum(axis=(-2, -1))
                iou = (inter / (templates.sum(axis=(-2, -1)) + area - inter)).max()
                if iou > best[0]:
                    best = (float(iou), float(r))
        fits[s] = best
    return fits


def _stack(alpha: np.ndarray, centres: list) -> np.ndarray:
    """The mean of the [F, H, W] frames with foreground, each rolled by whole pixels to put the shape's centre in
    the middle (rolled by its rounded motion from the first such frame, so frames of a whole-pixel motion align
    exactly)."""
    h, w = alpha.shape[1:]
    first = next(c for c in centres if c is not None)
    base = (h // 2 - int(np.floor(first[0] + 0.5)), w // 2 - int(np.floor(first[1] + 0.5)))
    total, n = np.zeros((h, w), np.float32), 0
    for a, c in zip(alpha, centres):
        if c is None:
            continue
        dy = int(round((c[0] - first[0] + h / 2) % h - h / 2))
        dx = int(round((c[1] - first[1] + w / 2) % w - w / 2))
        total += np.roll(a, (base[0] - dy, base[1] - dx), axis=(0, 1))
        n += 1
    return total / n


def _estimate_blur(alpha: np.ndarray, mask: np.ndarray, centre: tuple[float, float], min_blur: float = 0.3) -> float:
    """Gaussian sigma (pixels) of the shape's edges in an [H, W] alpha map: the pixels near the shape caught between
    25% and 75% of the way to the colour, per pixel of the mask's boundary (an edge blurred by sigma has 1.35 sigma
    of them). Below ``min_blur`` reads as sharp (0)."""
    h, w = alpha.shape
    reach = 2 * np.sqrt(mask.sum() / np.pi) + 2
    near = _offsets(h, centre[0])[:, None] ** 2 + _offsets(w, centre[1])[None, :] ** 2 <= reach**2
    rim = (near & (alpha > 0.25) & (alpha < 0.75)).sum()
    inside = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    sigma = float(rim / (1.35 * max((mask & ~inside).sum(), 1)))
    return sigma if sigma >= min_blur else 0.0


def _gaussian(offsets: np.ndarray, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur matrix over pixel offsets (rows sum to 1)."""
    g = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma) ** 2).astype(np.float32)
    return g / g.sum(axis=1, keepdims=True)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0..255: [N, 3] -> [N, 3]."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920], [0.1804375, 0.0721750, 0.9503041]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=-1)


__all__ = ["ATTRIBUTES", "NONE", "Recognition", "ceiling", "evaluate", "recognise"]
