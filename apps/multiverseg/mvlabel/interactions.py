"""Interaction state per client: the last prediction of each image/slice/label, and accepted slices.

A click refines the previous prediction of the same (client, image, slice, label) through the network's
previous-prediction channel. The state is dropped when the client asks (``reset_state``), when the prompts
did not grow (the client removed a click, or sent the same ones again: start over), and after ``expiry``
seconds without use. Slices of a volume predicted in the session are kept as context for the neighbouring
slices.

Only what is needed again is kept, on the model grid: a prediction's logits (``1 S S``), an accepted
slice's context entry (image and mask ``1 S S``), never the full-size image, probability or mask. The
whole store is bounded in entries and in bytes (``max_bytes``); the least recently used entries go first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

from mvseg.context import ContextEntry


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.element_size() * t.nelement() for t in tensors)


def _entry_nbytes(entry: ContextEntry) -> int:
    return _nbytes(entry.image, entry.label, entry.descriptor)


@dataclass
class _State:
    logits: torch.Tensor  # 1 S S: what the next click refines
    prompt_count: int = 0
    touched: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.logits)


@dataclass
class _Volume:
    slices: dict[int, ContextEntry] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(map(_entry_nbytes, self.slices.values()))


class InteractionStore:
    def __init__(self, expiry: float = 1800.0, max_entries: int = 1024, max_bytes: int = 256 << 20):
        self.expiry = expiry
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._states: dict[tuple, _State] = {}
        self._volumes: dict[tuple, _Volume] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by all states and session slices."""
        with self._lock:
            return self._held()

    def _held(self) -> int:
        return sum(v.nbytes for table in (self._states, self._volumes) for v in table.values())

    def _expire(self, spare: tuple = (), near: Optional[int] = None) -> None:
        """Drop idle entries, then the least recently used until the store is within its bounds. The entries
        ``spare`` (those the current call works on) go last: a volume among them that alone is over the
        bounds loses its slices farthest from ``near`` instead."""
        now = time.monotonic()
        for table in (self._states, self._volumes):
            for key in [k for k, v in table.items() if now - v.touched > self.expiry]:
                del table[key]
        held = self._held()
        while held > self.max_bytes or len(self._states) + len(self._volumes) > self.max_entries:
            others = [(t, k) for t in (self._states, self._volumes) for k in t if k not in spare]
            if others:
                table, key = min(others, key=lambda tk: tk[0][tk[1]].touched)
                held -= table.pop(key).nbytes
                continue
            volume = next((self._volumes[k] for k in spare if k in self._volumes and self._volumes[k].slices), None)
            if volume is None or len(volume.slices) == 1:
                return  # what this call needs stays, whatever it holds
            far = max(volume.slices, key=lambda i: abs(i - (near or 0)))
            held -= _entry_nbytes(volume.slices.pop(far))

    def previous(self, key: tuple, prompt_count: int) -> Optional[torch.Tensor]:
        """The logits to refine (``1 S S``), or None when the prompts did not grow since they were made."""
        with self._lock:
            self._expire()
            state = self._states.get(key)
            if state is None or prompt_count <= state.prompt_count:
                self._states.pop(key, None)
                return None
            state.touched = time.monotonic()
            return state.logits

    def forget(self, key: tuple) -> None:
        """Drop one click state (nothing was shown: the next click starts afresh)."""
        with self._lock:
            self._states.pop(key, None)

    def remember(self, key: tuple, logits: torch.Tensor, prompt_count: int) -> None:
        with self._lock:
            self._states[key] = _State(logits.detach().cpu(), prompt_count)
            self._expire(spare=(key,))

    def reset(self, client: Hashable, image: Optional[str] = None) -> int:
        """Forget a client's state (for one image or all); returns how many entries were dropped."""
        with self._lock:
            dropped = 0
            for table in (self._states, self._volumes):
                for key in [k for k in table if k[0] == client and (image is None or k[1] == image)]:
                    del table[key]
                    dropped += 1
            return dropped

    def accept_slice(self, volume_key: tuple, index: int, entry: Optional[ContextEntry],
                     state_key: Optional[tuple] = None) -> None:
        """Keep a volume slice's result (a prepared context entry) for its neighbours; None (an empty mask)
        forgets the slice. ``state_key``: the click's state, kept with it."""
        with self._lock:
            vol = self._volumes.setdefault(volume_key, _Volume())
            if entry is None:
                vol.slices.pop(index, None)
            else:
                vol.slices[index] = entry
            vol.touched = time.monotonic()
            self._expire(spare=(volume_key, state_key), near=index)

    def neighbours(self, volume_key: tuple, index: int, k: int) -> list[tuple[int, ContextEntry]]:
        """Up to ``k`` session slices nearest to ``index`` (excluding it)."""
        with self._lock:
            vol = self._volumes.get(volume_key)
            if vol is None:
                return []
            items = [(i, e) for i, e in vol.slices.items() if i != index]
        return sorted(items, key=lambda item: abs(item[0] - index))[:k]
