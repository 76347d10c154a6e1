"""From any 2D image to the model's square grid and back.

An image of any size, dtype and channel count becomes a grey ``[0, 1]`` image (intensities clipped at
robust percentiles), is zero-padded to a centred square (the paper pads square with zeros) and resized to
the model resolution. :class:`Geometry` records that mapping so that clicks, boxes, scribbles and context
masks go forward with exactly the same geometry, and logits come back onto the original grid, same shape
and orientation. Coordinates are ``(x, y) = (column, row)`` throughout, as in the official encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIZE = 128
DEFAULT_PERCENTILES = (0.5, 99.5)
# ITU-R BT.601 luma weights for RGB -> grey.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def as_gray(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``H W``, ``H W 1``, ``H W 3`` or ``H W 4`` (alpha dropped) -> ``H W`` float64; checks the values."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if not (np.issubdtype(image.dtype, np.number)) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., 0] if image.shape[-1] == 1 else image[..., :3].astype(np.float64) @ LUMA
    if image.ndim != 2:
        raise ValueError(f"{name} must be 2D (H W) or 2D with 1, 3 or 4 channels last, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    image = image.astype(np.float64, copy=False)
    if not np.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return image


def normalize_intensity(image: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Grey image -> float32 in [0, 1], clipped at the given percentiles (robust to outliers).

    A constant image becomes all zeros.
    """
    gray = as_gray(image)
    lo, hi = np.percentile(gray, percentiles)
    if hi <= lo:  # percentiles can coincide on sparse images: fall back to the full range
        lo, hi = gray.min(), gray.max()
    if hi <= lo:
        return np.zeros(gray.shape, np.float32)
    return np.clip((gray - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def as_mask(mask: np.ndarray, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A 2D mask (any numeric dtype; nonzero = inside) matching ``shape`` -> float32 {0, 1}."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must be 2D, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the image has shape {tuple(shape)}")
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{name} must hold numbers or booleans, got dtype {mask.dtype}")  # "0" != 0: all inside
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return (mask != 0).astype(np.float32)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``N C h w`` to ``size`` (h, w); anti-aliased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-1] > size[1] or x.shape[-2] > size[0]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _upsampled_part(x: torch.Tensor, dim: int, length: int, start: int, count: int) -> torch.Tensor:
    """Entries ``start:start + count`` of ``x`` linearly upsampled along ``dim`` to ``length``: the same
    samples as ``F.interpolate(mode="bilinear", align_corners=False)`` takes, without the rest."""
    n = x.shape[dim]
    scale = torch.tensor(n / length, dtype=torch.float32)  # in float32, as PyTorch computes it
    src = ((torch.arange(start, start + count, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    lo = src.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    shape = [1] * x.ndim
    shape[dim] = count
    w = (src - lo).to(x.dtype).view(shape)
    return x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w


def binarize_resampled(fraction: torch.Tensor) -> torch.Tensor:
    """Resampled binary masks ``N 1 H W`` (per-pixel foreground fraction) -> binary float masks.

    Thresholded at 0.5, except that a mask whose structure is too small to survive the threshold keeps
    every pixel it touches, so a non-empty label never turns empty.
    """
    too_small = fraction.flatten(1).amax(1) < 0.5
    return torch.where(too_small.view(-1, 1, 1, 1), fraction > 0, fraction >= 0.5).float()


@dataclass(frozen=True)
class Geometry:
    """The mapping between an ``height x width`` image and the ``size x size`` model grid.

    Original -> centred zero-padded square of side ``max(height, width)`` -> resize to ``size``.
    """

    height: int
    width: int
    size: int = DEFAULT_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def top(self) -> int:
        return (self.side - self.height) // 2

    @property
    def left(self) -> int:
        return (self.side - self.width) // 2

    @property
    def scale(self) -> float:
        return self.size / self.side

    # -- rasters ------------------------------------------------------------------------------------

    def pad_square(self, x: np.ndarray) -> torch.Tensor:
        """``H W`` array -> ``1 1 side side`` tensor, zero-padded, centred."""
        out = torch.zeros((1, 1, self.side, self.side), dtype=torch.float32)
        out[0, 0, self.top : self.top + self.height, self.left : self.left + self.width] = torch.from_numpy(
            np.ascontiguousarray(x, dtype=np.float32)
        )
        return out

    def _square_resampled(self, x: np.ndarray, resample) -> torch.Tensor:
        """``H W`` -> ``1 1 size size``: ``resample(tensor, (h, w))`` of the zero-padded square. When shrinking,
        one axis at a time (both resamplers are separable), so only ``side x size`` values are ever held: the
        padded square of a 60000 x 1 image alone is 14 GB."""
        if self.side <= self.size:
            return resample(self.pad_square(x), (self.size, self.size))
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        if self.width == self.side:  # the long axis needs no padding: shrink it first
            t = F.pad(resample(t, (self.height, self.size)), (0, 0, self.top, self.side - self.height - self.top))
        else:
            t = F.pad(resample(t, (self.size, self.width)), (self.left, self.side - self.width - self.left))
        return resample(t, (self.size, self.size))

    def image_forward(self, image01: np.ndarray) -> torch.Tensor:
        """Normalised grey ``H W`` in [0, 1] -> ``1 size size``."""
        self._check(image01.shape, "image")
        return self._square_resampled(image01, _resize)[0].clamp_(0.0, 1.0)

    def mask_forward(self, mask: np.ndarray) -> torch.Tensor:
        """Binary ``H W`` -> binary ``1 size size`` (resampled, thresholded at 0.5).

        A non-empty mask whose structure is too small to survive the threshold keeps every model pixel
        it touches, so an example never turns into an empty label.
        """
        return binarize_resampled(self._square_resampled(as_mask(mask, self.shape), _resize))[0]

    def map_forward(self, values: np.ndarray) -> torch.Tensor:
        """Real-valued ``H W`` map (e.g. a probability) -> ``1 size size``, area-averaged when shrinking;
        zero on the padding."""
        self._check(values.shape, "map")
        return self._square_resampled(values, _resize)[0]

    def scribble_forward(self, scribble: np.ndarray) -> torch.Tensor:
        """Binary ``H W`` stroke mask -> binary ``1 size size``; a model pixel is on if any source pixel
        under it is on, so thin strokes survive shrinking."""
        s = as_mask(scribble, self.shape, "scribble")
        if self.side > self.size:
            return self._square_resampled(s, F.adaptive_max_pool2d)[0]
        return F.interpolate(self.pad_square(s), size=(self.size, self.size), mode="nearest")[0]

    def logits_back(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-grid logits ``... size size`` -> original-grid logits ``... H W``."""
        lead = logits.shape[:-2]
        x = logits.reshape((-1, 1, self.size, self.size)).float()
        if self.side <= self.size:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False,
                              antialias=self.side < self.size)
            x = x[..., self.top : self.top + self.height, self.left : self.left + self.width]
        else:  # only the image's rows and columns of the square: all of it may not fit in memory (see above)
            x = _upsampled_part(x, -1, self.side, self.left, self.width)
            x = _upsampled_part(x, -2, self.side, self.top, self.height)
        return x.reshape(lead + (self.height, self.width))

    # -- coordinates --------------------------------------------------------------------------------

    def points_forward(self, points: np.ndarray) -> np.ndarray:
        """Pixel ``(x, y)`` ``N 2`` -> the model pixel whose footprint holds that pixel's centre."""
        p = self.check_points(points)
        x = np.floor((p[:, 0] + self.left + 0.5) * self.scale)
        y = np.floor((p[:, 1] + self.top + 0.5) * self.scale)
        return np.clip(np.stack([x, y], axis=1), 0, self.size - 1).astype(np.int64)

    def box_forward(self, box) -> np.ndarray:
        """``[x1, y1, x2, y2]`` (end-exclusive pixel bounds) -> the smallest model box that covers it."""
        x1, y1, x2, y2 = self.check_box(box)
        s = self.scale
        out = [
            math.floor((x1 + self.left) * s),
            math.floor((y1 + self.top) * s),
            math.ceil((x2 + self.left) * s - 1e-9),
            math.ceil((y2 + self.top) * s - 1e-9),
        ]
        return np.clip(np.asarray(out, dtype=np.int64), 0, self.size)

    # -- checks -------------------------------------------------------------------------------------

    def _check(self, shape, name: str) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"{name} has shape {tuple(shape)} but the geometry is for {self.shape}")

    def check_points(self, points, name: str = "click") -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2) if np.size(points) else np.zeros((0, 2))
        if not np.isfinite(p).all():
            raise ValueError(f"{name} coordinates must be finite numbers")
        bad = (p[:, 0] < 0) | (p[:, 0] > self.width - 1) | (p[:, 1] < 0) | (p[:, 1] > self.height - 1)
        if bad.any():
            x, y = p[np.argmax(bad)]
            raise ValueError(
                f"{name} (x={x:g}, y={y:g}) is outside the image (width {self.width}, height {self.height}; "
                f"x in [0, {self.width - 1}], y in [0, {self.height - 1}])"
            )
        return p

    def check_box(self, box) -> tuple[float, float, float, float]:
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.size != 4 or not np.isfinite(b).all():
            raise ValueError(f"box must be four finite numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = b.tolist()
        if x1 > x2 or y1 > y2:
            raise ValueError(f"box [x1, y1, x2, y2] = {b.tolist()} must have x1 <= x2 and y1 <= y2")
        if x1 == x2 or y1 == y2:
            raise ValueError(f"box {b.tolist()} is empty (zero width or height)")
        if x1 < 0 or y1 < 0 or x2 > self.width or y2 > self.height:
            raise ValueError(
                f"box {b.tolist()} is outside the image (x in [0, {self.width}], y in [0, {self.height}])"
            )
        return x1, y1, x2, y2


def prepare_image_and_gray(
    image: np.ndarray, size: int = DEFAULT_SIZE, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[torch.Tensor, Geometry, np.ndarray]:
    """As :func:`prepare_image`, plus the normalised grey image on the original grid (``H W`` in [0, 1]),
    for callers that read the image's own pixels again (boundary refinement)."""
    gray = normalize_intensity(image, percentiles)
    geometry = Geometry(gray.shape[0], gray.shape[1], size)
    return geometry.image_forward(gray), geometry, gray


def prepare_image(
    image: np.ndarray, size: int = DEFAULT_SIZE, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[torch.Tensor, Geometry]:
    """Any 2D image -> (model-grid grey image ``1 size size`` in [0, 1], its :class:`Geometry`)."""
    model_image, geometry, _ = prepare_image_and_gray(image, size, percentiles)
    return model_image, geometry
