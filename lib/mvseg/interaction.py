"""Simulated users: the paper's evaluation protocols and the randomised prompts used for training.

All functions work on one ``H W`` binary mask (nonzero = inside) in numpy and return prompts in that
mask's pixel coordinates, ``(x, y) = (column, row)``, so they feed :class:`mvseg.prompts.Prompts` directly.

* center clicks (paper 5.3): one positive click at the centre of the largest component; each correction one
  click at the centre of the largest error component, positive for a miss, negative for a false alarm.
  "Centre" = the pixel farthest from the component's border, so it is always inside the component.
* centerline scribbles (paper 5.3): a positive scribble along the skeleton of the largest component and a
  negative one along the skeleton of a band around it; each correction one scribble along the skeleton of
  the largest error component.
* random prompts for training (paper 3.3): 1-3 positive and 0-3 negative clicks or scribbles, or a box, to
  start; 1-3 corrections per step from the error region.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .prompts import Prompts

Point = tuple[int, int]


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    return mask != 0


def components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-connectivity), largest first."""
    labels, n = ndimage.label(_binary(mask), structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    return [labels == (i + 1) for i in np.argsort(-sizes, kind="stable")]


def largest_component(mask: np.ndarray) -> Optional[np.ndarray]:
    parts = components(mask)
    return parts[0] if parts else None


def center_point(region: np.ndarray) -> Point:
    """The pixel of ``region`` farthest from its border; among ties (a rectangle's ridge), the one nearest
    to the middle of the tied pixels."""
    # Pad so that the image border counts as the region's border too.
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dist >= dist.max() - 1e-6)
    best = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
    return int(xs[best]), int(ys[best])


def center_click(mask: np.ndarray) -> Optional[Point]:
    """Centre of the largest component, or ``None`` for an empty mask."""
    region = largest_component(mask)
    return None if region is None else center_point(region)


def error_regions(truth: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(missed = truth and not predicted, false alarm = predicted and not truth)."""
    t, p = _binary(truth), _binary(prediction)
    if t.shape != p.shape:
        raise ValueError(f"prediction shape {p.shape} does not match the mask shape {t.shape}")
    return t & ~p, p & ~t


def largest_error(truth: np.ndarray, prediction: np.ndarray) -> tuple[Optional[np.ndarray], bool]:
    """The largest error component and whether it is a miss (needs a positive correction)."""
    missed, false_alarm = error_regions(truth, prediction)
    m, f = largest_component(missed), largest_component(false_alarm)
    if m is None and f is None:
        return None, True
    if f is None or (m is not None and m.sum() >= f.sum()):
        return m, True
    return f, False


def correction_click(truth: np.ndarray, prediction: np.ndarray) -> Optional[tuple[Point, bool]]:
    """One click at the centre of the largest error component: ``((x, y), positive)``; ``None`` if perfect."""
    region, positive = largest_error(truth, prediction)
    return None if region is None else (center_point(region), positive)


def bounding_box(mask: np.ndarray, jitter: float = 0.0, rng: Optional[np.random.Generator] = None) -> list[int]:
    """``[x1, y1, x2, y2]`` (end-exclusive) around the mask; ``jitter`` moves each side by up to that
    fraction of the box size (training)."""
    m = _binary(mask)
    if not m.any():
        raise ValueError("cannot draw a box around an empty mask")
    ys, xs = np.nonzero(m)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    if jitter > 0:
        rng = rng or np.random.default_rng()
        w, h = box[2] - box[0], box[3] - box[1]
        box += rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
    h, w = m.shape
    x1, y1 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]), x1 + 1, w)), int(np.clip(np.ceil(box[3]), y1 + 1, h))
    return [x1, y1, x2, y2]


def centerline(region: np.ndarray) -> np.ndarray:
    """Skeleton of a region (its centre line); a one-pixel region is its own skeleton."""
    region = _binary(region)
    skeleton = skeletonize(region)
    if not skeleton.any() and region.any():
        skeleton = np.zeros_like(region)
        x, y = center_point(region)
        skeleton[y, x] = True
    return skeleton


def background_band(mask: np.ndarray, width: Optional[int] = None) -> np.ndarray:
    """Background pixels within ``width`` of the object (default: a quarter of its equivalent diameter)."""
    m = _binary(mask)
    if width is None:
        width = max(2, int(round(0.25 * 2 * np.sqrt(m.sum() / np.pi))))
    grown = ndimage.binary_dilation(m, iterations=width)
    band = grown & ~m
    return band if band.any() else ~m


# Human strokes in the MedScribble data are ~1.75% of the image side wide and rarely longer than twice the
# side (see tests/test_interaction.py, which measures both against the real scribbles).
BRUSH_FRACTION = 0.0175
MAX_LENGTH_SIDES = 2.0


def stroke(region: np.ndarray) -> np.ndarray:
    """A human-like stroke along a region's centre line: at most ``MAX_LENGTH_SIDES`` image sides long
    (the part nearest the region's centre), painted with a brush ``BRUSH_FRACTION`` of the side wide,
    and kept inside the region."""
    region = _binary(region)
    line = centerline(region)
    side = max(region.shape)
    max_len = int(MAX_LENGTH_SIDES * side)
    ys, xs = np.nonzero(line)
    if len(xs) > max_len:
        cx, cy = center_point(region)
        keep = np.argsort((xs - cx) ** 2 + (ys - cy) ** 2, kind="stable")[:max_len]
        line = np.zeros_like(line)
        line[ys[keep], xs[keep]] = True
    radius = int(round(BRUSH_FRACTION * side / 2))
    if radius > 0:
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        line = ndimage.binary_dilation(line, structure=xx**2 + yy**2 <= radius**2) & region
    return line


def centerline_scribble(region: np.ndarray) -> np.ndarray:
    """Centre-line scribble of the largest component of ``region`` (empty if the region is)."""
    part = largest_component(region)
    return np.zeros(np.shape(region), bool) if part is None else stroke(part)


def correction_scribble(truth: np.ndarray, prediction: np.ndarray) -> Optional[tuple[np.ndarray, bool]]:
    """One scribble along the largest error component: ``(stroke mask, positive)``; ``None`` if perfect."""
    region, positive = largest_error(truth, prediction)
    return None if region is None else (stroke(region), positive)


def add_click(prompts: Prompts, point: Point, positive: bool) -> Prompts:
    """A copy of ``prompts`` with one more click."""
    if positive:
        return replace(prompts, positive=list(prompts.positive) + [point])
    return replace(prompts, negative=list(prompts.negative) + [point])


def add_stroke(prompts: Prompts, line: np.ndarray, positive: bool) -> Prompts:
    """A copy of ``prompts`` with one more scribble stroke, merged into that sign's scribble mask."""
    key = "positive_scribbles" if positive else "negative_scribbles"
    old = getattr(prompts, key)
    return replace(prompts, **{key: line.copy() if old is None else (np.asarray(old) != 0) | line})


# ---------------------------------------------------------------------------------------------------
# Protocols: a first step from the mask, then corrections from (mask, prediction)
# ---------------------------------------------------------------------------------------------------


@dataclass
class CenterClicks:
    """The paper's center-click protocol. Prompts accumulate over steps; one interaction per click."""

    def first(self, truth: np.ndarray) -> tuple[Prompts, int]:
        point = center_click(truth)
        if point is None:
            raise ValueError("cannot click on an empty mask")
        return Prompts(positive=[point]), 1

    def correct(self, truth: np.ndarray, prediction: np.ndarray, prompts: Prompts) -> tuple[Prompts, int]:
        found = correction_click(truth, prediction)
        return (prompts, 0) if found is None else (add_click(prompts, *found), 1)


@dataclass
class CenterlineScribbles:
    """The paper's centerline-scribble protocol: one positive and one negative scribble to start (one step),
    then one correction scribble per step."""

    def first(self, truth: np.ndarray) -> tuple[Prompts, int]:
        positive = centerline_scribble(truth)
        if not positive.any():
            raise ValueError("cannot scribble on an empty mask")
        negative = centerline_scribble(background_band(truth))
        return Prompts(positive_scribbles=positive, negative_scribbles=negative), 1

    def correct(self, truth: np.ndarray, prediction: np.ndarray, prompts: Prompts) -> tuple[Prompts, int]:
        found = correction_scribble(truth, prediction)
        return (prompts, 0) if found is None else (add_stroke(prompts, *found), 1)


PROTOCOLS = {"clicks": CenterClicks, "scribbles": CenterlineScribbles}


# ---------------------------------------------------------------------------------------------------
# Randomised prompts for training
# ---------------------------------------------------------------------------------------------------


def random_points(region: np.ndarray, n: int, rng: np.random.Generator) -> list[Point]:
    ys, xs = np.nonzero(_binary(region))
    if n <= 0 or len(xs) == 0:
        return []
    pick = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return [(int(xs[i]), int(ys[i])) for i in pick]


def random_scribble(region: np.ndarray, rng: np.random.Generator, keep: tuple[float, float] = (0.3, 1.0)) -> np.ndarray:
    """A stroke along part of the region's centre line: a random contiguous run of skeleton pixels."""
    skeleton = centerline(region) if _binary(region).any() else np.zeros(np.shape(region), bool)
    ys, xs = np.nonzero(skeleton)
    if len(xs) <= 2:
        return skeleton
    # order the skeleton pixels along their principal axis and keep a random window of them
    pts = np.stack([xs, ys], 1).astype(float)
    axis = np.linalg.svd(pts - pts.mean(0), full_matrices=False)[2][0]
    order = np.argsort((pts - pts.mean(0)) @ axis)
    n = max(2, int(len(order) * rng.uniform(*keep)))
    start = rng.integers(0, len(order) - n + 1)
    stroke = np.zeros_like(skeleton)
    sel = order[start : start + n]
    stroke[ys[sel], xs[sel]] = True
    return stroke


@dataclass
class RandomPrompts:
    """Training-time user: random clicks, scribbles or a box to start, random corrections after."""

    rng: np.random.Generator
    min_positive: int = 1
    max_positive: int = 3
    min_negative: int = 0
    max_negative: int = 3
    min_corrections: int = 1
    max_corrections: int = 3
    box_jitter: float = 0.1
    # Chance that the first negative clicks come from anywhere in the background rather than from the
    # band around the object: users also click away a false region far from the target.
    p_far_negative: float = 0.0
    # Chance that the corrections after a start without prompts (a zero-click in-context prediction) are
    # scribbles rather than clicks: otherwise a scribbling user's first stroke over a context prediction
    # is never seen in training.
    p_scribble_corrections: float = 0.0

    def negative_click_region(self, truth: np.ndarray) -> np.ndarray:
        """Where the first negative clicks go: the band around the object, or (with chance
        ``p_far_negative``) the whole background."""
        t = _binary(truth)
        # no draw at p = 0, so configs without far negatives keep their random streams (older runs repeat)
        far = self.p_far_negative > 0 and self.rng.random() < self.p_far_negative and (~t).any()
        return ~t if far else background_band(t)

    def first(self, truth: np.ndarray) -> Prompts:
        t = _binary(truth)
        kind = self.rng.choice(["clicks", "scribbles", "box", "box+clicks"])
        n_pos = int(self.rng.integers(self.min_positive, self.max_positive + 1))
        n_neg = int(self.rng.integers(self.min_negative, self.max_negative + 1))
        prompts = Prompts()
        if "box" in kind and t.any():
            prompts.box = bounding_box(t, self.box_jitter, self.rng)
        if "clicks" in kind:
            prompts.positive = random_points(t, n_pos, self.rng)
            prompts.negative = random_points(self.negative_click_region(t), n_neg, self.rng)
        if kind == "scribbles":
            parts = components(t)
            if parts:
                pos = np.zeros_like(t)
                for part in parts[:n_pos]:
                    pos |= random_scribble(part, self.rng)
                prompts.positive_scribbles = pos
            if n_neg:
                prompts.negative_scribbles = random_scribble(background_band(t), self.rng)
        return prompts

    def correct(self, truth: np.ndarray, prediction: np.ndarray, prompts: Prompts) -> Prompts:
        missed, false_alarm = error_regions(truth, prediction)
        n = int(self.rng.integers(self.min_corrections, self.max_corrections + 1))
        scribble = prompts.positive_scribbles is not None or prompts.negative_scribbles is not None
        if not prompts and self.p_scribble_corrections > 0:  # no draw at 0: older runs repeat
            scribble = bool(self.rng.random() < self.p_scribble_corrections)
        errors = [(r, True) for r in components(missed)] + [(r, False) for r in components(false_alarm)]
        errors.sort(key=lambda e: -int(e[0].sum()))
        for region, positive in errors[:n]:
            if scribble:
                prompts = add_stroke(prompts, random_scribble(region, self.rng), positive)
            else:
                for point in random_points(region, 1, self.rng):
                    prompts = add_click(prompts, point, positive)
        return prompts
