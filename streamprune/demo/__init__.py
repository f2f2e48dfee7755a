"""Demo data: the Fashion-MNIST files (full, or the real subset bundled in the package) as
WebDataset shards, and web-like shards of mixed image sizes for tests and benchmarks."""

from streamprune.demo.datasets import (
    CLASSES,
    encode_png,
    fashion_mnist_classes,
    fashion_mnist_dir,
    fashion_mnist_shards,
    load_fashion_mnist,
    shard_sizes,
    weblike_sample,
    weblike_shards,
    write_shards,
)

__all__ = [
    "CLASSES",
    "encode_png",
    "fashion_mnist_classes",
    "fashion_mnist_dir",
    "fashion_mnist_shards",
    "load_fashion_mnist",
    "shard_sizes",
    "weblike_sample",
    "weblike_shards",
    "write_shards",
]
