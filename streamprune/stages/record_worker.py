"""What runs inside each of `record`'s Ray Train workers (`train_loop`): the proxy model built or
restored from the last checkpoint, every epoch's samples read from the run's shards
(`IndexedShards`: this rank's shards, split over its DataLoader workers), one DDP training step
per batch, each sample's statistics sent to the writer actor that owns its chunk, counts
reported to the `Progress` actor, and, on rank 0 after each epoch, the writers flushed, a
checkpoint saved and the epoch's complete shards marked."""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

import numpy as np
import ray
import torch

from streamprune import storage
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import STATS, StatsStore, missing_stats
from streamprune.scoring.columns import LABEL, LABEL_MISSING
from streamprune.stages.record_resolved import ResolvedSettings
from streamprune.stages.record_writers import StoreWriters
from streamprune.training.decode import SampleDecoder, View
from streamprune.training.indexed_shards import IndexedShards
from streamprune.training.models import build_model
from streamprune.training.recipe import make_sgd, set_cosine_lr, sync_from_rank0, train_step
from streamprune.training.stats import sample_stats

SEND_ROWS = 4096  # statistics go to the writers in batches of at least this many rows
MAX_PENDING = 64  # sends in flight before a worker waits for the oldest


def train_loop(cfg: dict) -> None:
    """Ray Train's function on each worker: train the epochs from the first incomplete one, recording."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    rc = ResolvedSettings(**cfg["config"])
    run = cfg["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg["threads"]))
    distributed = dist.is_available() and dist.is_initialized()
    barrier = dist.barrier if distributed else (lambda: None)
    start = StatsStore.open(RunDir(run).stats, mode="r").complete_epochs() if rc.record else cfg["start"]
    model, opt = _model(run, rc, start)
    device = ray.train.torch.get_device()
    data = IndexedShards(
        run,
        SampleDecoder(None if rc.view is None else View(*rc.view), rc.label, cfg["classes"], rc.decode),
        rank=rank,
        world_size=world,
        seed=rc.seed,
        shuffle_buffer=rc.shuffle_buffer,
        on_bad_sample="placeholder" if rc.on_bad_sample == "skip" else "error",  # skipped rows reach the store
        urls=cfg["urls"],  # the shards' URLs, resolved by the driver
        shape=tuple(rc.input_shape),
        shard_seeded=rc.augment,
    )
    writers: StoreWriters | None = cfg["writers"] if rc.record else None
    progress = cfg["progress"]
    for epoch in range(start, rc.epochs):
        t0 = time.time()
        progress.reset.remote(rank, epoch)
        set_cosine_lr(opt, rc.lr, epoch, rc.schedule_epochs)
        if rank == 0 and writers is not None:
            writers.begin(epoch)
        barrier()
        data.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=max(1, rc.batch_size // world),
            num_workers=min(rc.loader_workers, len(data.shards)),
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        _train_epoch(model, opt, loader, device, _Outbox(writers), progress, rank, epoch)
        if distributed:
            sync_from_rank0(model, opt)
        barrier()
        if rank == 0:
            _finish_epoch(run, model, opt, writers, epoch)
            ray.get(progress.epoch_done.remote(epoch, time.time() - t0))
        barrier()


def _model(run: str, rc: ResolvedSettings, start: int) -> tuple[Any, torch.optim.Optimizer]:
    """The proxy (seeded with the run's seed, from the checkpoint of epoch `start` when > 0),
    prepared by Ray Train (DDP, device), and its SGD optimiser."""
    import ray.train.torch

    torch.manual_seed(rc.seed)
    net = build_model(rc.model, tuple(rc.input_shape), rc.num_classes)
    opt_state = None
    if start > 0:
        ckpt = torch.load(
            io.BytesIO(storage.read_bytes(RunDir(run).checkpoint(start))), map_location="cpu", weights_only=True
        )
        net.load_state_dict(ckpt["model"])
        opt_state = ckpt["optimizer"]
    model = ray.train.torch.prepare_model(net)
    opt = make_sgd(model, rc.lr, rc.momentum, rc.weight_decay, rc.nesterov)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    return model, opt


class _Outbox:
    """Statistics on their way to the writer actors (None: training without recording): sent
    every SEND_ROWS rows, with at most MAX_PENDING sends in flight."""

    def __init__(self, writers: StoreWriters | None):
        self.writers = writers
        self.rows: list[np.ndarray] = []
        self.stats: list[dict[str, np.ndarray]] = []
        self.pending: list = []

    def add(self, rows: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, good: np.ndarray):
        """A batch's statistics; its rows of skipped samples (`good` False) are given with missing ones."""
        if self.writers is None:
            return
        n_good = int(good.sum())
        self.rows.append(rows.numpy()[good])
        self.stats.append({**sample_stats(logits[mask], y[mask]), LABEL: y[mask].cpu().numpy()})
        if n_good < len(good):  # skipped samples: given, with missing statistics
            self.rows.append(rows.numpy()[~good])
            self.stats.append({**missing_stats(len(good) - n_good), LABEL: np.full(len(good) - n_good, LABEL_MISSING)})
        if sum(len(r) for r in self.rows) >= SEND_ROWS:
            self._send()
            if len(self.pending) > MAX_PENDING:  # wait for the oldest, keep the newest half in flight
                keep = MAX_PENDING // 2
                ray.get(self.pending[:-keep])
                self.pending = self.pending[-keep:]

    def _send(self) -> None:
        assert self.writers is not None
        rows = np.concatenate(self.rows)
        stats = {n: np.concatenate([s[n] for s in self.stats]) for n in (*STATS, LABEL)}
        self.pending += self.writers.add(rows, stats)
        self.rows, self.stats = [], []

    def close(self) -> None:
        """Send the rest and wait until every send has arrived."""
        if self.rows:
            self._send()
        ray.get(self.pending)


def _train_epoch(model, opt, loader, device, outbox: _Outbox, progress, rank: int, epoch: int) -> None:
    """One epoch's training steps on this worker's samples (`Join`ed: ranks with fewer batches do
    not hang DDP), their statistics sent, counts reported every second."""
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel

    model.train()
    seen, reported = [0, 0.0, 0], time.monotonic()  # samples, summed loss, correct
    join = Join([model]) if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with join:
        for step, (x, y, rows) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, loss = train_step(model, opt, x, y)
            mask = y >= 0  # label -1: a skipped sample
            good = mask.cpu().numpy()
            n_good = int(good.sum())
            seen[0] += n_good
            seen[1] += float(loss.detach()) * n_good
            seen[2] += int((logits.argmax(1) == y).sum())
            outbox.add(rows, logits, y, mask, good)
            if step == 1 or time.monotonic() - reported >= 1.0:  # after two batches: the driver's rate starts
                progress.update.remote(rank, epoch, *seen)
                seen, reported = [0, 0.0, 0], time.monotonic()
    outbox.close()
    progress.update.remote(rank, epoch, *seen)


def _finish_epoch(run: str, model, opt, writers: StoreWriters | None, epoch: int) -> None:
    """Rank 0, after every rank's epoch: flush the writers, save the checkpoint of `epoch + 1`,
    then mark the epoch's complete shards and remove the checkpoint before it."""
    from torch.nn.parallel import DistributedDataParallel

    missing = writers.flush() if writers is not None else None
    state = {
        "model": (model.module if isinstance(model, DistributedDataParallel) else model).state_dict(),
        "optimizer": opt.state_dict(),
        "epochs_done": epoch + 1,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(RunDir(run).checkpoint(epoch + 1), buffer.getvalue())
    if writers is not None and missing is not None:
        writers.mark_done(epoch, missing)
    storage.remove(RunDir(run).checkpoint(epoch - 1))
