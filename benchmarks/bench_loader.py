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

`--s3` adds the same over `s3://` URLs: the shards uploaded to a real S3 server (moto's server
mode, tests/s3_server.py, in a child process, found through AWS_ENDPOINT_URL): keep 100% against
webdataset reading each object through a `pipe:` command that streams it with boto3 (webdataset
has no s3 handler of its own; the pipe is what its documentation suggests) and against webdataset
with an in-process fsspec (s3fs) stream registered for `s3`, and bytes the server sent for a keep-10%
and a keep-100% pass against the shards' total (goals <= 15% and about 1x). Use it with `--quick`
(moto keeps objects in memory and serves them from Python).

    python benchmarks/bench_loader.py [--quick] [--data-dir DIR] [--http [--latency 0.02]] [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from s3_process import TESTS, S3Process, serve_s3_process
from shardsets import shard_sets

from streamprune import KeepList, PrunedWebDataset, ensure_ray, index
from streamprune.demo import fashion_mnist_dir


def _run(ds) -> tuple[int, float]:
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return n, time.perf_counter() - t


def bench(
    name: str,
    paths: list[str],
    work: Path,
    repeat: int,
    seed: int = 0,
    server=None,
    latencies: tuple[float, ...] = (),
    s3: Any = None,
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
        "bytes_read_keep10": probe.read_counts.bytes_read / sum(os.path.getsize(p) for p in paths),
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
    if s3 is not None:
        row["s3"] = bench_s3(name, paths, s3, keep_all, keep10, kept_keys, ext, handlers, repeat, row["MB"] * 1e6)
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
        "bytes_requested_keep10": getattr(probe.read_counts, "bytes_requested", 0) / total,
        "bytes_received_keep10": getattr(probe.read_counts, "bytes_received", 0) / total,
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


# A `pipe:` command streaming one object (`bucket/key`) to stdout with boto3, as webdataset reads s3.
_S3_PIPE = (
    "import boto3, shutil, sys; bucket, key = sys.argv[1].split('/', 1); "
    "shutil.copyfileobj(boto3.client('s3').get_object(Bucket=bucket, Key=key)['Body'], sys.stdout.buffer, 1 << 20)"
)


@contextlib.contextmanager
def _wds_reads_s3_with_fsspec() -> Iterator[None]:
    """webdataset's `gopen` with an `s3` handler that opens the object as an fsspec (s3fs) stream."""
    import fsspec

    schemes = sys.modules["webdataset.gopen"].gopen_schemes  # `webdataset.gopen` is also a function's name
    schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    try:
        yield
    finally:
        del schemes["s3"]


def bench_s3(
    name: str,
    paths: list[str],
    server: S3Process,
    keep_all: KeepList,
    keep10: KeepList,
    kept_keys: set[str],
    ext: str,
    handlers: tuple,
    repeat: int,
    total: float,
) -> dict:
    """The loader over s3:// URLs (the shards uploaded to `server`): keep 100% against webdataset
    (a boto3 `pipe:`; an fsspec stream) in the same run, and the bytes the server sent."""
    import s3fs

    bucket = "bench-loader"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with contextlib.suppress(FileExistsError):
        fs.mkdir(bucket)
    keys = [f"{bucket}/{name}/{os.path.basename(p)}" for p in paths]
    for p, key in zip(paths, keys, strict=True):
        fs.put(p, key)
    urls = [f"s3://{key}" for key in keys]
    pipes = [f"pipe:{shlex.quote(sys.executable)} -c {shlex.quote(_S3_PIPE)} {shlex.quote(key)}" for key in keys]
    decode: Callable[[Any], Any] = lambda ds: ds.decode(*handlers).to_tuple(ext, "cls")
    pipelines = {
        "wds-pipe": lambda: decode(wds.WebDataset(pipes, shardshuffle=False)),
        "wds-fsspec": lambda: decode(wds.WebDataset(urls, shardshuffle=False)),
        "pruned-100": lambda: decode(PrunedWebDataset(urls, keep=keep_all, shardshuffle=False)),
        "pruned-10": lambda: decode(PrunedWebDataset(urls, keep=keep10, shardshuffle=False)),
    }
    best = {k: float("inf") for k in pipelines}
    counts, sent, gets = {}, {}, {}
    with _wds_reads_s3_with_fsspec():
        for _ in range(repeat):
            for k, make in pipelines.items():
                server.reset()
                counts[k], t = _run(make())
                best[k], sent[k], gets[k] = min(best[k], t), server.bytes_sent, server.gets
    assert counts["wds-pipe"] == counts["wds-fsspec"] == counts["pruned-100"] == len(keep_all), counts
    assert counts["pruned-10"] == len(keep10), counts
    server.reset()  # an undecoded keep-10% pass: which samples came, and what the server sent for them
    came = [s["__key__"] for s in PrunedWebDataset(urls, keep=keep10, shardshuffle=False)]
    probe_sent, probe_gets = server.bytes_sent, server.gets
    exact = len(came) == len(keep10) and set(came) == kept_keys
    sps = {k: counts[k] / best[k] for k in pipelines}
    row = {
        "set": name,
        "shards": len(urls),
        "kept10": len(keep10),
        "kept10_exact": exact,
        **{f"{k}_sps": v for k, v in sps.items()},
        "ratio_keep100_vs_pipe": sps["pruned-100"] / sps["wds-pipe"],
        "ratio_keep100_vs_fsspec": sps["pruned-100"] / sps["wds-fsspec"],
        "bytes_sent_keep10": probe_sent / total,
        "gets_keep10": probe_gets,
        "bytes_sent_keep100": sent["pruned-100"] / total,
        "gets_keep100": gets["pruned-100"],
        "bytes_sent_wds": sent["wds-fsspec"] / total,
        "gets_wds": gets["wds-fsspec"],
    }
    print(
        f"{name:>10} s3: keep 100%: pruned {sps['pruned-100']:,.0f} samples/s vs webdataset pipe:boto3 "
        f"{sps['wds-pipe']:,.0f} = x{row['ratio_keep100_vs_pipe']:.2f}, vs webdataset+fsspec "
        f"{sps['wds-fsspec']:,.0f} = x{row['ratio_keep100_vs_fsspec']:.2f}; server sent "
        f"{row['bytes_sent_keep100']:.1%} of total in {gets['pruned-100']} GETs (webdataset "
        f"{row['bytes_sent_wds']:.1%} in {gets['wds-fsspec']}) | keep 10%: "
        f"server sent {row['bytes_sent_keep10']:.1%} of total in {probe_gets} GETs; {len(came)}/{len(keep10)} "
        f"kept samples came{'' if exact else ', NOT exactly the kept ones'}",
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
    p.add_argument(
        "--s3", action="store_true", help="also read the shards as s3:// objects from a local S3 server (moto)"
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
        s3 = stack.enter_context(serve_s3_process()) if args.s3 else None
        return [
            bench(name, paths, work, repeat, server=server, latencies=latencies, s3=s3) for name, paths in sets.items()
        ]


if __name__ == "__main__":
    main()
