"""Loader benchmark: `PrunedWebDataset` against webdataset on local real shards, in one run.

Keep 100%: samples/s against `webdataset.WebDataset` (goal >= 0.98). Keep 10%: against
webdataset decoding everything then `select` (goal >= 6x) and against webdataset with
`select_files` (drops pruned members before decoding but still reads every byte), and
bytes read against the shards' total (goal <= 15%). Each pipeline decodes and makes
(image, label) tuples; each is timed `--repeat` times, alternating, and the best is kept.

`--http` adds the same comparisons over `http://127.0.0.1:PORT/...` URLs, the shard folder
served by a real local HTTP server (tests/http_server.py, aiohttp's static files, which honour
`Range`): bytes the server sent for a keep-10% pass against the shards' total (goal <= 15%)
with a check that exactly the kept samples came, keep 100% against `webdataset.WebDataset`
(which reads http through `curl`; goal >= 0.9) and keep 10% against webdataset + `select`.
`--latency SECONDS` repeats them with that delay per request, server-side, in the same run:
requests in flight should hide it.

    python benchmarks/bench_loader.py [--quick] [--data-dir DIR] [--http [--latency 0.02]]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from shardsets import shard_sets

from streamprune import PrunedWebDataset, index
from streamprune.datasets import fashion_mnist_dir
from streamprune.formats.keeplist import KeepList
from streamprune.stages.ray_cluster import ensure_ray

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _run(ds) -> tuple[int, float]:
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return n, time.perf_counter() - t


def bench(
    name: str, paths: list[str], work: Path, repeat: int, seed: int = 0, server=None, latencies: tuple[float, ...] = ()
) -> dict:
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
        "wds-select": lambda: (
            wds.WebDataset(paths, shardshuffle=False)
            .decode(*handlers)
            .select(lambda s: s["__key__"] in kept_keys)
            .to_tuple(ext, "cls")
        ),
        "wds-select_files": lambda: decode(
            wds.WebDataset(paths, shardshuffle=False, select_files=lambda f: f.split(".", 1)[0] in kept_keys)
        ),
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
    row = {
        "set": name,
        "samples": idx.n_samples,
        "kept10": len(keep10),
        "MB": sum(os.path.getsize(p) for p in paths) / 1e6,
        **{f"{k}_sps": v for k, v in sps.items()},
        "ratio_keep100": sps["pruned-100"] / sps["wds"],
        "ratio_keep10_vs_select": sps["pruned-10"] / sps["wds-select"],
        "ratio_keep10_vs_select_files": sps["pruned-10"] / sps["wds-select_files"],
        "bytes_read_keep10": probe.stats.bytes_read / sum(os.path.getsize(p) for p in paths),
    }
    print(
        f"{name:>10}: {row['samples']} samples, {row['MB']:.0f} MB | keep 100%: pruned {sps['pruned-100']:,.0f} "
        f"vs webdataset {sps['wds']:,.0f} samples/s = x{row['ratio_keep100']:.3f} | keep 10%: pruned "
        f"{sps['pruned-10']:,.0f} samples/s (kept), vs decode+select x{row['ratio_keep10_vs_select']:.1f}, "
        f"vs select_files x{row['ratio_keep10_vs_select_files']:.1f}; bytes read "
        f"{row['bytes_read_keep10']:.1%} of total",
        flush=True,
    )
    if server is not None:
        urls = [f"{server.url}/{Path(p).relative_to(work).as_posix()}" for p in paths]
        row["http"] = [
            bench_http(
                name,
                urls,
                server,
                latency,
                keep_all,
                keep10,
                kept_keys,
                ext,
                handlers,
                repeat,
                idx.n_samples,
                row["MB"] * 1e6,
            )
            for latency in latencies
        ]
        base = row["http"][0]
        for r in row["http"][1:]:  # what the latency cost each reader: samples/s against its own at 0 ms
            r["speed_vs_no_latency"] = {
                k: r[f"{k}_sps"] / base[f"{k}_sps"] for k in ("wds", "pruned-100", "wds-select", "pruned-10")
            }
            print(
                f"{name:>10} http, {r['latency'] * 1000:.0f} ms/request against 0 ms: "
                + ", ".join(f"{k} x{v:.2f}" for k, v in r["speed_vs_no_latency"].items()),
                flush=True,
            )
    return row


def bench_http(
    name: str,
    urls: list[str],
    server,
    latency: float,
    keep_all: KeepList,
    keep10: KeepList,
    kept_keys: set[str],
    ext: str,
    handlers: tuple,
    repeat: int,
    n_samples: int,
    total: float,
) -> dict:
    """The loader over http URLs served by `server` with `latency` seconds per request: speed
    against webdataset (curl) in the same run, and the bytes the server sent."""
    server.latency = latency
    decode = lambda ds: ds.decode(*handlers).to_tuple(ext, "cls")
    pipelines = {
        "wds": lambda: decode(wds.WebDataset(urls, shardshuffle=False)),
        "pruned-100": lambda: decode(PrunedWebDataset(urls, keep=keep_all, shardshuffle=False)),
        "wds-select": lambda: (
            wds.WebDataset(urls, shardshuffle=False)
            .decode(*handlers)
            .select(lambda s: s["__key__"] in kept_keys)
            .to_tuple(ext, "cls")
        ),
        "pruned-10": lambda: decode(PrunedWebDataset(urls, keep=keep10, shardshuffle=False)),
    }
    best = {k: float("inf") for k in pipelines}
    counts, sent, requests = {}, {}, {}
    for _ in range(repeat):
        for k, make in pipelines.items():
            server.reset()
            counts[k], t = _run(make())
            best[k] = min(best[k], t)
            sent[k], requests[k] = server.bytes_sent, server.requests
    assert counts["wds"] == counts["pruned-100"] == n_samples, counts
    assert counts["pruned-10"] == counts["wds-select"] == len(keep10), counts
    # An undecoded keep-10% pass: which samples came, and what the server sent for them.
    server.reset()
    probe = PrunedWebDataset(urls, keep=keep10, shardshuffle=False)
    keys = [s["__key__"] for s in probe]
    probe_sent, probe_requests = server.bytes_sent, server.requests
    exact = len(keys) == len(keep10) and set(keys) == kept_keys
    sps = {k: counts[k] / best[k] for k in pipelines}
    row = {
        "set": name,
        "latency": latency,
        "samples": n_samples,
        "kept10": len(keep10),
        "kept10_came": len(keys),
        "kept10_exact": exact,
        **{f"{k}_sps": v for k, v in sps.items()},
        "ratio_keep100": sps["pruned-100"] / sps["wds"],
        "ratio_keep10_vs_select": sps["pruned-10"] / sps["wds-select"],
        "bytes_sent_keep10": probe_sent / total,
        "requests_keep10": probe_requests,
        "bytes_sent_keep100": sent["pruned-100"] / total,
        "requests_keep100": requests["pruned-100"],
        "bytes_sent_wds": sent["wds"] / total,
        "requests_wds": requests["wds"],
        # the loader's own counts, where its remote reader keeps them
        "bytes_requested_keep10": getattr(probe.stats, "bytes_requested", 0) / total,
        "bytes_received_keep10": getattr(probe.stats, "bytes_received", 0) / total,
    }
    print(
        f"{name:>10} http, {latency * 1000:.0f} ms/request: keep 100%: pruned {sps['pruned-100']:,.0f} vs "
        f"webdataset (curl) {sps['wds']:,.0f} samples/s = x{row['ratio_keep100']:.3f} | keep 10%: pruned "
        f"{sps['pruned-10']:,.0f} samples/s (kept), vs decode+select x{row['ratio_keep10_vs_select']:.1f}; "
        f"server sent {row['bytes_sent_keep10']:.1%} of total in {probe_requests} requests "
        f"(webdataset {row['bytes_sent_wds']:.1%} in {requests['wds']}); {len(keys)}/{len(keep10)} kept samples "
        f"came{'' if exact else ', NOT exactly the kept ones'}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few thousand samples, for a smoke run")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: found or bundled)")
    p.add_argument("--repeat", type=int, default=None, help="timings per pipeline, best kept (default 3; 1 quick)")
    p.add_argument(
        "--http", action="store_true", help="also read the shards over http from a local server (tests/http_server.py)"
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --http: also run with this delay per request, server-side (default 0: none)",
    )
    args = p.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    print(
        f"data: Fashion-MNIST from {fashion_mnist_dir(args.data_dir)}; {os.cpu_count()} CPUs; "
        f"python {sys.version.split()[0]}; webdataset {wds.__version__}"
    )
    ensure_ray()
    latencies = (0.0, args.latency) if args.latency > 0 else (0.0,)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        sets = shard_sets(
            work, 2000 if args.quick else None, n_big=500 if args.quick else 10000, data_dir=args.data_dir
        )
        server = None
        if args.http:
            sys.path.insert(0, str(TESTS))
            from http_server import serve_process  # its own process: the client does not share its GIL

            server = stack.enter_context(serve_process(work))
        return [bench(name, paths, work, repeat, server=server, latencies=latencies) for name, paths in sets.items()]


if __name__ == "__main__":
    main()
