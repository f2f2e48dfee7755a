"""Recording from your own training loop: per-sample statistics into `RUN/stats.zarr` without Ray.

`record` trains its own proxy on Ray Train. This module lets an existing PyTorch loop (plain
DDP under torchrun with gloo or nccl, a Ray Train worker, or one process with no
`torch.distributed` at all) record the statistics of its own forward passes into the same
store, with the same guarantees, so that `streamprune reduce RUN` works on the run unchanged:

- `IndexedShards` (from `training.indexed_shards`, the dataset `record`'s workers read too): a
  torch IterableDataset over the run's indexed shards yielding `(x, label, row)`: the healthy
  shards cut across ranks by `record`'s rule, then across DataLoader workers, each sample
  checked against the index's key (a shard changed since indexing is refused) and undecodable
  samples skipped and listed in `RUN/bad-samples.jsonl`.
- `StatsLogger`: `begin_epoch(epoch)`, `log(rows, logits, labels)` after each forward pass,
  `end_epoch()`; `start_epoch` is the first incomplete epoch (resume there).
- `index_in_process`: `streamprune index` in this process, without Ray, for small jobs.

Ownership without Ray actors: one writer per rank; the rank owning a row's chunk
(`store.owner_of`) is the only one that writes it. Each rank spools what it logs into part
files `RUN/.stats-spool/epoch-NNNN/rRRRRR-oOOOOO-KKKKKK.npz`, one series per owner rank (written
atomically, at most `spool_rows` rows held in memory). `end_epoch` is collective: the ranks
exchange their part counts (which also waits for all of them), each rank writes its own chunks
whole from the parts addressed to it (`ChunkWriter`, which refuses a row given twice), the
ranks exchange the rows nobody logged, and rank 0 marks the `(epoch, shard)` pairs without a
missing row complete. A rank that dies mid-epoch leaves the epoch unmarked: the rerun starts
at `start_epoch` and redoes it, overwriting its chunks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError, SettingsError
from streamprune.formats.atomic import output_lock
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import STATS, OwnershipError, StatsStore, clear_statistics, owner_of, zarr_array
from streamprune.scoring.columns import LABEL
from streamprune.training.indexed_shards import IndexedShards as IndexedShards  # public here: streamprune.IndexedShards
from streamprune.training.samples import bad_samples

DEFAULT_SPOOL_ROWS = 65536
SOURCE = "own-loop"  # the store's config["recorder"] for runs recorded by a StatsLogger


class _Ranks:
    """The ranks' collectives: torch.distributed's object all-gather when it is initialised,
    else one process (nothing to exchange)."""

    def __init__(self, rank: int | None, world_size: int | None):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.dist: Any = dist
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if rank not in (None, self.rank) or world_size not in (None, self.world_size):
                raise SettingsError(
                    f"rank={rank}, world_size={world_size} disagree with torch.distributed's "
                    f"{self.rank} of {self.world_size}"
                )
        else:
            env = int(os.environ.get("WORLD_SIZE", 1))
            if env > 1 and world_size is None:  # under torchrun, each process alone would write every chunk
                raise SettingsError(
                    f"WORLD_SIZE={env} but torch.distributed is not initialised: call "
                    f"init_process_group before making the StatsLogger"
                )
            self.dist, self.rank, self.world_size = None, rank or 0, world_size or 1
            if self.world_size != 1 or self.rank != 0:
                raise SettingsError(
                    f"rank {self.rank} of {self.world_size}: several ranks need torch.distributed "
                    f"initialised (init_process_group) before the StatsLogger is made"
                )

    def exchange(self, payload: Any, error: BaseException | None = None) -> list:
        """Every rank's `payload`, in rank order; if any rank had an `error`, every rank raises it.

        Also a barrier: it returns when every rank has called it.
        """
        mine = (payload, None if error is None else (type(error).__name__, str(error)))
        out: list = [mine]
        if self.dist is not None:
            out = [None] * self.world_size
            self.dist.all_gather_object(out, mine)
        failed = [(r, e) for r, (_, e) in enumerate(out) if e is not None]
        if error is not None:
            raise error
        if failed:
            r, (kind, message) = failed[0]
            cls = {
                c.__name__: c
                for c in (OwnershipError, SettingsError, InputError, DamagedRunError, ValueError, FileNotFoundError)
            }.get(kind, RuntimeError)
            raise cls(f"rank {r}: {message}")
        return [p for p, _ in out]


def _as_numpy(a, dtype) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(dtype, copy=False)


class StatsLogger:
    """Writes the statistics of your own loop's forward passes into `RUN/stats.zarr`.

    ```python
    logger = StatsLogger(run, epochs=T, config={"lr": 0.1})     # every rank; rank 0 creates the store
    for epoch in range(logger.start_epoch, T):                  # resume at the first incomplete epoch
        logger.begin_epoch(epoch)                               # collective
        for x, y, rows in loader:                               # e.g. IndexedShards(run, ...)
            logits = model(x)
            ...                                                 # loss, backward, step
            logger.log(rows, logits, y)                         # local: no communication
        missing = logger.end_epoch()                            # collective: writes chunks, marks shards
    ```

    Guarantees (as `record`): each chunk of the store is written only by its owner rank and
    only whole; each row at most once per epoch (a row logged twice in an epoch, by one rank or
    two, makes `end_epoch` raise OwnershipError on every rank and marks nothing); an epoch's
    shards are marked complete only when all their rows are written, by rank 0, after the
    writes; `start_epoch` is the first epoch not complete for every shard, and an epoch begun
    again is rewritten whole. Undecodable samples that `IndexedShards` skipped count as given
    (their statistics missing), so their shards still complete.

    Ranks come from torch.distributed when it is initialised (gloo, or nccl with
    `torch.cuda.set_device(local_rank)` called first: the object all-gathers use the current
    device), else a single process. `run` must hold an index (`streamprune index` or
    `index_in_process`) and be on a filesystem every rank sees. `config` (JSON-able) is stored
    in the store; reopening it with a different value for a key it already has is refused, unless
    `restart` (rank 0 first clears the run's statistics, as `record --restart`: give it on the first
    launch only, since a relaunch with it starts over). Spooled rows are flushed to part files every
    `spool_rows` rows, so memory stays bounded.
    """

    def __init__(
        self,
        run: str | os.PathLike,
        epochs: int,
        *,
        config: dict | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        chunk_rows: int | None = None,
        spool_rows: int = DEFAULT_SPOOL_ROWS,
        restart: bool = False,
    ):
        if storage.is_url(run):
            raise SettingsError(
                f"{os.fspath(run)!r}: StatsLogger spools its parts on a filesystem; give it a local or shared "
                "run directory (`streamprune record` writes a run on object storage)"
            )
        self.run = Path(run).resolve()
        self.ranks = _Ranks(rank, world_size)
        self.rank, self.world_size = self.ranks.rank, self.ranks.world_size
        self.index = Index(RunDir(self.run).index)
        self.spool_rows = max(1, spool_rows)
        path = RunDir(self.run).stats
        cfg = {"recorder": SOURCE, "epochs": epochs, **json.loads(json.dumps(config or {}))}
        store, error = None, None
        if self.rank == 0:
            try:
                if restart:
                    with output_lock(path, writer="StatsLogger"):
                        clear_statistics(self.run)
                store = StatsStore.create(
                    path,
                    self.index,
                    epochs,
                    config=cfg,
                    same=cfg,
                    **({} if chunk_rows is None else {"chunk_rows": chunk_rows}),
                )
            except (ValueError, OSError) as exc:
                error = exc
        self.ranks.exchange(None, error)  # the other ranks open the store once rank 0 made it
        self.store = store if store is not None else StatsStore.open(path, index=self.index)
        self.epochs = self.store.epochs
        self.start_epoch = self.store.complete_epochs()
        self.owned = self.store.owned_chunks(self.rank, self.world_size)
        self._epoch: int | None = None
        self._buf: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._buffered = 0
        self._parts: dict[int, int] = {}

    def complete_epochs(self) -> int:
        """How many leading epochs are complete for every shard (read from the store now)."""
        return self.store.complete_epochs()

    def _spool(self, epoch: int) -> Path:
        return Path(RunDir(self.run).stats_spool) / f"epoch-{epoch:04d}"

    def _part(self, epoch: int, rank: int, owner: int, k: int) -> Path:
        return self._spool(epoch) / f"r{rank:05d}-o{owner:05d}-{k:06d}.npz"

    def begin_epoch(self, epoch: int) -> None:
        """Start recording `epoch` (collective: every rank calls it).

        Rank 0 unmarks the epoch's shards and removes parts an interrupted attempt left, before
        any rank spools a row of it.
        """
        if self._epoch is not None:
            raise RuntimeError(f"epoch {self._epoch} is still open: call end_epoch() first")
        if not 0 <= epoch < self.epochs:
            raise SettingsError(f"epoch {epoch} outside the store's {self.epochs} epochs")
        error = None
        if self.rank == 0:
            try:
                if self.store.done()[epoch].any():
                    zarr_array(self.store.group, "done")[epoch, :] = np.zeros(self.store.n_shards, np.uint8)
                shutil.rmtree(self._spool(epoch), ignore_errors=True)
                self._spool(epoch).mkdir(parents=True)
            except OSError as exc:
                error = exc
        self.ranks.exchange(None, error)
        self._epoch, self._buf, self._buffered, self._parts = epoch, [], 0, {}

    def log(self, rows, logits: torch.Tensor, labels) -> None:
        """Record one batch: index rows `(B,)`, the forward pass's logits `(B, C)` (any device,
        computed in training mode as `record` does), the labels `(B,)` trained on, in `[0, C)`.

        The six statistics are computed on the logits' device (`sample_stats`); only they, the
        rows and the labels move to the CPU. Local to this rank (no communication)."""
        from streamprune.training.stats import sample_stats

        if self._epoch is None:
            raise RuntimeError("call begin_epoch(epoch) before log()")
        rows, y = _as_numpy(rows, np.int64).reshape(-1), _as_numpy(labels, np.int64).reshape(-1)
        if logits.ndim != 2 or not len(rows) == len(y) == logits.shape[0]:
            raise SettingsError(
                f"rows {rows.shape}, logits {tuple(logits.shape)} and labels {y.shape} must be (B,), (B, C) and (B,)"
            )
        if not len(rows):
            return
        n, c = self.store.n_samples, logits.shape[1]
        out = (rows < 0) | (rows >= n)
        if out.any():
            raise InputError(f"row {int(rows[out][0])} is outside the index's {n} rows")
        wrong = (y < 0) | (y >= c)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise InputError(f"row {int(rows[i])}: label {int(y[i])} is outside [0, {c}) (the logits' classes)")
        stats = sample_stats(logits, labels if isinstance(labels, torch.Tensor) else y)
        stats[LABEL] = y.astype(np.int32)
        self._buf.append((rows, stats))
        self._buffered += len(rows)
        if self._buffered >= self.spool_rows:
            self._spill(self._epoch)

    def _spill(self, epoch: int) -> None:
        """Write the buffered rows as one part file per owner rank (atomically), and forget them."""
        if not self._buf:
            return
        rows = np.concatenate([r for r, _ in self._buf])
        stats = {k: np.concatenate([s[k] for _, s in self._buf]) for k in (*STATS, LABEL)}
        self._buf, self._buffered = [], 0
        owner = owner_of(rows, self.store.chunk_rows, self.store.n_chunks, self.world_size)
        order = np.argsort(owner, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(owner[order])) + 1):
            w = int(owner[part[0]])
            k = self._parts.get(w, 0)
            path = self._part(epoch, self.rank, w, k)
            tmp = path.with_name(path.name + ".tmp")
            arrays: dict[str, Any] = {n: v[part] for n, v in stats.items()}  # Any: mypy checks ** against allow_pickle
            with open(tmp, "wb") as f:
                np.savez(f, rows=rows[part], **arrays)
            os.replace(tmp, path)
            self._parts[w] = k + 1

    def end_epoch(self) -> np.ndarray:
        """Finish the epoch (collective): write every owned chunk whole, mark complete shards.

        Returns the rows nobody logged this epoch (the same on every rank), sorted; their
        shards stay incomplete, so the epoch is redone on resume (a warning says so). Raises on
        every rank when any rank fails (a row logged twice: OwnershipError); nothing is marked
        then, and `begin_epoch` may start the epoch again.
        """
        if self._epoch is None:
            raise RuntimeError("end_epoch() without begin_epoch()")
        epoch, self._epoch = self._epoch, None
        error: Exception | None = None
        try:
            self._spill(epoch)
        except OSError as exc:
            error = exc
        counts = self.ranks.exchange(self._parts, error)  # every rank's parts are on disk now
        missing, error = np.zeros(0, np.int64), None
        try:
            missing = self._write_owned(epoch, [c.get(self.rank, 0) for c in counts])
        except (OwnershipError, ValueError, OSError) as exc:
            error = exc
        missing = np.sort(np.concatenate(self.ranks.exchange(missing, error))).astype(np.int64)
        error = None
        if self.rank == 0:
            incomplete = np.unique(self.index.shard_of(missing))
            try:
                self.store.mark_done(epoch, np.setdiff1d(np.arange(self.store.n_shards), incomplete))
                shutil.rmtree(self._spool(epoch), ignore_errors=True)
                with contextlib.suppress(OSError):  # the spool folder itself, once no epoch is in it
                    self._spool(epoch).parent.rmdir()
            except OSError as exc:
                error = exc
            if len(missing):
                warnings.warn(
                    f"epoch {epoch}: {len(missing)} rows were never logged (e.g. {missing[:5].tolist()}); "
                    f"their {len(incomplete)} shards are not marked complete, so a resumed run redoes "
                    f"this epoch",
                    stacklevel=2,
                )
        self.ranks.exchange(None, error)  # every rank returns with the epoch marked
        return missing

    def _write_owned(self, epoch: int, parts_from: list[int]) -> np.ndarray:
        """Write this rank's chunks of `epoch` from the parts addressed to it; the owned rows
        neither logged nor skipped as undecodable."""
        from streamprune.formats.stats_store import ChunkWriter

        writer = ChunkWriter(self.store, self.owned, epoch)
        for r, n_parts in enumerate(parts_from):
            for k in range(n_parts):
                with np.load(self._part(epoch, r, self.rank, k), allow_pickle=False) as z:
                    rows, stats = z["rows"], {n: z[n] for n in (*STATS, LABEL)}
                try:
                    writer.add(rows, stats)
                except OwnershipError as exc:
                    raise OwnershipError(_twice_message(self.index, epoch, rows, exc, r)) from None
        missing = writer.flush()
        skipped = np.fromiter(bad_samples(self.run), dtype=np.int64)  # given, with missing statistics (as record)
        return np.setdiff1d(missing, skipped) if len(skipped) else missing


def _twice_message(index: Index, epoch: int, rows: np.ndarray, exc: OwnershipError, rank: int) -> str:
    """A row logged twice, named by shard and key, with the usual causes."""
    values, counts = np.unique(rows, return_counts=True)
    found = re.search(r"row (\d+)", str(exc))
    row = int(values[counts > 1][0]) if (counts > 1).any() else int(found.group(1)) if found else None
    if row is None:
        return str(exc)
    shard = int(index.shard_of(np.array([row]))[0])
    key = index.keys(shard)[row - int(index.shard_offset[shard])]
    return (
        f"row {row} (shard {index.names[shard]!r}, key {key!r}) was logged twice in epoch {epoch} (the second "
        f"time by rank {rank}): each sample must be logged exactly once per epoch. A DistributedSampler pads "
        f"ranks with repeated samples and a loop that reads a sample twice logs it twice; IndexedShards gives "
        f"each row to one rank once"
    )


def index_in_process(
    shards: str | Iterable[str],
    run: str | os.PathLike,
    *,
    root: str | None = None,
    identity: str | Callable | None = None,
) -> Index:
    """`streamprune index` in this process, one shard after another, without Ray: the same
    `RUN/index` (same names, rows, identities and fingerprint) for jobs small enough to scan
    serially. Call it on one rank only, then wait for it (e.g. a barrier)."""
    from streamprune.formats.index import write_index
    from streamprune.shards.identity import parse_identity, shard_names
    from streamprune.shards.scan import scan_shard
    from streamprune.shards.urls import absolute, expand_urls

    urls = [absolute(u) for u in expand_urls(shards)]
    names, root_path = shard_names(urls, root)
    ident = parse_identity(identity)
    with output_lock(RunDir(run).index):
        scans = [scan_shard(u, n, ident) for u, n in zip(urls, names, strict=True)]
        return write_index(RunDir(run).index, scans, root_path, "shard-key" if ident is None else ident.spec)
