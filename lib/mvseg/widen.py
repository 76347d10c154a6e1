"""Grow a trained MultiverSeg network to a larger width (Net2WiderNet, Chen et al. 2016).

A wider network trained from scratch needs the compute that trained the narrow one all over again. Widening
starts it from the narrow network's function instead: every new channel copies an existing one (its
incoming weights, bias and norm parameters, plus a little noise so the copies can drift apart), and each
layer that reads a copied channel splits that channel's outgoing weight among the copies, so the sum it
computes is unchanged. Convolutions and LeakyReLU keep the function exactly; the one-group GroupNorm
sees its channel statistics shift by the copies, except when every channel is copied equally often
(e.g. 24 -> 48), where the widened network computes the same function (up to float rounding, with
``noise=0``).

    python -m mvseg.widen lib/mvseg/weights/multiverseg_default.pt runs/wide32/init.pt --width 32
    python -m mvseg.train --config CONFIG --set encoder_widths=[32,32,32,32] --init runs/wide32/init.pt ...
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .network import MultiverSegConfig, MultiverSegNet

log = logging.getLogger(__name__)


def _channel_map(old: int, new: int, rng: np.random.Generator) -> np.ndarray:
    """New channel -> the old channel it copies: the old channels in order, then copies drawn evenly
    (every old channel once before any twice)."""
    extra = new - old
    picks = np.concatenate([rng.permutation(old) for _ in range(-(-extra // old))])[:extra] if extra else []
    return np.concatenate([np.arange(old), np.asarray(picks, dtype=np.int64)]).astype(np.int64)


def _input_map(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Input channel parts (each a channel map) -> (old input index of every new input channel, the share of
    the old channel's weight each copy takes)."""
    index, share, offset = [], [], 0
    for m in parts:
        counts = np.bincount(m, minlength=int(m.max()) + 1)
        index.append(m + offset)
        share.append(1.0 / counts[m])
        offset += int(m.max()) + 1
    return np.concatenate(index), np.concatenate(share)


class _Widener:
    def __init__(self, old: dict[str, torch.Tensor], rng: np.random.Generator, noise: float):
        self.old, self.rng, self.noise = old, rng, noise
        self.new: dict[str, torch.Tensor] = {}

    def conv(self, name: str, out_map: np.ndarray, in_parts: Sequence[np.ndarray]) -> None:
        w, b = self.old[f"{name}.weight"], self.old[f"{name}.bias"]
        in_index, share = _input_map(in_parts)
        if len(in_index) and in_index.max() >= w.shape[1]:
            raise ValueError(f"{name}: the input channel maps describe more channels than the layer has")
        nw = w[out_map][:, in_index] * torch.as_tensor(share, dtype=w.dtype).view(1, -1, *([1] * (w.ndim - 2)))
        copies = torch.as_tensor(np.arange(len(out_map)) >= w.shape[0])
        if self.noise and copies.any():
            std = float(w.std()) * self.noise
            jitter = torch.as_tensor(self.rng.normal(0.0, std, size=tuple(nw.shape)), dtype=w.dtype)
            nw = nw + jitter * copies.view(-1, *([1] * (w.ndim - 1))).to(w.dtype)
        self.new[f"{name}.weight"], self.new[f"{name}.bias"] = nw.contiguous(), b[out_map].clone()

    def norm(self, name: str, out_map: np.ndarray) -> None:
        for p in ("weight", "bias"):
            self.new[f"{name}.{p}"] = self.old[f"{name}.{p}"][out_map].clone()


def widen(
    model: MultiverSegNet,
    encoder_widths: Sequence[int],
    decoder_widths: Optional[Sequence[int]] = None,
    seed: int = 0,
    noise: float = 0.01,
) -> MultiverSegNet:
    """A MultiverSeg network of the given widths that starts from ``model``'s function.

    Args:
        model: the trained network.
        encoder_widths, decoder_widths: the new widths, each at least the old one at the same stage
            (decoder default: encoder widths reversed, without the last).
        seed: draws which channels are copied and the noise.
        noise: standard deviation of the noise added to a copy's incoming weights, relative to the
            standard deviation of the layer's weights (0: exact copies).
    """
    new_cfg = MultiverSegConfig(
        encoder_widths=list(encoder_widths),
        decoder_widths=None if decoder_widths is None else list(decoder_widths),
        target_channels=model.config.target_channels,
        context_channels=model.config.context_channels,
    )
    old_cfg = model.config
    olds = old_cfg.encoder_widths + old_cfg.decoder_widths
    news = new_cfg.encoder_widths + new_cfg.decoder_widths
    if len(olds) != len(news) or any(n < o for o, n in zip(olds, news)):
        raise ValueError(f"widths {news} must have the old network's {len(olds)} stages, each at least {olds}")
    rng = np.random.default_rng(seed)
    w = _Widener({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, rng, noise)

    def block(name: str, old: int, new: int, q_in: Sequence[np.ndarray], v_in: Sequence[np.ndarray]):
        cross, t, v = (_channel_map(old, new, rng) for _ in range(3))
        w.conv(f"{name}.cross.cross_conv", cross, list(q_in) + list(v_in))
        for branch, m in (("target", t), ("support", v)):
            w.conv(f"{name}.{branch}.vmapped.conv", m, [cross])
            w.norm(f"{name}.{branch}.vmapped.norml", m)
        return t, v

    q = [np.arange(old_cfg.target_channels)]
    ctx = [np.arange(old_cfg.context_channels)]
    skips = []
    for i, (old, new) in enumerate(zip(old_cfg.encoder_widths, new_cfg.encoder_widths)):
        t, v = block(f"enc_blocks.{i}", old, new, q, ctx)
        skips.append((t, v))
        q, ctx = [t], [v]
    skips.pop()  # the bottleneck is no skip
    for j, (old, new) in enumerate(zip(old_cfg.decoder_widths, new_cfg.decoder_widths)):
        t_skip, v_skip = skips.pop()
        t, v = block(f"dec_blocks.{j}", old, new, q + [t_skip], ctx + [v_skip])
        q, ctx = [t], [v]
    w.conv("out_conv.conv", np.arange(1), q)

    wide = MultiverSegNet(new_cfg)
    wide.load_state_dict(w.new, strict=True)
    return wide


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvseg.widen", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a trained MultiverSeg checkpoint")
    parser.add_argument("out", type=Path, help="where to write the widened network")
    parser.add_argument("--width", type=int, required=True, help="the new width of every stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise on copied weights (0: exact)")
    args = parser.parse_args(argv)
    if args.noise < 0:
        parser.error(f"--noise must be 0 or more, got {args.noise}")
    if args.out.exists():  # never the trained weights it starts from, nor another run's
        parser.error(f"{args.out} exists: write the widened network to a new file")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        parser.error(str(e))
    if not isinstance(model, MultiverSegNet):
        parser.error(f"{args.checkpoint} holds a {type(model).__name__}, not a MultiverSeg network")
    depth = len(model.config.encoder_widths)
    try:
        wide = widen(model, [args.width] * depth, seed=args.seed, noise=args.noise)
    except ValueError as e:
        parser.error(str(e))
    meta = {"widened_from": {"file": args.checkpoint.name, "meta": model.meta}, "seed": args.seed, "noise": args.noise}
    save_checkpoint(wide, args.out, meta)
    log.info("wrote %s: widths %s", args.out, wide.config.encoder_widths)


if __name__ == "__main__":
    main()
