"""Record overhead: training samples/s with recording against the same loop without it.

Both runs use the same shards, model, workers and recipe, in one process and one Ray
instance; the ratio (goal >= 0.97) is what counts on a shared, noisy machine. Runs
alternate (without, with, without, with) and each mode's best is kept.

    python benchmarks/bench_record.py [--quick] [--samples N] [--epochs T] [--workers W] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from streamprune import index
from streamprune.datasets import fashion_mnist_shards
from streamprune.raycluster import ensure_ray
from streamprune.recorder import record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.epochs, args.repeats = 1200, 1, 1
    ensure_ray()
    gpus = 1.0 if args.device == "cuda" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, source = fashion_mnist_shards(tmp / "shards", n_shards=max(4, args.samples // 1000), uneven=True,
                                             limit=args.samples, progress=False)
        index(paths, tmp / "base", progress=False)
        best = {"without": 0.0, "with": 0.0}
        per_worker = {}
        for rep in range(args.repeats):
            for mode in ("without", "with"):
                run = tmp / f"{mode}-{rep}"
                shutil.copytree(tmp / "base", run)
                s = record(run, args.epochs, workers=args.workers, gpus_per_worker=gpus, model=args.model,
                           schedule_epochs=max(10, args.epochs), loader_workers=1, record_stats=mode == "with",
                           progress=False, num_classes=10)
                rate = s.samples / sum(s.epoch_seconds)
                print(f"  {mode:>7} recording, run {rep}: {rate:,.0f} samples/s "
                      f"({', '.join(f'{x:,.0f}' for x in s.samples_per_s_per_worker)} per worker-epoch)", flush=True)
                if rate > best[mode]:
                    best[mode], per_worker[mode] = rate, s.samples_per_s_per_worker
        ratio = best["with"] / best["without"]
        print(f"record overhead: {args.samples} samples from {source}, {args.workers} workers on {args.device}, "
              f"{args.epochs} epochs x {args.repeats} runs each | with recording {best['with']:,.0f} samples/s, "
              f"without {best['without']:,.0f} samples/s | ratio {ratio:.3f} (goal >= 0.97)")
        return {"ratio": ratio, **best, "per_worker_with": per_worker["with"]}


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"wall {time.time() - t:.0f} s, {os.cpu_count()} CPUs")
