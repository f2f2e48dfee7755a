"""The `streamprune` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def index_summary(idx) -> str:
    m = idx.manifest
    lines = [f"index: {idx.path}",
             f"  shards {m['n_shards']}  samples {m['n_samples']}  members {m['n_members']}  "
             f"fingerprint {m['fingerprint']}"]
    if m["bytes_total"]:
        lines.append(f"  read {m['bytes_read']:,} of {m['bytes_total']:,} bytes "
                     f"({m['bytes_read'] / m['bytes_total']:.1%}: tar headers only where seekable)")
    for b in m["broken"]:
        lines.append(f"  BROKEN {b['shard']}: {b['error']}")
    if m["empty"]:
        lines.append(f"  empty shards ({len(m['empty'])}): {', '.join(m['empty'][:10])}")
    if m["duplicates"]["rows"]:
        ex = ", ".join(f"{e['shard']}:{e['key']}" for e in m["duplicates"]["examples"][:5])
        lines.append(f"  DUPLICATE identities: {m['duplicates']['rows']} rows share an identity (e.g. {ex})")
    return "\n".join(lines)


def cmd_index(args) -> None:
    from .indexer import index

    idx = index(args.shards, args.out, root=args.root, identity=args.identity, address=args.address,
                progress=not args.quiet)
    print(index_summary(idx))


def cmd_make_shards(args) -> None:
    from .datasets import fashion_mnist_shards

    paths, source = fashion_mnist_shards(args.out, split=args.split, data_dir=args.data_dir, n_shards=args.shards,
                                         uneven=args.uneven, limit=args.limit, image_format=args.format,
                                         seed=args.seed)
    print(f"wrote {len(paths)} shards of Fashion-MNIST {args.split} from {source} to {args.out}")


def record_line(s) -> str:
    if not s.epochs_run:
        return f"record: all {s.epochs_done} epochs of {s.run} were already recorded"
    rate = s.samples / max(sum(s.epoch_seconds), 1e-9)
    return (f"record: epochs {s.epochs_run[0]}..{s.epochs_run[-1]} of {s.run} done in {sum(s.epoch_seconds):.1f} s "
            f"({rate:,.0f} samples/s); {s.epochs_done} epochs recorded")


def reduce_line(keep, out) -> str:
    m = keep.manifest
    return (f"reduce: {m['method']} at ratio {m['ratio']}: kept {m['k']:,} of {m['N']:,} samples "
            f"({m['dropped_missing']:,} with missing statistics left out"
            + (f", {m['filled_zero_weight']:,} filled uniformly from zero weights" if m["filled_zero_weight"] else "")
            + f"); keep-list: {out}")


def cmd_demo(args) -> None:
    from .datasets import fashion_mnist_shards
    from .indexer import index
    from .recorder import record
    from .reducer import reduce

    out = Path(args.out)
    run = out / "run"
    t0 = time.perf_counter()
    paths, source = fashion_mnist_shards(out / "shards", data_dir=args.data_dir, uneven=True, limit=args.samples,
                                         progress=not args.quiet)
    t1 = time.perf_counter()
    print(f"shards: {len(paths)} uneven WebDataset shards of Fashion-MNIST from {source} ({t1 - t0:.1f} s)")
    print(index_summary(index(paths, run, address=args.address, progress=not args.quiet)))
    t2 = time.perf_counter()
    print(f"index: {t2 - t1:.1f} s")
    summary = record(run, args.epochs, schedule_epochs=max(args.epochs, 3 * args.epochs), num_classes=10,
                     address=args.address, progress=not args.quiet)
    t3 = time.perf_counter()
    print(record_line(summary) + f" ({t3 - t2:.1f} s with start-up)")
    keep = reduce(run, args.ratio, "dual-beta", window=min(10, args.epochs), progress=not args.quiet)
    print(reduce_line(keep, run / "keep") + f" ({time.perf_counter() - t3:.1f} s)")
    print(f"\nnext: PrunedWebDataset('{out / 'shards'}/train-*.tar', keep='{run / 'keep'}', shardshuffle=100)")


def cmd_record(args) -> None:
    from .recorder import record

    print(record_line(record(args.run, args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              model=args.model, address=args.address, batch_size=args.batch_size, lr=args.lr,
                              schedule_epochs=args.schedule_epochs, seed=args.seed, num_classes=args.num_classes,
                              loader_workers=args.loader_workers, max_failures=args.max_failures,
                              progress=not args.quiet)))


def cmd_reduce(args) -> None:
    from .reducer import reduce

    keep = reduce(args.run, args.ratio, args.method, seed=args.seed, epochs=args.epochs, window=args.window,
                  workers=args.workers, block_rows=args.block_rows, out=args.out, missing=args.missing,
                  c_d=args.c_d, C=args.C, alpha_plus_beta=args.alpha_plus_beta, cut=args.cut, address=args.address,
                  which=args.scores, progress=not args.quiet)
    print(reduce_line(keep, args.out or Path(args.run) / "keep"))


def cmd_reshard(args) -> None:
    from .resharder import reshard

    paths = reshard(args.run, args.out, args.shard_size, keep=args.keep, prefix=args.prefix, address=args.address,
                    progress=not args.quiet)
    print(f"reshard: {len(paths)} shards in {args.out} ({args.prefix}-000000.tar ...)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="streamprune", description=__doc__)
    p.add_argument("--version", action="version", version=f"streamprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="scan shards in parallel and write RUN/index")
    s.add_argument("shards", nargs="+", help="shard URLs: paths, braces, globs, file://, pipe:, fsspec URLs")
    s.add_argument("--out", required=True, help="run directory (the index goes to OUT/index)")
    s.add_argument("--root", help="dataset root that shard names are relative to (default: common directory)")
    s.add_argument("--identity", default=None,
                   help="'shard-key' (default), 'json:FIELD' (e.g. json:uid) or 'package.module:function'")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("record", help="train the proxy on Ray and record per-sample statistics")
    s.add_argument("run", help="run directory holding RUN/index")
    s.add_argument("--epochs", type=int, required=True, help="epochs to run and record (T)")
    s.add_argument("--workers", type=int, help="training workers (default: one per GPU, else CPUs/2 up to 4)")
    s.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    s.add_argument("--model", help="small-cnn, resnet18 or package.module:factory (default: by image size)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--schedule-epochs", type=int, default=200, help="length of the full cosine schedule")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-classes", type=int, help="default: from the labels of the first shards")
    s.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per training worker")
    s.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_record)

    s = sub.add_parser("reduce", help="score samples and write the keep-list")
    s.add_argument("run", help="run directory with RUN/index and RUN/stats.zarr")
    s.add_argument("--ratio", type=float, required=True, help="pruning ratio r in [0, 1): the fraction removed")
    s.add_argument("--method", default="dual-beta",
                   help="dual-beta (default), dual, dyn-unc, el2n, forgetting, entropy, aum, ccs:SCORE, random")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--epochs", type=int, help="recorded epochs to use (T; default: all complete ones)")
    s.add_argument("--window", type=int, default=10, help="window length J of DUAL and Dyn-Unc (default 10)")
    s.add_argument("--workers", type=int, help="reducer tasks in flight (default: the cluster's CPUs)")
    s.add_argument("--block-rows", type=int, help="rows per task (rounded to whole store chunks; default 262144)")
    s.add_argument("--out", help="keep-list directory (default RUN/keep)")
    s.add_argument("--missing", default="drop", choices=["drop", "error"],
                   help="samples with missing statistics: leave out (counted) or refuse")
    s.add_argument("--c-d", dest="c_d", type=float, default=4.0, help="Beta sampler c_d (default 4)")
    s.add_argument("--C", dest="C", type=float, default=15.0, help="Beta sampler C (default 15)")
    s.add_argument("--alpha-plus-beta", type=float, help="alpha + beta (default C + 1, as the reference code)")
    s.add_argument("--cut", type=float, default=0.2, help="CCS: hardest fraction dropped first (default 0.2)")
    s.add_argument("--scores", default="all", choices=["all", "method"],
                   help="write every score to RUN/scores.zarr (default), or only what the method needs (faster)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_reduce)

    s = sub.add_parser("reshard", help="write the kept samples as new shards (Ray tasks)")
    s.add_argument("run", help="run directory with RUN/index and RUN/keep")
    s.add_argument("--out", required=True, help="output directory for the new shards")
    s.add_argument("--shard-size", type=int, help="samples per output shard (default: the input's mean)")
    s.add_argument("--keep", help="keep-list directory (default RUN/keep)")
    s.add_argument("--prefix", default="pruned", help="output shard names PREFIX-NNNNNN.tar (default pruned)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_reshard)

    s = sub.add_parser("make-shards", help="write Fashion-MNIST as WebDataset shards")
    s.add_argument("--out", required=True)
    s.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: found or bundled)")
    s.add_argument("--split", default="train", choices=["train", "test"])
    s.add_argument("--shards", type=int, help="number of shards (default: one per ~1000 samples)")
    s.add_argument("--uneven", action="store_true", help="deliberately uneven shard sizes")
    s.add_argument("--format", default="png", choices=["png", "npy"])
    s.add_argument("--limit", type=int, help="only the first N samples")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_make_shards)

    s = sub.add_parser("demo", help="the whole job offline on real Fashion-MNIST shards")
    s.add_argument("--out", default="streamprune-demo")
    s.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: found or bundled)")
    s.add_argument("--samples", type=int, default=6000, help="training images to use (default 6000)")
    s.add_argument("--epochs", type=int, default=10, help="proxy epochs to record (default 10)")
    s.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (default 0.5)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        print(f"streamprune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
