"""Zoom: a second look, at the model grid's full resolution, at the part of the image the user works on.

The network sees the whole image shrunk to its grid (128 x 128 by default). An object that fills a small
part of a large image then gets a few grid cells, and a stroke drawn along it a line of them: small
lesions, a vessel lumen or a thin organ lose the detail the user points at. nnInteractive answers this by
zooming onto where the user works; so does this module, for 2D images and volume slices alike:

1. the whole image is segmented as usual from the user's prompts;
2. the *window*, the box around that prediction and every prompt, grown by ``margin`` of its side on each
   side, is cut out when it is small enough to gain from a closer look (its side at most ``max_side`` of
   the image's longer side);
3. the window is segmented on its own grid, with the prompts that fall inside it and the first prediction
   in the previous-prediction channel, and pasted back over the first prediction.

Prompts outside the window keep their effect through the first prediction, which stays in place outside
the window. When it applies (:meth:`Zoom.applies`), measured on five tasks no training saw
(``python -m mvseg.evaluate``, model card "Zoom"):

- only on prompts with a stroke: a stroke shows the extent of what the user works on, and there the zoom
  saved steps (small MS lesions, a carotid lumen); on clicks alone the window follows a first prediction
  that may be far off, and it cost clicks;
- only without context: the zoomed window is on another scale than the context images, and with context
  the zoom cost steps;
- never on a zero-click prediction: there is nowhere the user works yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .prompts import Prompts


@dataclass(frozen=True)
class Window:
    """Rows ``top:bottom`` and columns ``left:right`` of an image (end-exclusive)."""

    top: int
    bottom: int
    left: int
    right: int

    def crop(self, array: np.ndarray) -> np.ndarray:
        """``H W ...`` -> the window's ``h w ...``."""
        return array[self.top : self.bottom, self.left : self.right]

    def paste(self, array: np.ndarray, part: np.ndarray) -> np.ndarray:
        """A copy of ``array`` (``H W``) with the window's pixels replaced by ``part`` (``h w``)."""
        out = array.copy()
        out[self.top : self.bottom, self.left : self.right] = part
        return out

    def prompts(self, prompts: Prompts) -> Prompts:
        """The prompts that fall inside the window, in its coordinates (a box is the first pass's alone)."""

        def points(pts) -> list:
            return [
                (x - self.left, y - self.top)
                for x, y in pts
                if self.left <= x <= self.right - 1 and self.top <= y <= self.bottom - 1
            ]

        def strokes(mask) -> Optional[np.ndarray]:
            if mask is None:
                return None
            part = self.crop(np.asarray(mask))
            return part if (part != 0).any() else None

        return Prompts(
            points(prompts.positive),
            points(prompts.negative),
            None,
            strokes(prompts.positive_scribbles),
            strokes(prompts.negative_scribbles),
        )


class Zoom:
    """Where to take the second look (see the module docstring).

    Args:
        max_side: zoom only when the window's side is at most this share of the image's longer side (a
            larger window gains too little resolution to pay for a second forward).
        margin: the box of the prediction and the prompts grows by this share of its side on each side, so
            that the window shows the object's surroundings too.
        min_side: the window's side is at least this many pixels.
    """

    def __init__(self, max_side: float = 0.8, margin: float = 0.25, min_side: int = 32):
        if not 0 < max_side < 1:
            raise ValueError(f"max_side must lie in (0, 1), got {max_side}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {min_side}")
        self.max_side = max_side
        self.margin = margin
        self.min_side = min_side

    @staticmethod
    def applies(prompts: Optional[Prompts], with_context: bool) -> bool:
        """Whether a prediction from these prompts gets a second look (see the module docstring)."""
        strokes = prompts is not None and (
            prompts.positive_scribbles is not None or prompts.negative_scribbles is not None
        )
        return strokes and not with_context

    def window(self, mask: np.ndarray, prompts: Prompts) -> Optional[Window]:
        """The window around ``mask`` (``H W``, the first prediction) and the prompts, or ``None`` when
        there is nothing to zoom onto or the window would be too large to gain."""
        h, w = mask.shape
        region = np.asarray(mask) != 0
        for stroke in (prompts.positive_scribbles, prompts.negative_scribbles):
            if stroke is not None:
                region = region | (np.asarray(stroke) != 0)
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        ys = [int(y) for _, y in (*prompts.positive, *prompts.negative)] + ([rows[0], rows[-1]] if len(rows) else [])
        xs = [int(x) for x, _ in (*prompts.positive, *prompts.negative)] + ([cols[0], cols[-1]] if len(cols) else [])
        if not ys:
            return None
        side = max(max(ys) - min(ys), max(xs) - min(xs)) + 1
        side = math.ceil(max(side * (1 + 2 * self.margin), self.min_side))
        if side > self.max_side * max(h, w):
            return None
        top = math.floor((min(ys) + max(ys) + 1 - side) / 2)  # centred on the box
        left = math.floor((min(xs) + max(xs) + 1 - side) / 2)
        return Window(max(0, top), min(h, top + side), max(0, left), min(w, left + side))
