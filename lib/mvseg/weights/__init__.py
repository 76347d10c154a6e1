"""Weights bundled with the package."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
DEFAULT = HERE / "multiverseg_default.pt"
FIRST_IMAGE = HERE / "multiverseg_first_image.pt"


def default_weights() -> Path:
    """Path of the bundled default MultiverSeg weights."""
    if not DEFAULT.is_file():
        raise FileNotFoundError(
            f"no bundled weights at {DEFAULT}; pass a checkpoint path (official MultiverSeg or our format)"
        )
    return DEFAULT


def first_image_weights() -> Path:
    """Path of the bundled weights for an empty context set: the default network fine-tuned on the first
    image of a task alone, segmented by clicks and strokes without context (MODEL_CARD.md, "First image")."""
    if not FIRST_IMAGE.is_file():
        raise FileNotFoundError(f"no bundled first-image weights at {FIRST_IMAGE}")
    return FIRST_IMAGE
