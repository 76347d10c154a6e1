"""The two MONAI Label infer tasks, interactive ``multiverseg`` and zero-click ``multiverseg_auto``, and the
batch task that runs one of them over many datastore images (``POST /batch/infer/{model}``)."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .contextstore import volume_slice
from .errors import BadRequest
from .guard import remove_after_response
from .imageio import read_image, write_label
from .segmenter import Segmenter

log = logging.getLogger(__name__)


def result_file(mask: np.ndarray, loaded, request: dict) -> str:
    """Write a result as the request asks (``result_extension``, ``result_dtype``, ``result_compress``); the file
    goes once the request is answered, or refused after the model ran (MONAI Label removes it on success only)."""
    compress = request.get("result_compress", True)
    if isinstance(compress, str):
        compress = compress.strip().lower() not in ("false", "0", "no")
    path = write_label(
        mask, loaded, request.get("result_extension"), request.get("result_dtype", "uint8"), bool(compress)
    )
    remove_after_response(path)
    return path


def _fill_slice(shape: tuple, axis: int, index: int, plane: np.ndarray, value: int = 1) -> np.ndarray:
    """A volume of ``shape`` that is zero except slice ``index``, which holds ``plane * value``."""
    out = np.zeros(shape, np.uint8, order="F")  # file order of NIfTI and NRRD: written without a copy
    volume_slice(out, axis, index)[...] = plane.astype(np.uint8) * value
    return out


class MultiverSegInfer(InferTask):
    """Clicks, a box or scribbles on a 2D image or one slice of a volume, plus the label's context set."""

    def __init__(self, segmenter: Segmenter, labels: list[str], description: str = ""):
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=2,
            description=description
            or "MultiverSeg: clicks, box or scribbles, helped by every image already saved for the label",
            config={"label_name": labels[0], "reset_state": False},
        )
        self.segmenter = segmenter

    def info(self):
        info = super().info()
        info["nuclick"] = True  # QuPath lists click models only when this is set
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        target, mask, info = self.segmenter.interactive(request)
        t0 = time.perf_counter()
        loaded = target.loaded
        if loaded.is_volume:  # Slicer/OHIF replace the one slice they asked for
            mask = _fill_slice(loaded.shape, self.segmenter.axis, target.index, mask)
        path = result_file(mask, loaded, request)
        info["latencies"]["write"] = round(time.perf_counter() - t0, 4)
        return path, info


class MultiverSegAuto(InferTask):
    """Zero-click, in-context segmentation of a whole image or volume, for every label with context."""

    def __init__(self, segmenter: Segmenter, labels: list[str], description: str = ""):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=description or "MultiverSeg without clicks: segments from the saved labels alone",
        )
        self.segmenter = segmenter

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        loaded, labelmap, info = self.segmenter.automatic(request)
        return result_file(labelmap, loaded, request), info


class BatchInfer(BatchInferTask):
    """MONAI Label's batch task, on CPU servers too: it spreads the images over every CUDA device by
    default, and with none it divided by zero; the app's predictor decides the device anyway."""

    def __call__(self, request, datastore, infer):
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False, "device": "cpu"}

        def skipping_deleted(req, store):  # one image deleted meanwhile must not stop the whole job
            try:
                return infer(req, store)
            except HTTPException as e:
                if e.status_code != 404:
                    raise
                log.warning("batch: %s is no longer in the datastore, skipped", req.get("image"))
                return {}

        return super().__call__(request, datastore, skipping_deleted)


# -- MONAI Label's infer route, mended ---------------------------------------------------------------


class _TempFilesOfTheRequest:
    """``tempfile`` as MONAI Label's infer route sees it: each upload copy it names is removed once the
    request ends. It removed them only after a success, so every refused or failed request left its
    uploads in the temp folder."""

    def __getattr__(self, name):
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args, **kwargs):  # noqa: N802 (tempfile's name)
        made = tempfile.NamedTemporaryFile(*args, **kwargs)
        remove_after_response(made.name)
        return made


def mend_infer_route() -> None:
    """Put the route's upload handling right: uploads go once the request ends (:class:`_TempFilesOfTheRequest`),
    and OHIF's scribbles (``label`` as a raw ``.bin`` labelmap of the volume) are checked against the volume
    before MONAI Label converts them, the converted file removed after the answer."""
    import monailabel.endpoints.infer as route

    convert = route.binary_to_image
    if getattr(convert, "mended", False):
        return
    route.tempfile = _TempFilesOfTheRequest()

    def binary_to_image_checked(reference: str, label: str, *args, **kwargs) -> str:
        image = read_image(reference)
        if not image.is_volume:
            raise BadRequest("a .bin labelmap (OHIF's scribbles) is for volumes: send a 2D image's scribbles as "
                             "a PNG label", 422)
        expected, size = int(np.prod(image.shape)), os.path.getsize(label)
        if size != expected:
            raise BadRequest(f"the .bin labelmap holds {size} bytes; this volume of {' x '.join(map(str, image.shape))}"
                             f" voxels needs {expected}, one uint8 per voxel", 422)
        converted = convert(reference, label, *args, **kwargs)
        remove_after_response(converted)
        return converted

    binary_to_image_checked.mended = True
    route.binary_to_image = binary_to_image_checked
