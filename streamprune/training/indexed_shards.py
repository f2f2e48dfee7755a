"""`IndexedShards`: the samples of an indexed run as a torch IterableDataset, the one that
`record`'s Ray Train workers and users' own training loops (`own_loop`) both read.

Every epoch the healthy shards are cut across ranks (`samples.assign_shards`), a rank's shards
across its DataLoader workers, each shard read in tar order with its keys checked against the
index (`samples.indexed_samples`), and the samples shuffled through a buffer; undecodable
samples are skipped and listed in `RUN/bad-samples.jsonl`, yielded as placeholders, or raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from streamprune import storage
from streamprune.errors import SettingsError
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.sources import shard_urls
from streamprune.shards.labels import BadSample
from streamprune.training.samples import assign_shards, healthy_shards, indexed_samples, log_bad_sample, shuffled

Transform = Callable[..., tuple[Any, int]]
ON_BAD_SAMPLE = ("skip", "error", "placeholder")


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: as given, else torch.distributed's, else `RANK`/`WORLD_SIZE`, else 0 and 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise SettingsError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class IndexedShards(torch.utils.data.IterableDataset):
    """The samples of an indexed run as `(transform(sample)..., row)`: `(x, label, row)`.

    Every epoch the healthy shards are cut into `world_size` contiguous runs of about equal
    sample counts, shuffled with `(seed, epoch)` (`record`'s `assign_shards`), this rank's run
    split across DataLoader workers, each shard read in tar order with webdataset's grouping,
    and the samples shuffled through a buffer of `shuffle_buffer` (seeded by `(seed, epoch)` and
    the first shard the worker reads). Together the ranks read every indexed sample exactly once
    per epoch. `row` is the sample's row in the index (the row the logger records it at); each
    sample's key is checked against the index, so a shard changed since indexing is an error,
    not wrong rows.

    `transform(sample)` gets a webdataset-style dict (`__key__`, `__url__`, member bytes by
    lower-cased extension) and returns `(x, label)`; default
    `streamprune.training.decode.ToTensors(seed, do_augment=True)`. With `shard_seeded=True` it
    is called as `transform(sample, rng)`, `rng` a NumPy generator seeded by `(seed, epoch,
    shard)`: augmentations that depend on neither the ranks nor the DataLoader workers (a
    `SampleDecoder` takes this form; `record` uses it). A transform raising
    `streamprune.BadSample` (a ValueError) marks the sample undecodable, as does an `x` of
    another shape than `shape` (when given). `on_bad_sample`: `"skip"` (as `record`) leaves it
    out, lists it in `RUN/bad-samples.jsonl` (shard, key, row, epoch, reason), and the logger
    counts its row as given with missing statistics; `"placeholder"` lists it as well and yields
    `(zeros(shape), -1, row)` in its place, so that its row reaches the loop (`record` sends it
    to the store with missing statistics); `"error"` raises. Other errors (e.g. a label outside
    the classes) stop the loop.

    `shards`: the URLs of the indexed shards to read (`shards.sources.shard_urls`; default: the
    index's root plus each shard's name); or `urls`, already resolved: one per index shard, in
    index order (what `shard_urls` returned, e.g. on `record`'s driver).

    `rank`/`world_size` default to torch.distributed's (or `RANK`/`WORLD_SIZE`). Call
    `set_epoch(epoch)` before each epoch and make the DataLoader (non-persistent workers)
    after it, as with `DistributedSampler`.
    """

    def __init__(
        self,
        run: str | os.PathLike,
        transform: Transform | None = None,
        *,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        on_bad_sample: str = "skip",
        shards: str | Iterable[str] | None = None,
        urls: Sequence[str] | None = None,
        shape: tuple[int, ...] | None = None,
        shard_seeded: bool = False,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise SettingsError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, not {on_bad_sample!r}")
        if on_bad_sample == "placeholder" and shape is None:
            raise SettingsError("on_bad_sample='placeholder' needs the examples' shape (shape=...)")
        if shards is not None and urls is not None:
            raise SettingsError("give the shards to read as shards (specs) or urls (resolved), not both")
        self.run = storage.absolute(run)
        idx = Index(RunDir(self.run).index)
        self.urls = list(urls) if urls is not None else shard_urls(idx, shards)
        if len(self.urls) != idx.n_shards:
            raise SettingsError(f"urls: {len(self.urls)} URLs for the index's {idx.n_shards} shards")
        self.healthy = healthy_shards(idx)
        self.counts = np.diff(idx.shard_offset)[self.healthy]
        self.rank, self.world_size = rank_world(rank, world_size)
        if transform is None:
            from streamprune.training.decode import ToTensors

            transform = ToTensors(seed=seed, do_augment=True)
        self.transform: Transform = transform
        self.seed, self.shuffle_buffer = seed, max(1, shuffle_buffer)
        self.on_bad_sample, self.shard_seeded = on_bad_sample, shard_seeded
        self.shape = None if shape is None else tuple(shape)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s shards from now on (the cut depends on the epoch)."""
        self.epoch = int(epoch)
        self.shards: list[int] = assign_shards(self.counts, self.healthy, self.world_size, self.seed, self.epoch)[
            self.rank
        ].tolist()

    @property
    def num_samples(self) -> int:
        """Samples this rank reads this epoch (undecodable ones included)."""
        return int(self.counts[np.isin(self.healthy, self.shards)].sum())

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = torch.utils.data.get_worker_info()
        wid, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        idx = Index(RunDir(self.run).index)
        mine = self.shards[wid::n_workers]
        rng = np.random.default_rng([self.seed, self.epoch, 1 << 20, *mine[:1], wid])
        yield from shuffled((item for shard in mine for item in self._samples(idx, shard)), self.shuffle_buffer, rng)

    def _samples(self, idx: Index, shard: int) -> Iterator[tuple[Any, int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch, shard]) if self.shard_seeded else None
        for sample, row in indexed_samples(idx, shard, self.urls[shard]):
            try:
                x, label = self.transform(sample, rng) if self.shard_seeded else self.transform(sample)
            except BadSample as exc:
                yield from self._bad(idx, shard, sample["__key__"], row, str(exc))
                continue
            if self.shape is not None and tuple(x.shape) != self.shape:
                yield from self._bad(
                    idx,
                    shard,
                    sample["__key__"],
                    row,
                    f"sample {sample['__key__']!r} of shard {idx.names[shard]!r}: decoded to shape "
                    f"{tuple(x.shape)}, the run's inputs are {self.shape}",
                )
                continue
            yield x, label, row

    def _bad(self, idx: Index, shard: int, key: str, row: int, reason: str) -> Iterator[tuple[Any, int, int]]:
        """An undecodable sample: an error, or listed in `RUN/bad-samples.jsonl` and left out, or
        yielded as a placeholder with label -1."""
        if self.on_bad_sample == "error":
            raise BadSample(f"{reason} (on_bad_sample='skip' skips such samples)")
        log_bad_sample(self.run, idx.names[shard], key, row, self.epoch, reason)
        if self.on_bad_sample == "placeholder":
            assert self.shape is not None  # checked in __init__
            yield torch.zeros(self.shape), -1, row
