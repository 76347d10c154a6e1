"""Latency, memory and FLOP rate of one MultiverSeg prediction versus context size.

    python -m mvseg.bench                       # widths 24 64 256, context 0 1 4 16 64, CPU (+ CUDA if present)
    python -m mvseg.bench --widths 24 64 256 --contexts 1 16 64 --vs-direct

Each configuration runs in a fresh process so that its peak memory is its own: peak RSS on CPU, peak
allocated memory on CUDA. Latency is the median over ``--repeats`` forwards after one warm-up forward,
through ``Predictor.forward`` (inference mode, one 128x128 target with its 5 channels). FLOPs count
convolution multiply-adds (2 per MAC): "executed" is what this implementation runs; "official" is what the
official implementation runs for the same forward (it also computes the last decoder's unused context branch).
The CPU convolution path is picked per layer shape as served (``--conv auto``); ``--vs-direct`` also times
every configuration on the direct path alone and prints the ratio. "% peak" is the FLOP rate against the
direct 3x3 convolution's rate measured at the start (256 channels, 128x128, NHWC) in the precision the
forward ran in: ``--dtype auto`` (as served) takes bfloat16 for narrow networks on CPUs with bfloat16
instructions (``Predictor(dtype="auto")``), ``--dtype float32`` forces float32.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from .network import MultiverSegConfig, MultiverSegNet, multiverseg_flops


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(
    width: int, context: int, device: str, repeats: int, dtype: str, size: int = 128, conv: str = "auto"
) -> dict:
    from . import network
    from .predictor import Predictor

    network.CONV_PATH = conv
    torch.manual_seed(0)
    config = MultiverSegConfig(encoder_widths=[width] * 4)
    predictor = Predictor(MultiverSegNet(config), device=device, dtype=dtype, size=size)
    target = torch.rand((1, 5, size, size))
    images = torch.rand((1, context, 1, size, size))
    labels = (torch.rand((1, context, 1, size, size)) > 0.5).float()
    rss_before = _rss_mb()
    predictor.forward(target, images, labels)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.forward(target, images, labels)  # returns CPU logits: synchronised
        times.append(time.perf_counter() - start)
    flops = multiverseg_flops(config, context, size)
    seconds = statistics.median(times)
    result = {
        "width": width,
        "context": context,
        "device": device,
        "dtype": str(predictor.dtype).removeprefix("torch."),  # what "auto" chose
        "median_ms": seconds * 1e3,
        "min_ms": min(times) * 1e3,
        "gflop": flops["executed"] / 1e9,
        "gflop_official": flops["official"] / 1e9,
        "gflops_per_s": flops["executed"] / seconds / 1e9,
        "threads": torch.get_num_threads(),
        "conv": conv if device == "cpu" else "cuda",
        "conv_paths": sorted(set(network._faster_path.values())) if conv == "auto" else [conv],
    }
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = _rss_mb()
        result["model_mb"] = rss_before
    return result


def conv_rate(path: str, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of one 256->256 3x3 convolution on a 128x128 map on the CPU (``path`` "direct" on NHWC or
    "winograd" on NCHW, nominal FLOPs; ``dtype`` bfloat16: direct only): this machine's ceiling."""
    from . import network

    x, w = torch.rand(1, 256, 128, 128, dtype=dtype), torch.rand(256, 256, 3, 3, dtype=dtype)
    conv = network._direct if path == "direct" else network._winograd
    if path == "direct":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x, w, None)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x, w, None)
            times.append(time.perf_counter() - start)
    return 2 * 256 * 256 * 9 * 128 * 128 / min(times) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[24, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 1, 4, 16, 64])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="network precision: as served (auto: bfloat16 for narrow networks on CPUs with bfloat16 instructions)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--conv", default="auto", choices=["auto", "direct", "winograd"],
        help="CPU convolution path: the faster per layer shape (auto, as served), or one forced",
    )
    parser.add_argument("--direct", action="store_true", help="same as --conv direct")
    parser.add_argument("--vs-direct", action="store_true", help="also time the direct path alone; print the ratio")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=3, metavar=("WIDTH", "CONTEXT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("widths", "contexts"):
        if any(v < (1 if name == "widths" else 0) for v in getattr(args, name)):
            parser.error(f"--{name} must be {'positive' if name == 'widths' else 'non-negative'} whole numbers")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    if args.direct:
        args.conv = "direct"
    if args.one:
        width, context, device = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(measure(width, context, device, args.repeats, args.dtype, conv=args.conv)))
        return

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, CPU conv {args.conv}, "
        f"repeats {args.repeats}"
    )
    peak = {"float32": conv_rate("direct")}
    if args.dtype != "float32":
        peak["bfloat16"] = conv_rate("direct", dtype=torch.bfloat16)
    print(
        f"one 256->256 3x3 conv at 128x128 on CPU: direct {peak['float32']:.0f} GFLOP/s, "
        f"Winograd {conv_rate('winograd'):.0f} GFLOP/s (nominal FLOPs)"
        + (f", direct bfloat16 {peak['bfloat16']:.0f} GFLOP/s" if "bfloat16" in peak else "")
    )
    header = (
        f"{'device':6} {'width':>5} {'ctx':>4} {'median ms':>10} {'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>6} "
        f"{'official GFLOP':>14} {'peak MB':>8} {'dtype':>8} {'paths':>16}" + (f" {'direct ms':>10} {'x direct':>8}" if args.vs_direct else "")
    )
    print(header)
    print("-" * len(header))

    def run_one(width: int, context: int, device: str, conv: str, dtype: str) -> Optional[dict]:
        cmd = [sys.executable, "-m", "mvseg.bench", "--one", str(width), str(context), device]
        cmd += ["--repeats", str(args.repeats), "--dtype", dtype, "--conv", conv]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{device:6} {width:5d} {context:4d}  failed: {done.stderr.strip().splitlines()[-1:]}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    def paths(r: dict) -> str:  # bfloat16 convolutions all go to oneDNN's direct kernels
        return "direct (bf16)" if r["dtype"] == "bfloat16" and r["device"] == "cpu" else "+".join(r["conv_paths"])

    results = []
    for device in devices:
        for width in args.widths:
            for context in args.contexts:
                r = run_one(width, context, device, args.conv, args.dtype)
                if r is None:
                    continue
                line = (
                    f"{device:6} {width:5d} {context:4d} {r['median_ms']:10.1f} {r['gflop']:8.1f} "
                    f"{r['gflops_per_s']:8.1f} {100 * r['gflops_per_s'] / peak[r['dtype']] if device == 'cpu' else 0:6.0f} "
                    f"{r['gflop_official']:14.1f} {r['peak_mb']:8.0f} {r['dtype']:>8} {paths(r):>16}"
                )
                if args.vs_direct and device == "cpu":
                    d = run_one(width, context, device, "direct", r["dtype"])  # the same precision
                    if d is not None:
                        r["direct_ms"] = d["median_ms"]
                        line += f" {d['median_ms']:10.1f} {d['median_ms'] / r['median_ms']:8.2f}"
                results.append(r)
                print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not results:  # a benchmark that measured nothing has failed
        raise SystemExit("every configuration failed")


if __name__ == "__main__":
    main()
