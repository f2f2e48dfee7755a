"""Record per-sample statistics from your own PyTorch training loop (no Ray), then `reduce` as usual.

    python examples/own_training_loop.py --shards 'data/train-*.tar' --run-dir run --epochs 3
    torchrun --standalone --nproc_per_node 2 examples/own_training_loop.py \
        --shards 'data/train-*.tar' --run-dir run --epochs 3
    streamprune reduce run --ratio 0.5 --window 3

A plain loop: a small CNN, SGD, cross-entropy, one `logger.log(rows, logits, labels)` after
each step. Single process, or DDP under torchrun (gloo on CPUs, nccl on GPUs, one per process);
ranks that run out of data first are joined (`Join`), so uneven shards never hang. RUN is
indexed in this process (rank 0, no Ray) when it has no index. Rerunning resumes at the
first incomplete epoch from the checkpoint saved after each epoch (`RUN/checkpoints/`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from streamprune import (
    Classes,
    IndexedShards,
    StatsLogger,
    ToTensors,
    index_in_process,
    scan_classes,
    small_cnn,
    sync_from_rank0,
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Path(args.run_dir)
    ddp = setup_distributed()
    classes = prepare_run(run, args, ddp)
    args.num_classes = args.num_classes or classes.num_classes
    data, net, opt, logger = build(run, args, classes, ddp)
    start = logger.start_epoch
    if start == args.epochs:
        if ddp.rank == 0:
            print(f"all {args.epochs} epochs of {run} are recorded already")
        return _finish(ddp.distributed)
    if start > 0:  # every rank resumes from the model and optimizer saved after epoch `start`
        ckpt = torch.load(_checkpoint(run, start), map_location=ddp.device, weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    model = (
        DistributedDataParallel(net, device_ids=[ddp.device.index] if ddp.cuda else None) if ddp.distributed else net
    )

    for epoch in range(start, args.epochs):
        t0 = time.time()
        data.set_epoch(epoch)  # the same cut of shards on every rank, a new one each epoch
        loader = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, num_workers=args.loader_workers, pin_memory=ddp.cuda
        )
        logger.begin_epoch(epoch)
        totals = train_epoch(model, loader, opt, logger, ddp)
        if ddp.distributed:
            sync_from_rank0(net, opt)
            dist.all_reduce(totals)
        if ddp.rank == 0:  # saved before the epoch is marked: a complete epoch always has its checkpoint
            save_checkpoint(run, epoch + 1, net, opt)
        missing = logger.end_epoch()  # every rank: chunks written by their owners, shards marked
        if ddp.rank == 0:
            stale = _checkpoint(run, epoch - 1)
            if stale.exists():
                stale.unlink()
            n, loss_sum, correct = totals.tolist()
            print(
                f"epoch {epoch}: {int(n)} samples, loss {loss_sum / max(n, 1):.3f}, accuracy "
                f"{correct / max(n, 1):.3f}, {len(missing)} rows missing, {time.time() - t0:.1f} s",
                flush=True,
            )
    if ddp.rank == 0:
        print(
            f"recorded epochs {start}..{args.epochs - 1}; complete epochs: {logger.complete_epochs()} of {args.epochs}"
        )
    _finish(ddp.distributed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard spec (braces, globs, ...); used to index RUN if needed")
    p.add_argument(
        "--run-dir",
        required=True,
        metavar="RUN",
        help="run directory: RUN/index, RUN/stats.zarr (not --run: torchrun would take that for its own --run-path)",
    )
    p.add_argument("--epochs", type=int, required=True, help="epochs to record")
    p.add_argument("--label", default="cls", help="label spec: cls, an extension, json:FIELD, module:function")
    p.add_argument("--image-size", type=int, default=None, help="square training size (default: the images' own)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="default: from the run's class list (counted once into RUN/classes.json)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per store chunk (default 65,536)")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per rank")
    return p.parse_args(argv)


class Distributed(NamedTuple):
    """This process: DDP under torchrun or a single process, on a GPU if there is one."""

    distributed: bool
    cuda: bool
    device: torch.device
    rank: int

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(**({"device_ids": [self.device.index]} if self.cuda else {}))


def setup_distributed() -> Distributed:
    distributed = "RANK" in os.environ  # set by torchrun
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)  # also the device of the logger's object collectives under nccl
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(distributed, cuda, device, dist.get_rank() if distributed else 0)


def prepare_run(run: Path, args: argparse.Namespace, ddp: Distributed) -> Classes:
    """RUN's index and class list, made on rank 0 if missing (no Ray), then read on every rank."""
    if ddp.rank == 0 and not (run / "index" / "manifest.json").exists():
        index_in_process(args.shards, run)  # serial, no Ray: for small jobs (else `streamprune index`)
    if ddp.rank == 0 and (Classes.load(run) is None or Classes.load(run).label != args.label):
        scan_classes(run, args.label)  # every label counted once (`streamprune index --label` does it on Ray)
    ddp.barrier()
    return Classes.load(run)


def build(run: Path, args: argparse.Namespace, classes: Classes, ddp: Distributed):
    """The data, the model (sized from one sample), its optimizer and the statistics logger."""
    options = {"label": args.label, "classes": classes, "image_size": args.image_size}
    data = IndexedShards(
        run, ToTensors(seed=args.seed + ddp.rank, do_augment=True, **options), seed=args.seed, shuffle_buffer=1000
    )
    sample, _, _ = next(
        iter(IndexedShards(run, ToTensors(do_augment=False, **options), rank=0, world_size=1, shuffle_buffer=1))
    )
    torch.manual_seed(args.seed)
    net = small_cnn(args.num_classes, in_channels=sample.shape[0], image_size=sample.shape[-1]).to(ddp.device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    logger = StatsLogger(
        run,
        args.epochs,
        config={
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "model": "small-cnn",
            "num_classes": args.num_classes,
            "label": args.label,
            "image_size": args.image_size,
            "classes": classes.digest,
        },
        chunk_rows=args.chunk_rows,
    )
    return data, net, opt, logger


def train_epoch(model, loader, opt, logger: StatsLogger, ddp: Distributed) -> torch.Tensor:
    """One epoch of plain SGD steps, each logged; returns this rank's (samples, loss sum, correct)."""
    model.train()
    totals = torch.zeros(3, device=ddp.device)  # samples, loss sum, correct
    with Join([model]) if ddp.distributed else contextlib.nullcontext():
        for x, y, rows in loader:
            x, y = x.to(ddp.device, non_blocking=True), y.to(ddp.device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logger.log(rows, logits, y)  # the statistics of this forward pass, per sample
            totals[0] += len(y)
            totals[1] += loss.detach() * len(y)
            totals[2] += (logits.argmax(1) == y).sum()
    return totals


def save_checkpoint(run: Path, epochs_done: int, net, opt) -> None:
    path = _checkpoint(run, epochs_done)
    path.parent.mkdir(exist_ok=True)
    torch.save(
        {"model": net.state_dict(), "optimizer": opt.state_dict(), "epochs_done": epochs_done}, str(path) + ".tmp"
    )
    os.replace(str(path) + ".tmp", path)


def _checkpoint(run: Path, epochs_done: int) -> Path:
    return run / "checkpoints" / f"epoch-{epochs_done:04d}.pt"


def _finish(distributed: bool) -> None:
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
