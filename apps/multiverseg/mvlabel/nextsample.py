"""Next-sample strategies for the app, scores computed in the background, and leases between annotators.

The strategies themselves live in :mod:`mvseg.activelearning`; here they meet the datastore:

* :class:`ScoreBoard` scores every unlabelled image, per label name, in a background thread after each
  save (and at start-up). Coverage needs descriptors only (cached per file); uncertainty and confident need
  a network forward per image, a few images per forward, and the board takes the predictor's lock one
  forward at a time, so an annotator's click waits for at most one of them. Scores also go into each
  image's info in the datastore.
* :class:`Leases` keeps an image handed to one annotator away from the others for a while.
* :class:`NextSample` is the MONAI Label strategy: it answers from the stored scores at once (coverage is
  computed on the spot for images the board has not reached yet) and says why it picked the image.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
from typing import Hashable, Optional

import numpy as np
import torch
from monailabel.interfaces.tasks.strategy import Strategy

from mvseg import activelearning
from mvseg.context import describe
from mvseg.geometry import prepare_image

from .contextstore import DatastoreContext, volume_slice
from .errors import BadRequest
from .guard import DICOM_INFO, client_key, pacs_unreachable
from .imageio import stat_key

log = logging.getLogger(__name__)
# what a forward on one image the network cannot take raises (NaN values, out of memory): that image is not scored
UNSCORABLE = (ValueError, RuntimeError, MemoryError)

PACS_RETRY = 30  # seconds before a scoring pass the PACS did not answer is tried again
DESCRIPTIONS = {
    "hybrid": "Context-aware: unsure predictions first, among images unlike anything labelled",
    "coverage": "Context-aware: the image least like anything labelled (the most typical one to start)",
    "nearest": "Context-aware: the image most like something labelled, the cheapest to segment next",
    "uncertainty": "Context-aware: the image whose zero-click prediction is least certain",
    "confident": "Context-aware: the image whose zero-click prediction is most certain, the fewest clicks now",
    "review": "Pre-segmented: the image whose batch pre-segmentation is least certain, to correct first",
    "random": "Random unlabelled image",
    "first": "First unlabelled image by name",
}


MAX_LEASES_PER_USER = 4  # images one user holds at once (a few viewers open); more would hoard the pool


class Leases:
    """Which client was handed which image, and when; others do not get it within ``window`` seconds. With
    ``per_user`` (authentication on: users are known) one user holds at most ``MAX_LEASES_PER_USER`` images,
    the oldest going first: a user names their clients (``client_id``), so one annotator could otherwise take
    every image from the others. Clients are :func:`mvlabel.guard.client_key` s (user first)."""

    def __init__(self, window: float = 600.0, per_user: bool = False):
        self.window = window
        self.per_user = per_user
        self._given: dict[str, tuple[Hashable, float]] = {}
        self._lock = threading.Lock()

    def _user(self, client: Hashable) -> Hashable:
        return client[0] if self.per_user and isinstance(client, tuple) else client

    def free_for(self, image_id: str, client: Hashable) -> bool:
        with self._lock:
            return self._free(image_id, client)

    def _free(self, image_id: str, client: Hashable) -> bool:
        holder = self._given.get(image_id)
        return holder is None or holder[0] == client or time.monotonic() - holder[1] > self.window

    def claim(self, ranked: list[str], client: Hashable) -> Optional[str]:
        """The first of ``ranked`` free for ``client``, given to it in one step (two annotators asking at once
        never get the same image); None when all are taken."""
        with self._lock:
            pick = next((i for i in ranked if self._free(i, client)), None)
            if pick is not None:
                self._give(pick, client)
            return pick

    def give(self, image_id: str, client: Hashable) -> None:
        with self._lock:
            self._give(image_id, client)

    def release(self, image_id: str) -> None:
        with self._lock:
            self._given.pop(image_id, None)

    def _give(self, image_id: str, client: Hashable) -> None:
        now = time.monotonic()
        for old in [i for i, (_, when) in self._given.items() if now - when > self.window]:
            del self._given[old]  # run out: holds nobody back (and a deleted image's goes too)
        user = self._user(client)
        held = sorted((when, i) for i, (c, when) in self._given.items() if self._user(c) == user and i != image_id)
        for _, old in held[: max(0, len(held) - MAX_LEASES_PER_USER + 1)]:
            del self._given[old]
        self._given[image_id] = (client, now)


class ScoreBoard:
    """Per-label scores of the unlabelled images, refreshed in a background thread."""

    def __init__(self, segmenter, datastore):
        self.segmenter = segmenter
        self.datastore = datastore
        self.scores: dict[str, dict[str, dict[str, float]]] = {}  # label -> strategy -> image -> score
        self.passes = 0
        self._descriptors: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.unreadable: set[str] = set()  # images that cannot be read (a PACS series that is no volume)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stop = False

    @property
    def context(self) -> DatastoreContext:
        return self.segmenter.context

    # -- inputs -------------------------------------------------------------------------------------

    def _uri(self, image_id: str, read=lambda path: path):
        """``read`` of the image's file (a PACS downloads it now), or None for an image that cannot be read
        (a PACS series that is no volume, a corrupt file): never the next sample, and no 500."""
        try:
            return read(self.datastore.get_image_uri(image_id))
        except BadRequest as e:
            log.warning("next sample and scoring: leaving %s out: %s", image_id, e)
            self.unreadable.add(image_id)
            return None

    def readable(self, image_id: str) -> bool:
        """Whether the image can be had; one that cannot is remembered as such."""
        return self._uri(image_id) is not None

    def plane(self, image_id: str) -> Optional[np.ndarray]:
        """The 2D image an image is scored on: itself, or a volume's middle slice."""
        loaded = self._uri(image_id, self.segmenter.load)
        if loaded is None:
            return None
        if not loaded.is_volume:
            return loaded.array
        axis = self.segmenter.axis
        return volume_slice(loaded.array, axis, loaded.shape[axis] // 2)

    def descriptor(self, image_id: str) -> Optional[torch.Tensor]:
        path = self._uri(image_id)  # a PACS that does not answer is raised: scoring waits for it
        if path is None:
            return None
        try:
            key = stat_key(path)
        except OSError:
            return None
        hit = self._descriptors.get(image_id)
        if hit and hit[0] == key:
            return hit[1]
        plane = self.plane(image_id)
        if plane is None:
            return None
        try:
            d = describe(prepare_image(plane, self.segmenter.predictor.size)[0])
        except UNSCORABLE as e:  # an image no network can read: never the next sample
            log.warning("scoring: skipping %s: %s", image_id, e)
            return None
        self._descriptors[image_id] = (key, d)
        return d

    def likeness(self, strategy: str, candidates: list[str], labelled: list[str]) -> dict[str, float]:
        """``coverage`` or ``nearest`` scores from image descriptors alone (no network)."""
        cand = [(i, self.descriptor(i)) for i in candidates]
        cand = [(i, d) for i, d in cand if d is not None]
        if not cand:
            return {}
        lab = [d for d in (self.descriptor(i) for i in labelled) if d is not None]
        lab_t = torch.stack(lab) if lab else torch.zeros((0, cand[0][1].numel()))
        score = activelearning.nearest_scores if strategy == "nearest" else activelearning.coverage_scores
        s = score(torch.stack([d for _, d in cand]), lab_t)
        return {i: float(v) for (i, _), v in zip(cand, s)}

    # -- the background pass ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mvseg-scoring", daemon=True)
            self._thread.start()
            # at exit, let a forward in progress finish: a daemon thread stopped inside torch aborts the process
            atexit.register(self.stop, 30.0)
        self._wake.set()

    def poke(self) -> None:
        """Something changed (a label was saved): rescore soon."""
        self._wake.set()

    def stop(self, wait: float = 0.0) -> None:
        """End the background pass after the forward in progress (waiting up to ``wait`` seconds for it)."""
        self._stop = True
        self._wake.set()
        if wait and self._thread is not None:
            self._thread.join(wait)

    def _run(self) -> None:
        with self.segmenter.predictor.background():  # scoring forwards yield to clicks
            self._loop()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            try:
                self.score_all()
            except Exception as e:  # never let a bad file kill the thread
                if not pacs_unreachable(e):
                    log.exception("scoring pass failed")
                    continue
                log.warning("scoring put off for %d s: the PACS did not answer (%s)", PACS_RETRY, e)
                again = threading.Timer(PACS_RETRY, self._wake.set)
                again.daemon = True
                again.start()

    def score_all(self) -> None:
        """One pass: every strategy, every label name, every unlabelled image. Stops early (to restart)
        when a new save arrives, so scores follow the newest context."""
        self.context.refresh()
        self.unreadable.clear()  # read again: a series may have been mended
        predictor = self.segmenter.predictor
        for label in self.context.label_names() if predictor.trust else ():
            if self._wake.is_set() or self._stop:
                return  # a newer save: start over with the new context
            predictor.reliability(self.context.get(label))  # first: so zero-click after a save finds it ready
        unlabelled = sorted(self.datastore.get_unlabeled_images())
        labelled = sorted(self.datastore.get_labeled_images())
        for gone in set(self._descriptors) - set(unlabelled) - set(labelled):  # images deleted since
            self._descriptors.pop(gone, None)
        # image likeness: the same for every label name
        cover, near = (self.likeness(s, unlabelled, labelled) for s in ("coverage", "nearest"))
        new: dict[str, dict[str, dict[str, float]]] = {}
        for label in self.context.label_names():
            new[label] = {"coverage": cover, "nearest": near}
            context = self.context.get(label).copy()
            unsure: dict[str, float] = {}
            if len(context):
                for start in range(0, len(unlabelled), activelearning.SCORING_BATCH):
                    if self._wake.is_set() or self._stop:
                        return  # a newer save: start over with the new context
                    batch = unlabelled[start : start + activelearning.SCORING_BATCH]
                    planes = [(i, self.plane(i)) for i in batch]
                    planes = [(i, p) for i, p in planes if p is not None]
                    if planes:
                        unsure.update(self._entropy(planes, context))
            ids = [i for i in cover if i in unsure]
            derived = activelearning.entropy_strategies(
                np.array([cover[i] for i in ids]), np.array([unsure[i] for i in ids])
            )
            for strategy, values in derived.items():  # no context yet: every one of them falls back to coverage
                new[label][strategy] = {i: float(v) for i, v in zip(ids, values)} if ids else dict(cover)
        with self._lock:
            self.scores = new
            self.passes += 1
        now = int(time.time())
        infos = {image_id: {"mvseg_scores": {label: {s: v.get(image_id) for s, v in per.items() if image_id in v}
                                             for label, per in new.items()}, "mvseg_scored": now}
                 for image_id in unlabelled}
        try:
            many = getattr(self.datastore, "update_images_info", None)
            if many is not None:  # one write of the index, not one per image (a 2,000-image index is MBs)
                many(infos)
            else:
                for image_id, info in infos.items():
                    self.datastore.update_image_info(image_id, info)
        except Exception as e:  # a read-only datastore still serves from memory
            log.debug("could not store the scores: %s", e)

    def _entropy(self, planes: list[tuple[str, np.ndarray]], context) -> dict[str, float]:
        """Uncertainty scores of a batch of images: one batched forward, holding the predictor's lock only for
        it; if the batch fails, image by image, so that one image the network cannot take (out of memory, say)
        costs only its own score, not every image's."""
        predictor = self.segmenter.predictor
        try:
            s = activelearning.entropy_scores(predictor, [p for _, p in planes], context)
            return {i: float(v) for (i, _), v in zip(planes, s)}
        except UNSCORABLE as e:
            if len(planes) == 1:
                log.warning("scoring: skipping %s: %s", planes[0][0], e)
                return {}
        return {i: v for one in planes for i, v in self._entropy([one], context).items()}

    def get(self, label: str, strategy: str) -> dict[str, float]:
        with self._lock:
            return dict(self.scores.get(label, {}).get(strategy, {}))


class NextSample(Strategy):
    """A MONAI Label strategy over :class:`ScoreBoard` scores (or random/first), with leases."""

    def __init__(self, name: str, board: ScoreBoard, leases: Leases, review_tag: str = "original"):
        super().__init__(DESCRIPTIONS[name])
        self.name = name
        self.board = board
        self.leases = leases
        self.review_tag = review_tag  # where batch pre-segmentations are (mvlabel.batch)

    def presegmented(self, datastore, candidates: list[str], label: str) -> dict[str, float]:
        """Uncertainty of each candidate's batch pre-segmentation for ``label`` (only those that have one)."""
        from .batch import recorded_uncertainty

        out = {}
        for image_id in candidates:
            try:
                info = datastore.get_label_info(image_id, self.review_tag) or {}
            except Exception:  # no label of that tag
                continue
            value = recorded_uncertainty(info, label) if isinstance(info, dict) else None
            if value is not None:
                out[image_id] = value
        return out

    def __call__(self, request, datastore):
        client = client_key(request.get("client_id"))
        label = request.get("label_name") or request.get("label") or self.board.context.names[0]
        if label not in self.board.context.label_names():
            raise BadRequest(f"unknown label '{label}'; known: {', '.join(self.board.context.label_names())}", 404)
        candidates = [i for i in sorted(datastore.get_unlabeled_images()) if self.leases.free_for(i, client)]
        if not candidates:
            return None
        scores: dict[str, float] = {}
        if self.name == "random":
            ranked, why = random.sample(candidates, len(candidates)), "random"
        elif self.name == "first":
            ranked, why = candidates, "first by name"
        elif self.name == "review" and (scores := self.presegmented(datastore, candidates, label)):
            ranked = sorted(scores, key=scores.get, reverse=True)
            why = (f"least certain batch pre-segmentation ('{self.review_tag}' tag) among {len(scores)} "
                   f"pre-segmented images for '{label}'")
        else:
            scores = self.board.get(label, self.name)
            missing = [i for i in candidates if i not in scores]
            if missing:  # not scored yet (new images, or the first pass still running): likeness now
                likeness = self.name if self.name in ("coverage", "nearest") else "coverage"  # review: none yet
                scores.update(self.board.likeness(likeness, missing, sorted(datastore.get_labeled_images())))
            ranked = sorted(candidates, key=lambda i: scores.get(i, float("-inf")), reverse=True)
            why = f"highest {self.name} score among {len(candidates)} unlabelled images for '{label}'"
        left = [i for i in ranked if i not in self.board.unreadable]
        # the best one nobody else took meanwhile, and one that can be read (MONAI Label looks its file up next)
        while (pick := self.leases.claim(left, client)) is not None and not self.board.readable(pick):
            self.leases.release(pick)
            left.remove(pick)
        if pick is None:
            return None
        score = scores.get(pick)
        out = {"id": pick, "strategy": self.name, "score": score, "reason": why, "label": label}
        try:  # a PACS series: its DICOM identity, which OHIF shows and opens
            info = datastore.get_image_info(pick) or {}
        except Exception:
            info = {}
        out.update({k: info[k] for k in DICOM_INFO if k in info})
        if request.get("patch_size") is not None:  # QuPath asks for a region: the whole 2D image
            plane = self.board.plane(pick)
            if plane is not None:
                out["bbox"] = [0, 0, int(plane.shape[1]), int(plane.shape[0])]
        return out
