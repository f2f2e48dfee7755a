"""Ray actors that own disjoint chunk ranges of the stats store, and the routing to them.

Producers (training workers) call `StoreWriters.add` with any rows; each row is sent to
the one actor that owns its chunk, so no two processes ever write one chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from streamprune.formats.stats_store import ChunkWriter, StatsStore, owner_of


@ray.remote(num_cpus=0)
class ChunkOwner:
    """Owns the chunks `owned_chunks(writer, n_writers)` of a store, one epoch at a time."""

    def __init__(self, path: str, writer: int, n_writers: int):
        self.store = StatsStore.open(path)
        self.chunks = self.store.owned_chunks(writer, n_writers)
        self.writer: ChunkWriter | None = None

    def begin(self, epoch: int) -> None:
        self.writer = ChunkWriter(self.store, self.chunks, epoch)

    def add(self, rows: np.ndarray, stats: dict[str, np.ndarray]) -> None:
        assert self.writer is not None, "add before begin"
        self.writer.add(rows, stats)

    def finish(self) -> np.ndarray:
        """Flush the epoch; the owned rows that were never given."""
        assert self.writer is not None, "finish before begin"
        missing = self.writer.flush()
        self.writer = None
        return missing


class StoreWriters:
    """A pool of `ChunkOwner` actors for one store. Picklable: hand it to producer tasks."""

    def __init__(self, path: str | Path, n_writers: int):
        store = StatsStore.open(path)
        self.path = str(path)
        self.n_writers = max(1, min(n_writers, store.n_chunks))
        self.chunk_rows, self.n_chunks = store.chunk_rows, store.n_chunks
        self.actors = [ChunkOwner.remote(self.path, w, self.n_writers) for w in range(self.n_writers)]  # type: ignore[attr-defined]

    def begin(self, epoch: int) -> None:
        ray.get([a.begin.remote(epoch) for a in self.actors])

    def add(self, rows: np.ndarray, stats: dict[str, np.ndarray]) -> list:
        """Route rows (and their statistics, with `label` when known) to their owners; returns the
        pending refs (wait on them for backpressure)."""
        rows = np.asarray(rows, dtype=np.int64)
        owner = owner_of(rows, self.chunk_rows, self.n_chunks, self.n_writers)
        refs = []
        for w in np.unique(owner):
            sel = owner == w
            refs.append(self.actors[w].add.remote(rows[sel], {n: np.asarray(v)[sel] for n, v in stats.items()}))
        return refs

    def flush(self) -> np.ndarray:
        """Flush every owner's epoch; the rows that never arrived, sorted."""
        parts = ray.get([a.finish.remote() for a in self.actors])
        return np.sort(np.concatenate(parts)).astype(np.int64)

    def mark_done(self, epoch: int, missing: np.ndarray) -> None:
        """Mark every shard with no missing row as complete for `epoch` (the driver's job)."""
        store = StatsStore.open(self.path)
        incomplete = np.unique(np.searchsorted(store.shard_offset, missing, side="right") - 1)
        store.mark_done(epoch, np.setdiff1d(np.arange(store.n_shards), incomplete))

    def finish(self, epoch: int) -> np.ndarray:
        """`flush` then `mark_done`; returns the missing rows."""
        missing = self.flush()
        self.mark_done(epoch, missing)
        return missing
