"""The whole job through the Python API, on real Fashion-MNIST shards, on a local Ray instance.

python examples/end_to_end.py [--out /tmp/sp-example] [--samples 4000] [--epochs 6] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamprune
from streamprune import train_subset
from streamprune.demo import fashion_mnist_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/sp-example")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ratio", type=float, default=0.5)
    args = p.parse_args()
    out = Path(args.out)

    train, _ = fashion_mnist_shards(out / "shards", limit=args.samples, uneven=True)
    test, _ = fashion_mnist_shards(out / "test-shards", split="test", limit=1000)
    run = out / "run"
    streamprune.index(train, run)  # 1. which samples exist
    streamprune.record(run, epochs=args.epochs, schedule_epochs=3 * args.epochs, num_classes=10)  # 2. statistics
    keep = streamprune.reduce(
        run,
        ratio=args.ratio,
        method="dual-beta",  # 3. DUAL + Beta keep-list
        window=min(10, args.epochs),
    )
    print(f"kept {len(keep):,} samples; e.g. {keep.names[0]}: {keep.kept_count(keep.names[0])} kept")

    # 4. apply it: a drop-in for webdataset.WebDataset that never reads pruned bytes
    ds = streamprune.PrunedWebDataset(train, keep=keep, shardshuffle=100).decode("pil").to_tuple("png", "cls")
    print(f"loader yields {sum(1 for _ in ds):,} samples")

    result = train_subset(train, test, keep, epochs=5)  # a fresh model on the kept subset
    print(f"test accuracy after 5 epochs on the kept subset: {result.test_accuracy:.3f}")
    paths = streamprune.reshard(run, out / "pruned-shards", shard_size=1000)  # optional: new, smaller shards
    print(f"resharded into {len(paths)} shards under {out / 'pruned-shards'}")


if __name__ == "__main__":
    main()
