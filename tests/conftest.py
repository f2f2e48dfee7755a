"""Shared fixtures: one real local Ray instance per test session, real Fashion-MNIST shards."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
