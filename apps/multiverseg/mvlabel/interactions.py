"""Interaction state per client: the last prediction of each image/slice/label, and accepted slices.

A click refines the previous prediction of the same (client, image, slice, label) through the network's
previous-prediction channel. The state is dropped when the client asks (``reset_state``), when the prompts
shrink (the client removed a click: start over), and after ``expiry`` seconds without use. Slices of a
volume predicted in the session are kept as context for the neighbouring slices.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mvseg import Prediction


@dataclass
class SliceResult:
    image: np.ndarray  # the 2D slice
    mask: np.ndarray  # what the user got (and kept) on it


@dataclass
class _State:
    prediction: Optional[Prediction] = None
    prompt_count: int = 0
    touched: float = field(default_factory=time.monotonic)


@dataclass
class _Volume:
    slices: dict[int, SliceResult] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)


class InteractionStore:
    def __init__(self, expiry: float = 1800.0, max_entries: int = 256):
        self.expiry = expiry
        self.max_entries = max_entries
        self._states: dict[tuple, _State] = {}
        self._volumes: dict[tuple, _Volume] = {}
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        for table in (self._states, self._volumes):
            for key in [k for k, v in table.items() if now - v.touched > self.expiry]:
                del table[key]
            while len(table) > self.max_entries:  # least recently used first
                del table[min(table, key=lambda k: table[k].touched)]

    def previous(self, key: tuple, prompt_count: int) -> Optional[Prediction]:
        """The prediction to refine, or None when the prompts did not grow since it was made."""
        with self._lock:
            self._expire()
            state = self._states.get(key)
            if state is None or prompt_count <= state.prompt_count:
                self._states.pop(key, None)
                return None
            state.touched = time.monotonic()
            return state.prediction

    def remember(self, key: tuple, prediction: Prediction, prompt_count: int) -> None:
        with self._lock:
            self._states[key] = _State(prediction, prompt_count)

    def reset(self, client: str, image: Optional[str] = None) -> int:
        """Forget a client's state (for one image or all); returns how many entries were dropped."""
        with self._lock:
            dropped = 0
            for table in (self._states, self._volumes):
                for key in [k for k in table if k[0] == client and (image is None or k[1] == image)]:
                    del table[key]
                    dropped += 1
            return dropped

    def accept_slice(self, volume_key: tuple, index: int, result: SliceResult) -> None:
        with self._lock:
            vol = self._volumes.setdefault(volume_key, _Volume())
            vol.slices[index] = result
            vol.touched = time.monotonic()

    def neighbours(self, volume_key: tuple, index: int, k: int) -> list[tuple[int, SliceResult]]:
        """Up to ``k`` session slices nearest to ``index`` (excluding it) that have a non-empty mask."""
        with self._lock:
            vol = self._volumes.get(volume_key)
            if vol is None:
                return []
            items = [(i, r) for i, r in vol.slices.items() if i != index and r.mask.any()]
        return sorted(items, key=lambda item: abs(item[0] - index))[:k]
