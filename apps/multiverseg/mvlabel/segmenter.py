"""Turns a MONAI Label request into an ``mvseg`` prediction and back: the request side of the app.

One :class:`Segmenter` is shared by the infer tasks: it holds the predictor (one model, one forward at a
time), the datastore-fed context sets, the interaction state and a small cache of loaded images.
Coordinates: a 2D image's click is ``[x, y]`` (column, row); a volume's click is the voxel index
``[i, j, k]`` and the 2D slice along ``axis`` keeps the other two axes in order (rows, columns).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np

from mvseg import ContextSet, Predictor, Prompts
from mvseg.activelearning import mean_uncertainty
from mvseg.predictor import NOTHING

from .contextstore import DatastoreContext, from_planes, planes_of, volume_slice
from .errors import BadRequest, calling
from .guard import client_key
from .imageio import Loaded, is_upload, read_image, read_label, stat_key
from .interactions import InteractionStore

log = logging.getLogger(__name__)

SCRIBBLE_FOREGROUND, SCRIBBLE_BACKGROUND = 3, 2  # MONAI Label's scribble label values


@dataclass
class Target:
    """What one interactive request asks for, resolved on one 2D plane."""

    loaded: Loaded
    label: str
    image: np.ndarray  # the 2D plane (H W [C])
    prompts: Prompts
    index: Optional[int] = None  # slice index for volumes
    client: Hashable = ("anonymous", "client", "default")  # mvlabel.guard.client_key
    region: Optional[tuple] = None  # (x0, y0, x1, y1) of a 2D image the plane is (QuPath), else the whole
    timings: dict = field(default_factory=dict)

    @functools.cached_property
    def source(self) -> str:
        """The image, as interaction state knows it: its path and version (an image deleted and uploaded again
        under its id is another image: its clicks started from the old one's prediction), or the content of an
        upload (each request uploads its own copy: QuPath's wsi_v2 sends the region again with every click)."""
        if not is_upload(self.loaded.path):
            try:
                return f"{self.loaded.path}@{stat_key(self.loaded.path)}"
            except OSError:  # gone since it was read
                return self.loaded.path
        return "upload:" + hashlib.blake2b(np.ascontiguousarray(self.loaded.array).data, digest_size=16).hexdigest()


def _number_list(value: Any, name: str) -> list:
    if value is None or value == "":
        return []
    if not isinstance(value, (list, tuple)):
        raise BadRequest(f"'{name}' must be a list of points, got {type(value).__name__}", 422)
    out = []
    for p in value:
        if not isinstance(p, (list, tuple)) or not all(isinstance(c, (int, float)) and np.isfinite(c) for c in p):
            raise BadRequest(f"'{name}' must hold points made of numbers, got {p!r}", 422)
        out.append([float(c) for c in p])
    return out


class Segmenter:
    def __init__(
        self,
        predictor: Predictor,
        context: DatastoreContext,
        interactions: InteractionStore,
        axis: int = 2,
        neighbour_slices: int = 2,
        cache_bytes: int = 1 << 30,
    ):
        self.predictor = predictor
        self.context = context
        self.interactions = interactions
        self.axis = axis
        self.neighbour_slices = neighbour_slices
        self._images: "OrderedDict[str, tuple[tuple, Loaded]]" = OrderedDict()
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()

    # -- inputs -------------------------------------------------------------------------------------

    def load(self, path: str) -> Loaded:
        """Read an image, reusing recent reads of unchanged files (a volume is clicked many times), up to
        ``cache_bytes`` of them."""
        if not path or not os.path.isfile(path):
            raise BadRequest(f"image not found: {os.path.basename(str(path)) or '(none given)'}", 404)
        key = stat_key(path)
        with self._lock:
            hit = self._images.get(path)
            if hit and hit[0] == key:
                self._images.move_to_end(path)
                return hit[1]
        loaded = read_image(path)
        with self._lock:
            self._images[path] = (key, loaded)
            # bounded in bytes (a few volumes), never fewer than the image just read
            while len(self._images) > 1 and sum(v.array.nbytes for _, v in self._images.values()) > self.cache_bytes:
                self._images.popitem(last=False)
        return loaded

    def label_name(self, request: dict) -> str:
        """The label a request works on: ``label_name``, or ``label`` when it is a name, else the default."""
        name = request.get("label_name")
        label = request.get("label")
        if not name and isinstance(label, str) and label and not is_upload(label):
            name = label
        name = str(name) if name else self.context.names[0]
        known = self.context.label_names()
        if name not in known:
            raise BadRequest(f"unknown label '{name}'; this server segments {', '.join(known)}", 404)
        return name

    def target(self, request: dict, region: Optional[tuple] = None) -> Target:
        """Resolve image, label, plane and prompts of an interactive request (validating all of them).
        ``region``: ``(x0, y0, x1, y1)`` of a 2D image to segment instead of all of it; the request's
        points are then in the region's pixels."""
        t0 = time.perf_counter()
        loaded = self.load(request.get("image", ""))
        if region is not None and loaded.is_volume:
            raise BadRequest("a region (QuPath) request needs a 2D image", 422)
        label = self.label_name(request)
        client = client_key(request.get("client_id"))
        fg = _number_list(request.get("foreground"), "foreground")
        bg = _number_list(request.get("background"), "background")
        ndim = 3 if loaded.is_volume else 2
        if ndim == 2:  # Slicer sees a 2D image as a one-slice volume and sends [x, y, 0]
            fg, bg = ([p[:2] if len(p) == 3 and p[2] == 0 else p for p in pts] for pts in (fg, bg))
        for p in fg + bg:
            if len(p) != ndim:
                raise BadRequest(f"clicks on a {ndim}D image need {ndim} coordinates, got {p}", 422)
        index = None
        if loaded.is_volume:
            index = self._slice_index(request, loaded, fg + bg)
            clicked = bool(fg or bg)
            fg = [p for p in fg if round(p[self.axis]) == index]
            bg = [p for p in bg if round(p[self.axis]) == index]
            if clicked and not (fg or bg):
                raise BadRequest(f"no click is on slice {index} (axis {self.axis}), the slice to segment", 422)
            for p in fg + bg:
                self._check_voxel(p, loaded.shape)
            plane = volume_slice(loaded.array, self.axis, index)
            keep = [a for a in range(3) if a != self.axis]
            # slice rows = first kept axis, columns = second: a click (r, c) is the point x=c, y=r
            to_xy = lambda p: (p[keep[1]], p[keep[0]])  # noqa: E731
        else:
            if request.get("slice") not in (None, 0, "0"):
                raise BadRequest(f"a 2D image has one slice, 0; got slice {request.get('slice')!r}", 422)
            plane = loaded.array
            if region is not None:
                x0, y0, x1, y1 = region
                plane = plane[y0:y1, x0:x1]
            to_xy = lambda p: (p[0], p[1])  # noqa: E731
        prompts = Prompts(positive=[to_xy(p) for p in fg], negative=[to_xy(p) for p in bg])
        if region is None:  # a region request's clicks are all it takes
            prompts.box = self._box(request.get("roi"), loaded, index)
            self._scribbles(request, loaded, index, prompts)
        target = Target(loaded, label, plane, prompts, index, client, region=region)
        target.timings["read"] = time.perf_counter() - t0
        return target

    def _slice_index(self, request: dict, loaded: Loaded, points: list) -> int:
        depth = loaded.shape[self.axis]
        value = request.get("slice")
        if value is None and points:
            value = points[-1][self.axis]
        roi = request.get("roi")
        if value is None and isinstance(roi, (list, tuple)) and len(roi) == 6:
            value = (roi[2 * self.axis] + roi[2 * self.axis + 1]) / 2
        if value is None:
            raise BadRequest("a volume needs 'slice' (or clicks) to know which slice to segment", 422)
        try:
            index = int(round(float(value)))
        except (TypeError, ValueError):
            raise BadRequest(f"'slice' must be a number, got {value!r}", 422) from None
        if not 0 <= index < depth:
            raise BadRequest(f"slice {index} is outside the volume (0..{depth - 1} along axis {self.axis})", 422)
        return index

    @staticmethod
    def _check_voxel(p: list, shape: tuple) -> None:
        if any(c < -0.5 or c > n - 0.5 for c, n in zip(p, shape)):
            raise BadRequest(f"click {[round(c, 2) for c in p]} is outside the volume of shape {list(shape)}", 422)

    def _box(self, roi, loaded: Loaded, index: Optional[int]) -> Optional[list]:
        """Slicer's ROI ``[i0, i1, j0, j1(, k0, k1)]`` (inclusive voxel bounds, either order) -> box
        ``[x1, y1, x2, y2]``. A bound may be one past the last voxel (an exclusive end), never further."""
        if roi is None or roi == [] or roi == "":
            return None
        values = _number_list([roi], "roi")[0]
        if loaded.is_volume:
            if len(values) != 6:
                raise BadRequest(f"roi on a volume must be [i0, i1, j0, j1, k0, k1], got {roi}", 422)
            extents = list(loaded.shape)
            rows, cols = [a for a in range(3) if a != self.axis]
        else:
            if len(values) != 4:
                raise BadRequest(f"roi on a 2D image must be [x0, x1, y0, y1], got {roi}", 422)
            extents = [loaded.shape[1], loaded.shape[0]]  # x, then y
            rows, cols = 1, 0
        if any(not 0 <= v <= extents[k // 2] for k, v in enumerate(values)):
            raise BadRequest(f"roi {roi} goes outside the image of shape {list(loaded.shape)}", 422)
        (r0, r1), (c0, c1) = sorted(values[2 * rows : 2 * rows + 2]), sorted(values[2 * cols : 2 * cols + 2])
        r1, c1 = min(r1, extents[rows] - 1), min(c1, extents[cols] - 1)  # an exclusive end: the last voxel
        return [c0, r0, c1 + 1, r1 + 1]

    def _scribbles(self, request: dict, loaded: Loaded, index: Optional[int], prompts: Prompts) -> None:
        """An uploaded scribble labelmap (values 3 = foreground, 2 = background, as MONAI Label's)."""
        path = request.get("label")
        if not is_upload(path):
            return
        try:
            label = read_label(path, loaded)
        except BadRequest as e:  # named as the upload, not by the server's temporary copy
            raise BadRequest(calling(str(e), path, "the scribble label"), e.status) from None
        if index is not None:
            label = volume_slice(label, self.axis, index)
        fg_value = int(request.get("scribbles_fg_label", SCRIBBLE_FOREGROUND))
        bg_value = int(request.get("scribbles_bg_label", SCRIBBLE_BACKGROUND))
        fg, bg = label == fg_value, label == bg_value
        prompts.positive_scribbles = fg if fg.any() else None
        prompts.negative_scribbles = bg if bg.any() else None

    # -- running ------------------------------------------------------------------------------------

    def context_for(self, target: Target, judge: bool) -> tuple[ContextSet, int, Optional[float], bool]:
        """The label's datastore context (refreshed first) plus slices of this volume already segmented in
        the session; how many label files the refresh read; with ``judge`` (a request the predictor trusts
        a context for or not, see ``Predictor.predict``), the datastore context's reliability, when the
        predictor has a ``trust`` to compare it with; and whether the predictor may trust the whole set
        (with neighbouring slices of this volume in it, it may)."""
        read = self.context.refresh()
        context = self.context.get(target.label).copy()  # a snapshot: a refresh may change the live set meanwhile
        judged = judge and self.predictor.trust and len(context)
        reliability = self.predictor.reliability(context) if judged else None
        trusted = not judged or self.predictor.trusts(context)  # the figure is known by now
        if target.index is None:
            return context, read, reliability, trusted
        version = context.version  # the datastore's; session slices do not count
        neighbours = self.interactions.neighbours(self._volume_key(target), target.index, self.neighbour_slices)
        for i, entry in neighbours:
            context.put(("session", i), entry)
        context.version = version
        return context, read, reliability, trusted or bool(neighbours)

    @staticmethod
    def _volume_key(target: Target) -> tuple:
        return (target.client, target.source, target.label)

    def interactive(self, request: dict, region: Optional[tuple] = None) -> tuple[Target, np.ndarray, dict]:
        """Segment one plane (or ``region``, see :meth:`target`) from the request's prompts; returns the
        target, the 2D mask and result info."""
        target = self.target(request, region)
        if request.get("reset_state"):
            self.interactions.reset(target.client, target.source)
        t0 = time.perf_counter()
        count = target.prompts.count()
        context, read, reliability, trusted = self.context_for(target, not count or target.prompts.has_scribbles())
        t1 = time.perf_counter()
        key = self._volume_key(target) + (target.index, target.region)
        previous = self.interactions.previous(key, count) if count else None
        try:
            prediction = self.predictor.predict(
                target.image, target.prompts if count else None, context, previous=previous, trusted=trusted
            )
        except ValueError as e:  # prompts outside the image, wrong shapes: the core says which
            raise BadRequest(str(e), 422) from None
        t2 = time.perf_counter()
        if prediction.network == NOTHING:  # nothing shown: the next click must not refine an empty mask
            self.interactions.forget(key)
        else:
            self.interactions.remember(key, prediction.logits, count)
        if target.index is not None:
            try:  # kept on the model grid, as the context keeps it
                entry = context.prepare(target.image, prediction.mask)
            except ValueError:  # an empty mask shows the neighbours nothing
                entry = None
            self.interactions.accept_slice(self._volume_key(target), target.index, entry, state_key=key)
        info = {
            "label_names": {target.label: 1},
            "label": target.label,
            "context_size": len(prediction.context_ids),
            "context_version": prediction.context_version,
            "context_reliability": None if reliability is None else round(reliability, 3),
            "network": prediction.network,
            "refined": previous is not None,
            "labels_read": read,  # label files this request had to read (0 once the context is fresh)
            "labels_read_total": self.context.reads,
            "latencies": {
                "read": round(target.timings["read"], 4),
                "context": round(t1 - t0, 4),
                "infer": round(t2 - t1, 4),
            },
        }
        if target.index is not None:
            info["slice"] = target.index
        return target, prediction.mask, info

    def automatic(self, request: dict, region: Optional[tuple] = None) -> tuple[Loaded, np.ndarray, dict]:
        """Zero-click segmentation of a whole 2D image, or of every slice of a volume, for every label that
        has context (or of ``region``, ``(x0, y0, x1, y1)`` of a 2D image). Returns the labelmap (values =
        positions in ``label_names``) and result info."""
        t0 = time.perf_counter()
        loaded = self.load(request.get("image", ""))
        if region is not None and loaded.is_volume:
            raise BadRequest("a region (QuPath) request needs a 2D image", 422)
        self.context.refresh()
        wanted = request.get("label_name") or request.get("labels")
        names = [n for n in self.context.label_names() if len(self.context.get(n))]
        if isinstance(wanted, str):
            wanted = [wanted]
        if wanted:
            unknown = [n for n in wanted if n not in self.context.label_names()]
            if unknown:
                raise BadRequest(f"unknown label(s) {unknown}; known: {self.context.label_names()}", 404)
            names = [n for n in names if n in wanted]
        if not names:
            raise BadRequest(
                "no saved ('final') labels to learn from yet: segment and save one image interactively first", 409
            )
        if region is None:
            planes = planes_of(loaded, self.axis)
        else:  # the region on its own grid, at its own scale
            x0, y0, x1, y1 = region
            planes = [loaded.array[y0:y1, x0:x1]]
        t1 = time.perf_counter()
        best = np.zeros((len(planes),) + planes[0].shape[:2], np.float32)
        labelmap = np.zeros(best.shape, np.uint8)
        sizes, versions, uncertainty = {}, {}, {}
        for value, name in enumerate(names, start=1):
            context = self.context.get(name).copy()
            # background, one slice per forward: a click waits for at most one slice's forward
            with self.predictor.background():
                predictions = self.predictor.predict_many(planes, context, batch_size=1)
            prob = np.stack([p.probability for p in predictions])
            win = (prob >= 0.5) & (prob > best)
            labelmap[win] = value
            best = np.maximum(best, prob)
            sizes[name] = len(predictions[0].context_ids)
            versions[name] = predictions[0].context_version
            uncertainty[name] = round(mean_uncertainty(predictions), 6)  # what the 'review' strategy ranks
        t2 = time.perf_counter()
        out = from_planes(labelmap, loaded, self.axis) if region is None else labelmap[0]
        info = {
            "label_names": {name: i for i, name in enumerate(names, start=1)},
            "context_size": sizes,
            "context_version": versions,
            "uncertainty": uncertainty,
            "latencies": {"read": round(t1 - t0, 4), "infer": round(t2 - t1, 4)},
        }
        return loaded, out, info
