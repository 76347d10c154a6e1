"""Train MultiverSeg (paper section 3.3, 4, 5.1 and appendix C).

    python -m mvseg.train --config lib/mvseg/weights/multiverseg_default.json --out runs/default [--resume]

Each step draws ``n ~ U[0, max_context]``, then ``batch_size`` tasks with ``n`` context entries each
(:class:`mvseg.tasks.TaskBank`: hierarchical sampling, synthetic tasks, Table 4/5 augmentations), and
simulates ``interaction_steps`` rounds of interactive segmentation with the randomised user of
:class:`mvseg.interaction.RandomPrompts`: 1-3 positive and 0-3 negative clicks, scribbles or a box first, 1-3
corrections per later step, each step fed the previous prediction. The loss (soft Dice + focal, gamma 20) is
summed over the steps; Adam. Beyond the paper: some examples start from a zero-click in-context prediction
(``p_context_only``) and some contexts carry perturbed labels (``p_noisy_context``), as a context set of
earlier corrected predictions does.

Every step's random draws come from (seed, step) alone (:func:`step_random`), so a run is deterministic for
a given config on a given device, whether resumed or not and whatever ``--workers`` draws its batches. On a
GPU, ``--workers`` (background batch drawing) and ``--bf16`` (autocast) keep the device busy.

The run folder gets ``config.json``, ``split.json`` (train/held-out ids per task), ``log.jsonl`` (one line per
step), ``last.pt`` (resumable: model, optimiser, step) and ``model.pt`` (the weights, in the format
:func:`mvseg.load_checkpoint` reads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import perturb_labels
from .checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from .geometry import Geometry, binarize_resampled
from .interaction import RandomPrompts
from .network import MultiverSegConfig, MultiverSegNet, count_parameters
from .memory import retain_for_network
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
    # Chance that an example's context labels are perturbed (augment.perturb_labels): in use the context is
    # the user's earlier corrected predictions, so clicks must outrank a context that disagrees with them.
    p_noisy_context: float = 0.0
    # Chance that the first negative clicks come from the whole background instead of the band around
    # the object (interaction.RandomPrompts.p_far_negative; scribbles keep the band).
    p_far_negative: float = 0.0
    # Chance that corrections after a zero-click start are scribbles, not clicks
    # (interaction.RandomPrompts.p_scribble_corrections).
    p_scribble_corrections: float = 0.0
    # Chance that a step has no context at all (beyond n = 0 of n ~ U[0, max_context]): the first image of
    # every new task is segmented that way, by clicks alone.
    p_no_context: float = 0.0
    focal_gamma: float = 20.0
    p_synthetic: float = 0.5
    superpixel_scale: tuple[float, float] = (1.0, 500.0)
    # Fraction of synthetic tasks that are intensity tasks (several images of one source, one intensity
    # rule; tasks.intensity_label) rather than the paper's augmented copies of one superpixel.
    p_intensity: float = 0.0
    # Fraction of the other synthetic tasks that are ridge tasks (thin lines of one width and polarity over
    # several images of one source; tasks.ridge_label): vessels, membranes, neurites.
    p_ridge: float = 0.0
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

    def override(self, assignments: Sequence[str]) -> None:
        """Apply ``KEY=VALUE`` overrides, e.g. ``p_low_res=0``: VALUE is read as JSON (a bare word as a
        string) and must have the type of the entry it replaces."""
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep or key not in self.__dataclass_fields__:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(self.__dataclass_fields__)}")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            current = getattr(self, key)
            if isinstance(current, float) and type(value) is int:
                value = float(value)
            elif isinstance(current, (list, tuple)) and isinstance(value, list):
                value = type(current)(value)
            if type(value) is not type(current):
                raise ValueError(f"--set {item!r}: {key} takes a {type(current).__name__}, got {value!r}")
            setattr(self, key, value)


    def check(self) -> None:
        """Refuse values no run can use, before a run writes anything (they crashed deep in the first step,
        after config.json, split.json and the log were written)."""
        problems = [f"{k} must be a whole number of at least {least}, got {getattr(self, k)!r}"
                    for k, least in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("interaction_steps", 1),
                                     ("max_context", 0), ("size", 16))
                    if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool)
                    or getattr(self, k) < least]
        problems += [f"{k} must be a number from 0 to 1, got {getattr(self, k)!r}"
                     for k in self.__dataclass_fields__ if k.startswith("p_") or k == "heldout"
                     if not isinstance(getattr(self, k), (int, float)) or not 0 <= getattr(self, k) <= 1]
        widths = self.encoder_widths
        if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
            problems.append(f"encoder_widths must be a list of positive whole numbers, got {widths!r}")
        scale = self.superpixel_scale
        if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
                and 0 < scale[0] <= scale[1]):
            problems.append(f"superpixel_scale must be [low, high] with 0 < low <= high, got {scale!r}")
        if problems:
            raise ValueError("; ".join(problems))


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
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
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
        logits = model(target, context_images, context_labels).float()  # the loss in float32 under autocast
        loss = segmentation_loss(logits, labels, gamma)
        total = total + loss
        per_step.append(float(loss.detach()))
        previous = logits.detach()
    return total, per_step


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One step's examples: target ``B 1 S S``, context ``B n 1 S S``; which examples start without prompts."""

    images: torch.Tensor
    labels: torch.Tensor
    context_images: torch.Tensor
    context_labels: torch.Tensor
    context_only: list[bool]
    synthetic: float


def step_random(seed: int, step: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of training step ``step``: every step's draws depend on (seed, step)
    alone, so a resumed run, or one drawing batches in parallel workers, repeats the same sequence."""
    return np.random.default_rng([seed, step, stream])


BATCH_STREAM, PROMPT_STREAM = 0, 1


def draw_batch(bank: TaskBank, cfg: TrainConfig, step: int) -> Batch:
    """Step ``step``'s examples: ``n ~ U[0, max_context]`` context entries each (none at all with chance
    ``p_no_context``), perturbed context labels (``p_noisy_context``), half resolution (``p_low_res``) and
    zero-click starts (``p_context_only``)."""
    rng = step_random(cfg.seed, step, BATCH_STREAM)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    n = int(rng.integers(0, cfg.max_context + 1))
    if cfg.p_no_context > 0 and rng.random() < cfg.p_no_context:  # no draw at 0: older runs repeat
        n = 0
    x, y, cx, cy, synthetic = bank.batch(
        cfg.batch_size,
        n,
        rng,
        gen,
        p_synthetic=cfg.p_synthetic,
        superpixel_scale=tuple(cfg.superpixel_scale),
        p_intensity=cfg.p_intensity,
        p_ridge=cfg.p_ridge,
    )
    if n > 0:
        for i in np.flatnonzero(rng.random(cfg.batch_size) < cfg.p_noisy_context):
            cy[i] = perturb_labels(cy[i], gen)
    if rng.random() < cfg.p_low_res:
        (x, y), (cx, cy) = half_resolution(x, y), half_resolution(cx, cy)
    context_only = ((rng.random(cfg.batch_size) < cfg.p_context_only) & (n > 0)).tolist()
    return Batch(x, y, cx, cy, context_only, synthetic)


class BatchStream(torch.utils.data.IterableDataset):
    """The batches of steps ``start`` to ``stop - 1``, in order. Under a ``DataLoader`` with ``W`` workers,
    worker ``k`` draws steps ``start + k, start + k + W, ...`` and the loader interleaves them back in order."""

    def __init__(self, bank: TaskBank, cfg: TrainConfig, start: int, stop: int):
        self.bank, self.cfg, self.start, self.stop = bank, cfg, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, w = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + k, self.stop, w):
            yield draw_batch(self.bank, self.cfg, step)


class CompiledNetwork:
    """The network's forward under ``torch.compile`` for training, eager where compiling fails (no C compiler).

    The context size is marked dynamic, so every ``n >= 2`` shares one graph per image size instead of one
    graph each; image sizes stay static (two sizes, and dynamic sizes do not compile), which turns off
    dynamo's automatic dynamic shapes for the process. About six graphs of ~1 min each on 2 CPU cores;
    ``graphs`` counts them so that benchmarks can leave compiling steps out.
    """

    def __init__(self, model: MultiverSegNet):
        import torch._dynamo

        torch._dynamo.config.automatic_dynamic_shapes = False
        self.model, self.compiled, self.failed = model, torch.compile(model), False

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def __call__(self, target: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            if images.shape[1] > 1:
                torch._dynamo.mark_dynamic(images, 1)
                torch._dynamo.mark_dynamic(labels, 1)
            try:
                return self.compiled(target, images, labels)
            except Exception as error:  # a missing compiler surfaces at the first call
                log.warning("torch.compile failed, training eagerly: %s", str(error).splitlines()[0][:200])
                self.failed = True
        return self.model(target, images, labels)


def _as_is(batch: Batch) -> Batch:
    return batch


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # W workers share the cores with the training process


def batches(bank: TaskBank, cfg: TrainConfig, start: int, workers: int = 0):
    """Iterator over the batches of steps ``start`` to ``cfg.steps - 1``; ``workers`` > 0 draws them in
    that many background processes (the same batches, sooner)."""
    stream = BatchStream(bank, cfg, start, cfg.steps)
    if workers <= 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, collate_fn=_as_is, worker_init_fn=_one_thread, prefetch_factor=4
    )
    return iter(loader)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step``: the steps about to be run (again), and a line a kill cut short."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(line + "\n" for line in kept))


def train(
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    device: Optional[str] = None,
    init: Optional[Path] = None,
    workers: int = 0,
    bf16: bool = False,
    compile: bool = False,
) -> Path:
    """Run (or resume) training; returns the path of the saved weights.

    ``init``: start a fresh run (new optimizer, full learning-rate schedule) from these weights instead of
    a random initialisation; their architecture must match the config. A resumed run keeps the ``init``
    it started from. ``workers``: background processes drawing batches. ``bf16``: run the network under
    bfloat16 autocast (GPUs, and CPUs with AVX512-BF16); the loss stays in float32. ``compile``: the network under ``torch.compile``
    (:class:`CompiledNetwork`; pays on runs longer than a few hundred steps).
    """
    cfg.check()
    state_path = out / "last.pt"
    if resume and not state_path.exists():  # a fresh run here would empty the old run's log
        raise FileNotFoundError(f"nothing to resume: {state_path} does not exist (leave out --resume to start)")
    if not resume and state_path.exists():  # one forgotten --resume would replace a long run's checkpoints
        raise FileExistsError(f"{out} holds a run ({state_path.name}): --resume continues it; start a new run "
                              "in another --out")
    if init is not None and not resume and not Path(init).is_file():  # before minutes of loading sources
        raise FileNotFoundError(f"--init checkpoint not found: {init}")
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    retain_for_network(dev.type, cfg.encoder_widths)
    torch.manual_seed(cfg.seed)
    sources = [Source(**s) for s in cfg.sources]
    bank = TaskBank(sources, Path(cfg.data_root), cfg.size, cfg.heldout, cfg.seed)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "split.json").write_text(json.dumps(bank.split, indent=1))

    model = MultiverSegNet(MultiverSegConfig(encoder_widths=list(cfg.encoder_widths))).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, seconds = 0, 0.0
    init_record = None  # where the weights started, kept in every checkpoint
    if resume:
        try:  # plain data only: nothing in the file is run
            state = torch.load(state_path, map_location=dev, weights_only=True)
            load_state_strict(model, state["model"], str(state_path))
            optimizer.load_state_dict(state["optimizer"])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot resume from {state_path}: {type(e).__name__}: {e}") from None
        start, seconds, init_record = state["step"], state.get("seconds", 0.0), state.get("init")
        log.info("resuming %s at step %d", out, start)
    elif init is not None:
        load_state_strict(model, load_checkpoint(init).state_dict(), str(init))
        # the file name alone does not say which weights they were (every stage saves a model.pt)
        init_record = {"file": Path(init).name, "sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest()}
        log.info("starting from the weights in %s", init)
    _truncate_log(out / "log.jsonl", start)  # a fresh run (start 0) empties an old run's log
    log.info("training %s: %d parameters on %s", cfg.name, count_parameters(model), dev)

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds}
        torch.save({**state, "init": init_record}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        meta = {"name": cfg.name, "size": cfg.size, "steps": step, "train_seconds": round(seconds), "device": str(dev)}
        if init_record is not None:
            meta["init"] = init_record
        save_checkpoint(model, out / "model.pt", meta=meta)

    model.train()
    network = CompiledNetwork(model) if compile else model
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    with (out / "log.jsonl").open("a") as logf, tqdm(total=cfg.steps, initial=start, desc="training") as bar:
        t0 = time.perf_counter()
        for step, batch in enumerate(batches(bank, cfg, start, workers), start):
            x, y, cx, cy = (t.to(dev, non_blocking=True) for t in batch[:4])
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * step / cfg.steps))
            user = RandomPrompts(
                step_random(cfg.seed, step, PROMPT_STREAM),
                p_far_negative=cfg.p_far_negative,
                p_scribble_corrections=cfg.p_scribble_corrections,
            )
            with autocast:
                loss, per_step = interactive_loss(
                    network, x, y, cx, cy, user, cfg.interaction_steps, cfg.focal_gamma, batch.context_only
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = float(loss.detach())
            now = time.perf_counter()
            seconds, t0 = seconds + now - t0, now
            record = {
                "step": step + 1,
                "loss": loss,
                "steps": per_step,
                "context": cx.shape[1],
                "size": x.shape[-1],
                "synthetic": batch.synthetic,
                "lr": optimizer.param_groups[0]["lr"],
            }
            logf.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", ctx=cx.shape[1])
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
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one config entry (VALUE as JSON, e.g. --set p_low_res=0); repeatable",
    )
    parser.add_argument("--init", type=Path, help="fine-tune: start from these weights (fresh optimizer and schedule)")
    parser.add_argument("--data-root", help="override where relative source paths start")
    parser.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--workers", type=int, default=0, help="background processes drawing batches (GPU runs)")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast for the network (GPUs; CPUs with AVX512-BF16)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (~6 min of compiling first)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.load(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.override(args.set)
    if args.data_root:
        cfg.data_root = str(Path(args.data_root).resolve())
    try:
        path = train(cfg, args.out, args.resume, args.device, args.init, args.workers, args.bf16, args.compile)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        parser.error(str(e))
    print(f"weights: {path}")


if __name__ == "__main__":
    main()
