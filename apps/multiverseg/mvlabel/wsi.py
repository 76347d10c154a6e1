"""QuPath's region requests (``/infer/wsi`` and ``/infer/wsi_v2``) on 2D images: clicks in, polygons out.

QuPath sends the region as ``location`` (level-0 ``[x, y]`` of its top-left corner) and ``size``, with the
clicks in level-0 pixels; ``wsi_v2`` uploads the region itself as a PNG patch. The answer is ASAP XML
polygons in level-0 pixels, the format QuPath's MONAI Label extension imports.
"""

from __future__ import annotations

import os

import numpy as np
from skimage.measure import find_contours

from .errors import BadRequest
from .imageio import write_asap
from .segmenter import Segmenter

DEFAULT_COLOR = "#00FF00"


def polygons(mask: np.ndarray, offset: tuple[float, float], min_area: float) -> list[np.ndarray]:
    """Outlines of a binary ``H W`` mask as ``N 2`` ``(x, y)`` arrays shifted by ``offset``; tiny ones dropped."""
    padded = np.pad(mask.astype(np.float32), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        ys, xs = contour[:, 0] - 1, contour[:, 1] - 1
        area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        if area >= min_area:
            out.append(np.stack([xs + offset[0], ys + offset[1]], 1))
    return out


def _pair(value, name: str, n: int = 2) -> list[int]:
    """``n`` whole numbers (QuPath's ``[x, y]`` or ``[width, height]``; ``level`` alone), or a 422."""
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        if len(values) != n or any(isinstance(v, bool) or float(v) != int(v) for v in values):
            raise ValueError
        return [int(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"'{name}' must be {n} whole number{'s' if n > 1 else ''}, got {value!r}", 422) from None


def region_request(request: dict, image_path: str, uploaded: bool, shape: tuple[int, int]) -> tuple[dict, tuple]:
    """The plain 2D request for the region, and the region's (x0, y0, x1, y1) in level-0 pixels."""
    if _pair(request.get("level") or 0, "level", 1)[0] != 0:
        raise BadRequest("only level 0 is served for 2D images", 422)
    x0, y0 = _pair(request.get("location") or [0, 0], "location")
    w, h = _pair(request.get("size") or [shape[1], shape[0]], "size")
    if uploaded:  # the patch is the region
        h, w = shape
    elif not (0 <= x0 < shape[1] and 0 <= y0 < shape[0]) or w <= 0 or h <= 0:
        raise BadRequest(f"region at {[x0, y0]} size {[w, h]} is outside the image ({shape[1]} x {shape[0]})", 422)
    x1, y1 = (x0 + w, y0 + h) if uploaded else (min(x0 + w, shape[1]), min(y0 + h, shape[0]))

    def local(points, name):
        out = []
        for p in points or []:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise BadRequest(f"'{name}' points must be [x, y], got {p!r}", 422)
            x, y = float(p[0]), float(p[1])
            if not (x0 <= x < x1 and y0 <= y < y1):
                raise BadRequest(f"{name} click ({x:g}, {y:g}) is outside the region {[x0, y0, x1, y1]}", 422)
            out.append([x - x0, y - y0])
        return out

    plain = dict(request)
    plain["image"] = image_path
    plain["foreground"] = local(request.get("foreground"), "foreground")
    plain["background"] = local(request.get("background"), "background")
    plain.pop("roi", None)
    return plain, (x0, y0, x1, y1)


def infer_region(segmenter: Segmenter, request: dict, image_path: str, uploaded: bool) -> dict:
    """Run the interactive model on the region; returns MONAI Label's ``{"file", "params"}`` result."""
    loaded = segmenter.load(image_path)
    if loaded.is_volume:
        raise BadRequest("region (QuPath) requests need a 2D image", 422)
    plain, (x0, y0, x1, y1) = region_request(request, image_path, uploaded, loaded.shape)
    crop_path = image_path
    if not uploaded and (x0, y0, x1, y1) != (0, 0, loaded.shape[1], loaded.shape[0]):
        plain["image"] = crop_path = _crop(segmenter, loaded.array[y0:y1, x0:x1], image_path, (x0, y0, x1, y1))
    try:
        target, mask, info = segmenter.interactive(plain)
    finally:
        if crop_path != image_path:
            os.unlink(crop_path)
    polys = polygons(mask, (x0, y0), float(request.get("min_poly_area") or 0))
    info.update({"location": [x0, y0], "size": [x1 - x0, y1 - y0], "polygons": len(polys)})
    if request.get("output") == "json":
        return {"file": None, "params": info}
    path = write_asap({target.label: polys}, {target.label: request.get("color", DEFAULT_COLOR)})
    return {"file": path, "params": info}


def _crop(segmenter: Segmenter, array: np.ndarray, source: str, box: tuple) -> str:
    """Write a region of a datastore image to a temporary PNG (the interaction state keys on the source)."""
    import tempfile

    from PIL import Image

    fd, path = tempfile.mkstemp(suffix=".png", prefix="mvseg-region-")
    os.close(fd)
    Image.fromarray(array).save(path)
    return path
