"""The per-sample statistics store `RUN/stats.zarr` (Zarr v3): layout, ownership, markers.

Row `r` is sample `r` of the index; shard `s` owns rows `[shard_offset[s], shard_offset[s+1])`.
Each statistic is an `(N, T)` array chunked `(chunk_rows, 1)`, so one epoch of one row
block is one chunk. Ownership rule: chunk `c` is written only by `owner_of(c)`, and only
whole; `ChunkWriter` buffers rows and refuses rows it does not own. zarr-python loses
data silently when two writers touch one chunk, hence the rule.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

STATS = ("p_true", "correct", "margin", "el2n", "entropy", "loss")
CORRECT_MISSING = 255
LABEL = "label"  # int32 (N,): each sample's class as trained on; -1 unknown
LABEL_MISSING = -1
FORMAT = "streamprune-stats"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 65536


def fill_value(name: str):
    """The missing-value marker of a statistic: NaN, or 255 for `correct`."""
    return CORRECT_MISSING if name == "correct" else np.nan


def missing_stats(n: int) -> dict[str, np.ndarray]:
    """Statistics of `n` rows that have none (skipped samples): the missing marker of each."""
    return {name: np.full(n, fill_value(name), dtype=stat_dtype(name)) for name in STATS}


def stat_dtype(name: str) -> np.dtype:
    return np.dtype(np.uint8 if name == "correct" else np.float32)


def owner_of(rows: np.ndarray, chunk_rows: int, n_chunks: int, n_writers: int) -> np.ndarray:
    """The writer (0..n_writers-1) that owns each row: contiguous, disjoint chunk ranges."""
    return (np.asarray(rows, dtype=np.int64) // chunk_rows) * n_writers // max(n_chunks, 1)


class OwnershipError(RuntimeError):
    """A writer was handed rows of a chunk it does not own, or a row twice in one epoch."""


class StatsStore:
    """A stats store on disk. Create it from an index with `create`, open it with `open`."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group, self.path = group, path
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a streamprune stats store")
        self.attrs = attrs
        self.n_samples: int = attrs["n_samples"]
        self.n_shards: int = attrs["n_shards"]
        self.epochs: int = attrs["epochs"]
        self.chunk_rows: int = attrs["chunk_rows"]
        self.fingerprint: str = attrs["fingerprint"]
        self.shard_offset = np.asarray(group["shard_offset"][:])
        self.has_labels: bool = LABEL in group  # stores of streamprune 0.1.0 keep no labels

    @classmethod
    def create(cls, path: str | Path, index, epochs: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               config: dict | None = None) -> "StatsStore":
        """Create `path` for `index` and `epochs` recorded epochs; reopen it if it exists for the same index.

        An existing store made for another index (fingerprint) or epoch count is refused.
        """
        path = Path(path)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, not {epochs}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, not {chunk_rows}")
        if (path / "zarr.json").exists():
            store = cls.open(path, index=index)
            if store.epochs != epochs:
                raise ValueError(f"stats store {str(path)!r} has {store.epochs} epochs, not {epochs}")
            return store
        n, s = index.n_samples, index.n_shards
        tmp = path.with_name(path.name + ".tmp")
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name in STATS:  # float statistics barely compress (~13%) and read ~1.6x faster raw
            group.create_array(name, shape=(n, epochs), chunks=(chunk_rows, 1), dtype=stat_dtype(name),
                               fill_value=fill_value(name), **({} if name == "correct" else {"compressors": None}))
        group.create_array(LABEL, shape=(n,), chunks=(chunk_rows,), dtype=np.int32, fill_value=LABEL_MISSING)
        for name, arr in (("id_hi", index.id_hi), ("id_lo", index.id_lo)):
            a = group.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=np.uint64, fill_value=0)
            a[:] = np.asarray(arr)
        group.create_array("shard_offset", shape=(s + 1,), chunks=(s + 1,), dtype=np.int64, fill_value=0)[:] = \
            index.shard_offset
        group.create_array("done", shape=(epochs, s), chunks=(1, max(s, 1)), dtype=np.uint8, fill_value=0)
        from . import __version__

        group.attrs.update({
            "format": FORMAT, "version": FORMAT_VERSION, "streamprune_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "n_samples": n, "n_shards": s, "epochs": epochs, "chunk_rows": chunk_rows,
            "fingerprint": index.fingerprint, "config": config or {},
        })
        tmp.rename(path)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+", index=None) -> "StatsStore":
        """Open an existing store; with `index`, refuse a store made for another index."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"no stats store at {str(path)!r}")
        store = cls(zarr.open_group(str(path), mode=mode, zarr_format=3), path)
        if index is not None and store.fingerprint != index.fingerprint:
            raise ValueError(f"stats store {str(path)!r} was made for another index "
                             f"(fingerprint {store.fingerprint}, index {index.fingerprint})")
        return store

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_rows)

    def labels(self, rows: slice = slice(None)) -> np.ndarray:
        """The recorded labels of `rows` (-1: never recorded); refuses a store without labels."""
        if not self.has_labels:
            raise ValueError(f"stats store {str(self.path)!r} has no labels (recorded by an older streamprune); "
                             f"record it again in a new run directory")
        return self.read(LABEL, rows)

    @property
    def config(self) -> dict:
        return self.attrs.get("config", {})

    def chunk_rows_range(self, chunk: int) -> tuple[int, int]:
        """Rows `[r0, r1)` of chunk `chunk`."""
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_samples)

    def owned_chunks(self, writer: int, n_writers: int) -> range:
        """The chunks writer `writer` of `n_writers` owns (the inverse of `owner_of`)."""
        c = self.n_chunks
        first = -(-writer * c // n_writers)
        last = -(-(writer + 1) * c // n_writers)
        return range(first, last)

    def mark_done(self, epoch: int, shards: np.ndarray) -> None:
        """Mark `(epoch, shard)` complete. One process (the run's driver) writes markers."""
        row = np.asarray(self.group["done"][epoch, :])
        row[np.asarray(shards, dtype=np.int64)] = 1
        self.group["done"][epoch, :] = row

    def done(self) -> np.ndarray:
        """Completion markers, `(T, S)` bool."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def complete_epochs(self) -> int:
        """How many leading epochs are complete for every shard."""
        full = self.done().all(axis=1)
        return int(np.argmin(full)) if not full.all() else self.epochs

    def read(self, name: str, rows: slice = slice(None), epochs: slice = slice(None)) -> np.ndarray:
        """Rows (and, for `(N, T)` arrays, epochs) of array `name`."""
        arr = self.group[name]
        return np.asarray(arr[rows] if arr.ndim == 1 else arr[rows, epochs])

    def iter_blocks(self, block_rows: int | None = None, names: tuple[str, ...] = STATS,
                    start: int = 0, stop: int | None = None) -> Iterator["Block"]:
        """Yield chunk-aligned row blocks `[r0, r1)` with the `(rows, T)` arrays of `names`.

        `block_rows` is rounded up to a multiple of the chunk size; `start` must be chunk-aligned.
        """
        step = self.chunk_rows * max(1, -(-(block_rows or self.chunk_rows) // self.chunk_rows))
        if start % self.chunk_rows:
            raise ValueError(f"start row {start} is not a multiple of the chunk size {self.chunk_rows}")
        stop = self.n_samples if stop is None else min(stop, self.n_samples)
        for r0 in range(start, stop, step):
            r1 = min(r0 + step, stop)
            yield Block(r0, r1, {name: self.read(name, slice(r0, r1)) for name in names})


@dataclass
class Block:
    """Rows `[start, stop)` of the store and their `(rows, T)` statistics."""

    start: int
    stop: int
    data: dict[str, np.ndarray]


class ChunkWriter:
    """Buffers one epoch's statistics for the chunks it owns and writes each chunk whole.

    `add` refuses rows outside the owned chunks and rows already given this epoch;
    `flush` writes every owned chunk not yet written (rows never given stay missing).
    With a `label` entry among the statistics, the given rows' labels are written with
    their chunk (the label array shares the chunk boundaries, so ownership carries over).
    """

    def __init__(self, store: StatsStore, chunks: range, epoch: int):
        if not 0 <= epoch < store.epochs:
            raise ValueError(f"epoch {epoch} outside the store's {store.epochs} epochs")
        self.store, self.chunks, self.epoch = store, chunks, epoch
        self.row_lo = chunks.start * store.chunk_rows
        self.row_hi = min(chunks.stop * store.chunk_rows, store.n_samples)
        self._buf: dict[int, dict[str, np.ndarray]] = {}
        self._seen: dict[int, np.ndarray] = {}
        self._written: set[int] = set()
        self.rows_written = 0

    def add(self, rows: np.ndarray, stats: dict[str, np.ndarray]) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        outside = rows[(rows < self.row_lo) | (rows >= self.row_hi)]
        if len(outside):
            raise OwnershipError(f"rows {outside[:5].tolist()} are not in chunks {self.chunks.start}.."
                                 f"{self.chunks.stop - 1} owned by this writer")
        chunk_of = rows // self.store.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for part in np.split(order, bounds):
            c = int(chunk_of[part[0]])
            if c in self._written:
                raise OwnershipError(f"chunk {c} of epoch {self.epoch} was already written; "
                                     f"row {int(rows[part[0]])} came late")
            r0, r1 = self.store.chunk_rows_range(c)
            if c not in self._buf:
                self._buf[c] = {n: np.full(r1 - r0, fill_value(n), dtype=stat_dtype(n)) for n in STATS}
                self._buf[c][LABEL] = np.full(r1 - r0, LABEL_MISSING, dtype=np.int32)
                self._seen[c] = np.zeros(r1 - r0, dtype=bool)
            local = rows[part] - r0
            seen = self._seen[c]
            if seen[local].any() or len(np.unique(local)) != len(local):
                dup = rows[part][seen[local]] if seen[local].any() else rows[part]
                raise OwnershipError(f"row {int(dup[0])} recorded twice in epoch {self.epoch}")
            seen[local] = True
            for n in STATS:
                self._buf[c][n][local] = np.asarray(stats[n])[part]
            if LABEL in stats:
                self._buf[c][LABEL][local] = np.asarray(stats[LABEL])[part]
            if seen.all():
                self._write(c)

    def _write(self, c: int) -> None:
        r0, r1 = self.store.chunk_rows_range(c)
        buf = self._buf.pop(c, None)
        seen = self._seen.pop(c, None)
        if buf is None:
            buf = {n: np.full(r1 - r0, fill_value(n), dtype=stat_dtype(n)) for n in STATS}
        for n in STATS:
            self.store.group[n][r0:r1, self.epoch : self.epoch + 1] = buf[n][:, None]
        given = buf.get(LABEL, np.full(0, LABEL_MISSING))
        known = given != LABEL_MISSING
        if self.store.has_labels and known.any():  # rows not given keep their label
            if not known.all():
                given = np.where(known, given, self.store.read(LABEL, slice(r0, r1)))
            self.store.group[LABEL][r0:r1] = given
        self._written.add(c)
        self.rows_written += int(seen.sum()) if seen is not None else 0

    def flush(self) -> np.ndarray:
        """Write the remaining owned chunks; return the owned rows left missing this epoch."""
        missing = [np.flatnonzero(~self._seen[c]) + self.store.chunk_rows_range(c)[0] for c in self._seen]
        for c in self.chunks:
            if c not in self._written:
                if c not in self._seen:
                    r0, r1 = self.store.chunk_rows_range(c)
                    missing.append(np.arange(r0, r1))
                self._write(c)
        return np.sort(np.concatenate(missing)) if missing else np.zeros(0, dtype=np.int64)
