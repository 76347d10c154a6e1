"""Context sets fed from the datastore's ``final`` labels, one per label name, kept fresh cheaply.

Every call to :meth:`DatastoreContext.refresh` lists the final labels (in memory in the datastore) and
compares each label file's (mtime, size) and info timestamp with what was read last time: only new or
changed labels are read again, removed ones drop out. That covers labels saved through
``PUT /datastore/label`` (which also calls :meth:`refresh_one`) and labels that arrive behind that hook
(saved by inference, batch jobs, or copied onto disk and picked up by the datastore's file watcher).

A label file becomes one context entry per label name: names come from the ``label_info`` saved with it
(``[{"name", "idx"}]``); a plain binary mask gets the default name. Volumes contribute 2D slices along
the configured axis: the slice of largest area plus evenly spaced slices where the label is present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mvseg import ContextSet

from .errors import BadRequest
from .guard import pacs_unreachable
from .imageio import Loaded, check_label_values, extension, read_asap, read_image, read_label, stat_key

log = logging.getLogger(__name__)
FINAL = "final"


def volume_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` of a volume along ``axis``: rows and columns are the two remaining axes in order.

    A view (basic indexing): ``np.take`` copies through a slow generic path (~35 ms for 256x256x64).
    """
    return array[(slice(None),) * axis + (index,)]


def planes_of(image: Loaded, axis: int) -> list[np.ndarray]:
    """The 2D planes a zero-click pass segments: every slice of a volume along ``axis``, or the 2D image."""
    if not image.is_volume:
        return [image.array]
    return [volume_slice(image.array, axis, k) for k in range(image.shape[axis])]


def from_planes(stack: np.ndarray, image: Loaded, axis: int) -> np.ndarray:
    """Per-plane results ``N H W`` back on ``image``'s grid (the inverse of :func:`planes_of`)."""
    return np.moveaxis(stack, 0, axis) if image.is_volume else stack[0]


def pick_slices(mask: np.ndarray, axis: int, cap: int) -> list[int]:
    """Slices of a 3D mask to use as context: the largest, plus evenly spaced others where it is present."""
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    present = np.flatnonzero(areas)
    if len(present) == 0:
        return []
    largest = int(present[np.argmax(areas[present])])
    spread = [int(present[i]) for i in np.linspace(0, len(present) - 1, num=min(cap, len(present))).round().astype(int)]
    picked = [largest] + [s for s in spread if s != largest]
    return sorted(picked[:cap])


def label_masks(label: np.ndarray, info: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Labelmap -> ``{label name: binary mask}``. ``label_info`` names the values; a 0/255 mask, as masks are
    often stored, is value 1 (unless ``label_info`` names 255). Without ``label_info`` a binary map takes
    ``names[0]``, other values ``names[value - 1]`` when configured, else ``label_<value>``. A non-empty label
    of which ``label_info`` names no value raises 422: it would be stored and never used."""
    described = info.get("label_info") if isinstance(info, dict) else None
    described = [(str(item["name"]), item.get("idx", item.get("id", 1)))
                 for item in (described if isinstance(described, list) else []) if isinstance(item, dict) and "name" in item]
    described = [(name, idx) for name, idx in described if isinstance(idx, int) and not isinstance(idx, bool)]
    values = [int(v) for v in np.unique(label) if v != 0]
    if values == [255] and 255 not in {idx for _, idx in described}:
        values, label = [1], (label != 0).astype(np.uint8)
    if described:
        out = {name: label == idx for name, idx in described if idx in values}
        if values and not out:
            raise BadRequest(f"label_info names none of the label's values ({', '.join(map(str, values))}): "
                             "give each label's value as its 'idx'", 422)
        return out
    return {names[v - 1] if 0 < v <= len(names) else f"label_{v}": label == v for v in values}


def _saved_at(stamp: Optional[tuple]) -> tuple:
    """When a label (its :meth:`DatastoreContext._stamp`) was saved: the save time in its info (seconds), else
    its file's time; then the file time (ns), which orders saves of one second."""
    if stamp is None:
        return (0, 0)
    return (stamp[3] if isinstance(stamp[3], (int, float)) else stamp[1] / 1e9, stamp[1])


@dataclass
class _Seen:
    stamp: tuple
    keys: list = field(default_factory=list)  # (label name, entry key) pairs this label contributed


class DatastoreContext:
    """Per-label-name :class:`mvseg.ContextSet` s built from a MONAI Label datastore.

    Args:
        datastore: the app's datastore (``get_labeled_images``, ``get_label_uri``, ``get_image_uri``,
            ``get_label_info``). new_set: makes an empty context set on the predictor's grid.
        names: configured label names (the first is the default). axis: slice axis of volumes.
        slices_per_volume: most slices one 3D label contributes.
    """

    def __init__(self, datastore, new_set, names: list[str], axis: int = 2, slices_per_volume: int = 4):
        self.datastore = datastore
        self.new_set = new_set
        self.names = list(names)
        self.axis = axis
        self.slices_per_volume = slices_per_volume
        self.sets: dict[str, ContextSet] = {}
        self.reads = 0  # label files read so far (lets tests and benchmarks check incremental refresh)
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.RLock()

    def label_names(self) -> list[str]:
        extra = sorted(n for n, s in self.sets.items() if len(s) and n not in self.names)
        return self.names + extra

    def get(self, name: str) -> ContextSet:
        with self._lock:
            if name not in self.sets:
                self.sets[name] = self.new_set()
            return self.sets[name]

    # -- freshness ----------------------------------------------------------------------------------

    def _stamp(self, image_id: str) -> Optional[tuple]:
        try:
            uri = self.datastore.get_label_uri(image_id, FINAL)
        except Exception as e:  # one label that cannot be had must not fail every click, nor the start
            if pacs_unreachable(e):
                raise
            log.warning("context: no label of %s: %s", image_id, e, exc_info=not isinstance(e, BadRequest))
            return None
        if not uri:
            return None
        try:
            info = self.datastore.get_label_info(image_id, FINAL) or {}
            return (uri,) + stat_key(uri) + (info.get("ts"),)
        except OSError:
            return None

    def refresh(self) -> int:
        """Bring every label's entries up to date; returns how many label files were read. Labels are read
        in the order they were saved, so entries made later are newer (what the context reliability checks),
        after a restart too."""
        with self._lock:
            current = set(self.datastore.get_labeled_images())
            stamps = {image_id: self._stamp(image_id) for image_id in current}
            order = sorted(current, key=lambda i: (_saved_at(stamps[i]), i))
            read = sum(self._sync(image_id, stamps[image_id]) for image_id in order)
            for image_id in set(self._seen) - current:
                self._forget(image_id)
            return read

    def refresh_one(self, image_id: str) -> None:
        """Re-read one label now (the ``on_save_label`` hook)."""
        with self._lock:
            self._sync(image_id, self._stamp(image_id))

    def _sync(self, image_id: str, stamp: Optional[tuple]) -> bool:
        """Bring one label's entries up to date (``stamp``: its :meth:`_stamp` now); True when its file was
        read. A label whose file is gone (even if the datastore still lists it) drops out."""
        if stamp is None:
            self._forget(image_id)
            return False
        seen = self._seen.get(image_id)
        if seen is not None and seen.stamp == stamp:
            return False
        self._load(image_id, stamp)
        return True

    def _forget(self, image_id: str) -> None:
        seen = self._seen.pop(image_id, None)
        for name, key in seen.keys if seen else []:
            self.get(name).remove(key)

    def _load(self, image_id: str, stamp: tuple) -> None:
        """(Re)read one final label and its image; a broken pair is logged and skipped, never fatal."""
        self.reads += 1
        try:
            entries = self.read_entries(image_id, stamp[0])
        except Exception as e:  # one unreadable file must not fail every click
            log.warning("context: skipping label of %s: %s", image_id, e, exc_info=not isinstance(e, BadRequest))
            entries = []
        self._forget(image_id)
        keys = []
        for name, key, entry in entries:
            self.get(name).put(key, entry)
            keys.append((name, key))
        self._seen[image_id] = _Seen(stamp, keys)
        log.info("context: %s -> %d entries (%s)", image_id, len(keys), ", ".join(sorted({n for n, _ in keys})))

    def read_entries(self, image_id: str, label_path: str) -> list:
        """``[(label name, entry key, ContextEntry)]`` for one labelled image."""
        image = read_image(self.datastore.get_image_uri(image_id))
        info = self.datastore.get_label_info(image_id, FINAL) or {}
        if extension(label_path) == ".xml":
            masks = read_asap(label_path, image.shape[:2], default_name=self.names[0])
        else:
            # the checks of a save, for labels that reached the folder another way (256 values: 256 label names)
            masks = label_masks(check_label_values(read_label(label_path, image)), info, self.names)
        cset = self.new_set()
        out = []
        for name, mask in masks.items():
            for key, img2d, m2d in self.examples(image_id, image, mask):
                out.append((name, key, cset.prepare(img2d, m2d)))
        return out

    def examples(self, image_id: str, image: Loaded, mask: np.ndarray):
        """2D (key, image, mask) examples of one labelled image: itself, or chosen slices of a volume."""
        if not mask.any():
            return
        if not image.is_volume:
            yield (image_id, None), image.array, mask
            return
        for k in pick_slices(mask, self.axis, self.slices_per_volume):
            yield (image_id, k), volume_slice(image.array, self.axis, k), volume_slice(mask, self.axis, k)

    def labelled_for(self, name: str) -> set[str]:
        """Images whose final label gives the context set of ``name`` its entries."""
        with self._lock:
            return {image_id for image_id, seen in self._seen.items() if any(n == name for n, _ in seen.keys)}

    def fingerprint(self, name: str) -> str:
        """Names the context set of ``name`` across processes and restarts: a hash of which labels feed it and
        their versions (save time, else file time, and size), not of where a cache put them."""
        with self._lock:
            parts = sorted((i, self._seen[i].stamp[3] or self._seen[i].stamp[1], self._seen[i].stamp[2])
                           for i in self.labelled_for(name))
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        return {name: len(s) for name, s in self.sets.items()}
