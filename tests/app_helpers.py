"""Building datastores from ``../shared/datasets`` and talking to the app, for the app tests."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from PIL import Image

from .conftest import DATASETS, ROOT

APP_DIR = ROOT / "apps" / "multiverseg"
HC18 = DATASETS / "hc18_fetal_head"


def hc18_ids(n: int, start: int = 0) -> list[str]:
    return sorted(p.stem for p in (HC18 / "images").glob("*.png"))[start : start + n]


def hc18_pair(key: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(HC18 / "images" / f"{key}.png"))
    mask = np.asarray(Image.open(HC18 / "masks" / f"{key}.png")) > 0
    return image, mask


def make_studies(folder: Path, ids: list[str], volume_ids: list[str] = ()) -> Path:
    """PNG images of ``ids``, plus (when given) an NRRD and a NIfTI volume stacked from ``volume_ids``."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in ids:
        shutil.copy(HC18 / "images" / f"{key}.png", folder / f"{key}.png")
    if volume_ids:
        images, masks = zip(*(hc18_pair(k) for k in volume_ids))
        vol = np.stack(images, axis=2)  # I J K = rows, columns, slices
        lab = np.stack(masks, axis=2).astype(np.uint8)
        header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.6, 2.0]),
                  "space origin": np.array([10.0, -20.0, 5.0])}
        nrrd.write(str(folder / "vol_nrrd.nrrd"), vol, header, index_order="F")
        affine = np.diag([0.5, 0.6, 2.0, 1.0])
        affine[:3, 3] = [1.0, 2.0, 3.0]
        nib.save(nib.Nifti1Image(vol, affine), str(folder / "vol_nifti.nii.gz"))
        np.save(folder.parent / "volume_label.npy", lab)
    return folder


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def split_multipart(response) -> tuple[dict, bytes]:
    """MONAI Label's default infer answer: multipart with ``params`` (JSON) and ``image`` (the file)."""
    ctype = response.headers["content-type"]
    boundary = ctype.split("boundary=")[1].encode()
    params, image = {}, b""
    for part in response.content.split(b"--" + boundary):
        if b"\r\n\r\n" not in part:
            continue
        head, body = part.split(b"\r\n\r\n", 1)
        body = body.rsplit(b"\r\n", 1)[0]
        if b'name="params"' in head:
            params = json.loads(body)
        elif b'name="image"' in head:
            image = body
    return params, image


def save_tiny_weights(path):
    """A small, seeded, untrained MultiverSeg checkpoint: the app runs fast on it."""
    import torch

    from mvseg import MultiverSegConfig, MultiverSegNet, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])), path)


@contextlib.contextmanager
def app_client(studies: Path, conf: dict):
    """``(TestClient, app instance)`` of the app on ``studies`` with tiny weights (the lifespan runs)."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    weights = studies.parent / "tiny.pt"
    if not weights.exists():
        save_tiny_weights(weights)
    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(studies)
    settings.MONAI_LABEL_APP_CONF = {"weights": str(weights), "device": "cpu", **conf}
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    from monailabel.app import app
    from monailabel.interfaces.utils.app import app_instance

    with TestClient(app) as client:
        yield client, app_instance()
