"""Shared fixtures: one real local Ray instance per test session, real Fashion-MNIST shards,
a real local HTTP file server, an index built without Ray, and the builders several test
modules share (handed out by fixtures: test modules never import each other)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from s3_server import environment, free_port

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Every AWS client of the session (this process, the subprocesses and Ray workers it starts) talks
# to the `s3_server` fixture's port, never to real AWS: set before any of them starts.
_S3_PORT = free_port()
os.environ.update(environment(f"http://127.0.0.1:{_S3_PORT}"))

SLOW_MODULES = {"test_benchmarks", "test_record", "test_evaluate", "test_cli", "test_own_loop", "test_inputs"}


def _deselects_slow(markexpr: str) -> bool:
    """Whether `-m markexpr` deselects every test marked `slow` (as the fast tier's does)."""
    if not markexpr:
        return False
    from _pytest.mark.expression import Expression

    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", markexpr)) - {"and", "or", "not", "slow"}
    return not any(  # false whatever other marks a slow test has
        Expression.compile(markexpr).evaluate(lambda name, on=on: name == "slow" or name in on)
        for on in (set(c) for r in range(len(names) + 1) for c in itertools.combinations(sorted(names), r))
    )


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown under `-p no:xdist`
def pytest_xdist_make_scheduler(config, log):
    """The fast tier under `-n N` (xdist's `--dist load`, `-m` deselecting `slow`) hands each
    file's tests to one worker, as `--dist loadfile` does: module-scoped fixtures (shard sets,
    servers, test_resume's resumed epochs) are built once, not by every worker that got some of
    a module's tests. Full runs keep xdist's per-test balancing (their long modules)."""
    if config.getoption("dist") != "load" or not _deselects_slow(config.getoption("markexpr")):
        return None
    from xdist.scheduler import LoadFileScheduling

    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(items):
    """Mark `ray` every test that uses the Ray session, and `slow` those of the training and
    benchmark modules, so that `pytest -m "not ray"` runs the pure tests alone in seconds."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Ray workers import remote functions defined in test modules: let them find tests/.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


FMNIST_SAMPLES = 1200  # the `fmnist` fixture's samples


def _first_idx_records(path: Path, n: int) -> np.ndarray:
    """The first `n` records of a gzip-compressed uint8 IDX file (Fashion-MNIST's), decompressing
    only them: the full training set is 60,000 images, and each xdist worker would unpack it all."""
    import gzip

    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        assert magic[:3] == b"\x00\x00\x08", f"{path}: not a uint8 IDX file"
        dims = [int.from_bytes(f.read(4), "big") for _ in range(magic[3])]
        assert dims[0] >= n, f"{path}: {dims[0]} records, fewer than {n}"
        size = int(np.prod(dims[1:], dtype=np.int64))
        return np.frombuffer(f.read(n * size), dtype=np.uint8).reshape(n, *dims[1:]).copy()


@pytest.fixture(scope="session")
def fmnist():
    """The first 1,200 real Fashion-MNIST training images and labels (bundled or full set):
    `load_fashion_mnist("train")[:1200]`, read without unpacking the rest."""
    from streamprune.demo.datasets import fashion_mnist_dir

    d = fashion_mnist_dir()
    return tuple(
        _first_idx_records(d / f"{name}.gz", FMNIST_SAMPLES)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    )


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory, fmnist):
    """Six deliberately uneven PNG shards of real Fashion-MNIST images."""
    from streamprune.demo.datasets import shard_sizes, write_shards

    images, labels = fmnist
    out = tmp_path_factory.mktemp("shards")
    sizes = shard_sizes(len(images), 6, uneven=True, seed=1)
    return write_shards(images, labels, out, sizes=sizes), sizes


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A real HTTP file server on 127.0.0.1 (tests/http_server.py: aiohttp's static files,
    HEAD, GET and `Range: bytes=a-b` -> 206), one per session, serving `server.root`, a
    per-session tmp dir. Copy files into `server.root` and read `f"{server.url}/<name>"`.

    Failures by URL: `/flaky/<name>` (first request per method, name and Range header: 503),
    `/fail-after/<N>/<name>` (ranges from byte N: 500; longer transfers cut at byte N),
    `/cut-once/<N>/<name>` (the first transfer past byte N is cut there, once per name).
    Counters since the last `server.reset()`: `requests`, `range_requests`, `bytes_sent`
    (response body bytes), and `log`. Shared by the session: call `server.reset()` first
    (it also forgets seen flaky/cut-once requests), use file names of your own, and put
    `server.latency` (seconds per request) back to 0 if you change it.
    """
    from http_server import serve

    with serve(tmp_path_factory.mktemp("www")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on 127.0.0.1 (tests/s3_server.py: moto's server mode), one per session,
    at the `AWS_ENDPOINT_URL` every AWS client of the session reads. Make a bucket of your own
    (`server.make_bucket(name) -> "s3://name"`); `server.reset()` zeroes the counters
    (`requests`, `gets`, `bytes_sent`: GET body bytes, `log`)."""
    from s3_server import serve

    with serve(_S3_PORT) as server:
        yield server


def _wait_for_a_recorded_epoch(proc: subprocess.Popen, stats: str, seconds: float) -> None:
    """Wait until `record` (process `proc`) has completely recorded an epoch into store `stats`
    (a path or URL), or ended, or `seconds` passed."""
    import time

    from streamprune.formats.stats_store import StatsStore

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if StatsStore.open(stats, mode="r").complete_epochs() >= 1:
                return
        except (FileNotFoundError, ValueError, KeyError, OSError):  # not created yet, or mid-creation
            pass
        time.sleep(0.2)


@pytest.fixture(scope="session")
def wait_for_a_recorded_epoch():
    """`wait_for_a_recorded_epoch(proc, stats, seconds)`: until `record` in process `proc` has
    completely recorded an epoch into `stats`, ended, or `seconds` passed (then check proc.poll())."""
    return _wait_for_a_recorded_epoch


@pytest.fixture(scope="session")
def make_index():
    """`make_index(shards, run, **kw) -> Index`: `run/index` written in this process, without Ray
    (`streamprune.index_in_process`: the same index as `streamprune.index`), for tests whose
    subject is not the index stage, so that they need no Ray."""
    from streamprune.training.own_loop import index_in_process

    return index_in_process


def _content(samples) -> list[dict]:
    """Samples without where they were read from (`__url__`, `__local_path__`)."""
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in samples]


def _kept(samples: list[dict], keep) -> list[dict]:
    """The samples (as webdataset yields them) that `keep` keeps."""
    return [s for s in samples if (os.path.basename(s["__url__"]), s["__key__"]) in keep]


@pytest.fixture(scope="session")
def sample_content():
    """`sample_content(samples) -> list[dict]`: samples without `__url__` and `__local_path__`."""
    return _content


@pytest.fixture(scope="session")
def kept_samples():
    """`kept_samples(samples, keep) -> list[dict]`: the samples a keep-list keeps, in order."""
    return _kept


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width x height` greyscale pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1024))) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def png_claiming():
    """`png_claiming(width, height) -> bytes`: a small PNG claiming a huge size."""
    return _png_claiming


@pytest.fixture(scope="session")
def ray_python(ray_session):
    """`ray_python(code, **popen_kwargs) -> Popen`: `code` run by another Python process joined to
    the session's Ray instance, with text stdout and stderr piped."""
    address = ray_session.get_runtime_context().gcs_address

    def run(code: str, **kwargs) -> subprocess.Popen:
        prelude = f"import ray, streamprune; ray.init(address={address!r}, logging_level='ERROR')\n"
        return subprocess.Popen(
            [sys.executable, "-c", prelude + code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )

    return run


SYNTHETIC_EPOCHS = 12  # T, the epochs of a synthetic run


def _synthetic_stats(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Learning-curve-like statistics; a tenth of the samples never change (DUAL = 0)."""
    T = SYNTHETIC_EPOCHS
    a, b = rng.normal(-1, 1, n), rng.uniform(0, 0.6, n)
    logit = a[:, None] + b[:, None] * np.arange(T) + rng.normal(0, 0.5, (n, T))
    logit[: n // 10] = 2.0
    p = 1 / (1 + np.exp(-logit))
    return {
        "p_true": p.astype(np.float32),
        "correct": (p > 0.5).astype(np.uint8),
        "margin": logit.astype(np.float32),
        "el2n": (1 - p).astype(np.float32) * 1.2,
        "entropy": (-p * np.log(p) - (1 - p) * np.log(1 - p)).astype(np.float32),
        "loss": -np.log(p).astype(np.float32),
    }


def _synthetic_labels(n: int) -> np.ndarray:
    """Ten uneven classes: class 9 holds about 4/13 of the samples, the others 1/13 each."""
    return np.minimum(np.arange(n) % 13, 9).astype(np.int32)


@pytest.fixture(scope="session")
def synthetic():
    """Synthetic statistics: `.epochs` (T), `.stats(n, rng)` (T epochs of each statistic) and
    `.labels(n)` (ten uneven classes)."""
    return SimpleNamespace(epochs=SYNTHETIC_EPOCHS, stats=_synthetic_stats, labels=_synthetic_labels)


@pytest.fixture(scope="session")
def synthetic_run(ray_session):
    """`synthetic_run(run, paths, seed) -> (index, stats)`: an index of `paths` under `run` (on
    Ray) and a complete store of T epochs of synthetic statistics (labels from `.labels`)."""
    from streamprune import index
    from streamprune.formats.stats_store import STATS, ChunkWriter, StatsStore
    from streamprune.scoring.columns import LABEL

    def build(run: Path, paths: list[str], seed: int):
        idx = index(paths, run, progress=False)
        store = StatsStore.create(run / "stats.zarr", idx, epochs=SYNTHETIC_EPOCHS, chunk_rows=64)
        stats = _synthetic_stats(idx.n_samples, np.random.default_rng(seed))
        rows = np.arange(idx.n_samples)
        labels = _synthetic_labels(idx.n_samples)
        for t in range(SYNTHETIC_EPOCHS):
            w = ChunkWriter(store, range(store.n_chunks), t)
            w.add(rows, {**{n: stats[n][:, t] for n in STATS}, LABEL: labels})
            w.flush()
            store.mark_done(t, np.arange(idx.n_shards))
        return idx, stats

    return build
