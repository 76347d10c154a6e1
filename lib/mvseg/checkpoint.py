"""Reading and writing network checkpoints.

Three layouts load through one function, :func:`load_checkpoint`:

* official MultiverSeg: ``{"model": state_dict}``;
* official ScribblePrompt-UNet: the bare state dict;
* ours: ``{"format": "mvseg", "kind": ..., "config": ..., "state_dict": ..., "meta": ...}``.

The architecture is always read off the state dict itself, then the weights load with strict key and
shape checking; a file that does not fit gets a :class:`CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .network import (
    MultiverSegConfig,
    MultiverSegNet,
    ScribblePromptConfig,
    ScribblePromptUNet,
)

log = logging.getLogger(__name__)

FORMAT = "mvseg"
MULTIVERSEG = "multiverseg"
SCRIBBLEPROMPT = "scribbleprompt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match any supported network."""


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _shape(state: dict[str, torch.Tensor], key: str, path: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: missing key '{key}' needed to read the architecture")
    return tuple(state[key].shape)


def infer_architecture(state: dict[str, torch.Tensor], path: str = "checkpoint") -> tuple[str, Any]:
    """Return ``(kind, config)`` read off a state dict's keys and shapes."""
    if any(k.startswith("enc_blocks.") for k in state):
        enc = _blocks(state, "enc_blocks")
        dec = _blocks(state, "dec_blocks")
        if enc != list(range(len(enc))) or dec != list(range(len(dec))):
            raise CheckpointError(f"{path}: block indices are not contiguous (encoder {enc}, decoder {dec})")
        width = lambda name: _shape(state, f"{name}.cross.cross_conv.weight", path)[0]  # noqa: E731
        first_in = _shape(state, "enc_blocks.0.cross.cross_conv.weight", path)[1]
        config = MultiverSegConfig(
            encoder_widths=[width(f"enc_blocks.{i}") for i in enc],
            decoder_widths=[width(f"dec_blocks.{i}") for i in dec],
            target_channels=first_in - 2,
            context_channels=2,
        )
        return MULTIVERSEG, config
    if any(k.startswith("downs.") for k in state):
        downs = _blocks(state, "downs")
        shapes = [_shape(state, f"downs.{i}.conv.0.weight", path) for i in downs]
        out = _shape(state, "final_conv.conv.0.weight", path)
        config = ScribblePromptConfig(
            features=[s[0] for s in shapes], in_channels=shapes[0][1], out_channels=out[0]
        )
        return SCRIBBLEPROMPT, config
    sample = ", ".join(list(state)[:5]) or "(none)"
    raise CheckpointError(
        f"{path}: not a MultiverSeg or ScribblePrompt-UNet state dict (no 'enc_blocks.*' or 'downs.*' keys; "
        f"first keys: {sample})"
    )


def build(kind: str, config: Any) -> nn.Module:
    if kind == MULTIVERSEG:
        return MultiverSegNet(config if isinstance(config, MultiverSegConfig) else MultiverSegConfig(**config))
    if kind == SCRIBBLEPROMPT:
        return ScribblePromptUNet(
            config if isinstance(config, ScribblePromptConfig) else ScribblePromptConfig(**config)
        )
    raise CheckpointError(f"unknown network kind '{kind}' (expected '{MULTIVERSEG}' or '{SCRIBBLEPROMPT}')")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with one readable error listing every mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches {_short(wrong)}")
        raise CheckpointError(f"{path}: does not match the {type(model).__name__} it describes: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _short(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def _read(path: Union[str, os.PathLike]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _state_of(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], Optional[str], dict]:
    """Split a loaded file into (state dict, the kind it declares, metadata)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], obj.get("kind"), obj.get("meta") or {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"], None, {}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, {}
    raise CheckpointError(
        f"{path}: expected a state dict, {{'model': state_dict}} or an mvseg checkpoint, got {type(obj).__name__}"
        + (f" with keys {_short([str(k) for k in obj])}" if isinstance(obj, dict) else "")
    )


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load an official or own checkpoint; return the network in eval mode.

    The returned module has ``.kind`` (``"multiverseg"`` or ``"scribbleprompt"``) and ``.meta`` (our
    checkpoint's metadata, ``{}`` for official files).
    """
    obj = _read(path)
    state, declared, meta = _state_of(obj, str(path))
    kind, config = infer_architecture(state, str(path))
    if declared not in (None, kind):
        raise CheckpointError(f"{path}: says it holds a '{declared}' network but its weights are '{kind}'")
    model = build(kind, config)
    load_state_strict(model, state, str(path))
    model.kind = kind
    model.meta = meta
    log.info("loaded %s %s from %s", kind, config, path)
    return model.to(map_location).eval()


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike], meta: Optional[dict] = None) -> None:
    """Write ``model`` in our format (architecture, weights, free-form metadata)."""
    kind = MULTIVERSEG if isinstance(model, MultiverSegNet) else SCRIBBLEPROMPT
    obj = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
