"""Weights bundled with the package."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
DEFAULT = HERE / "multiverseg_default.pt"


def default_weights() -> Path:
    """Path of the bundled default MultiverSeg weights."""
    if not DEFAULT.is_file():
        raise FileNotFoundError(
            f"no bundled weights at {DEFAULT}; pass a checkpoint path (official MultiverSeg or our format)"
        )
    return DEFAULT
