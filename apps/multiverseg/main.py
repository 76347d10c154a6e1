"""MONAI Label app: MultiverSeg with a context set fed by the datastore's saved labels.

    monailabel start_server --app apps/multiverseg --studies sample-datasets/brain-2d \\
        [--conf weights PATH] [--conf labels white_matter] ...

Configuration (``--conf key value``):
    weights           MultiverSeg checkpoint (default: the bundled ``mvseg`` weights; official files load too)
    fallback          network for an empty context set (a task's first image): a ScribblePrompt-UNet or
                      MultiverSeg checkpoint, or ``none`` (default: with the bundled weights, the bundled
                      first-image weights; with other weights, none)
    labels            comma-separated label names; the first is the default (default: ``foreground``)
    axis              slice axis of volumes, 0-2 (default: 2)
    max_context       most context entries per forward (default: 64)
    size              side of the square grid the network sees, in pixels (default: the checkpoint's, 128);
                      256 costs four times the compute; with ``refine`` on, 128 did better on nuclei too
    refine            true/false: snap boundaries to the image's intensity edges where the grid blurred
                      them (default: true; see ``mvseg.refine``)
    zoom              true/false: after a stroke on an image without context, segment the window around
                      the object and the prompts again on its own grid (default: true; see ``mvseg.zoom``)
    blend             share of the first-image network in predictions from prompts with context, 0-1
                      (default: 0.5 with the bundled weights and their first-image network, else 0)
    trust             least reliability of a context set (how well it segments its own images), 0-1: below
                      it no zero-click proposal, and scribbles go without it (default: 0.75 with the
                      bundled pair, else 0)
    slices_per_volume most slices one 3D label adds to the context (default: 4)
    device            cpu, cuda, mps (default: best available)
    dtype             auto, float32, bfloat16: network precision (default: auto, bfloat16 for a narrow
                      network on a CPU with bfloat16 instructions, float32 elsewhere; ``mvseg.Predictor``)
    state_expiry      seconds an idle interaction state is kept (default: 1800)
    strategy          the next-sample strategy listed first, i.e. the default (default: nearest)
    lease_window      seconds an image handed to one annotator is kept from the others (default: 600)
    review_tag        tag of batch pre-segmentations, which the 'review' strategy ranks (default: original)
    max_pixels        largest image read, in pixels or voxels (default: 100000000)
    max_upload_mb     largest request body (default: 2048)
    history_keep      how many earlier ``final`` labels of each image ``labels/final/.history/`` keeps, the
                      newest (default: all)

``weights`` and ``fallback`` also take the official releases by name (``multiverseg-v1``,
``scribbleprompt-v1``: ``mvseg.hub``). Every request passes ``mvlabel.guard`` first (authentication and roles
when MONAI Label's auth settings turn it on, names instead of paths, well-formed parameters, limits).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Optional

import torch
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this app's own modules (mvlabel)

from mvlabel import guard, imageio
from mvlabel.access import TokenCache, install_monailabel_user, verifier_from_settings
from mvlabel.contextstore import DatastoreContext
from mvlabel.dicomweb import connect
from mvlabel.errors import BadRequest, shorten
from mvlabel.imageio import is_upload, read_image, uploads_removed_when_refused
from mvlabel.infer import BatchInfer, MultiverSegAuto, MultiverSegInfer, mend_infer_route
from mvlabel.interactions import InteractionStore
from mvlabel.localstore import CheckedDatastore
from mvlabel.nextsample import Leases, NextSample, ScoreBoard
from mvlabel.ohif import serve_ohif_assets
from mvlabel.segmenter import Segmenter
from mvlabel.sessions import CheckedSessions
from mvlabel.wsi import auto_region, infer_region
from mvseg import Predictor
from mvseg.memory import limit_arenas
from mvseg.predictor import device_available

log = logging.getLogger(__name__)
serve_ohif_assets()  # MONAI Label 0.8.5 answers every nested /ohif/ asset with index.html
mend_infer_route()  # its uploads stayed in the temp folder after a failure; OHIF's .bin scribbles unchecked

STRATEGIES = ("nearest", "confident", "coverage", "hybrid", "uncertainty", "review", "random", "first")
# The most clicks saved on both measured pools, and never worse than random order (README, "Next sample").
DEFAULT_STRATEGY = "nearest"


def _positive_int(conf: dict, key: str, default: int) -> int:
    value = str(conf.get(key, default))
    if not guard.is_whole(value) or int(value) <= 0:
        raise ValueError(f"--conf {key} must be a positive whole number, got '{value}'")
    return int(value)


def _positive_number(conf: dict, key: str, default: float) -> float:
    value = str(conf.get(key, default)).strip()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise ValueError(f"--conf {key} must be a positive number of seconds, got '{value}'")
    return number


def _count_or_all(conf: dict, key: str) -> int | None:
    value = str(conf.get(key, "all")).strip().lower()
    if value != "all" and not guard.is_whole(value):
        raise ValueError(f"--conf {key} must be a whole number or 'all', got '{value}'")
    return None if value == "all" else int(value)


def _check_writable(folder: str) -> None:
    """MONAI Label keeps its lock, index and labels in the datastore folder: say so at start-up when it
    cannot write there, instead of a traceback about '.lock'."""
    try:
        with open(os.path.join(folder, ".lock"), "a"):
            pass
    except OSError as e:
        raise RuntimeError(f"the datastore folder {folder} is not writable ({e.strerror}): MONAI Label keeps its "
                           "index, lock file and labels there; mount it read-write, or copy the images to a "
                           "folder the server can write") from None


def _device(conf: dict) -> Optional[str]:
    """``--conf device``: one torch knows and this machine has, or None (the best available)."""
    value = str(conf.get("device") or "").strip()
    if not value:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"--conf device must be cpu, cuda, cuda:N or mps, got '{value}'") from None
    if not device_available(device):
        raise ValueError(f"--conf device {value}: this machine has no such device (leave it out for the best one)")
    return value


def _flag(conf: dict, key: str, default: bool) -> bool:
    value = str(conf.get(key, default)).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"--conf {key} must be true or false, got '{value}'")
    return value == "true"


def _fraction(conf: dict, key: str) -> Optional[float]:
    """``--conf KEY`` as a number from 0 to 1, or None when not given (the predictor's default)."""
    value = str(conf.get(key, "")).strip()
    try:
        number = float(value) if value else None
    except ValueError:
        number = -1.0
    if number is not None and not 0.0 <= number <= 1.0:
        raise ValueError(f"--conf {key} must be a number from 0 to 1, got '{value}'")
    return number


def _http(error: BadRequest) -> HTTPException:
    return HTTPException(status_code=error.status, detail=str(error))


# the --conf keys this app reads (server_mode: MONAI Label's own)
CONF_KEYS = {"axis", "blend", "device", "dtype", "fallback", "history_keep", "labels", "lease_window", "max_context",
             "max_pixels", "max_upload_mb", "refine", "review_tag", "size", "slices_per_volume", "state_expiry",
             "strategy", "trust", "weights", "zoom", "server_mode"}


class MultiverSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        limit_arenas()  # before the worker threads: each would keep its own heap's peak
        unknown = sorted(set(conf) - CONF_KEYS)
        if unknown:  # a typo ('label' for 'labels') would start a server that ignores it
            raise ValueError(f"--conf {', '.join(unknown)}: no such setting; known: {', '.join(sorted(CONF_KEYS))}")
        names = [n.strip() for n in conf.get("labels", "foreground").split(",") if n.strip()]
        if not names or len(set(names)) < len(names):
            raise ValueError(f"--conf labels must name each label once, got '{conf.get('labels')}'")
        self.label_names = names
        axis = str(conf.get("axis", 2)).strip()
        if axis not in ("0", "1", "2"):
            raise ValueError(f"--conf axis must be 0, 1 or 2, got '{axis}'")
        self.axis = int(axis)
        size = conf.get("size") or None
        if size is not None and not (guard.is_whole(str(size)) and int(size) > 0):
            raise ValueError(f"--conf size must be a positive whole number of pixels, got '{size}'")
        dtype = str(conf.get("dtype", "auto")).strip().lower()
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--conf dtype must be auto, float32 or bfloat16, got '{dtype}'")
        self.predictor = Predictor(
            conf.get("weights") or None,
            fallback=conf.get("fallback") or None,
            device=_device(conf),
            dtype=dtype,
            size=None if size is None else int(size),
            max_context=_positive_int(conf, "max_context", 64),
            refine=_flag(conf, "refine", True),
            zoom=_flag(conf, "zoom", True),
            blend=_fraction(conf, "blend"),
            trust=_fraction(conf, "trust"),
        )
        self._batch_job = threading.Lock()  # held while a request starting a batch job is answered (mvlabel.guard)
        self.interactions = InteractionStore(expiry=_positive_number(conf, "state_expiry", 1800))
        imageio.MAX_PIXELS = _positive_int(conf, "max_pixels", 100_000_000)
        self.history_keep = _count_or_all(conf, "history_keep")
        max_body = _positive_int(conf, "max_upload_mb", 2048) << 20
        tokens = None
        if settings.MONAI_LABEL_AUTH_ENABLE:
            verifier = verifier_from_settings()
            tokens = TokenCache(verifier)
            install_monailabel_user(tokens)  # MONAI Label's own role checks: the same verification, cached
        from monailabel.app import app as server

        guard.restrict_cors(server, [str(o).rstrip("/") for o in settings.MONAI_LABEL_CORS_ORIGINS])
        guard.install(server.router, lambda inner: guard.Guard(
            inner, tokens, self._check_upload, self._image_exists, max_body, on_pacs=self._on_pacs(studies),
            tasks=self._task_names, batch_lock=self._batch_job,
            label_exists=lambda image_id, tag: guard.has_label(self.datastore(), image_id, tag)))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MultiverSeg",
            description="Interactive in-context segmentation: every saved label makes the next image faster",
            version="0.1.0",
            labels=self.label_names,
        )

    # -- wiring -------------------------------------------------------------------------------------

    @staticmethod
    def _on_pacs(studies: str) -> bool:
        return studies.startswith(("http://", "https://"))

    @staticmethod
    def _check_upload(path: str) -> None:
        read_image(path)  # BadRequest when unreadable, of an unknown format or over max_pixels

    def _in_session(self, path) -> bool:
        """An image a client uploaded into a session (``PUT /session/``), which MONAI Label keeps in its
        session store and hands over by path."""
        root = getattr(self.sessions(), "store_path", None)
        return bool(root) and isinstance(path, str) and os.path.isfile(path) and \
            os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)

    def _load_sessions(self, load=False):
        """Images a client uploads into a session (Slicer's, for an image not in the datastore) are kept in the
        datastore's ``.sessions/`` (on a PACS: in the server's cache folder), not in the home folder, unless
        MONAI_LABEL_SESSION_PATH names a place."""
        if not load:
            return None
        folder = settings.MONAI_LABEL_SESSION_PATH.strip()
        if not folder:
            pacs = self._on_pacs(self.studies)
            folder = os.path.join(self._datastore.root, "sessions") if pacs else os.path.join(self.studies, ".sessions")
        sessions = CheckedSessions(folder, settings.MONAI_LABEL_SESSION_EXPIRY)
        sessions.hide_paths = bool(settings.MONAI_LABEL_AUTH_ENABLE)
        return sessions

    def _task_names(self) -> dict:
        return {"infer": list(getattr(self, "_infers", {})), "train": list(getattr(self, "_trainers", {})),
                "scoring": list(getattr(self, "_scoring_methods", {}))}

    def _image_exists(self, image_id: str) -> bool:
        return self.datastore().has_image(image_id)

    def init_datastore(self):
        if self._on_pacs(self.studies):
            datastore = connect(self.studies, self.label_names)
        else:
            _check_writable(self.studies)
            datastore = CheckedDatastore(
                self.studies,
                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
            datastore.history_keep = self.history_keep
            if not datastore.list_images():  # MONAI Label makes a mistyped --studies folder without a word
                log.warning("the datastore folder %s holds no images yet: images uploaded or copied there are "
                            "picked up (is --studies the folder you meant?)", self.studies)
        datastore.hide_paths = bool(settings.MONAI_LABEL_AUTH_ENABLE)  # remote users: no server file paths
        self.context = DatastoreContext(
            datastore,
            self.predictor.new_context,
            self.label_names,
            axis=self.axis,
            slices_per_volume=_positive_int(self.conf, "slices_per_volume", 4),
        )
        self.segmenter = Segmenter(self.predictor, self.context, self.interactions, axis=self.axis)
        return datastore

    def init_infers(self):
        return {
            "multiverseg": MultiverSegInfer(self.segmenter, self.label_names),
            "multiverseg_auto": MultiverSegAuto(self.segmenter, self.label_names),
        }

    def init_batch_infer(self):
        return BatchInfer()

    def init_strategies(self):
        self.scoreboard = ScoreBoard(self.segmenter, self._datastore)
        leases = Leases(_positive_number(self.conf, "lease_window", 600), per_user=settings.MONAI_LABEL_AUTH_ENABLE)
        default = self.conf.get("strategy", DEFAULT_STRATEGY)
        if default not in STRATEGIES:
            raise ValueError(f"--conf strategy must be one of {', '.join(STRATEGIES)}, got '{default}'")
        names = [default] + [n for n in STRATEGIES if n != default]  # clients offer the first one by default
        review_tag = self.conf.get("review_tag", "original")  # where batch pre-segmentations are saved
        if not guard.TAG.match(review_tag) or review_tag == "final":
            raise ValueError(f"--conf review_tag must be a tag name other than final, got '{review_tag}'")
        return {name: NextSample(name, self.scoreboard, leases, review_tag) for name in names}

    def on_init_complete(self):
        super().on_init_complete()
        self.predictor.warmup()
        read = 0
        with guard.unless_the_pacs_is_down("the context is read at the first request it answers"):
            read = self.context.refresh()
        log.info("MultiverSeg ready: %d labels read, context sizes %s", read, self.context.sizes())
        self.scoreboard.start()

    def on_save_label(self, image_id, label_id):
        with guard.unless_the_pacs_is_down(f"the label of {image_id} is saved; the context reads it later"):
            self.context.refresh_one(image_id)
        self.scoreboard.poke()
        return super().on_save_label(image_id, label_id)

    # -- requests: bad input is a 4xx with a message ----------------------------------------------

    def _check_model(self, request):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404,
                detail=shorten(f"unknown model '{model}'; this server has {', '.join(self._infers)}"),
            )

    @staticmethod
    def _check_session_found(image) -> None:
        if image == "":  # MONAI Label found no session of the request's session_id
            raise HTTPException(status_code=404, detail="the session is unknown or has expired; upload the image "
                                                        "again (PUT /session/) or name a datastore image")

    def infer(self, request, datastore=None):
        with uploads_removed_when_refused(request.get("image"), request.get("label")):
            return self._infer(request, datastore)

    def _infer(self, request, datastore=None):
        self._check_model(request)
        image = request.get("image")
        if request.get("save_label") and request.get("label_tag") == DefaultLabelTag.FINAL.value:
            raise HTTPException(
                status_code=409, detail="inference never writes 'final' labels; save them with PUT /datastore/label"
            )
        collides = False
        self._check_session_found(image)
        stored = isinstance(image, str) and not (is_upload(image) or self._in_session(image))
        if stored:
            uri = self.datastore().get_image_uri(image)
            if not uri:
                raise HTTPException(status_code=404, detail=f"image '{image}' is not in the datastore")
            # a file of that name in the working folder: MONAI Label would read it; hand it the image instead
            collides = os.path.exists(image)
        tag = request.get("label_tag", DefaultLabelTag.ORIGINAL.value)
        try:
            if not collides:
                result = super().infer(request, datastore)
            else:
                result = super().infer({**request, "image": uri}, datastore)  # a path: MONAI Label saves nothing
                if request.get("save_label"):
                    result["label"] = (datastore or self.datastore()).save_label(
                        image, result["file"], tag, {"model": request.get("model"), "params": result["params"]})
        except BadRequest as e:
            raise _http(e) from None
        if stored and request.get("save_label"):
            result["tag"] = tag  # MONAI Label answers 'original' whichever tag it saved under
        return result

    def infer_wsi(self, request, datastore=None):
        with uploads_removed_when_refused(request.get("image")):
            return self._infer_wsi(request, datastore)

    def _infer_wsi(self, request, datastore=None):
        self._check_model(request)
        image = request.get("image") or ""
        self._check_session_found(image)
        uploaded = is_upload(image) or self._in_session(image)
        path = image if uploaded else self.datastore().get_image_uri(image)
        if not path:
            raise HTTPException(status_code=404, detail=f"image '{image}' is not in the datastore")
        try:
            answer = infer_region if request.get("model") == "multiverseg" else auto_region
            return answer(self.segmenter, request, path, uploaded)
        except BadRequest as e:
            raise _http(e) from None

    def next_sample(self, request):
        strategy = request.get("strategy") or next(iter(self._strategies))
        if strategy not in self._strategies:
            raise HTTPException(
                status_code=404,
                detail=shorten(f"unknown strategy '{strategy}'; choose from {', '.join(self._strategies)}"),
            )
        try:
            result = super().next_sample(request)
        except BadRequest as e:
            raise _http(e) from None
        if self._datastore.hide_paths:
            result.pop("path", None)
        return result
