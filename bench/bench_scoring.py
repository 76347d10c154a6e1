"""Background scoring benchmark: one full pass of the app's ScoreBoard over a datastore of 2D images.

    python -m bench.bench_scoring [--images 500] [--labels 8] [--weights PATH] [--size 256]

Builds a MONAI Label local datastore of ``--images`` unlabelled hc18 images plus ``--labels`` images with
saved final labels (``../shared/datasets/hc18_fetal_head``), then times ``ScoreBoard.score_all()``: image
descriptors (coverage, nearest), one zero-click forward per image for uncertainty (confident reuses it),
the hybrid ranks, and writing the scores into every image's info. Prints the total and per-image time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HC18 = ROOT.parent / "shared" / "datasets" / "hc18_fetal_head"
sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    parser.add_argument("--size", type=int, help="the network's grid, as the app's --conf size (default: 128)")
    args = parser.parse_args(argv)

    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore
    from mvlabel.contextstore import DatastoreContext
    from mvlabel.interactions import InteractionStore
    from mvlabel.nextsample import ScoreBoard
    from mvlabel.segmenter import Segmenter
    from mvseg import Predictor
    from mvseg.activelearning import SCORING_CONTEXT

    keys = sorted(p.stem for p in (HC18 / "images").glob("*.png"))
    if args.images + args.labels > len(keys):
        raise SystemExit(f"only {len(keys)} images available")
    work = Path(tempfile.mkdtemp(prefix="mvseg-scoring-"))
    try:
        (work / "labels" / "final").mkdir(parents=True)
        for key in keys[: args.images + args.labels]:
            shutil.copy(HC18 / "images" / f"{key}.png", work / f"{key}.png")
        for key in keys[: args.labels]:
            mask = np.asarray(Image.open(HC18 / "masks" / f"{key}.png")) > 0
            Image.fromarray(mask.astype(np.uint8)).save(work / "labels" / "final" / f"{key}.png")
        datastore = LocalDatastore(str(work), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
        predictor = Predictor(args.weights, device="cpu", dtype="auto", size=args.size)
        predictor.warmup()
        context = DatastoreContext(datastore, predictor.new_context, ["head"])
        segmenter = Segmenter(predictor, context, InteractionStore())
        board = ScoreBoard(segmenter, datastore)
        t0 = time.perf_counter()
        context.refresh()
        t1 = time.perf_counter()
        board.score_all()
        t2 = time.perf_counter()
        n = len(board.get("head", "uncertainty"))
        print(f"context: {args.labels} labels read in {t1 - t0:.2f} s")
        per_image = (t2 - t1) / max(1, n) * 1e3
        k = min(args.labels, SCORING_CONTEXT)
        print(f"scoring pass: {n} unlabelled images in {t2 - t1:.1f} s ({per_image:.0f} ms per image; "
              f"coverage, nearest, uncertainty and confident with {k} context entries, hybrid, image info written)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
