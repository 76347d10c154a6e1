"""Reading labelled tasks in the ``images/<id>.png`` + ``masks/<id>.png`` layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Example:
    id: str
    image: np.ndarray  # H W or H W C
    mask: np.ndarray  # H W bool


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read image {path}: {e}") from None


def mask_path(masks: Path, key: str) -> Optional[Path]:
    """The mask of image ``key`` in a ``masks/`` folder, whatever its image suffix; ``None`` if absent."""
    return next((masks / f"{key}{s}" for s in IMAGE_SUFFIXES if (masks / f"{key}{s}").exists()), None)


def load_task(folder: Path, ids: Optional[list[str]] = None) -> list[Example]:
    """All image/mask pairs of a task folder (sorted by id), or only ``ids``. Unmatched files are skipped."""
    folder = Path(folder)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise ValueError(f"{folder} must contain images/ and masks/")
    found = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    wanted = sorted(found) if ids is None else list(ids)
    out = []
    for key in wanted:
        found_mask = mask_path(masks, key)
        if key not in found or found_mask is None:
            if ids is not None:
                raise ValueError(f"{folder}: no image/mask pair for id '{key}'")
            continue
        image, mask = read_image(found[key]), read_image(found_mask)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{folder}: mask of '{key}' has shape {mask.shape}, image {image.shape[:2]}")
        out.append(Example(key, image, mask > 0))
    return out
