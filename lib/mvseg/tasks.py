"""Training tasks: labelled folders split by subject, synthetic tasks from superpixels, hierarchical sampling.

A *source* is a folder in the ``images/ [masks/]`` layout of ``../shared/datasets``. A labelled source holds
one or more tasks (a regex on the file name picks the task, e.g. the axis or sub-dataset; the paper's task is
dataset x axis x label). Each task is split by subject (another regex; default: one subject per image)
into train and held-out parts. Every image is stored once, already on the model grid (padded square,
resized, percentile-normalised, as :func:`mvseg.geometry.prepare_image` does at inference), as uint8.

:meth:`TaskBank.batch` draws ``B`` tasks hierarchically (source, then task within it, then examples), or with
probability ``p_synthetic`` a synthetic task: one superpixel of one image, copied and augmented (Table 4), or,
with probability ``p_intensity`` among synthetic tasks, an *intensity task* (:func:`intensity_label`): one
rule, "the smoothed intensity lies in this band", applied to several different images of one source. The
paper's copies teach matching a shape seen in the context; an intensity task's images differ, so its
target can only be solved by reading the rule off the context, and its labels have many components, as
cells, nuclei or lesions do. With probability ``p_ridge`` among the other synthetic tasks, a *ridge task*
(:func:`ridge_label`): "the thin bright (or dark) lines of this width", again over several images of one
source, whose labels are the thin branching networks of vessels, membranes or neurites. Then within-task and
task augmentations (Table 5) are applied.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import sato
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

from . import augment
from .data import IMAGE_SUFFIXES, mask_path, read_image
from .geometry import prepare_image

log = logging.getLogger(__name__)

MIN_SUPERPIXEL_FRACTION = 0.002  # smaller superpixels make labels of a few model pixels
# An intensity task's target label must cover this fraction of the image (else another rule is drawn).
INTENSITY_FRACTION = (0.005, 0.6)
RULE_TRIES = 8  # rules drawn at most for one intensity or ridge task
# A ridge task's target label covers this fraction of the image (thin lines: a few percent).
RIDGE_FRACTION = (0.01, 0.3)


@dataclass
class Source:
    """A dataset folder used for training (one entry of a training config's ``sources``)."""

    path: str
    name: Optional[str] = None
    labelled: bool = True
    task: Optional[str] = None  # regex on the id; group 1 names the task (default: one task)
    subject: Optional[str] = None  # regex on the id; group 1 names the subject (default: the id)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class Task:
    name: str
    images: torch.Tensor  # N 1 S S uint8
    labels: torch.Tensor  # N 1 S S uint8 {0, 1}


def _group(pattern: Optional[str], key: str, default: str) -> str:
    if not pattern:
        return default
    m = re.search(pattern, key)
    return m.group(1) if m else default


def split_subjects(subjects: list[str], heldout: float, seed: int) -> set[str]:
    """Held-out subjects: a deterministic ``heldout`` fraction (at least one when there are two or more)."""
    unique = sorted(set(subjects), key=lambda s: hashlib.sha1(f"{seed}:{s}".encode()).hexdigest())
    if len(unique) < 2 or heldout <= 0:
        return set()
    k = min(len(unique) - 1, max(1, round(heldout * len(unique))))
    return set(unique[:k])


def _load_folder(folder: Path, size: int, labelled: bool = True) -> list[tuple[str, np.ndarray, Optional[np.ndarray]]]:
    """(id, model-grid image uint8 S S, model-grid mask uint8 S S or None) for every image of a folder;
    masks are looked up as :func:`mvseg.data.load_task` does, and only for labelled sources."""
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for path in images:
        image = read_image(path)
        grid, geometry = prepare_image(image, size)
        mask = None
        found = mask_path(folder / "masks", path.stem) if labelled else None
        if found is not None:
            m = read_image(found)
            mask = geometry.mask_forward(m[..., 0] if m.ndim == 3 else m)[0].numpy().astype(np.uint8)
        out.append((path.stem, (grid[0].numpy() * 255).round().astype(np.uint8), mask))
    return out


def intensity_label(image: np.ndarray, low: float, high: float, sigma: float, min_size: int = 4) -> np.ndarray:
    """``S S`` uint8 image -> bool label: where the image, Gaussian-smoothed by ``sigma`` px, lies in
    ``[low, high]`` (intensities in [0, 1]), without components smaller than ``min_size`` pixels.

    Only the box of the image's content is labelled and smoothed (reflected at its edges), so the zero
    padding of a non-square image neither joins a label nor blurs a band of it along the padding.
    """
    label = np.zeros(image.shape, bool)
    box = _content_box(image)
    if box is None:
        return label
    content = image[box].astype(np.float32) / 255
    smooth = ndimage.gaussian_filter(content, sigma, mode="reflect") if sigma > 0 else content
    label[box] = (smooth >= low) & (smooth <= high)
    parts, n = ndimage.label(label)
    if n:
        label &= np.bincount(parts.ravel())[parts] >= min_size
    return label


def _content_box(image: np.ndarray) -> Optional[tuple[slice, slice]]:
    """The box of an ``S S`` image's non-zero content (the rest is the zero padding of a non-square image)."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if len(rows) == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def ridge_response(image: np.ndarray, sigma: float, dark: bool) -> np.ndarray:
    """``S S`` uint8 image -> float32 ridge filter response (Sato tubeness at scale ``sigma`` px) of its
    content box, zero on the padding: high on bright lines about ``2 sigma`` wide, or dark ones."""
    out = np.zeros(image.shape, np.float32)
    box = _content_box(image)
    if box is not None:
        out[box] = sato(image[box].astype(np.float32) / 255, sigmas=[sigma], black_ridges=dark, mode="reflect")
    return out


def ridge_label(response: np.ndarray, threshold: float, min_size: int = 8) -> np.ndarray:
    """Ridge response -> bool label: the lines above ``threshold``, without pieces smaller than ``min_size``
    pixels (speckle, not lines)."""
    label = response > threshold
    parts, n = ndimage.label(label, structure=np.ones((3, 3)))
    if n:
        label &= np.bincount(parts.ravel())[parts] >= min_size
    return label


class TaskBank:
    """Every training task and synthetic-task image, on the model grid, in memory.

    Args:
        sources: the folders (see :class:`Source`); ``root`` resolves relative paths.
        size: model resolution. heldout: fraction of subjects held out per task; seed: split seed.
    """

    def __init__(self, sources: list[Source], root: Path, size: int, heldout: float = 0.2, seed: int = 0):
        self.tasks: dict[str, list[Task]] = {}  # source -> tasks (train part)
        self.split: dict[str, dict[str, list[str]]] = {}  # "source/task" -> {"train": ids, "heldout": ids}
        pool: dict[str, list[np.ndarray]] = {}  # source -> images for synthetic tasks (train part only)
        for src in tqdm(sources, desc="loading sources", unit="source"):
            folder = (root / src.path).resolve()
            if not (folder / "images").is_dir():
                raise ValueError(f"training source {folder} has no images/ folder")
            rows = _load_folder(folder, size, src.labelled)
            if not src.labelled:
                pool[src.label] = [im for _, im, _ in rows]
                continue
            by_task: dict[str, list] = {}
            for row in rows:
                if row[2] is not None and row[2].any():
                    by_task.setdefault(_group(src.task, row[0], "all"), []).append(row)
            tasks, images = [], []
            for name, items in sorted(by_task.items()):
                subjects = [_group(src.subject, r[0], r[0]) for r in items]
                held = split_subjects(subjects, heldout, seed)
                train = [r for r, s in zip(items, subjects) if s not in held]
                key = f"{src.label}/{name}"
                self.split[key] = {
                    "folder": folder.name,  # what ``mvseg.evaluate --ids`` matches a --task folder against
                    "train": [r[0] for r in train],
                    "heldout": [r[0] for r, s in zip(items, subjects) if s in held],
                }
                images += [r[1] for r in train]
                if len(train) < 2:  # a target needs at least one other example as its context
                    log.warning("%s: %d training image(s), not used as a task", key, len(train))
                    continue
                tasks.append(
                    Task(
                        key,
                        torch.from_numpy(np.stack([r[1] for r in train]))[:, None],
                        torch.from_numpy(np.stack([r[2] for r in train]))[:, None],
                    )
                )
            if tasks:
                self.tasks[src.label] = tasks
            pool[src.label] = images
        self.pool = {k: v for k, v in pool.items() if v}
        if not self.tasks and not self.pool:
            raise ValueError("no training data: every source is empty")
        log.info(
            "%d labelled tasks from %d sources, %d synthetic-task images",
            sum(len(t) for t in self.tasks.values()),
            len(self.tasks),
            sum(len(v) for v in self.pool.values()),
        )

    # -- sampling -----------------------------------------------------------------------------------

    def _real(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Target + ``n`` context entries of one real task: ``(n+1) 1 S S`` float images and labels."""
        tasks = self.tasks[rng.choice(sorted(self.tasks))]
        task = tasks[rng.integers(len(tasks))]
        count = len(task.images)
        target = int(rng.integers(count))
        others = np.delete(np.arange(count), target)  # the target never shows up as its own context
        idx = np.concatenate([[target], rng.choice(others, size=n, replace=len(others) < n)])
        return task.images[idx].float() / 255, task.labels[idx].float()

    def _synthetic(self, n: int, rng: np.random.Generator, gen: torch.Generator, scale: tuple[float, float]):
        """Target + ``n`` context entries of a synthetic task: one superpixel of one image, augmented copies."""
        images = self.pool[rng.choice(sorted(self.pool))]
        image = images[rng.integers(len(images))]
        segments = felzenszwalb(image, scale=float(rng.uniform(*scale)), sigma=0.5, min_size=8)
        areas = np.bincount(segments.ravel())
        # superpixels of the zero padding (or of clipped black) are not structures: leave them out
        black = np.bincount(segments.ravel(), weights=(image.ravel() == 0)) > 0.5 * areas
        ok = np.flatnonzero((areas >= MIN_SUPERPIXEL_FRACTION * image.size) & (areas <= 0.6 * image.size) & ~black)
        c = rng.choice(ok) if len(ok) else int(np.argmax(areas))
        x = torch.from_numpy(image).float().div(255)[None, None].repeat(n + 1, 1, 1, 1)
        y = torch.from_numpy(segments == c).float()[None, None].repeat(n + 1, 1, 1, 1)
        return augment.augment(x, y, augment.SYNTHETIC, gen)

    def _rule_task(self, n: int, rng: np.random.Generator, draw_rule, fraction: tuple[float, float]):
        """Target + ``n`` context entries of a task that one rule defines: ``n + 1`` images of one source
        (different ones where it has enough) and the labels the rule gives each. ``draw_rule(rng, image)``
        draws a rule and returns it (``image -> bool label``) with its label of ``image``; rules are drawn
        until the target's label covers ``fraction`` of it (``RULE_TRIES`` at most)."""
        images = self.pool[rng.choice(sorted(self.pool))]
        idx = rng.choice(len(images), size=n + 1, replace=len(images) < n + 1)
        picked = [images[i] for i in idx]
        for _ in range(RULE_TRIES):
            rule, target = draw_rule(rng, picked[0])
            if fraction[0] <= target.mean() <= fraction[1]:
                break
        labels = [target] + [rule(im) for im in picked[1:]]
        x = torch.from_numpy(np.stack(picked)).float().div(255)[:, None]
        y = torch.from_numpy(np.stack(labels)).float()[:, None]
        return x, y

    def _intensity(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An intensity task: one intensity band and smoothing. Bright objects on dark ground (a band reaching
        1) half of the time, a band in between otherwise; the task augmentation's intensity flip makes dark
        objects of either."""

        def draw(rng, image):
            sigma = float(rng.uniform(0.5, 2.5))
            if rng.random() < 0.5:
                low, high = float(rng.uniform(0.25, 0.85)), 1.0
            else:
                low = float(rng.uniform(0.1, 0.7))
                high = low + float(rng.uniform(0.1, 0.4))

            def rule(im):
                return intensity_label(im, low, high, sigma)

            return rule, rule(image)

        return self._rule_task(n, rng, draw, INTENSITY_FRACTION)

    def _ridge(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A ridge task: one line width, polarity and response threshold (the one that keeps the target's
        strongest 3-20% of pixels)."""

        def draw(rng, image):
            sigma, dark = float(rng.uniform(0.7, 3.0)), bool(rng.random() < 0.5)
            response = ridge_response(image, sigma, dark)
            threshold = float(np.quantile(response, 1 - rng.uniform(0.03, 0.2)))

            def rule(im):
                return ridge_label(ridge_response(im, sigma, dark), threshold)

            return rule, ridge_label(response, threshold)

        return self._rule_task(n, rng, draw, RIDGE_FRACTION)

    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        gen: torch.Generator,
        p_synthetic: float = 0.5,
        superpixel_scale: tuple[float, float] = (1, 500),
        p_intensity: float = 0.0,
        p_ridge: float = 0.0,
        retries: int = 3,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One augmented task: images and labels ``(n+1) 1 S S`` (item 0 is the target), synthetic or not;
        ``p_intensity`` of the synthetic ones are intensity tasks, ``p_ridge`` of the others ridge tasks."""
        synthetic = not self.tasks or (bool(self.pool) and rng.random() < p_synthetic)
        intensity = synthetic and rng.random() < p_intensity
        # no draw at p_ridge 0, so that older configs draw the very same tasks
        ridge = synthetic and not intensity and p_ridge > 0 and rng.random() < p_ridge
        for _ in range(retries):
            if intensity:
                x, y = self._intensity(n, rng)
            elif ridge:
                x, y = self._ridge(n, rng)
            elif synthetic:
                x, y = self._synthetic(n, rng, gen, superpixel_scale)
            else:
                x, y = self._real(n, rng)
            x, y = augment.augment(x, y, augment.WITHIN_TASK, gen)
            x, y = augment.augment(x, y, augment.TASK, gen, shared=True)
            if y[0].any():  # a target whose label left the image teaches nothing
                break
        return x, y, synthetic

    def batch(self, batch_size: int, n: int, rng: np.random.Generator, gen: torch.Generator, **kw):
        """``B`` tasks with ``n`` context entries each: target images/labels ``B 1 S S``, context
        ``B n 1 S S``, and the fraction of synthetic tasks."""
        items = [self.sample(n, rng, gen, **kw) for _ in range(batch_size)]
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        return x[:, 0], y[:, 0], x[:, 1:], y[:, 1:], float(np.mean([i[2] for i in items]))
