"""Train MultiverSeg (paper section 3.3, 4, 5.1 and appendix C).

    python -m mvseg.train --config lib/mvseg/weights/multiverseg_default.json --out runs/default [--resume]

Each step draws ``n ~ U[0, max_context]``, then ``batch_size`` tasks with ``n`` context entries each
(:class:`mvseg.tasks.TaskBank`: hierarchical sampling, synthetic tasks, Table 4/5 augmentations), and
simulates ``interaction_steps`` rounds of interactive segmentation with the randomised user of
:class:`mvseg.interaction.RandomPrompts`: 1-3 positive and 0-3 negative clicks, scribbles or a box first, 1-3
corrections per later step, each step fed the previous prediction. The loss (soft Dice + focal, gamma 20) is
summed over the steps; Adam.

The run folder gets ``config.json``, ``split.json`` (train/held-out ids per task), ``log.jsonl`` (one line per
step), ``last.pt`` (resumable: model, optimiser, step, random states) and ``model.pt`` (the weights, in the
format :func:`mvseg.load_checkpoint` reads). Runs are deterministic for a given config on a given device.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from .geometry import Geometry, binarize_resampled
from .interaction import RandomPrompts
from .network import MultiverSegConfig, MultiverSegNet, count_parameters
from .predictor import pick_device
from .prompts import Prompts, encode_for_model
from .tasks import Source, TaskBank

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    name: str = "multiverseg"
    encoder_widths: list[int] = field(default_factory=lambda: [32, 32, 32, 32])
    size: int = 128
    sources: list[dict] = field(default_factory=list)
    data_root: str = "."  # relative source paths start here (relative to the config file)
    heldout: float = 0.2
    steps: int = 1000
    batch_size: int = 2
    max_context: int = 64
    interaction_steps: int = 3
    lr: float = 1e-4
    lr_final: float = 1e-4  # cosine decay from lr to lr_final over the run
    p_low_res: float = 0.0  # fraction of steps run at half resolution (cheaper; teaches scale robustness)
    # Chance that, with a non-empty context, an example's first step has no prompts at all: the zero-click
    # in-context prediction the app shows first, and which the user's first corrections then refine.
    p_context_only: float = 0.0
    focal_gamma: float = 20.0
    p_synthetic: float = 0.5
    superpixel_scale: tuple[float, float] = (1.0, 500.0)
    seed: int = 0
    checkpoint_every: int = 100
    note: str = ""

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        cfg = cls(**data)
        cfg.data_root = str((Path(path).parent / cfg.data_root).resolve())
        return cfg


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``1 - soft Dice``. ``B 1 H W`` logits and {0, 1} target."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss (Lin et al.), mean over pixels."""
    logp = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # log p_t
    return (-((1 - logp.exp()) ** gamma) * logp).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    return soft_dice_loss(logits, target) + focal_loss(logits, target, gamma)


# ---------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------


def half_resolution(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``... 1 S S`` images and binary labels -> ``... 1 S/2 S/2`` (area-averaged; labels thresholded at 0.5)."""
    lead = images.shape[:-3]
    x = F.avg_pool2d(images.flatten(0, -4), 2)
    y = binarize_resampled(F.avg_pool2d(labels.flatten(0, -4), 2))
    return x.unflatten(0, lead) if lead else x, y.unflatten(0, lead) if lead else y


def interactive_loss(
    model: MultiverSegNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    context_images: torch.Tensor,
    context_labels: torch.Tensor,
    user: RandomPrompts,
    steps: int,
    gamma: float,
    context_only: Optional[Sequence[bool]] = None,
) -> tuple[torch.Tensor, list[float]]:
    """Simulate ``steps`` rounds of interaction on a batch; returns the summed loss and each step's loss.

    ``images``/``labels`` ``B 1 S S``, context ``B n 1 S S`` (n may be 0), all on the model's device. The
    prompts are drawn on the model grid, so the geometry is the identity. ``context_only[i]``: example
    ``i``'s first step has no prompts (a zero-click prediction from the context); corrections follow.
    """
    b, _, size, _ = images.shape
    grid = Geometry(size, size, size)
    truth = labels[:, 0].bool().cpu().numpy()
    host_images = images[:, 0].cpu()  # prompts are encoded on the host, once per step; copy the images once
    prompts: list[Prompts] = [Prompts() for _ in range(b)]
    context_only = [False] * b if context_only is None else context_only
    previous = torch.zeros_like(images)
    total, per_step = images.new_zeros(()), []
    for step in range(steps):
        host_previous = previous.cpu()
        predicted = (host_previous[:, 0] > 0).numpy()
        for i in range(b):
            if step > 0:
                prompts[i] = user.correct(truth[i], predicted[i], prompts[i])
            elif not context_only[i]:
                prompts[i] = user.first(truth[i])
        target = torch.cat(
            [encode_for_model(host_images[i], grid, prompts[i], host_previous[i]) for i in range(b)]
        ).to(images.device)
        logits = model(target, context_images, context_labels)
        loss = segmentation_loss(logits, labels, gamma)
        total = total + loss
        per_step.append(float(loss.detach()))
        previous = logits.detach()
    return total, per_step


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


def _random_state(rng: np.random.Generator, gen: torch.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": gen.get_state(), "torch_global": torch.get_rng_state()}


def _set_random_state(state: dict, rng: np.random.Generator, gen: torch.Generator) -> None:
    rng.bit_generator.state = state["numpy"]
    gen.set_state(state["torch"])
    torch.set_rng_state(state["torch_global"])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step``: the steps about to be run (again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def train(
    cfg: TrainConfig, out: Path, resume: bool = False, device: Optional[str] = None, init: Optional[Path] = None
) -> Path:
    """Run (or resume) training; returns the path of the saved weights.

    ``init``: start a fresh run (new optimizer, full learning-rate schedule) from these weights instead of
    a random initialisation; their architecture must match the config. Ignored when resuming.
    """
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sources = [Source(**s) for s in cfg.sources]
    bank = TaskBank(sources, Path(cfg.data_root), cfg.size, cfg.heldout, cfg.seed)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "split.json").write_text(json.dumps(bank.split, indent=1))

    model = MultiverSegNet(MultiverSegConfig(encoder_widths=list(cfg.encoder_widths))).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    user = RandomPrompts(rng)
    start, seconds = 0, 0.0
    state_path = out / "last.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_random_state(state["random"], rng, gen)
        start, seconds = state["step"], state.get("seconds", 0.0)
        log.info("resuming %s at step %d", out, start)
    elif init is not None:
        load_state_strict(model, load_checkpoint(init).state_dict(), str(init))
        log.info("starting from the weights in %s", init)
    _truncate_log(out / "log.jsonl", start)  # a fresh run (start 0) empties an old run's log
    log.info("training %s: %d parameters on %s", cfg.name, count_parameters(model), dev)

    def save(step: int) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "random": _random_state(rng, gen),
                "step": step,
                "seconds": seconds,
            },
            state_path.with_suffix(".tmp"),
        )
        state_path.with_suffix(".tmp").replace(state_path)
        meta = {"name": cfg.name, "size": cfg.size, "steps": step, "train_seconds": round(seconds), "device": str(dev)}
        if init is not None:
            meta["init"] = Path(init).name
        save_checkpoint(model, out / "model.pt", meta=meta)

    model.train()
    with (out / "log.jsonl").open("a") as logf, tqdm(total=cfg.steps, initial=start, desc="training") as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            n = int(rng.integers(0, cfg.max_context + 1))
            x, y, cx, cy, synthetic = bank.batch(
                cfg.batch_size, n, rng, gen, p_synthetic=cfg.p_synthetic, superpixel_scale=tuple(cfg.superpixel_scale)
            )
            if rng.random() < cfg.p_low_res:
                (x, y), (cx, cy) = half_resolution(x, y), half_resolution(cx, cy)
            x, y, cx, cy = (t.to(dev) for t in (x, y, cx, cy))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * step / cfg.steps))
            context_only = (rng.random(cfg.batch_size) < cfg.p_context_only) & (n > 0)
            loss, per_step = interactive_loss(
                model, x, y, cx, cy, user, cfg.interaction_steps, cfg.focal_gamma, context_only.tolist()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = float(loss.detach())
            seconds += time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": loss,
                "steps": per_step,
                "context": n,
                "size": x.shape[-1],
                "synthetic": synthetic,
                "lr": optimizer.param_groups[0]["lr"],
            }
            logf.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", ctx=n)
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                logf.flush()
                save(step + 1)
    return out / "model.pt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvseg.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="training config (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--steps", type=int, help="override the config's step count")
    parser.add_argument("--init", type=Path, help="fine-tune: start from these weights (fresh optimizer and schedule)")
    parser.add_argument("--data-root", help="override where relative source paths start")
    parser.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.load(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.data_root:
        cfg.data_root = str(Path(args.data_root).resolve())
    path = train(cfg, args.out, args.resume, args.device, args.init)
    print(f"weights: {path}")


if __name__ == "__main__":
    main()
