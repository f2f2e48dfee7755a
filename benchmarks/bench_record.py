"""Record overhead: training samples/s with recording against the same loop without it.

Both runs use the same shards, model, workers and recipe, in one process and one Ray
instance; the ratio (goal >= 0.97) is what counts on a shared, noisy machine. Runs
alternate (without, with, without, with) and each mode's best is kept. The same holds for the
logging overhead in your own loop: one plain loop (IndexedShards, small CNN, SGD) with and
without a StatsLogger (goal >= 0.97, i.e. at most 3% slower). Web-like JPEGs (real images
resized to 256-512 px, mixed modes, JSON labels): decoding samples/s per DataLoader worker
with streamprune's view (random resized crop to 64 px) against webdataset's PIL decoding and a
plain resize in the same process, then `record --label json:label --image-size 64` end to end.

    python benchmarks/bench_record.py [--quick] [--samples N] [--epochs T] [--workers W] [--device cpu|cuda]
                                      [--only overhead|own-loop|web]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from streamprune import ensure_ray, index, record
from streamprune.demo import fashion_mnist_shards


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", choices=["overhead", "own-loop", "web"], help="run one section")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.epochs, args.repeats = 1200, 1, 1
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, source = fashion_mnist_shards(
            tmp / "shards", n_shards=max(4, args.samples // 1000), uneven=True, limit=args.samples, progress=False
        )
        index(paths, tmp / "base", progress=False)
        out: dict = {}
        if args.only in (None, "overhead"):
            out.update(overhead(tmp, args, source))
        if args.only in (None, "own-loop"):
            out["own_loop"] = own_loop(tmp, args)
        if args.only in (None, "web"):
            out["web"] = web(tmp, args)
        return out


def overhead(tmp: Path, args, source) -> dict:
    """`record` with and without writing statistics, alternating; each mode's best."""
    gpus = 1.0 if args.device == "cuda" else 0.0
    best = {"without": 0.0, "with": 0.0}
    per_worker = {}
    for rep in range(args.repeats):
        for mode in ("without", "with"):
            run = tmp / f"{mode}-{rep}"
            shutil.copytree(tmp / "base", run)
            s = record(
                run,
                args.epochs,
                workers=args.workers,
                gpus_per_worker=gpus,
                model=args.model,
                schedule_epochs=max(10, args.epochs),
                loader_workers=1,
                record_stats=mode == "with",
                progress=False,
                num_classes=10,
            )
            rate = s.samples / sum(s.epoch_seconds)
            print(
                f"  {mode:>7} recording, run {rep}: {rate:,.0f} samples/s "
                f"({', '.join(f'{x:,.0f}' for x in s.samples_per_s_per_worker)} per worker-epoch)",
                flush=True,
            )
            if rate > best[mode]:
                best[mode], per_worker[mode] = rate, s.samples_per_s_per_worker
    ratio = best["with"] / best["without"]
    print(
        f"record overhead: {args.samples} samples from {source}, {args.workers} workers on {args.device}, "
        f"{args.epochs} epochs x {args.repeats} runs each | with recording {best['with']:,.0f} samples/s, "
        f"without {best['without']:,.0f} samples/s | ratio {ratio:.3f} (goal >= 0.97)"
    )
    return {"ratio": ratio, **best, "per_worker_with": per_worker["with"]}


def web(tmp: Path, args) -> dict:
    """Web-like JPEG shards: decode samples/s in one process (a DataLoader worker's share) with
    streamprune's view against webdataset's PIL decoding plus a plain resize; then `record`."""
    from collections import Counter

    import numpy as np
    import torch
    import webdataset as wds

    from streamprune import Classes, LabelSpec
    from streamprune.demo import load_fashion_mnist, weblike_shards
    from streamprune.training.decode import SampleDecoder, View

    images, labels = load_fashion_mnist("train")
    n = min(args.samples, len(images)) // 4
    paths = weblike_shards(images[:n], labels[:n], tmp / "web", n_shards=4, sizes=(256, 512))
    view = View(3, 64, 64, True)
    names = Counter(LabelSpec("json:label")(s) for s in wds.WebDataset(paths, shardshuffle=False))
    decoder = SampleDecoder(view, "json:label", Classes.from_labels(names, "json:label"))
    rng = np.random.default_rng(0)

    def ours():
        for s in wds.WebDataset(paths, shardshuffle=False):
            decoder(s, rng)

    def baseline():  # what one writes by hand: PIL decode, RGB, resize, tensor
        for s in wds.WebDataset(paths, shardshuffle=False).decode("pil"):
            img = next(v for k, v in s.items() if k in ("jpg", "png")).convert("RGB").resize((64, 64))
            torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {"streamprune": 0.0, "webdataset": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("webdataset", baseline), ("streamprune", ours)):
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    torch.set_num_threads(threads)
    ratio = best["streamprune"] / best["webdataset"]
    print(
        f"web-like decoding: {n} JPEG/PNG samples of 256-512 px to 64 x 64, one process | streamprune "
        f"{best['streamprune']:,.0f} samples/s, webdataset .decode('pil') + resize {best['webdataset']:,.0f} "
        f"samples/s | ratio {ratio:.2f}"
    )
    index(paths, tmp / "web-run", progress=False)
    model = args.model or ("small-cnn" if args.quick else None)
    gpus = 1.0 if args.device == "cuda" else 0.0
    s = record(
        tmp / "web-run",
        args.epochs,
        workers=args.workers,
        gpus_per_worker=gpus,
        model=model,
        schedule_epochs=max(10, args.epochs),
        loader_workers=1,
        label="json:label",
        image_size=64,
        progress=False,
    )
    rate = s.samples / sum(s.epoch_seconds)
    print(
        f"web-like record: {n} samples, --label json:label --image-size 64 ({s.inputs}), model "
        f"{model or 'default (resnet18)'}, {args.workers} workers on {args.device}: {rate:,.0f} samples/s "
        f"({', '.join(f'{x:,.0f}' for x in s.samples_per_s_per_worker)} per worker-epoch), "
        f"{s.bad_samples} skipped"
    )
    return {
        "decode": best,
        "decode_ratio": ratio,
        "record_samples_per_s": rate,
        "bad_samples": s.bad_samples,
        "per_worker": s.samples_per_s_per_worker,
    }


def own_loop(tmp: Path, args) -> dict:
    """Logging overhead in your own loop: samples/s of one plain single-process loop over the indexed
    shards in `tmp/base` (IndexedShards, small CNN, SGD, batch 128, one torch thread and one DataLoader
    worker) with
    and without `StatsLogger` (begin_epoch, log per step, end_epoch: all timed), alternating."""
    import torch
    import torch.nn.functional as F

    from streamprune import IndexedShards, StatsLogger, ToTensors, small_cnn

    device = torch.device(args.device)
    best = {"without": 0.0, "with": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as record's workers: one core trains, the DataLoader worker decodes
    for rep in range(args.repeats):
        for mode in ("without", "with"):
            run = tmp / f"own-{mode}-{rep}"
            shutil.copytree(tmp / "base", run)
            torch.manual_seed(0)
            net = small_cnn(10, in_channels=1, image_size=28).to(device)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            data = IndexedShards(run, ToTensors(seed=0))
            logger = StatsLogger(run, args.epochs) if mode == "with" else None
            n, seconds, in_logger = 0, 0.0, 0.0
            for epoch in range(args.epochs):
                data.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(
                    data, batch_size=128, num_workers=1, pin_memory=device.type == "cuda"
                )
                t0 = time.perf_counter()
                if logger:
                    logger.begin_epoch(epoch)
                    in_logger += time.perf_counter() - t0
                for x, y, rows in loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if logger:
                        t1 = time.perf_counter()
                        logger.log(rows, logits, y)
                        in_logger += time.perf_counter() - t1
                    n += len(y)
                if logger:
                    t1 = time.perf_counter()
                    logger.end_epoch()
                    in_logger += time.perf_counter() - t1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
            rate = n / seconds
            print(
                f"  {mode:>7} StatsLogger, run {rep}: {rate:,.0f} samples/s"
                + (f", {in_logger / seconds:.1%} of the time in its calls" if logger else ""),
                flush=True,
            )
            if rate > best[mode]:
                best[mode] = rate
                if logger:
                    share = in_logger / seconds
    torch.set_num_threads(threads)
    ratio = best["with"] / best["without"]
    print(
        f"own-loop logging overhead: {args.samples} samples, 1 process on {args.device}, {args.epochs} epochs x "
        f"{args.repeats} runs each | with StatsLogger {best['with']:,.0f} samples/s, without "
        f"{best['without']:,.0f} samples/s | ratio {ratio:.3f} (goal >= 0.97: at most 3% overhead); "
        f"{share:.1%} of the time in StatsLogger calls"
    )
    return {"ratio": ratio, **best, "logger_share": share}


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"wall {time.time() - t:.0f} s, {os.cpu_count()} CPUs")
