"""Shared fixtures: one real local Ray instance per test session, real Fashion-MNIST shards,
a real local HTTP file server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SLOW_MODULES = {"test_benchmarks", "test_record", "test_evaluate", "test_cli", "test_own_loop", "test_inputs"}


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


@pytest.fixture(scope="session")
def fmnist():
    """The first 1,200 real Fashion-MNIST training images and labels (bundled or full set)."""
    from streamprune.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    return images[:1200], labels[:1200]


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory, fmnist):
    """Six deliberately uneven PNG shards of real Fashion-MNIST images."""
    from streamprune.datasets import shard_sizes, write_shards

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
