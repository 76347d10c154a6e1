"""Training throughput on the default config: examples per second and GFLOP/s, this checkout against another.

    python -m bench.bench_train [--steps 24] [--baseline /path/to/other/checkout] [--bf16] [--compile]

Times the training steps of ``lib/mvseg/weights/multiverseg_default.json`` as ``python -m mvseg.train`` runs
them (the same batches, drawn from (seed, step), the same three simulated interaction rounds, Adam), after
two warm-up steps, in a fresh process per checkout. ``--baseline`` runs the same steps with another
checkout's ``lib`` (e.g. ``git worktree add /tmp/base <commit>``), so before and after come from one run.
Reported: examples/s (one example = one target image with its context and its rounds), the share of time
spent drawing batches, and the network's GFLOP/s (forward + backward ~ 3x the forward's convolution FLOPs)
against the direct 3x3 convolution rate measured in the same process. ``--compile`` also times this checkout
with ``--compile`` (``mvseg.train.CompiledNetwork``): steps that compiled a graph are left out of its rate
and their seconds reported as compile time. ``--bf16`` also times this checkout under CPU bfloat16 autocast
(``python -m mvseg.train --bf16``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "lib" / "mvseg" / "weights" / "multiverseg_default.json"


def measure(steps: int, warmup: int = 2, compile: bool = False, bf16: bool = False) -> dict:
    """Run in the child process, with the checkout under test first on ``sys.path``."""
    import torch

    from mvseg import train as T
    from mvseg.network import MultiverSegConfig, MultiverSegNet, multiverseg_flops

    cfg = T.TrainConfig.load(CONFIG)
    try:  # as train() does; checkouts before the allocator setting have no such function
        from mvseg.memory import retain_for_network

        retain_for_network("cpu", cfg.encoder_widths)
    except ImportError:
        pass
    torch.manual_seed(cfg.seed)
    bank = T.TaskBank([T.Source(**s) for s in cfg.sources], Path(cfg.data_root), cfg.size, cfg.heldout, cfg.seed)
    config = MultiverSegConfig(encoder_widths=list(cfg.encoder_widths))
    model = MultiverSegNet(config)
    model.train()
    network = T.CompiledNetwork(model) if compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    draw = work = flops = compiling = 0.0
    examples = timed = 0
    for step in range(warmup + steps):
        graphs = T.CompiledNetwork.graphs() if compile else 0
        t0 = time.perf_counter()
        batch = T.draw_batch(bank, cfg, step)
        t1 = time.perf_counter()
        user = T.RandomPrompts(T.step_random(cfg.seed, step, T.PROMPT_STREAM), p_far_negative=cfg.p_far_negative)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = T.interactive_loss(
                network, *batch[:4], user, cfg.interaction_steps, cfg.focal_gamma, batch.context_only
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if compile and T.CompiledNetwork.graphs() != graphs:
            compiling += t2 - t0
        elif step >= warmup:
            draw, work = draw + t1 - t0, work + t2 - t1
            b, n, size = batch.images.shape[0], batch.context_images.shape[1], batch.images.shape[-1]
            flops += 3 * cfg.interaction_steps * multiverseg_flops(config, n, size, b)["executed"]
            examples += b
            timed += 1
    # the peak is measured here, not with mvseg.bench.conv_rate: a baseline checkout's mvseg.bench differs
    x, w = torch.rand(1, 256, 128, 128).contiguous(memory_format=torch.channels_last), torch.rand(256, 256, 3, 3)
    with torch.inference_mode():
        torch.nn.functional.conv2d(x, w, padding=1)
        t0 = time.perf_counter()
        torch.nn.functional.conv2d(x, w, padding=1)
        peak = 2 * 256 * 256 * 9 * 128 * 128 / (time.perf_counter() - t0) / 1e9
    total = draw + work
    return {
        "steps": timed,
        "examples": examples,
        "examples_per_s": examples / total,
        "seconds_per_step": total / timed,
        "draw_share": draw / total,
        "network_gflops_per_s": flops / work / 1e9,
        "conv_peak_gflops_per_s": peak,
        "threads": torch.get_num_threads(),
        "compile_seconds": compiling,
    }


def run(checkout: Path, steps: int, compile: bool = False, bf16: bool = False) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(checkout / 'lib')!r}); sys.path.insert(1, {str(ROOT)!r}); "
        f"from bench.bench_train import measure; print(json.dumps(measure({steps}, compile={compile}, bf16={bf16})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=checkout)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--baseline", type=Path, help="another checkout to run the same steps with")
    parser.add_argument("--compile", action="store_true", help="also time this checkout with --compile")
    parser.add_argument("--bf16", action="store_true", help="also time this checkout with --bf16 (autocast)")
    args = parser.parse_args(argv)
    runs = [("this checkout", ROOT, False, False)]
    runs += [("  --bf16", ROOT, False, True)] if args.bf16 else []
    runs += [("  --compile", ROOT, True, False)] if args.compile else []
    runs += [("baseline", args.baseline.resolve(), False, False)] if args.baseline else []
    results = {}
    print(f"default config ({CONFIG.name}), steps 2..{args.steps + 1} of the run")
    print(
        f"{'':14} {'examples/s':>10} {'s/step':>7} {'drawing':>8} {'net GFLOP/s':>11} {'conv peak':>9} "
        f"{'compiling s':>11}"
    )
    for name, checkout, compile, bf16 in runs:
        r = results[name] = run(checkout, args.steps, compile, bf16)
        print(
            f"{name:14} {r['examples_per_s']:10.2f} {r['seconds_per_step']:7.2f} {100 * r['draw_share']:7.0f}% "
            f"{r['network_gflops_per_s']:11.1f} {r['conv_peak_gflops_per_s']:9.0f} {r['compile_seconds']:11.0f}",
            flush=True,
        )
    if args.baseline:
        for name in [run[0] for run in runs[:-1]]:
            ratio = results[name]["examples_per_s"] / results["baseline"]["examples_per_s"]
            print(f"{name.strip()} against the baseline: x{ratio:.2f}")


if __name__ == "__main__":
    main()
