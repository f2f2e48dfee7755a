"""Index benchmark: samples/s and bytes read against total bytes, on local real shards.

Baseline, measured in the same run: reading every sample of the same shards with
webdataset (what any full pass costs). Two shard sets: Fashion-MNIST PNGs (tiny members,
where a 512-byte header is as large as the data) and the same images upscaled 4x as raw
RGB `npy` (37 KB members, closer to web images), where header-only scanning pays off.

    python benchmarks/bench_index.py [--quick] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds
from shardsets import shard_sets

from streamprune import ensure_ray, index
from streamprune.demo import fashion_mnist_dir
from streamprune.shards.scan import scan_shard


def webdataset_full_read(paths: list[str]) -> tuple[int, float]:
    t = time.perf_counter()
    n = sum(1 for _ in wds.WebDataset(paths, shardshuffle=False))
    return n, time.perf_counter() - t


def scan_only(paths: list[str]) -> tuple[int, int, float]:
    t = time.perf_counter()
    scans = [scan_shard(p, os.path.basename(p)) for p in paths]
    return sum(s.n for s in scans), sum(s.bytes_read for s in scans), time.perf_counter() - t


def bench(name: str, paths: list[str], work: Path) -> dict:
    total = sum(os.path.getsize(p) for p in paths)
    os.system("sync")
    n_wds, t_wds = webdataset_full_read(paths)
    n_scan, read, t_scan = scan_only(paths)
    t = time.perf_counter()
    idx = index(paths, work / name, progress=False)
    t_index = time.perf_counter() - t
    assert n_wds == n_scan == idx.n_samples
    row = {
        "set": name,
        "shards": len(paths),
        "samples": n_scan,
        "MB": total / 1e6,
        "read_fraction": read / total,
        "scan_sps": n_scan / t_scan,
        "wds_sps": n_wds / t_wds,
        "scan_vs_wds": (n_scan / t_scan) / (n_wds / t_wds),
        "index_ray_sps": idx.n_samples / t_index,
    }
    print(
        f"{name:>10}: {row['shards']} shards, {row['samples']} samples, {row['MB']:.1f} MB | "
        f"bytes read {read / total:.1%} of total | header scan {row['scan_sps']:,.0f} samples/s vs "
        f"webdataset full read {row['wds_sps']:,.0f} samples/s = x{row['scan_vs_wds']:.1f} | "
        f"`index` on Ray (tasks + merge) {row['index_ray_sps']:,.0f} samples/s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few thousand samples, for a smoke run")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: found or bundled)")
    args = p.parse_args(argv)
    n = 2000 if args.quick else None
    print(
        f"data: {n or 'all'} Fashion-MNIST images from {fashion_mnist_dir(args.data_dir)}; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )
    ensure_ray()  # started before timing: the figures are for indexing, not for Ray's start-up
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = shard_sets(work, n, n_big=500 if args.quick else 10000, data_dir=args.data_dir)
        return [bench(name, paths, work) for name, paths in sets.items()]


if __name__ == "__main__":
    main()
