"""index -> record -> reduce on an existing Ray cluster whose nodes share no filesystem.

Start Ray on the nodes (`ray start --head` / `ray start --address HEAD:6379`) and install
streamprune on every node. Put the shards and RUN in object storage (`s3://`, `gs://`, `az://`;
credentials and endpoint from each node's standard environment, e.g. `AWS_ENDPOINT_URL`,
profiles, instance roles); a filesystem every node sees works too. Then, on any node:

    python examples/ray_cluster.py --address auto --shards 's3://bucket/ds/train-{000000..009999}.tar' \
        --run s3://bucket/runs/ds --epochs 10 --ratio 0.7 --workers 8

Every node writes its own rows' chunks straight to RUN; no node needs another's disk, and a
killed run resumes from RUN alone.
"""

from __future__ import annotations

import argparse

import streamprune


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--address", required=True, help="Ray cluster address: auto (on a node) or ray://HEAD:10001")
    p.add_argument("--shards", required=True, help="shard URLs (braces, globs, s3://, pipe:)")
    p.add_argument("--run", required=True, help="run directory: an object-store URL, or a filesystem every node sees")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--workers", type=int, help="training workers (default: one per GPU)")
    p.add_argument("--schedule-epochs", type=int, help="the cosine schedule's length (default 200)")
    p.add_argument("--identity", help="e.g. json:uid for DataComp-style datasets")
    args = p.parse_args()

    idx = streamprune.index(args.shards, args.run, identity=args.identity, address=args.address)
    print(f"indexed {idx.n_samples:,} samples in {idx.n_shards:,} shards")
    summary = streamprune.record(
        args.run,
        epochs=args.epochs,
        shards=args.shards,  # a remote URL stored in a run is opened only when given
        **({} if args.schedule_epochs is None else {"schedule_epochs": args.schedule_epochs}),
        workers=args.workers,
        address=args.address,
    )
    print(f"recorded epochs {summary.epochs_run}; samples/s per worker {summary.samples_per_s_per_worker}")
    keep = streamprune.reduce(args.run, ratio=args.ratio, method="dual-beta", address=args.address)
    print(f"keep-list: {len(keep):,} samples in {streamprune.storage.join(args.run, 'keep')}")


if __name__ == "__main__":
    main()
