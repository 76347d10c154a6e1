"""Pre-segment every image of a datastore that has no final label yet, from the labels already saved.

    python apps/multiverseg/presegment.py --studies sample-datasets/brain-2d --label white_matter
    python apps/multiverseg/presegment.py --studies http://pacs:8042/dicom-web --label liver --address auto

Runs zero-click MultiverSeg (``multiverseg_auto`` for one label) on Ray: embedded on this machine by
default, or on a running Ray cluster (``--address auto`` on a cluster node, ``ray://HEAD:10001`` from
outside). Results are saved under ``--tag`` (default ``original``: what clients open as the model's
proposal), never ``final``; a rerun skips what is current. See ``mvlabel/batch.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this app's own modules (mvlabel)

from mvlabel import batch  # noqa: E402
from mvlabel.guard import pacs_unreachable  # noqa: E402
from mvseg import Predictor  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="datastore folder or DICOMweb URL (as the server's)")
    parser.add_argument("--label", required=True, help="label name to segment")
    parser.add_argument("--labels", help="the server's label names, comma-separated (default: --label)")
    parser.add_argument("--tag", default="original", help="tag the results are saved under (not 'final')")
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    parser.add_argument("--size", type=int, help="model grid (default: the checkpoint's)")
    parser.add_argument("--no-refine", action="store_true", help="no boundary refinement")
    parser.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis of volumes")
    parser.add_argument("--slices-per-volume", type=int, default=4,
                        help="most slices one 3D label adds to the context (the server's --conf slices_per_volume)")
    parser.add_argument("--max-context", type=int, default=64,
                        help="most context entries per forward (the server's --conf max_context)")
    parser.add_argument("--workers", type=int, help="Ray workers (default: one per CPU Ray sees)")
    parser.add_argument("--address", help="Ray cluster to join (default: Ray embedded on this machine)")
    parser.add_argument("--serial", action="store_true", help="no Ray: one image after another in this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in (args.labels or args.label).split(",") if n.strip()]
    for flag, value in (("--slices-per-volume", args.slices_per_volume), ("--max-context", args.max_context),
                        ("--workers", 1 if args.workers is None else args.workers)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    try:
        datastore = batch.open_datastore(args.studies, names)
        predictor = Predictor(args.weights, device="cpu", dtype="auto", size=args.size, refine=not args.no_refine,
                              max_context=args.max_context)
        plan = batch.plan(datastore, predictor, batch.weights_digest(args.weights), args.label, names, args.tag,
                          args.axis, args.slices_per_volume)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        what = "did not answer" if pacs_unreachable(e) else "answered with an error"  # the server's own test
        print(f"error: the PACS at {args.studies} {what} ({type(e).__name__}); nothing was segmented", file=sys.stderr)
        return 2
    print(f"'{args.label}': context of {len(plan.context)} examples (version {plan.version}); "
          f"{len(plan.todo)} to segment, {len(plan.current)} already current")
    if args.serial:
        summary = batch.run_serial(datastore, plan, predictor, args.axis)
    else:
        summary = batch.run_ray(datastore, plan, args.weights, args.size, not args.no_refine, args.axis,
                                args.workers, args.address, max_context=args.max_context)
    print(summary)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
