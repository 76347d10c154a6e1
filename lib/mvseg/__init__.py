"""MultiverSeg core: networks, prompts, geometry, context set and predictor (no MONAI Label here)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .context import ContextSet
from .geometry import Geometry, normalize_intensity, prepare_image
from .network import MultiverSegConfig, MultiverSegNet, ScribblePromptConfig, ScribblePromptUNet
from .predictor import Prediction, Predictor
from .prompts import Prompts, encode_prompts
from .refine import BoundaryRefiner

__all__ = [
    "BoundaryRefiner",
    "CheckpointError",
    "ContextSet",
    "Geometry",
    "MultiverSegConfig",
    "MultiverSegNet",
    "Prediction",
    "Predictor",
    "Prompts",
    "ScribblePromptConfig",
    "ScribblePromptUNet",
    "encode_prompts",
    "load_checkpoint",
    "normalize_intensity",
    "prepare_image",
    "save_checkpoint",
]
