"""Batch pre-segmentation throughput: the serial loop against Ray with 1 and 2 workers, in one run.

    python -m bench.bench_batch [--images 60] [--seeds 8] [--workers 1 2]

A datastore of ``--images`` unlabelled hc18 images and ``--seeds`` saved final labels (the context).
Measures images per second of segmenting and writing (after the workers have loaded the network) for
the serial loop in this process (``--serial`` in the CLI) and for Ray embedded with each worker count,
then the Ray overhead per image (Ray's seconds per image on one worker minus the serial loop's), and the
expected throughput on N workers from the measured per-image cost.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .bench_server import HC18, ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))


def build(folder: Path, images: int, seeds: int) -> None:
    keys = sorted(p.stem for p in (HC18 / "images").glob("*.png"))[: images + seeds]
    (folder / "labels" / "final").mkdir(parents=True)
    for k, key in enumerate(keys):
        shutil.copy(HC18 / "images" / f"{key}.png", folder / f"{key}.png")
        if k < seeds:
            mask = np.asarray(Image.open(HC18 / "masks" / f"{key}.png")) > 0
            Image.fromarray(mask.astype(np.uint8)).save(folder / "labels" / "final" / f"{key}.png")


def main(argv=None) -> None:
    from mvlabel import batch
    from mvseg import Predictor

    parser = argparse.ArgumentParser(prog="python -m bench.bench_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    rows = []
    for mode in ["serial"] + [f"ray-{n}" for n in args.workers]:
        work = Path(tempfile.mkdtemp(prefix="mvseg-batch-"))
        try:
            build(work / "studies", args.images, args.seeds)
            datastore = batch.open_datastore(str(work / "studies"), ["head"])
            predictor = Predictor(device="cpu", dtype="auto")
            plan = batch.plan(datastore, predictor, batch.weights_digest(None), "head", ["head"])
            if mode == "serial":
                summary = batch.run_serial(datastore, plan, predictor, progress=False)
            else:
                summary = batch.run_ray(datastore, plan, None, None, workers=int(mode.split("-")[1]), progress=False)
            assert not summary.failed, summary.failed
            rows.append((mode, len(summary.written), summary.segmenting, summary.seconds))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    serial = rows[0][2] / rows[0][1]
    print(f"{args.images} images (hc18, {args.seeds} final labels as context, bundled weights, CPU)")
    print("| run | images/s segmenting + writing | s per image | speed-up vs serial | whole run (with start-up) |")
    print("|---|---|---|---|---|")
    for mode, n, seg, total in rows:
        print(f"| {mode} | {n / seg:.2f} | {seg / n:.3f} | x{serial / (seg / n):.2f} | {total:.1f} s |")
    one = next((seg / n for mode, n, seg, _ in rows if mode == "ray-1"), None)
    if one is not None:
        print(f"Ray overhead per image (1 worker against the serial loop): {(one - serial) * 1e3:.0f} ms")
    mode, n, seg, _ = rows[-1]
    per_worker = n / seg / int(mode.split("-")[1])
    print(f"per worker with one core ({mode}): {per_worker:.2f} images/s; expected on N such workers: about "
          f"N x {per_worker:.2f} images/s, {3600 * per_worker:.0f} images per worker-hour (2D, this size)")


if __name__ == "__main__":
    main()
