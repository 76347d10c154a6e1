"""Shared paths and small fixtures. ``../shared`` sits beside the checkout (CI has it too)."""

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def tiny_models():
    """Small random MultiverSeg and ScribblePrompt networks (fast on CPU)."""
    from mvseg import MultiverSegConfig, MultiverSegNet, ScribblePromptConfig, ScribblePromptUNet

    torch.manual_seed(0)
    mvs = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])).eval()
    sp = ScribblePromptUNet(ScribblePromptConfig(features=[8, 8, 8, 8])).eval()
    return mvs, sp


def disk(shape, center, radius) -> np.ndarray:
    """Binary ``H W`` disk; center is (x, y)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2).astype(np.uint8)
