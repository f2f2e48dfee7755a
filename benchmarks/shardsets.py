"""The real shard sets the benchmarks share: Fashion-MNIST as 28 px PNGs (members as small as a
tar header) and the same images 4x upscaled as RGB `npy` (37 KB members, closer to web images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamprune.demo import load_fashion_mnist, shard_sizes, write_shards


def shard_sets(
    work: Path, n: int | None = None, n_big: int = 10000, data_dir: str | None = None
) -> dict[str, list[str]]:
    """Write both sets under `work` (uneven shard sizes, ~1,000 samples each); `n` limits the PNG set."""
    images, labels = load_fashion_mnist("train", data_dir)
    n = len(images) if n is None else min(n, len(images))
    m = min(n, n_big)
    png = write_shards(images[:n], labels[:n], work / "png", sizes=shard_sizes(n, max(4, n // 1000), uneven=True))
    big = np.repeat(np.repeat(images[:m], 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=3)
    npy = write_shards(
        big, labels[:m], work / "npy", sizes=shard_sizes(m, max(4, m // 1000), uneven=True), image_format="npy"
    )
    return {"png-28px": png, "npy-112px": npy}
