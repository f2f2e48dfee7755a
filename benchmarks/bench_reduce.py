"""Reducer benchmark: samples/s and peak memory on synthetic runs of 10^7 and 10^8 rows, T = 30;
and `scores.dual` against a straightforward loop over windows on the same data.

The synthetic run is written directly in streamprune's on-disk formats: an index (keys
`000000000`.., random 128-bit identities, 10,000 rows a shard, no member table) and a stats
store whose `p_true` holds learning-curve-like values (the only statistic DUAL+Beta needs;
the other five arrays are left unwritten, i.e. missing), reduced with `--scores method`
(read only what DUAL+Beta needs). Peak memory is the largest total
anonymous resident memory (heap; memory-mapped file pages excluded) of the driver and all
Ray task processes, sampled every 0.1 s.

`--s3` also reduces the same run with RUN an `s3://` URL on a real S3 server (moto's server mode,
tests/s3_server.py, in a child process; AWS_ENDPOINT_URL and credentials are set before Ray starts,
so the Ray tasks read them too): the local index uploaded as `write_index` writes one to an object
store (a generation folder committed by a `COMMIT` object), the stats store created with
`StatsStore.create(url)` and filled through zarr by the same tasks and seed. Reported: samples/s
against the local run measured in the same invocation (ratio), the same peak memory, the S3
server's own resident memory (moto keeps every object in its process's memory), and a check that
both keep-lists hold the same identities.

    python benchmarks/bench_reduce.py [--quick] [--sizes 10000000 100000000] [--keep-data DIR] [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from s3_process import S3Process, serve_s3_process

from streamprune import Index, StatsStore, ensure_ray, reduce, scores, storage
from streamprune.formats import commit
from streamprune.scoring.columns import LABEL

T, ROWS_PER_SHARD, CHUNK = 30, 10_000, 65_536
SAMPLE_BYTES = 1024  # a 512-byte header and 512 bytes of data


def write_synthetic_index(path: Path, n: int, seed: int = 0) -> None:
    path.mkdir(parents=True)
    s = -(-n // ROWS_PER_SHARD)
    offsets = np.minimum(np.arange(s + 1, dtype=np.int64) * ROWS_PER_SHARD, n)
    np.save(path / "shard_offset.npy", offsets)
    rng = np.random.default_rng(seed)
    for name in ("id_hi", "id_lo"):
        mm = np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=np.uint64, shape=(n,))
        for a in range(0, n, 1 << 24):
            mm[a : a + (1 << 24)] = rng.integers(0, 2**64 - 1, min(1 << 24, n - a), dtype=np.uint64)
        mm.flush()
    np.lib.format.open_memmap(path / "key_offset.npy", mode="w+", dtype=np.int64, shape=(n + 1,))[:] = (
        np.arange(n + 1, dtype=np.int64) * 9
    )
    with open(path / "keys.bin", "wb") as f:
        for a in range(0, n, 1 << 22):
            f.write(np.char.zfill(np.arange(a, min(n, a + (1 << 22))).astype("S9"), 9).tobytes())
    # one 512-byte member (header and data) per sample, as a real tar lays them out
    columns = {
        "sample_start": (np.int64, lambda pos: pos * SAMPLE_BYTES),
        "sample_end": (np.int64, lambda pos: (pos + 1) * SAMPLE_BYTES),
        "member_count": (np.int32, lambda pos: np.ones_like(pos)),
        "member_offset": (np.int64, lambda pos: pos * SAMPLE_BYTES),
        "member_size": (np.int64, lambda pos: np.full_like(pos, SAMPLE_BYTES - 512)),
    }
    for name, (dtype, values) in columns.items():
        mm = np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))
        for a in range(0, n, 1 << 22):
            mm[a : a + (1 << 22)] = values(np.arange(a, min(n, a + (1 << 22)), dtype=np.int64) % ROWS_PER_SHARD)
        mm.flush()
    with open(path / "shards.jsonl", "w") as f:
        for i in range(s):
            rows = [int(offsets[i]), int(offsets[i + 1])]
            f.write(
                json.dumps(
                    {
                        "name": f"train-{i:06d}.tar",
                        "url": f"train-{i:06d}.tar",
                        "status": "ok",
                        "error": None,
                        "error_offset": None,
                        "size": (rows[1] - rows[0]) * SAMPLE_BYTES + 1024,
                        "bytes_read": 0,
                        "samples": rows[1] - rows[0],
                        "rows": rows,
                    }
                )
                + "\n"
            )
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "streamprune-index",
                "version": 1,
                "root": "/synthetic",
                "identity": "synthetic",
                "n_shards": s,
                "n_samples": n,
                "n_members": n,
                "fingerprint": f"synthetic-{n}-{seed}",
                "bytes_total": 0,
                "bytes_read": 0,
                "broken": [],
                "empty": [],
                "duplicates": {"rows": 0, "examples": []},
            }
        )
    )


@ray.remote(num_cpus=1)
def _fill(store_path: str, r0: int, r1: int, seed: int) -> None:
    store = StatsStore.open(store_path)
    rng = np.random.default_rng([seed, r0])
    n = r1 - r0
    a, b = rng.normal(-1, 1, n), rng.uniform(0, 0.3, n)
    logit = a[:, None] + b[:, None] * np.arange(T) + rng.normal(0, 0.5, (n, T))
    store.group["p_true"][r0:r1, :] = (1 / (1 + np.exp(-logit))).astype(np.float32)
    store.group[LABEL][r0:r1] = rng.integers(0, 10, n, dtype=np.int32)  # for the class-balanced default


def _fill_store(location: str, index: Index, n: int) -> None:
    """Create the stats store at `location` (a local path or an object-store URL) for `index` and
    fill it with the Ray tasks (the same values for the same `n`, wherever it is)."""
    store = StatsStore.create(location, index, epochs=T, chunk_rows=CHUNK)
    step = CHUNK * 16
    ray.get([_fill.remote(location, r0, min(n, r0 + step), 0) for r0 in range(0, n, step)])
    for t in range(T):
        store.mark_done(t, np.arange(store.n_shards))


def synthetic_run(root: Path, n: int) -> Path:
    run = root / f"run-{n}"
    write_synthetic_index(run / "index", n)
    _fill_store(str(run / "stats.zarr"), Index(run / "index"), n)
    return run


def upload_index(local: Path, url: str) -> None:
    """The local index folder `local` written to `url` as `write_index` writes one to an object
    store: its files into a new generation folder, each in one request, `manifest.json` last,
    committed by one `COMMIT` object (`commit.replacing`)."""
    with commit.replacing(url) as place:
        for file in sorted(os.listdir(local), key=lambda f: (f == "manifest.json", f)):
            storage.write_bytes(storage.join(place, file), (local / file).read_bytes())


def synthetic_s3_run(local_run: Path, url: str, n: int) -> str:
    """The run of `synthetic_run` (its index; a stats store with the same values) at `url`."""
    upload_index(local_run / "index", storage.join(url, "index"))
    _fill_store(storage.join(url, "stats.zarr"), Index(storage.join(url, "index")), n)
    return url


def resident(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of process `pid` in bytes (0 if it is gone)."""
    try:
        return next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith(field))
    except (OSError, StopIteration, ValueError):
        return 0


class PeakMemory(threading.Thread):
    """Largest total anonymous resident memory (heap, not file-backed pages of memory-mapped
    inputs the kernel can drop) of this process and all `ray::` task processes; with `server`
    (a process id), that process's resident memory apart (`peak_server`)."""

    def __init__(self, server: int | None = None):
        super().__init__(daemon=True)
        self.peak, self.peak_task, self.peak_server, self.stop, self.server = 0, 0, 0, False, server

    def run(self):
        while not self.stop:
            total, task = 0, 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if int(pid) != os.getpid() and not cmd.startswith(b"ray::_"):
                        continue
                    rss = next(
                        int(line.split()[1])
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("RssAnon")
                    )
                except (OSError, StopIteration, ValueError):
                    continue
                total += rss * 1024
                if int(pid) != os.getpid():
                    task = max(task, rss * 1024)
            self.peak, self.peak_task = max(self.peak, total), max(self.peak_task, task)
            if self.server is not None:
                self.peak_server = max(self.peak_server, resident(self.server))
            time.sleep(0.1)


def loop_dual(p: np.ndarray, window: int = 10) -> np.ndarray:
    """The straightforward implementation: a loop over windows with NumPy's std (ddof=1)."""
    out = [
        10 * p[:, k : k + window].std(axis=1, ddof=1) * (1 - p[:, k : k + window].mean(axis=1))
        for k in range(p.shape[1] - window + 1)
    ]
    return np.mean(out, axis=0)


def bench_dual(n: int) -> dict:
    p = np.random.default_rng(1).random((n, T)).astype(np.float32)
    t = time.perf_counter()
    ours = scores.dual(p)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = loop_dual(p.astype(np.float64))
    t_loop = time.perf_counter() - t
    assert np.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    print(
        f"scores.dual on {n:,} x {T}: {n / t_ours:,.0f} samples/s; loop over windows {n / t_loop:,.0f} "
        f"samples/s; speed-up x{t_loop / t_ours:.1f} (max abs difference {np.abs(ours - ref).max():.1e})",
        flush=True,
    )
    return {"n": n, "dual_sps": n / t_ours, "loop_sps": n / t_loop, "speedup": t_loop / t_ours}


def measure(run: str | Path, n: int, ratio: float, server: S3Process | None = None) -> tuple[np.ndarray, dict]:
    """`reduce` of `run` timed, with the peak memory: the kept identities and the figures."""
    mem = PeakMemory(server.pid if server is not None else None)
    mem.start()
    t = time.perf_counter()
    keep = reduce(run, ratio, "dual-beta", scores="method", progress=False)
    t_reduce = time.perf_counter() - t
    mem.stop = True
    mem.join()
    assert len(keep) == round((1 - ratio) * n)
    r = {
        "n": n,
        "seconds": t_reduce,
        "sps": n / t_reduce,
        "peak_total_gb": mem.peak / 1e9,
        "peak_task_gb": mem.peak_task / 1e9,
    }
    if server is not None:
        r["peak_server_gb"] = mem.peak_server / 1e9
    return keep.ids(), r


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--keep-data", help="keep the synthetic runs in this folder (default: a temporary one)")
    p.add_argument(
        "--s3", action="store_true", help="also reduce each run with RUN on a local S3 server (moto), against local"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [300_000, 600_000]
    with contextlib.ExitStack() as stack:
        server = None
        if args.s3:  # before Ray starts: its tasks read the server's address and credentials from the environment
            if ray.is_initialized():
                raise SystemExit("--s3: Ray is already running here without the S3 server's environment")
            server = stack.enter_context(serve_s3_process())
        ensure_ray()
        return _run(args, server)


def _run(args: argparse.Namespace, server: S3Process | None) -> dict:
    results: dict = {"dual": bench_dual(min(args.sizes[0], 1_000_000))}
    root = Path(args.keep_data) if args.keep_data else Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    bucket = "s3://bench-reduce"
    if server is not None:
        fs, path = storage.filesystem(bucket)
        with contextlib.suppress(FileExistsError):
            fs.mkdir(path)
    try:
        for n in args.sizes:
            run = root / f"run-{n}"
            t = time.perf_counter()
            if not (run / "stats.zarr").exists():
                shutil.rmtree(run, ignore_errors=True)
                synthetic_run(root, n)
            t_make = time.perf_counter() - t
            ids, r = measure(run, n, args.ratio)
            r["setup_s"] = t_make
            results[str(n)] = r
            print(
                f"reduce dual-beta r={args.ratio} on {n:,} rows x {T} epochs: {r['seconds']:.1f} s = {r['sps']:,.0f} "
                f"samples/s | peak memory {r['peak_total_gb']:.2f} GB in all (largest task "
                f"{r['peak_task_gb']:.2f} GB) | synthetic data written in {t_make:.0f} s",
                flush=True,
            )
            if server is not None:
                results[f"s3-{n}"] = _run_s3(run, storage.join(bucket, f"run-{n}"), n, args.ratio, server, ids, r)
    finally:
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)
    sizes = [k for k in results if k.isdigit()]
    if len(sizes) >= 2:
        a, b = results[sizes[0]], results[sizes[-1]]
        print(
            f"scaling {a['n']:,} -> {b['n']:,} rows: samples/s x{b['sps'] / a['sps']:.2f}, "
            f"peak memory x{b['peak_total_gb'] / a['peak_total_gb']:.2f}"
        )
    return results


def _run_s3(run: Path, url: str, n: int, ratio: float, server: S3Process, ids: np.ndarray, local: dict) -> dict:
    """The local `run` written to `url` on `server`, reduced there: figures against `local`'s."""
    before = resident(server.pid)
    t = time.perf_counter()
    synthetic_s3_run(run, url, n)
    t_make = time.perf_counter() - t
    stored = storage.total_size(url)
    held = resident(server.pid)
    server.reset()
    s3_ids, r = measure(url, n, ratio, server)
    r.update(
        setup_s=t_make,
        ratio_vs_local=r["sps"] / local["sps"],
        same_keep=bool(np.array_equal(s3_ids, ids)),
        stored_gb=stored / 1e9,
        server_rss_before_gb=before / 1e9,
        server_rss_stored_gb=held / 1e9,
        requests=server.requests,
        gets=server.gets,
        get_gb=server.bytes_sent / 1e9,
    )
    print(
        f"  on s3 (moto): {r['seconds']:.1f} s = {r['sps']:,.0f} samples/s = x{r['ratio_vs_local']:.2f} of local | "
        f"peak memory {r['peak_total_gb']:.2f} GB in all (largest task {r['peak_task_gb']:.2f} GB) | "
        f"{r['requests']:,} requests, {r['gets']:,} GETs sent {r['get_gb']:.2f} GB | S3 server "
        f"{r['server_rss_stored_gb']:.2f} GB resident holding {r['stored_gb']:.2f} GB of run "
        f"(peak {r['peak_server_gb']:.2f} GB) | written in {t_make:.0f} s | same keep-list: {r['same_keep']}",
        flush=True,
    )
    assert r["same_keep"], "the keep-lists of the local and the S3 run differ"
    storage.remove(url)  # the server keeps objects in memory: free them for the next size
    return r


if __name__ == "__main__":
    main()
