"""QuPath's region requests (``/infer/wsi`` and ``/infer/wsi_v2``) on 2D images: clicks in, polygons out.

QuPath sends the region as ``location`` (level-0 ``[x, y]`` of its top-left corner) and ``size``, with the
clicks in level-0 pixels; ``wsi_v2`` uploads the region itself as a PNG patch. The answer is ASAP XML
polygons in level-0 pixels, the format QuPath's MONAI Label extension imports.
"""

from __future__ import annotations

import re

import numpy as np
from skimage.measure import find_contours, points_in_poly

from .errors import BadRequest
from .imageio import write_asap
from .segmenter import Segmenter

DEFAULT_COLOR = "#00FF00"
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


def polygons(mask: np.ndarray, offset: tuple[float, float], min_area: float) -> list[np.ndarray]:
    """Outlines of a binary ``H W`` mask as ``N 2`` ``(x, y)`` arrays shifted by ``offset``; tiny ones dropped.

    A hole is joined to the outline around it by a cut there and back (one polygon, filled even-odd), as
    QuPath reads a polygon: outlines written apart would come back as two filled annotations."""
    padded = np.pad(mask.astype(np.float32), 1)
    outers, holes = [], []
    for contour in find_contours(padded, 0.5):
        xy = np.stack([contour[:, 1] - 1, contour[:, 0] - 1], 1)
        area = _signed_area(xy)
        if abs(area) >= min_area:  # find_contours turns outlines and holes opposite ways
            (outers if area < 0 else holes).append(xy)
    for hole in holes:
        around = [k for k, outer in enumerate(outers) if points_in_poly(hole[:1], outer)[0]]
        if around:
            k = min(around, key=lambda k: abs(_signed_area(outers[k])))  # the innermost outline holding it
            outers[k] = _joined(outers[k], hole)
    return [outer + np.array(offset, float) for outer in outers]


def _signed_area(xy: np.ndarray) -> float:
    return 0.5 * float(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))


def _joined(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``outer`` with ``hole`` spliced in at their nearest vertices: out along the cut, round the hole, back."""
    gaps = np.linalg.norm(outer[:, None, :] - hole[None, :, :], axis=2)
    j, i = np.unravel_index(np.argmin(gaps), gaps.shape)
    around = np.concatenate([hole[i:], hole[: i + 1]])
    return np.concatenate([outer[: j + 1], around, outer[j:]])


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
    plain, box, region, drawing = _region_of(segmenter, request, image_path, uploaded)
    # the region's own interaction state: the next click on the same region refines this one
    target, mask, info = segmenter.interactive(plain, region=region)
    return _answer(request, {target.label: mask}, box, *drawing, info)


def auto_region(segmenter: Segmenter, request: dict, image_path: str, uploaded: bool) -> dict:
    """The zero-click model on the region (every label with context): polygons of each label."""
    _, box, region, drawing = _region_of(segmenter, request, image_path, uploaded)
    _, labelmap, info = segmenter.automatic({**request, "image": image_path}, region=region)
    masks = {name: labelmap == value for name, value in info["label_names"].items()}
    return _answer(request, masks, box, *drawing, info)


def _region_of(segmenter: Segmenter, request: dict, image_path: str, uploaded: bool) -> tuple:
    """What both region answers start from: the plain request, the region's box ``(x0, y0, x1, y1)``, the
    region to segment on its own grid (None: the whole image, or the uploaded patch) and the drawing
    options (:func:`_drawing`)."""
    loaded = segmenter.load(image_path)
    if loaded.is_volume:
        raise BadRequest("region (QuPath) requests need a 2D image", 422)
    drawing = _drawing(request)
    plain, box = region_request(request, image_path, uploaded, loaded.shape)
    whole = uploaded or box == (0, 0, loaded.shape[1], loaded.shape[0])
    return plain, box, None if whole else box, drawing


def _drawing(request: dict) -> tuple[float, str]:
    """The answer's smallest polygon area (pixels) and colour (``#RRGGBB``), checked."""
    min_area = request.get("min_poly_area") or 0
    if isinstance(min_area, bool) or not isinstance(min_area, (int, float)) or not 0 <= min_area < float("inf"):
        raise BadRequest(f"'min_poly_area' must be a number of pixels, 0 or more, got {min_area!r}", 422)
    color = request.get("color", DEFAULT_COLOR)
    if not isinstance(color, str) or not COLOR.match(color):
        raise BadRequest(f"'color' must be '#RRGGBB', got {str(color)[:20]!r}", 422)
    return float(min_area), color


def _answer(request: dict, masks: dict, box: tuple, min_area: float, color: str, info: dict) -> dict:
    x0, y0, x1, y1 = box
    polys = {name: polygons(mask, (x0, y0), min_area) for name, mask in masks.items()}
    info.update({"location": [x0, y0], "size": [x1 - x0, y1 - y0], "polygons": sum(map(len, polys.values()))})
    if request.get("output") == "json":
        return {"file": None, "params": info}
    return {"file": write_asap(polys, {name: color for name in polys}), "params": info}
