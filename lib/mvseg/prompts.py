"""User interactions and their encoding into the network's five target channels.

:class:`Prompts` holds what a user did on an image, in that image's pixel coordinates ``(x, y) =
(column, row)``. :func:`encode_prompts` turns model-grid prompts into ``B 5 H W`` exactly as the official
ScribblePrompt/MultiverSeg code does: [image, box, positive clicks+scribbles, negative clicks+scribbles,
previous logits]. :func:`encode_for_model` joins the two through a :class:`~mvseg.geometry.Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Geometry

POSITIVE, NEGATIVE = 1, 0


def encode_prompts(
    img: torch.Tensor,
    point_coords: Optional[torch.Tensor] = None,
    point_labels: Optional[torch.Tensor] = None,
    box: Optional[torch.Tensor] = None,
    scribbles: Optional[torch.Tensor] = None,
    mask_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Official input encoding: model-grid prompts -> ``B 5 H W``.

    Args:
        img: ``B 1 H W`` in [0, 1].
        point_coords: ``B N 2`` integer ``(x, y)``; point_labels ``B N`` with 1 = positive, 0 = negative.
        box: ``B K 4`` (or ``B 4``) ``[x1, y1, x2, y2]``, corners in any order, end-exclusive.
        scribbles: ``B 2 H W`` (positive, negative) in [0, 1], added to the click channels and clipped.
        mask_input: ``B 1 H W`` previous-prediction logits, passed through.
    """
    b, _, h, w = img.shape
    box_embed = torch.zeros((b, 1, h, w), dtype=img.dtype, device=img.device)
    if box is not None:
        boxes = box.reshape(b, -1, 4).long().tolist()
        for i, per_image in enumerate(boxes):
            for x1, y1, x2, y2 in per_image:
                box_embed[i, 0, min(y1, y2) : max(y1, y2), min(x1, x2) : max(x1, x2)] = 1
    clicks = torch.zeros((b, 2, h, w), dtype=img.dtype, device=img.device)
    if point_coords is not None:
        coords = point_coords.reshape(b, -1, 2).long()
        labels = point_labels.reshape(b, -1).long()
        if ((labels != POSITIVE) & (labels != NEGATIVE)).any():
            raise ValueError("point labels must be 1 (positive) or 0 (negative)")
        batch = torch.arange(b, device=coords.device)[:, None].expand_as(labels)
        # positive -> channel 0 of the pair, negative -> channel 1
        clicks[batch.reshape(-1), (1 - labels).reshape(-1), coords[..., 1].reshape(-1), coords[..., 0].reshape(-1)] = 1
    if scribbles is not None:
        clicks = torch.clamp(clicks + scribbles.to(clicks), 0.0, 1.0)
    if mask_input is None:
        mask_input = torch.zeros((b, 1, h, w), dtype=img.dtype, device=img.device)
    return torch.cat([img, box_embed, clicks, mask_input.to(img)], dim=1)


def rescale_prompts(prompts: dict, size: int = 128) -> dict:
    """The official demo's resize of ``encode_prompts`` arguments to ``size x size``.

    Image and scribbles are resized bilinearly; click and box coordinates are scaled and truncated to int.
    Kept for compatibility checks; :class:`~mvseg.geometry.Geometry` is the mapping the predictor uses.
    """
    out = dict(prompts)
    h, w = prompts["img"].shape[-2:]
    for key in ("img", "scribbles", "mask_input"):
        if prompts.get(key) is not None:
            out[key] = F.interpolate(prompts[key], size=(size, size), mode="bilinear")
    scale = torch.tensor([size / w, size / h])
    if prompts.get("point_coords") is not None:
        out["point_coords"] = (prompts["point_coords"] * scale).int()
    if prompts.get("box") is not None:
        out["box"] = (prompts["box"] * scale.repeat(2)).int()
    return out


@dataclass
class Prompts:
    """What a user did on one image, in its pixel coordinates.

    ``positive``/``negative``: clicks as ``(x, y)`` pairs. ``box``: ``[x1, y1, x2, y2]`` with
    ``x1 < x2, y1 < y2``, end-exclusive. ``positive_scribbles``/``negative_scribbles``: ``H W`` masks
    (nonzero = stroke).
    """

    positive: Sequence[Sequence[float]] = field(default_factory=list)
    negative: Sequence[Sequence[float]] = field(default_factory=list)
    box: Optional[Sequence[float]] = None
    positive_scribbles: Optional[np.ndarray] = None
    negative_scribbles: Optional[np.ndarray] = None

    def __bool__(self) -> bool:
        return bool(
            len(self.positive)
            or len(self.negative)
            or self.box is not None
            or self.positive_scribbles is not None
            or self.negative_scribbles is not None
        )

    def has_scribbles(self) -> bool:
        return self.positive_scribbles is not None or self.negative_scribbles is not None

    def count(self) -> int:
        """Number of interactions (clicks, box, scribble strokes as one each)."""
        return (
            len(self.positive)
            + len(self.negative)
            + (self.box is not None)
            + (self.positive_scribbles is not None)
            + (self.negative_scribbles is not None)
        )


def encode_for_model(
    image: torch.Tensor,
    geometry: Geometry,
    prompts: Optional[Prompts] = None,
    previous_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Model-grid image ``1 S S`` + original-grid prompts -> ``1 5 S S``; validates every prompt."""
    prompts = prompts or Prompts()
    size = geometry.size
    coords, labels = [], []
    clicks = ((prompts.positive, POSITIVE, "positive click"), (prompts.negative, NEGATIVE, "negative click"))
    for points, label, name in clicks:
        geometry.check_points(points, name)
        if len(points):
            coords.append(geometry.points_forward(points))
            labels += [label] * len(points)
    box = None
    if prompts.box is not None:
        box = torch.from_numpy(geometry.box_forward(prompts.box)).reshape(1, 1, 4)
    scribbles = None
    if prompts.positive_scribbles is not None or prompts.negative_scribbles is not None:
        scribbles = torch.zeros((1, 2, size, size))
        for ch, s in enumerate((prompts.positive_scribbles, prompts.negative_scribbles)):
            if s is not None:
                scribbles[0, ch] = geometry.scribble_forward(s)[0]
    if previous_logits is not None:
        if not isinstance(previous_logits, torch.Tensor) or previous_logits.numel() != size * size:
            got = tuple(previous_logits.shape) if hasattr(previous_logits, "shape") else type(previous_logits).__name__
            raise ValueError(f"previous must be a prediction or its model-grid logits (1 {size} {size}), got {got}")
        previous_logits = previous_logits.reshape(1, 1, size, size).float().cpu()
        if not torch.isfinite(previous_logits).all():
            raise ValueError("previous logits contain NaN or infinite values")
    return encode_prompts(
        image.reshape(1, 1, size, size),
        torch.from_numpy(np.concatenate(coords))[None] if coords else None,
        torch.tensor([labels]) if coords else None,
        box,
        scribbles,
        previous_logits,
    )
