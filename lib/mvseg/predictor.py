"""One object that turns an image, a user's interactions and a context set into a mask."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import hub
from .checkpoint import MULTIVERSEG, SCRIBBLEPROMPT, load_checkpoint
from .context import ContextSet
from .geometry import (
    DEFAULT_PERCENTILES,
    DEFAULT_SIZE,
    Geometry,
    normalize_intensity,
    prepare_image,
    prepare_image_and_gray,
)
from .memory import retain_for_network
from .network import MultiverSegNet, ScribblePromptUNet
from .prompts import Prompts, encode_for_model
from .refine import BoundaryRefiner
from .scheduling import PriorityLock
from .zoom import Window, Zoom

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# dtype "auto" takes bfloat16 on CPUs with bfloat16 instructions for networks no wider than this. Measured on
# a 2-core AVX512-BF16 VM: width 24 runs x1.46-1.57 faster in bfloat16 (context 4-64), width 64 at 80% of the
# bfloat16 convolution peak. Wider networks (the official width 256) stay in the float32 they were released
# and checked in; their wide layers take float32 Winograd kernels, and bfloat16 gained only at context 64.
BF16_MAX_WIDTH = 64

FOLLOW_PROMPTS = 0.5  # the bundled first-image network's share of a prediction from prompts with context
# the bundled pair's least context reliability for interactive predictions (model card, "Context reliability":
# chosen on held-out images of four trained tasks, then measured on the held-out whole tasks)
TRUST = 0.75
RELIABILITY_ENTRIES = 8  # newest context entries a reliability estimate segments
RELIABILITY_CONTEXT = 8  # context entries each of those predictions sees: the sizes TRUST was chosen at
RELIABILITIES_KEPT = 64  # states of context sets whose reliability is remembered
NOTHING = "none"  # Prediction.network when there was nothing to go on: no prompts, no usable context
FIRST_IMAGE = "first-image"  # Prediction.network of a MultiverSegNet fallback, used for an empty context

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the precisions a forward runs in, by name


def cpu_has_bfloat16(cpuinfo: PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); elsewhere PyTorch
    emulates it, more slowly than float32. Read from Linux's ``cpuinfo``: ``False`` where there is none."""
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclass
class Prediction:
    """A segmentation on the original grid, plus what is needed to refine it."""

    probability: np.ndarray  # H W float32 in [0, 1]
    mask: np.ndarray  # H W uint8 {0, 1}: probability >= 0.5 (after boundary refinement, if on)
    logits: torch.Tensor = field(repr=False)  # 1 S S model-grid logits: pass back as ``previous``
    context_ids: list = field(default_factory=list)
    context_version: int = 0
    network: str = MULTIVERSEG  # which network produced it


def device_available(device: torch.device) -> bool:
    """Whether this machine has ``device``: the CPU, a visible CUDA device (``cuda:N`` among them), MPS."""
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return device.type == "cpu"


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None`` -> CUDA if present, else MPS if present, else CPU. A CUDA or MPS device this machine does not
    have is a ValueError that says so (PyTorch fails later, on the first tensor, with an assertion)."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device '{device}' is none PyTorch knows (cpu, cuda, cuda:N, mps): {e}") from None
        if dev.type == "cuda" and not device_available(dev):
            raise ValueError(f"device '{device}': this machine has no such CUDA device "
                             f"({torch.cuda.device_count()} visible; torch {torch.__version__})")
        if dev.type == "mps" and not device_available(dev):
            raise ValueError(f"device '{device}': this machine has no MPS device")
        return dev
    return next(torch.device(name) for name in ("cuda", "mps", "cpu") if device_available(torch.device(name)))


def _as_model(model: Union[nn.Module, PathLike, None], *expected: type) -> Optional[nn.Module]:
    """A network of one of the ``expected`` classes from a module, a checkpoint path or a release name."""
    if model is None or isinstance(model, nn.Module):
        net = model
    else:  # a path, or the name of an official release (downloaded once into the cache: mvseg.hub)
        net = load_checkpoint(hub.resolve(str(model)) if str(model) in hub.RELEASES else model)
    if net is not None and not isinstance(net, expected):
        names = " or ".join(e.__name__ for e in expected)
        raise ValueError(f"expected a {names} here, got {type(net).__name__}")
    return net


def overrules(prompts: Optional[Prompts], before: np.ndarray, after: np.ndarray) -> bool:
    """Whether ``after`` takes away from the user a pixel that ``before`` gave them: a positive click or
    stroke pixel turned background, or a negative one turned foreground (masks ``H W`` bool)."""
    if not prompts:
        return False
    h, w = before.shape
    for points, scribble, wanted in (
        (prompts.positive, prompts.positive_scribbles, True),
        (prompts.negative, prompts.negative_scribbles, False),
    ):
        marked = np.zeros((h, w), bool) if scribble is None else np.asarray(scribble) > 0
        for x, y in points:
            marked[min(h - 1, max(0, int(y))), min(w - 1, max(0, int(x)))] = True
        lost = marked & (before == wanted) & (after != wanted)
        if lost.any():
            return True
    return False


class Predictor:
    """MultiverSeg inference on one device, one forward at a time.

    Args:
        model: a :class:`MultiverSegNet`, a checkpoint path, or an official release name
            (``"multiverseg-v1"``, fetched once into the cache: :mod:`mvseg.hub`); ``None`` loads the bundled
            default weights. ``fallback`` likewise (``"scribbleprompt-v1"``).
        fallback: the network for an empty context set, the first image of every task: a
            ScribblePrompt-UNet (what the official release pairs with MultiverSeg) or a MultiverSegNet
            trained for that case. ``None``: with the bundled default ``model``, the bundled first-image
            weights (``mvseg.weights.first_image_weights``), else none; ``False`` (or the name ``"none"``,
            as ``--conf`` and CLIs give it): none. Without one, ``model`` runs with its dummy context entry.
        device: ``None`` picks CUDA, then MPS, then CPU.
        dtype: ``torch.float32``, ``torch.bfloat16`` (autocast), their names, or ``"auto"``: bfloat16 for a
            network no wider than ``BF16_MAX_WIDTH`` on a CPU with bfloat16 instructions (AVX512-BF16, AMX,
            Arm BF16), float32 elsewhere.
        size: model resolution (default: the one the checkpoint was trained at, else 128).
        max_context: most context entries per forward (see ``ContextSet.select``).
        refine: snap boundaries to the image's own intensity edges where the grid blurred them
            (``True``: a :class:`mvseg.refine.BoundaryRefiner` with its defaults, or pass a configured
            one; ``False``: the raw resampled prediction).
        zoom: after a prediction from strokes without context (the first images of a task), segment the
            window around the object and the prompts again on its own grid and paste it back (``True``: a
            :class:`mvseg.zoom.Zoom` with its defaults, or pass a configured one; ``False``: whole image
            only). See :mod:`mvseg.zoom`.
        blend: in a prediction from prompts *with* context, the weight of a MultiverSegNet fallback's
            logits (computed without the context) averaged into the main network's: the context can outrank
            what the user draws in the main network, never in the fallback. ``None``: ``FOLLOW_PROMPTS`` with
            the bundled first-image network, else 0 (not measured with other pairs). Zero-click predictions
            never change.
        trust: the least :meth:`reliability` of a context set (how well it segments its own images) at which
            :meth:`trusts` it; an untrusted one gives no zero-click proposal and no say over scribbles (see
            :meth:`predict`). ``None``: ``TRUST`` with the bundled pair, else 0 (every context is trusted).
    """

    def __init__(
        self,
        model: Union[MultiverSegNet, PathLike, None] = None,
        fallback: Union[ScribblePromptUNet, MultiverSegNet, PathLike, None, bool] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        size: Optional[int] = None,
        max_context: int = 64,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        refine: Union[bool, BoundaryRefiner] = True,
        zoom: Union[bool, Zoom] = False,
        blend: Optional[float] = None,
        trust: Optional[float] = None,
    ):
        bundled_pair = model is None and fallback is None
        if model is None:
            from .weights import default_weights, first_image_weights

            model = default_weights()
            fallback = first_image_weights() if fallback is None else fallback
        if fallback is False or (isinstance(fallback, (str, os.PathLike)) and str(fallback).lower() == "none"):
            fallback = None
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype  # a name, as --conf and CLIs give it
        if dtype not in (torch.float32, torch.bfloat16, "auto"):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or 'auto', got {dtype}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context must be a whole number of at least 1, got {max_context!r}")
        lo, hi = (float(p) for p in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be two numbers 0 <= low < high <= 100, got {tuple(percentiles)}")
        self.device = pick_device(device)
        self.max_context = max_context
        self.percentiles = (lo, hi)
        self.refiner = BoundaryRefiner() if refine is True else (refine or None)
        self.zoom = Zoom() if zoom is True else (zoom or None)
        self.model = _as_model(model, MultiverSegNet).to(self.device).eval()
        retain_for_network(self.device.type, self.model.config.encoder_widths)
        self.size = int(getattr(self.model, "meta", {}).get("size", DEFAULT_SIZE)) if size is None else size
        self.fallback = _as_model(fallback, ScribblePromptUNet, MultiverSegNet)
        if self.fallback is not None:
            self.fallback = self.fallback.to(self.device).eval()
        self.blend = float(FOLLOW_PROMPTS if blend is None and bundled_pair else blend or 0.0)
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend must be between 0 and 1, got {blend}")
        if self.blend and not isinstance(self.fallback, MultiverSegNet):
            raise ValueError("blend needs a MultiverSegNet fallback (the first-image network) to blend in")
        self.trust = float(TRUST if trust is None and bundled_pair else trust or 0.0)
        if not 0.0 <= self.trust <= 1.0:
            raise ValueError(f"trust must be between 0 and 1, got {trust}")
        self._reliabilities: OrderedDict = OrderedDict()  # (k, entries of a context state) -> reliability
        self._reliabilities_lock = threading.Lock()
        self._judging: dict = {}  # state -> the lock its computing thread holds: a second asker waits for it
        step = 2 ** (self.model.depth - 1)
        if self.size <= 0 or self.size % step:
            raise ValueError(f"size {self.size} must be a positive multiple of {step} for this network")
        self._lock = PriorityLock()  # one forward at a time; clicks before background work
        for net in (self.model, self.fallback):
            for block in (*getattr(net, "enc_blocks", ()), *getattr(net, "dec_blocks", ())):
                # background forwards step aside here while a click waits
                block.register_forward_pre_hook(lambda *_: self._lock.yield_to_foreground())
        self.dtype = self._auto_dtype() if dtype == "auto" else dtype

    def background(self):
        """``with predictor.background():`` this thread's forwards wait while a click waits (zero-click
        volumes, scoring, batch jobs); see :mod:`mvseg.scheduling`."""
        return self._lock.background()

    def new_context(self) -> ContextSet:
        """An empty context set on this predictor's grid."""
        return ContextSet(self.size, self.max_context, self.percentiles)

    # -- the network --------------------------------------------------------------------------------

    def _auto_dtype(self) -> torch.dtype:
        """bfloat16 for a narrow network on a CPU that computes it natively, else float32 (GPUs too: the
        official weights were released and checked in float32)."""
        narrow = max(self.model.config.encoder_widths) <= BF16_MAX_WIDTH
        chosen = torch.bfloat16 if self.device.type == "cpu" and narrow and cpu_has_bfloat16() else torch.float32
        log.info("dtype auto: %s", chosen)
        return chosen

    def _autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(
        self, target: torch.Tensor, context_images: Optional[torch.Tensor], context_labels: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, str]:
        """Model-grid forward. ``target B 5 S S``, context ``B N 1 S S`` (or None / N = 0) -> logits ``B 1 S S``."""
        empty = context_images is None or context_images.shape[1] == 0
        use_fallback = empty and self.fallback is not None
        with self._lock, torch.inference_mode(), self._autocast():
            target = target.to(self.device)
            if use_fallback:
                logits = self.fallback(target)
            elif empty:
                logits = self.model(target)
            else:
                logits = self.model(target, context_images.to(self.device), context_labels.to(self.device))
                prompted = target[:, 1:4].flatten(1).any(1)  # a box, clicks or strokes
                if self.blend and prompted.any():
                    logits[prompted] = torch.lerp(logits[prompted], self.fallback(target[prompted]).to(logits.dtype),
                                                  self.blend)
        if not use_fallback:
            return logits.float().cpu(), MULTIVERSEG
        return logits.float().cpu(), SCRIBBLEPROMPT if isinstance(self.fallback, ScribblePromptUNet) else FIRST_IMAGE

    # -- public API ---------------------------------------------------------------------------------

    def predict(
        self,
        image: np.ndarray,
        prompts: Optional[Prompts] = None,
        context: Optional[ContextSet] = None,
        previous: Optional[Union[Prediction, torch.Tensor]] = None,
        exclude: Iterable[Hashable] = (),
        trusted: Optional[bool] = None,
    ) -> Prediction:
        """Segment one 2D image from prompts (original-grid coordinates) and a context set.

        ``previous`` (a :class:`Prediction` of the same image, or its model-grid logits) goes into the
        previous-prediction channel so that new clicks refine it. ``exclude``: context ids not to use
        (e.g. the image itself). With ``zoom`` on, a prediction from strokes without context takes a
        second look at the window the user works in (:mod:`mvseg.zoom`).

        A context the predictor does not trust (``trusted``; ``None``: :meth:`trusts`, asked only when it
        matters) gives no zero-click proposal (the prediction is empty, ``network`` ``"none"``) and stays out
        of predictions from scribbles, which then go as on a first image; clicks and boxes still use it.
        Measured on held-out tasks (model card, "Context reliability"): a poor proposal and the context's
        pull cost scribbles more steps than none, while a click, which says less, still gains from it.
        """
        prev = previous.logits if isinstance(previous, Prediction) else previous
        version = 0 if context is None else context.version
        usable = context is not None and bool(set(context.ids()) - set(exclude))
        if usable and (not prompts or prompts.has_scribbles()):
            usable = self.trusts(context) if trusted is None else trusted
            context = context if usable else None
        if not prompts and prev is None and not usable:
            return self._nothing(image, version)  # a network asked about nothing answers with a blob
        prediction = self._predict_whole(image, prompts, context, prev, exclude)
        zoom = self.zoom is not None and self.zoom.applies(prompts, with_context=bool(prediction.context_ids))
        window = self.zoom.window(prediction.mask, prompts) if zoom else None
        return prediction if window is None else self._look_closer(image, prompts, prediction, window)

    def _look_closer(self, image: np.ndarray, prompts: Prompts, prediction: Prediction, window: Window) -> Prediction:
        """``window`` of the image segmented again on its own grid (``prediction`` as the previous one,
        without context) and pasted back into ``prediction``."""
        closer = Geometry(window.bottom - window.top, window.right - window.left, self.size)
        # probabilities back to logits, clipped at about +-9.2 (eps 1e-4)
        seen = torch.logit(closer.map_forward(window.crop(prediction.probability)), eps=1e-4)
        part = self._predict_whole(window.crop(image), window.prompts(prompts), None, seen, ())
        probability = window.paste(prediction.probability, part.probability)
        whole = Geometry(probability.shape[0], probability.shape[1], self.size)
        return Prediction(
            probability=probability,
            mask=window.paste(prediction.mask, part.mask),
            logits=torch.logit(whole.map_forward(probability), eps=1e-4),  # what the next click refines
            context_ids=prediction.context_ids,
            context_version=prediction.context_version,
            network=prediction.network,
        )

    def _predict_whole(
        self,
        image: np.ndarray,
        prompts: Optional[Prompts],
        context: Optional[ContextSet],
        previous: Optional[torch.Tensor],
        exclude: Iterable[Hashable],
    ) -> Prediction:
        """One forward on the whole of ``image`` (``previous``: model-grid logits ``1 S S`` or None)."""
        # the grey image is kept for the boundary refinement: one normalisation per click, not two
        model_image, geometry, gray = prepare_image_and_gray(image, self.size, self.percentiles)
        target = encode_for_model(model_image, geometry, prompts, previous)
        ids, images, labels, version = self._context_for(model_image, context, exclude)
        logits, network = self.forward(target, images[None], labels[None])
        return self._finish(logits[0], geometry, ids, version, network, gray, prompts)

    def predict_many(
        self,
        images: Sequence[np.ndarray],
        context: Optional[ContextSet] = None,
        batch_size: int = 4,
        progress: bool = False,
        refine: bool = True,
    ) -> list[Prediction]:
        """Zero-click, in-context segmentation of many images, batched. ``refine=False`` skips the
        boundary refinement (for callers that only read the model-grid logits, such as scoring)."""
        prepared = [prepare_image(im, self.size, self.percentiles) for im in images]
        jobs = []
        for model_image, geometry in prepared:
            ids, ci, cl, version = self._context_for(model_image, context, ())
            target = encode_for_model(model_image, geometry)
            jobs.append((target, ci, cl, ids, version, geometry))
        # Batch items must share a context size; bound batch x context to keep memory flat.
        out: list[Optional[Prediction]] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][1].shape[0])
        bar = tqdm(total=len(jobs), desc="segmenting", unit="image", disable=not progress)
        start = 0
        while start < len(order):
            n_ctx = jobs[order[start]][1].shape[0]
            limit = max(1, min(batch_size, self.max_context // max(1, n_ctx)))
            group = [i for i in order[start : start + limit] if jobs[i][1].shape[0] == n_ctx]
            start += len(group)
            targets = torch.cat([jobs[i][0] for i in group])
            ci = torch.stack([jobs[i][1] for i in group])
            cl = torch.stack([jobs[i][2] for i in group])
            logits, network = self.forward(targets, ci, cl)
            for row, i in enumerate(group):
                _, _, _, ids, version, geometry = jobs[i]
                # normalised again here rather than kept for every image: a volume's slices add up
                gray = normalize_intensity(images[i], self.percentiles) if refine and self.refiner else None
                out[i] = self._finish(logits[row], geometry, ids, version, network, gray)
            bar.update(len(group))
        bar.close()
        return out  # type: ignore[return-value]

    def reliability(self, context: Optional[ContextSet]) -> float:
        """How well ``context`` segments its own images: the mean model-grid Dice of a zero-click prediction
        of each of its ``RELIABILITY_ENTRIES`` newest entries from (at most ``RELIABILITY_CONTEXT`` of) the
        others; 0 for fewer than two entries. An estimate of what its zero-click proposals are worth on this
        task; computed once per state of the set's entries, in two forwards.
        "Newest": added last (the app adds saved labels in the order they were saved, at start too)."""
        snapshot = ContextSet(self.size) if context is None else context.copy()
        items = snapshot.items()
        if len(items) < 2:
            return 0.0
        k = min(self.max_context, snapshot.max_size, len(items) - 1, RELIABILITY_CONTEXT)
        state = (k, tuple((key, entry.serial) for key, entry in items))
        with self._reliabilities_lock:
            if state in self._reliabilities:
                self._reliabilities.move_to_end(state)
                return self._reliabilities[state]
            judging = self._judging.setdefault(state, threading.Lock())
        with judging:  # another thread computing this very state: wait for its figure, not for others
            with self._reliabilities_lock:
                if state in self._reliabilities:
                    return self._reliabilities[state]
            try:
                value = self._self_dice(snapshot, [key for key, _ in items[-RELIABILITY_ENTRIES:]], k)
                with self._reliabilities_lock:
                    self._reliabilities[state] = value
                    while len(self._reliabilities) > RELIABILITIES_KEPT:
                        self._reliabilities.popitem(last=False)
            finally:
                with self._reliabilities_lock:
                    self._judging.pop(state, None)
        return value

    def _self_dice(self, snapshot: ContextSet, newest: list, k: int) -> float:
        """Mean model-grid Dice of the entries ``newest`` predicted zero-click from ``k`` of the others."""
        dices = []
        for start in range(0, len(newest), 4):  # a few images per forward, memory flat
            group = [snapshot.get(key) for key in newest[start : start + 4]]
            chosen = [snapshot.choose(entry.image, k, exclude=[key]) for key, entry in zip(newest[start:], group)]
            target = torch.zeros((len(group), 5, self.size, self.size))  # the image, no prompts
            target[:, :1] = torch.stack([entry.image for entry in group])
            logits, _ = self.forward(target, torch.stack([c[1] for c in chosen]), torch.stack([c[2] for c in chosen]))
            for row, entry in enumerate(group):
                predicted, truth = logits[row, 0] > 0, entry.label[0] > 0.5
                total = int(predicted.sum() + truth.sum())
                dices.append(1.0 if total == 0 else 2 * int((predicted & truth).sum()) / total)
        return float(np.mean(dices))

    def trusts(self, context: Optional[ContextSet]) -> bool:
        """Whether ``context`` is reliable enough for zero-click proposals and predictions from scribbles
        (see :meth:`predict`): a non-empty set whose :meth:`reliability` reaches ``trust`` (any, with
        ``trust`` 0)."""
        if context is None or not len(context):
            return False
        return self.trust <= 0 or self.reliability(context) >= self.trust

    def warmup(self, context_size: int = 1) -> None:
        """One forward on blank input, so the first user click does not pay for lazy initialisation."""
        target = torch.zeros((1, 5, self.size, self.size))
        ctx = torch.full((1, context_size, 1, self.size, self.size), 0.5)
        self.forward(target, ctx, ctx)

    # -- helpers ------------------------------------------------------------------------------------

    def _context_for(self, model_image: torch.Tensor, context: Optional[ContextSet], exclude: Iterable[Hashable]):
        if context is None:
            empty = torch.zeros((0, 1, self.size, self.size))
            return [], empty, empty, 0
        if context.size != self.size:
            raise ValueError(f"context set is on a {context.size} grid but the predictor works at {self.size}")
        # one state of the set: another thread may add or remove entries meanwhile
        return context.choose(model_image, min(self.max_context, context.max_size), exclude)

    def _nothing(self, image: np.ndarray, context_version: int = 0) -> Prediction:
        """The empty prediction of an image when there is nothing to go on (no prompts, no usable context)."""
        h, w = np.asarray(image).shape[:2]
        return Prediction(
            probability=np.zeros((h, w), np.float32),
            mask=np.zeros((h, w), np.uint8),
            logits=torch.full((1, self.size, self.size), -9.21),  # logit(1e-4), as the zoom's clipped ones
            context_version=context_version,
            network=NOTHING,
        )

    def _finish(
        self,
        logits: torch.Tensor,
        geometry: Geometry,
        ids: list,
        version: int,
        network: str,
        gray: Optional[np.ndarray] = None,
        prompts: Optional[Prompts] = None,
    ) -> Prediction:
        """Model-grid logits ``1 S S`` -> a :class:`Prediction` on the original grid; with ``gray`` (the
        normalised image ``H W``), its boundary refined (the probability moved across 0.5 wherever the
        refinement moved the mask), unless that would overrule one of the user's ``prompts``."""
        probability = torch.sigmoid(geometry.logits_back(logits[0])).numpy().astype(np.float32, copy=False)
        mask = probability >= 0.5
        if gray is not None and self.refiner is not None:
            refined = self.refiner(gray, mask, 1 / geometry.scale)  # cell: original pixels per grid cell
            if overrules(prompts, mask, refined):
                refined = mask
            below = np.nextafter(np.float32(0.5), np.float32(0))
            probability = np.where(refined & ~mask, np.maximum(probability, 0.5), probability)
            probability = np.where(mask & ~refined, np.minimum(probability, below), probability)
            mask = refined
        return Prediction(
            probability=probability,
            mask=mask.astype(np.uint8),
            logits=logits.reshape(1, geometry.size, geometry.size),
            context_ids=list(ids),
            context_version=version,
            network=network,
        )

