"""The context set: labelled examples of one segmentation task, preprocessed once.

Each entry is stored on the model grid (image ``1 S S`` in [0, 1], binary label ``1 S S``) with a small
image descriptor, so a click never re-reads or re-resamples a context image, and :meth:`ContextSet.select`
can pick the entries most like the target when the set is larger than the network should see at once.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import DEFAULT_PERCENTILES, DEFAULT_SIZE, as_mask, prepare_image

DEFAULT_MAX_CONTEXT = 64
DESCRIPTOR_SIDE = 16


def describe(image: torch.Tensor) -> torch.Tensor:
    """Model-grid image ``1 S S`` -> unit-norm descriptor (``DESCRIPTOR_SIDE**2``): a zero-mean thumbnail.

    Cosine similarity of two descriptors is the correlation of the thumbnails: cheap, and insensitive to
    global brightness and contrast.
    """
    thumb = F.adaptive_avg_pool2d(image.reshape(1, 1, *image.shape[-2:]).float(), DESCRIPTOR_SIDE).flatten()
    thumb = thumb - thumb.mean()
    return thumb / thumb.norm().clamp_min(1e-6)


_serials = itertools.count()


@dataclass(frozen=True)
class ContextEntry:
    image: torch.Tensor  # 1 S S, float32 in [0, 1]
    label: torch.Tensor  # 1 S S, float32 {0, 1}
    descriptor: torch.Tensor  # D, unit norm
    serial: int = field(default_factory=lambda: next(_serials), compare=False)  # one per entry made in this process


class ContextSet:
    """Labelled examples by id, on the model grid; thread-safe.

    ``version`` increases on every change, so callers can tell whether cached results are stale.
    """

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        max_size: int = DEFAULT_MAX_CONTEXT,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ):
        self.size = size
        self.max_size = max_size
        self.percentiles = percentiles
        self.version = 0
        self._entries: "OrderedDict[Hashable, ContextEntry]" = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable (sent to batch workers): the lock stays behind
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- building -----------------------------------------------------------------------------------

    def prepare(self, image: Optional[np.ndarray], mask: Optional[np.ndarray]) -> ContextEntry:
        """Preprocess one image/mask pair (any 2D image, mask of the same size, nonzero = inside)."""
        if image is None:
            raise ValueError("context entry has no image")
        if mask is None:
            raise ValueError("context image has no mask")
        model_image, geometry = prepare_image(image, self.size, self.percentiles)
        binary = as_mask(mask, geometry.shape)
        if not binary.any():
            raise ValueError("context mask is empty: an example must show the structure")
        label = geometry.mask_forward(binary)
        return ContextEntry(model_image, label, describe(model_image))

    def add(self, key: Hashable, image: np.ndarray, mask: np.ndarray) -> None:
        """Add or replace the entry ``key``."""
        self.put(key, self.prepare(image, mask))

    def put(self, key: Hashable, entry: ContextEntry) -> None:
        """Add or replace with an already prepared entry (lets callers prepare outside a lock)."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            self.version += 1

    def add_prepared(self, key: Hashable, image: torch.Tensor, label: torch.Tensor) -> None:
        """Add model-grid tensors (``1 S S`` image in [0, 1], ``1 S S`` label, thresholded at 0.5)."""
        for name, t in (("image", image), ("label", label)):
            if t.numel() != self.size * self.size:
                raise ValueError(f"prepared context {name} must be 1x{self.size}x{self.size}, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"prepared context {name} contains NaN or infinite values")
        image = image.reshape(1, self.size, self.size).float().cpu()
        label = (label.reshape(1, self.size, self.size).float().cpu() >= 0.5).float()
        if not label.any():
            raise ValueError("context mask is empty: an example must show the structure")
        self.put(key, ContextEntry(image, label, describe(image)))

    def copy(self, max_size: Optional[int] = None) -> "ContextSet":
        """A new set holding the same (immutable, shared) entries and version; ``max_size`` may differ."""
        out = ContextSet(self.size, self.max_size if max_size is None else max_size, self.percentiles)
        with self._lock:
            out._entries = OrderedDict(self._entries)
            out.version = self.version
        return out

    def remove(self, key: Hashable) -> bool:
        with self._lock:
            if self._entries.pop(key, None) is None:
                return False
            self.version += 1
            return True

    def clear(self) -> None:
        with self._lock:
            if self._entries:
                self._entries.clear()
                self.version += 1

    # -- reading ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def ids(self) -> list:
        with self._lock:
            return list(self._entries)

    def get(self, key: Hashable) -> ContextEntry:
        return self._entries[key]

    def items(self) -> list[tuple[Hashable, ContextEntry]]:
        """``(key, entry)`` pairs of one state of the set, in the order they were added."""
        return self._items(())[0]

    def select(self, target: torch.Tensor, k: Optional[int] = None, exclude: Iterable[Hashable] = ()) -> list:
        """Ids of the ``k`` entries most similar to ``target`` (model-grid image ``1 S S``), best first.

        All entries (in insertion order) when there are no more than ``k``; ``k`` defaults to ``max_size``.
        """
        return [key for key, _ in self._best(self._items(exclude)[0], target, k)]

    def choose(
        self, target: torch.Tensor, k: Optional[int] = None, exclude: Iterable[Hashable] = ()
    ) -> tuple[list, torch.Tensor, torch.Tensor, int]:
        """:meth:`select` and :meth:`tensors` on one state of the set, whatever other threads change
        meanwhile: ``(ids, images S 1 H W, labels S 1 H W, version)``."""
        items, version = self._items(exclude)
        chosen = self._best(items, target, k)
        return [key for key, _ in chosen], *self._stack([e for _, e in chosen]), version

    def _items(self, exclude: Iterable[Hashable]) -> tuple[list, int]:
        exclude = set(exclude)
        with self._lock:
            return [(key, e) for key, e in self._entries.items() if key not in exclude], self.version

    def _best(self, items: list, target: torch.Tensor, k: Optional[int]) -> list:
        k = self.max_size if k is None else k
        if len(items) <= k:
            return items
        if k <= 0:
            return []
        scores = torch.stack([e.descriptor for _, e in items]) @ describe(target)
        return [items[i] for i in torch.topk(scores, k).indices.tolist()]

    def tensors(self, ids: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack entries: images and labels ``S 1 H W`` (``S`` may be 0)."""
        with self._lock:
            entries = [self._entries[i] for i in ids]
        return self._stack(entries)

    def _stack(self, entries: list) -> tuple[torch.Tensor, torch.Tensor]:
        if not entries:
            empty = torch.zeros((0, 1, self.size, self.size))
            return empty, empty.clone()
        return torch.stack([e.image for e in entries]), torch.stack([e.label for e in entries])
