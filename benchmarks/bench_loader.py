"""Loader benchmark: `PrunedWebDataset` against webdataset on local real shards, in one run.

Keep 100%: samples/s against `webdataset.WebDataset` (goal >= 0.98). Keep 10%: against
webdataset decoding everything then `select` (goal >= 6x) and against webdataset with
`select_files` (drops pruned members before decoding but still reads every byte), and
bytes read against the shards' total (goal <= 15%). Each pipeline decodes and makes
(image, label) tuples; each is timed `--repeat` times, alternating, and the best is kept.

    python benchmarks/bench_loader.py [--quick] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from streamprune import PrunedWebDataset, index
from streamprune.datasets import fashion_mnist_dir
from streamprune.keeplist import KeepList
from streamprune.raycluster import ensure_ray

from shardsets import shard_sets


def _run(ds) -> tuple[int, float]:
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return n, time.perf_counter() - t


def bench(name: str, paths: list[str], work: Path, repeat: int, seed: int = 0) -> dict:
    idx = index(paths, work / name, progress=False)
    rng = np.random.default_rng(seed)
    keep_all = KeepList.from_rows(idx, np.arange(idx.n_samples), work / name / "keep-all")
    rows10 = np.sort(rng.choice(idx.n_samples, idx.n_samples // 10, replace=False))
    keep10 = KeepList.from_rows(idx, rows10, work / name / "keep-10")
    ext = name.split("-")[0]
    kept_keys = {k for n in keep10.names for k in keep10.shard_keys(n)}  # keys are unique across these shards
    handlers = ("pil",) if ext == "png" else ()
    decode = lambda ds: ds.decode(*handlers).to_tuple(ext, "cls")
    pipelines = {
        "wds": lambda: decode(wds.WebDataset(paths, shardshuffle=False)),
        "pruned-100": lambda: decode(PrunedWebDataset(paths, keep=keep_all, shardshuffle=False)),
        "wds-select": lambda: wds.WebDataset(paths, shardshuffle=False).decode(*handlers)
        .select(lambda s: s["__key__"] in kept_keys).to_tuple(ext, "cls"),
        "wds-select_files": lambda: decode(wds.WebDataset(
            paths, shardshuffle=False, select_files=lambda f: f.split(".", 1)[0] in kept_keys)),
        "pruned-10": lambda: decode(PrunedWebDataset(paths, keep=keep10, shardshuffle=False)),
    }
    best = {k: float("inf") for k in pipelines}
    counts = {}
    for _ in range(repeat):
        for k, make in pipelines.items():
            counts[k], t = _run(make())
            best[k] = min(best[k], t)
    assert counts["wds"] == counts["pruned-100"] == idx.n_samples, counts
    assert counts["pruned-10"] == counts["wds-select"] == counts["wds-select_files"] == len(keep10), counts
    probe = PrunedWebDataset(paths, keep=keep10, shardshuffle=False)
    _run(probe)
    sps = {k: counts[k] / best[k] for k in pipelines}
    row = {"set": name, "samples": idx.n_samples, "kept10": len(keep10),
           "MB": sum(os.path.getsize(p) for p in paths) / 1e6,
           **{f"{k}_sps": v for k, v in sps.items()},
           "ratio_keep100": sps["pruned-100"] / sps["wds"],
           "ratio_keep10_vs_select": sps["pruned-10"] / sps["wds-select"],
           "ratio_keep10_vs_select_files": sps["pruned-10"] / sps["wds-select_files"],
           "bytes_read_keep10": probe.stats.bytes_read / sum(os.path.getsize(p) for p in paths)}
    print(f"{name:>10}: {row['samples']} samples, {row['MB']:.0f} MB | keep 100%: pruned {sps['pruned-100']:,.0f} "
          f"vs webdataset {sps['wds']:,.0f} samples/s = x{row['ratio_keep100']:.3f} | keep 10%: pruned "
          f"{sps['pruned-10']:,.0f} samples/s (kept), vs decode+select x{row['ratio_keep10_vs_select']:.1f}, "
          f"vs select_files x{row['ratio_keep10_vs_select_files']:.1f}; bytes read "
          f"{row['bytes_read_keep10']:.1%} of total", flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few thousand samples, for a smoke run")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: found or bundled)")
    p.add_argument("--repeat", type=int, default=None, help="timings per pipeline, best kept (default 3; 1 quick)")
    args = p.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    print(f"data: Fashion-MNIST from {fashion_mnist_dir(args.data_dir)}; {os.cpu_count()} CPUs; "
          f"python {sys.version.split()[0]}; webdataset {wds.__version__}")
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = shard_sets(work, 2000 if args.quick else None, n_big=500 if args.quick else 10000,
                          data_dir=args.data_dir)
        return [bench(name, paths, work, repeat) for name, paths in sets.items()]


if __name__ == "__main__":
    main()
