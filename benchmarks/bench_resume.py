"""Resume benchmark: what `PrunedWebDataset.state_dict()` costs, and how soon a resumed epoch
yields its first sample, on local real shards, in one run.

`state_dict()` per call (µs), mid-epoch, without and with a 1,000-sample shuffle buffer (its
samples are in the state, as positions), against the time the loader takes per sample (decoded
PNG, (image, label) tuples). Time to first sample: a dataset resumed from a JSON state at 50% and
90% of the epoch against a fresh one (goal: about 1x, whatever the position: what was read
before is skipped, not read), and against fast-forwarding (reading and discarding up to the same
position, what a loader without state has to do). Each is timed `--repeat` times, the best kept.

    python benchmarks/bench_resume.py [--quick] [--data-dir DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds

from streamprune import KeepList, PrunedWebDataset, index_in_process
from streamprune.demo import fashion_mnist_dir, load_fashion_mnist, shard_sizes, write_shards


def _best(f: Callable[[], float], repeat: int) -> float:
    return min(f() for _ in range(repeat))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4,000 samples, for a smoke run")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: found or bundled)")
    p.add_argument("--repeat", type=int, default=None, help="timings per figure, best kept (default 5; 3 quick)")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 5)
    warnings.filterwarnings("ignore", category=UserWarning)  # webdataset's shardshuffle notes
    print(
        f"data: Fashion-MNIST from {fashion_mnist_dir(args.data_dir)}; {os.cpu_count()} CPUs; "
        f"python {sys.version.split()[0]}; webdataset {wds.__version__}",
        flush=True,
    )
    images, labels = load_fashion_mnist("train", args.data_dir)
    n = min(len(images), 4000 if args.quick else 30000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = write_shards(images[:n], labels[:n], work / "png", sizes=shard_sizes(n, n // 1000, uneven=True))
        idx = index_in_process(paths, work / "run")
        rows = np.sort(np.random.default_rng(0).choice(idx.n_samples, int(0.3 * idx.n_samples), replace=False))
        keep = KeepList.from_rows(idx, rows, work / "keep")
        k = len(keep)

        def dataset(buffer: int = 0):
            ds = PrunedWebDataset(paths, keep=keep, shardshuffle=100, seed=1)
            if buffer:
                ds = ds.shuffle(buffer)
            return ds.decode("pil").to_tuple("png", "cls")

        # the loader's own pace, for scale
        def epoch() -> float:
            t = time.perf_counter()
            assert sum(1 for _ in dataset()) == k
            return time.perf_counter() - t

        per_sample = _best(epoch, repeat) / k
        row: dict = {"samples": n, "kept": k, "shards": len(paths), "per_sample_us": per_sample * 1e6}
        print(f"{n} samples in {len(paths)} shards, {k} kept; the loader: {per_sample * 1e6:.0f} µs per sample")

        # state_dict() per call, mid-epoch
        calls = 200 if args.quick else 1000
        for buffer in (0, 1000):
            ds = dataset(buffer)
            it = iter(ds)
            for _ in range(k // 2):
                next(it)

            def states(ds=ds) -> float:
                t = time.perf_counter()
                for _ in range(calls):
                    ds.state_dict()
                return (time.perf_counter() - t) / calls

            cost = _best(states, repeat)
            size = len(json.dumps(ds.state_dict()))
            row[f"state_dict_us_buffer{buffer}"] = cost * 1e6
            print(
                f"state_dict(), shuffle buffer {buffer}: {cost * 1e6:.1f} µs per call "
                f"({cost / per_sample:.3f}x one sample's load), {size} bytes of JSON",
                flush=True,
            )

        # time to the first sample: fresh, resumed from a JSON state, fast-forwarded
        def first_fresh() -> float:
            t = time.perf_counter()
            next(iter(dataset()))
            return time.perf_counter() - t

        fresh = _best(first_fresh, repeat)
        row["first_sample_fresh_ms"] = fresh * 1e3
        print(f"first sample, fresh: {fresh * 1e3:.1f} ms")
        for at in (0.5, 0.9):
            m = int(at * k)
            ds = dataset()
            it = iter(ds)
            for _ in range(m):
                next(it)
            text = json.dumps(ds.state_dict())

            def first_resumed(text: str = text) -> float:
                t = time.perf_counter()
                again = dataset()
                again.load_state_dict(json.loads(text))
                next(iter(again))
                return time.perf_counter() - t

            def first_forwarded(m: int = m) -> float:
                t = time.perf_counter()
                it = iter(dataset())
                for _ in range(m + 1):
                    next(it)
                return time.perf_counter() - t

            resumed = _best(first_resumed, repeat)
            forwarded = _best(first_forwarded, min(repeat, 2))
            row[f"first_sample_resumed_{int(at * 100)}_ms"] = resumed * 1e3
            row[f"first_sample_forwarded_{int(at * 100)}_ms"] = forwarded * 1e3
            print(
                f"first sample, resumed at {at:.0%} of the epoch: {resumed * 1e3:.1f} ms = "
                f"{resumed / fresh:.2f}x fresh (goal about 1x); fast-forwarding there instead: "
                f"{forwarded * 1e3:.0f} ms = {forwarded / resumed:.0f}x the resume",
                flush=True,
            )
    return row


if __name__ == "__main__":
    main()
