"""The paper's Experiment 1: interactions needed to segment a dataset, as the context set grows.

    python -m mvseg.evaluate --task ../shared/datasets/hc18_fetal_head --weights W.pt \\
        --protocol clicks --images 18 --runs 5 --seed 0 --out runs/eval-hc18

Per run, the images of each task are shuffled; the first is the seed image, then ``--images`` more follow.
For each image: a zero-click prediction from the context so far (when there is context and the predictor
trusts it, ``Predictor.trusts``, as the app serves it; else the user starts as on a first image), then
corrections by the simulated user (``mvseg.interaction``) until Dice >= 0.9 or the interaction budget
(20 clicks, or 10 scribble steps) is spent. The final prediction, thresholded at 0.5, joins the context.
The seed image seeds the context with a label of at least 90% Dice, as in the paper (which segments it to
90% with ScribblePrompt): its prediction if that got there, else its ground truth, as a user who finishes
the first image by hand would save; it is counted at the full budget then.
Modes: ``context`` (as above), ``none`` (context off: interactive only), ``oracle`` (ground truth joins the
context instead of the prediction), ``leave-one-out`` (each image with the ground truth of every other image of
the pool as context: the richest context any order could give, so its total estimates the floor that no
next-sample strategy gets below). Outputs ``runs.json`` (every image of every run), ``summary.json``,
``summary.md`` (tables) and ``noi90.png`` (interactions per image vs image index, per mode).

Model grid: ``--model-size 256`` runs the network on a 256 x 256 grid instead of the checkpoint's own (the
app's ``--conf size``). Masks have their boundaries refined on the image's own pixels (``mvseg.refine``), as
the app serves them; ``--no-refine`` measures the raw resampled masks. Without context, a prediction from
strokes takes a second look at the window around the object (``mvseg.zoom``), as the app serves it;
``--no-zoom`` turns that off.

Grid: by default clicks and Dice are on each image's own pixels. ``--size 256`` evaluates as the paper does
(its section 5): every image zero-padded square and resized to ``256 x 256`` first (``--size 128``: its
appendix E.5).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from . import activelearning
from .data import Example, load_task
from .geometry import Geometry, normalize_intensity
from .interaction import PROTOCOLS
from .predictor import NOTHING, Prediction, Predictor
from .prompts import Prompts

log = logging.getLogger(__name__)

MODES = ("context", "none", "oracle", "leave-one-out")
ORDERED_MODES = ("context", "oracle")  # modes where the order of the images matters
BUDGET = {"clicks": 20, "scribbles": 10}
TARGET_DICE = 0.9


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def on_grid(example: Example, size: int) -> Example:
    """``example`` on the paper's evaluation grid: intensities in [0, 1], zero-padded to a centred square,
    resized to ``size x size`` (bilinear; the mask resampled and thresholded at 0.5, as context masks are)."""
    gray = normalize_intensity(example.image)
    geometry = Geometry(gray.shape[0], gray.shape[1], size)
    image = geometry.image_forward(gray)[0].numpy()
    mask = geometry.mask_forward(example.mask)[0].numpy() > 0
    return Example(example.id, image, mask)


@dataclass
class ImageResult:
    id: str
    index: int  # position in the run (0 = seed image)
    interactions: int  # NoI90, or the budget when not reached
    reached: bool
    dice: list[float] = field(default_factory=list)  # dice[k] = after k interactions (0 = zero-click)


def segment_one(
    predictor: Predictor,
    example: Example,
    context,
    protocol,
    budget: int,
    target: float = TARGET_DICE,
) -> tuple[ImageResult, Prediction]:
    """Simulate one user on one image. Returns the record and the final prediction."""
    truth = example.mask
    dices: list[float] = []
    prediction: Optional[Prediction] = None
    if context is not None and len(context):
        prediction = predictor.predict(example.image, None, context)
        if prediction.network == NOTHING:  # no proposal from an untrusted context: the user starts afresh
            prediction = None
    dices.append(0.0 if prediction is None else dice(prediction.mask, truth))  # nothing shown: 0
    used = 0
    prompts = Prompts()
    while dices[-1] < target and used < budget:
        if prediction is None:
            prompts, n = protocol.first(truth)
        else:  # the user corrects what they see, the zero-click prediction included
            prompts, n = protocol.correct(truth, prediction.mask, prompts)
            if n == 0:
                break
        prediction = predictor.predict(example.image, prompts, context, previous=prediction)
        used += n
        dices.extend([dices[-1]] * (n - 1) + [dice(prediction.mask, truth)])
    reached = dices[-1] >= target
    return ImageResult(example.id, 0, used if reached else budget, reached, dices), prediction


def run_once(
    predictor: Predictor,
    examples: list[Example],
    mode: str,
    protocol_name: str,
    budget: int,
    order: str = "random",
    rng: Optional[np.random.Generator] = None,
) -> list[ImageResult]:
    """Segment ``examples`` in one mode. ``order="random"`` keeps the given order (the first is the seed
    image); any other :mod:`mvseg.activelearning` strategy picks each next image, the seed image too."""
    protocol = PROTOCOLS[protocol_name]()
    if mode == "leave-one-out":
        return leave_one_out(predictor, examples, protocol, budget)
    context = None if mode == "none" else predictor.new_context()
    remaining = list(range(len(examples)))
    described = None if order in ("random", "first") else activelearning.descriptors(
        [e.image for e in examples], predictor.size
    )
    results = []
    for index in range(len(examples)):
        pick = 0
        if order != "random":
            done = [i for i in range(len(examples)) if i not in remaining]
            s = activelearning.scores(
                order,
                [examples[i].image for i in remaining],
                [examples[i].image for i in done],
                predictor,
                context,
                rng,
                None if described is None else described[remaining],
                None if described is None else described[done],
            )
            pick = int(np.argmax(s))
        example = examples[remaining.pop(pick)]
        result, final = segment_one(predictor, example, context, protocol, budget)
        result.index = index
        results.append(result)
        if context is not None:
            finished_by_hand = index == 0 and not result.reached  # the seed label is >= 90% Dice
            if mode == "oracle" or finished_by_hand:
                label = example.mask
            elif final is not None:
                label = final.mask
            else:  # nothing was shown (an untrusted context's proposal, and no budget to click)
                label = None
            if label is not None and label.any():
                context.add(example.id, example.image, label)
    return results


def leave_one_out(predictor: Predictor, examples: list[Example], protocol, budget: int) -> list[ImageResult]:
    """Segment each image with every other image of ``examples`` (ground truth) as context."""
    results = []
    for index, example in enumerate(examples):
        context = predictor.new_context()
        for other in examples:
            if other is not example and other.mask.any():
                context.add(other.id, other.image, other.mask)
        result, _ = segment_one(predictor, example, context, protocol, budget)
        result.index = index
        results.append(result)
    return results


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> tuple[float, float]:
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(records: dict, protocol: str, seed: int) -> dict:
    """records[task][mode] = list of runs, each a list of ImageResult dicts."""
    rng = np.random.default_rng(seed)
    out = {}
    for task, modes in records.items():
        out[task] = {}
        for mode, runs in modes.items():
            noi = np.array([[r["interactions"] for r in run] for run in runs], float)  # runs x images
            totals = noi.sum(1)
            after = {
                k: float(np.mean([r["dice"][min(k, len(r["dice"]) - 1)] for run in runs for r in run]))
                for k in (0, 1, 3)
            }
            out[task][mode] = {
                "noi_by_index": noi.mean(0).tolist(),
                "total_mean": float(totals.mean()),
                "total_ci95": bootstrap_ci(totals, rng),
                "per_image_mean": float(noi.mean()),
                "dice_after": after,
                "failures": int(sum(not r["reached"] for run in runs for r in run)),
                "images": int(noi.shape[1]),
                "runs": int(noi.shape[0]),
            }
        if "none" in out[task]:
            base = out[task]["none"]["total_mean"]
            for s in out[task].values():
                s["reduction_vs_none_pct"] = 100.0 * (1 - s["total_mean"] / base) if base else 0.0
        for name, s in out[task].items():  # "context/coverage" against "context" (random order)
            base_mode = name.split("/")[0]
            if "/" in name and base_mode in out[task]:
                base = out[task][base_mode]["total_mean"]
                s["reduction_vs_random_pct"] = 100.0 * (1 - s["total_mean"] / base) if base else 0.0
    return out


def table(summary: dict, protocol: str) -> str:
    unit = "clicks" if protocol == "clicks" else "scribble steps"
    lines = [
        f"| task | mode | total {unit} (95% CI) | per image | fewer than none | fewer than random order | Dice@0 "
        "| Dice@1 | Dice@3 "
        "| failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, modes in summary.items():
        for mode, s in modes.items():
            lo, hi = s["total_ci95"]
            lines.append(
                f"| {task} | {mode} | {s['total_mean']:.1f} ({lo:.1f}-{hi:.1f}) | {s['per_image_mean']:.2f} | "
                + (f"{s['reduction_vs_none_pct']:+.1f}%" if "reduction_vs_none_pct" in s else "")
                + " | "
                + (f"{s['reduction_vs_random_pct']:+.1f}%" if "reduction_vs_random_pct" in s else "")
                + f" | {s['dice_after'][0]:.3f} | {s['dice_after'][1]:.3f} | "
                f"{s['dice_after'][3]:.3f} | {s['failures']} |"
            )
    return "\n".join(lines)


def plot(summary: dict, protocol: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.5), squeeze=False)
    for ax, (task, modes) in zip(axes[0], summary.items()):
        for mode, s in modes.items():
            ax.plot(range(len(s["noi_by_index"])), s["noi_by_index"], marker="o", ms=3, label=mode)
        ax.set_title(task)
        ax.set_xlabel("image index (context size in context mode)")
        ax.set_ylabel(f"{protocol} to 90% Dice")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def runs_of(modes: list[str], orders: list[str]) -> list[tuple[str, str]]:
    """(mode, order) pairs: orders apply to the modes whose context grows image by image."""
    return [(m, o) for m in modes for o in (orders if m in ORDERED_MODES else ["random"])]


def held_out(subsets: dict) -> dict:
    """``{folder: [ids]}`` as given, or from a training ``split.json``: ``{"source/task": {"folder": name,
    "heldout": ids}}`` (older files have no ``folder``; their source is the folder name)."""
    if not isinstance(subsets, dict):
        raise ValueError("--ids must hold a JSON object: {folder: [ids]} or a training split.json")
    out: dict = {}
    for key, value in subsets.items():
        if isinstance(value, dict):
            value = value.get("heldout", [])
            key = subsets[key].get("folder", key.split("/")[0])
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ValueError(f"--ids: the ids of '{key}' must be a list of names, got {json.dumps(value)[:80]}")
        out.setdefault(key, []).extend(value)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=Path, action="append", required=True, help="images/ + masks/ folder")
    parser.add_argument(
        "--ids",
        type=Path,
        help="JSON restricting each task: {task folder name: [ids]}, or a training split.json (its held-out ids)",
    )
    parser.add_argument("--weights", type=Path, help="MultiverSeg checkpoint (default: bundled weights)")
    parser.add_argument(
        "--fallback",
        help="network for the empty context: a checkpoint, or none (default: the bundled first-image weights "
        "with the bundled weights, else none)",
    )
    parser.add_argument(
        "--blend",
        type=float,
        help="share of the first-image network in predictions from prompts with context, 0..1 (default: 0.5 "
        "with the bundled weights and their first-image network, else 0)",
    )
    parser.add_argument(
        "--trust",
        type=float,
        help="least reliability of the context (Dice of its images segmented from each other), 0..1; below it "
        "there is no zero-click proposal and scribbles go without the context, clicks keep it (default: 0.75 "
        "with the bundled weights and their first-image network, else 0)",
    )
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="clicks")
    parser.add_argument("--images", type=int, default=18, help="images after the seed image")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["context", "none"])
    parser.add_argument(
        "--order",
        nargs="+",
        choices=activelearning.STRATEGIES,
        default=["random"],
        help="image order(s) of the context modes: random, or a strategy that picks each next image",
    )
    parser.add_argument(
        "--budget", type=int, help="interactions per image (default: 20 clicks, 10 scribble steps; 0: zero-click only)"
    )
    parser.add_argument(
        "--size", type=int, help="evaluate on a zero-padded SIZE x SIZE grid (the paper: 256; default: own pixels)"
    )
    parser.add_argument(
        "--model-size", type=int, help="side of the grid the network runs on (default: the checkpoint's, 128)"
    )
    parser.add_argument(
        "--no-refine", action="store_true", help="raw resampled masks: no boundary refinement (mvseg.refine)"
    )
    parser.add_argument(
        "--no-zoom", action="store_true", help="no second look at the object's window without context (mvseg.zoom)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="network precision; auto (as served): bfloat16 for a narrow network on a CPU with bfloat16 instructions",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 16:
        parser.error(f"--size must be at least 16 pixels, got {args.size}")
    for name, least in (("runs", 1), ("images", 1), ("budget", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    names = [folder.name for folder in args.task]
    if len(set(names)) < len(names):  # results are kept by folder name
        parser.error(f"two --task folders have one name: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        predictor = Predictor(
            args.weights,
            fallback=args.fallback,
            device=args.device,
            dtype=args.dtype,
            size=args.model_size,
            refine=not args.no_refine,
            zoom=not args.no_zoom,
            blend=args.blend,
            trust=args.trust,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        subsets = held_out(json.loads(args.ids.read_text())) if args.ids else {}
    except (OSError, ValueError) as e:
        parser.error(f"--ids {args.ids}: {e}")
    budget = BUDGET[args.protocol] if args.budget is None else args.budget
    records: dict = {}
    total = len(args.task) * args.runs * len(runs_of(args.modes, args.order))
    bar = tqdm(total=total, desc="runs", unit="run")
    tasks = {}
    for folder in args.task:  # all read before the first run: a bad folder fails now, not hours in
        if args.ids and folder.name not in subsets:
            log.warning("%s: --ids lists none of its images, so all of them are used", folder.name)
        try:
            tasks[folder] = load_task(folder, subsets.get(folder.name))
        except (OSError, ValueError) as e:
            parser.error(f"--task {folder}: {e}")
    if args.out.is_file() or (args.out / "summary.json").exists():  # an earlier evaluation's results
        parser.error(f"--out {args.out} holds results already (or is a file): name a new folder")
    for folder, examples in tasks.items():
        empty = [e.id for e in examples if not e.mask.any()]
        if empty:  # nothing to click on: it would stop the whole evaluation once drawn
            log.warning("%s: %d images with an empty mask left out (%s)", folder.name, len(empty), ", ".join(empty[:5]))
            examples = [e for e in examples if e.mask.any()]
        if args.size:
            examples = [on_grid(e, args.size) for e in examples]
        if len(examples) < 2:
            raise SystemExit(f"{folder}: needs at least 2 labelled images, found {len(examples)}")
        records[folder.name] = {}
        for run in range(args.runs):
            rng = np.random.default_rng([args.seed, run])
            order = rng.permutation(len(examples))[: args.images + 1]
            chosen = [examples[i] for i in order]
            for mode, strategy in runs_of(args.modes, args.order):
                key = mode if strategy == "random" else f"{mode}/{strategy}"
                pool = sorted(chosen, key=lambda e: e.id) if strategy != "random" else chosen
                results = run_once(predictor, pool, mode, args.protocol, budget, strategy, rng)
                records[folder.name].setdefault(key, []).append([r.__dict__ for r in results])
                bar.update(1)
    bar.close()
    summary = summarise(records, args.protocol, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(records))
    (args.out / "settings.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}, default=str, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = table(summary, args.protocol)
    (args.out / "summary.md").write_text(md + "\n")
    plot(summary, args.protocol, args.out / "noi90.png")
    print(md)


if __name__ == "__main__":
    main()
