"""The per-sample statistics store `RUN/stats.zarr` (Zarr v3): layout, ownership, markers.

Row `r` is sample `r` of the index; shard `s` owns rows `[shard_offset[s], shard_offset[s+1])`.
Each statistic is an `(N, T)` array chunked `(chunk_rows, 1)`, so one epoch of one row
block is one chunk. Ownership rule: chunk `c` is written only by `owner_of(c)`, and only
whole; `ChunkWriter` buffers rows and refuses rows it does not own. zarr-python loses
data silently when two writers touch one chunk, hence the rule. On an object store a chunk is
one object, put whole in one request, so the rule is what keeps concurrent writers apart there too.

The store is a local path or an object-store URL (`s3://bucket/run/stats.zarr`). It is created
whole through `commit.replacing` (a temporary renamed into place locally; on an object store a
generation folder committed by one `COMMIT` object), so a half-created store is never opened;
chunks and markers are then written into the committed store in place (`store_root`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError, SettingsError
from streamprune.formats import commit
from streamprune.formats.atomic import named_os_error, output_lock
from streamprune.formats.headers import STATS_FORMAT, check_format, header
from streamprune.formats.rundir import RunDir
from streamprune.formats.schema import EPOCHS, ROWS, STATS_SCHEMA
from streamprune.scoring.columns import LABEL, LABEL_MISSING

if TYPE_CHECKING:
    from streamprune.formats.index import Index

STATS = tuple(spec.name for spec in STATS_SCHEMA.arrays if spec.shape == (ROWS, EPOCHS))  # the statistics
DEFAULT_CHUNK_ROWS = 65536
AccessMode = Literal["r", "r+", "a", "w", "w-"]  # zarr's modes of opening a store
RECORD_AGAIN = (
    "record the run again (`streamprune record RUN --restart` clears its statistics and keeps the index), "
    "or restore the store's files from a copy"
)
RESTART = (
    "rerun with --restart (restart=True) to clear the statistics and record again, or use the same settings to resume"
)
_Selection = slice | int | np.ndarray  # rows or epochs picked: a slice, an integer, an integer or bool array


def zarr_array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """Member `name` of a store's group: an array in every layout here (zarr types it `Array | Group`)."""
    return cast("zarr.Array[Any]", group[name])


def store_root(location: str | os.PathLike[str]) -> str:
    """Where the Zarr store of output `location` is: its committed content (`commit.committed`:
    `location` itself locally, its committed generation on an object store), or `location` itself
    when nothing is committed there: a store being built in a `commit.replacing` place, which the
    tasks filling it open by that place (reduce's scores)."""
    try:
        return commit.committed(location)
    except FileNotFoundError:
        return os.fspath(location)


def has_store(root: str) -> bool:
    """Whether a Zarr store is at `root` (a `store_root`): its root `zarr.json` exists."""
    return storage.exists(storage.join(root, "zarr.json"))


def store_exists(location: str | os.PathLike[str]) -> bool:
    """Whether output `location` (a stats or scores store, local or object-store URL) holds a store."""
    return has_store(store_root(location))


def open_zarr(root: str, mode: AccessMode) -> zarr.Group:
    """The Zarr v3 group at `root`. Given as a string, zarr opens a local path with its LocalStore
    and a URL with its FsspecStore (an async fsspec filesystem of its own, credentials and endpoint
    from the same standard environment as `storage`'s): one call for both."""
    where = root if storage.is_url(root) else storage.local_path(root)
    return zarr.open_group(where, mode=mode, zarr_format=3)


def chunk_file(store: str | os.PathLike[str], name: str, *coords: int) -> str:
    """The file (object) of the chunk at grid position `coords` of array `name` of the store at
    `store` (a `store_root`; Zarr v3's `c/` key layout)."""
    return storage.join(store, name, "c", *map(str, coords))


def _raw_meta_problem(root: str, name: str, exc: Exception) -> str:
    """Why zarr could not open array `name` of the store at `root`: its zarr.json's data type where readable."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(root, name, "zarr.json")))
        dtype, expected = np.dtype(meta.get("data_type")), STATS_SCHEMA[name].dtype
        if dtype != expected:
            return f"data type {dtype}, expected {expected}"
    except Exception:
        pass
    return f"zarr.json is unreadable ({type(exc).__name__}: {exc})"


def fill_value(name: str) -> float | int:
    """The missing-value marker of a statistic: NaN, or 255 for `correct`."""
    return STATS_SCHEMA[name].fill


def missing_stats(n: int) -> dict[str, np.ndarray]:
    """Statistics of `n` rows that have none (skipped samples): the missing marker of each."""
    return {name: STATS_SCHEMA[name].empty(n) for name in STATS}


def creation_temp(path: str | os.PathLike[str]) -> Path:
    """Where streamprune before object-store support built the local store at `path` (`verify` notes
    a leftover one). `StatsStore.create` now builds it through `commit.replacing`."""
    return Path(os.fspath(path) + ".tmp")


def stat_dtype(name: str) -> np.dtype:
    return STATS_SCHEMA[name].dtype


def owner_of(rows: np.ndarray, chunk_rows: int, n_chunks: int, n_writers: int) -> np.ndarray:
    """The writer (0..n_writers-1) that owns each row: contiguous, disjoint chunk ranges."""
    return (np.asarray(rows, dtype=np.int64) // chunk_rows) * n_writers // max(n_chunks, 1)


class OwnershipError(InputError, RuntimeError):
    """A writer was handed rows of a chunk it does not own, or a row twice in one epoch."""


def _build(place: str, index: Index, epochs: int, chunk_rows: int, config: dict[str, Any]) -> None:
    """Write a new, empty store for `index` and `epochs` at `place` (an empty `commit.replacing`
    place); a failed write (a full disk, a refused request) names `place`."""
    counts = {"n_samples": index.n_samples, "n_shards": index.n_shards, "epochs": epochs, "chunk_rows": chunk_rows}
    try:
        group = open_zarr(place, "w")
        for spec in STATS_SCHEMA.arrays:
            arr = spec.create(group, counts)
            if spec.index_copy:
                arr[:] = np.asarray(getattr(index, spec.name))
        group.attrs.update({**header(STATS_FORMAT), **counts, "fingerprint": index.fingerprint, "config": config})
    except OSError as exc:
        raise named_os_error(exc, place) from None


class StatsStore:
    """A stats store, local or on an object store. Create it from an index with `create`, open it with `open`.

    `path` is the store's location as given (what messages name); `root` is where its Zarr data
    is (`store_root`: the same locally, the committed generation on an object store).
    """

    def __init__(
        self,
        group: zarr.Group,
        path: str | os.PathLike[str],
        index: Index | None = None,
        strict: bool = True,
        root: str | None = None,
    ):
        """Wrap an open group (opened at `root`, default `path`); `strict` (default) refuses damaged
        or edited metadata (`problems`). With `strict=False` (for `verify`) the problems are kept in
        `metadata_problems` and the counts are those the arrays agree on (None where unusable)."""
        self.group, self.path = group, os.fspath(path)
        self.root = self.path if root is None else root
        attrs = check_format(dict(group.attrs), STATS_FORMAT, f"stats store {self.path!r}")
        self.attrs = attrs
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._held: dict[str, int] = {}
        self._shard_offset: np.ndarray | None = None
        problems = self.problems(index)
        self.metadata_problems = problems
        if problems and strict:
            listed = "; ".join(f"{storage.name(self.path)}/{file}: {p}" for file, p in problems[:8])
            more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise DamagedRunError(f"stats store {str(path)!r} is damaged or was edited: {listed}{more}; {RECORD_AGAIN}")
        held = self._held  # the counts, fingerprint and offsets are None only with strict=False
        self.n_samples = cast(int, held.get("n_samples"))
        self.n_shards = cast(int, held.get("n_shards"))
        self.epochs = cast(int, held.get("epochs"))
        self.chunk_rows = cast(int, held.get("chunk_rows"))
        self.fingerprint = cast(str, attrs.get("fingerprint"))
        self.shard_offset = cast(np.ndarray, self._shard_offset)
        self.has_labels: bool = LABEL in self._arrays  # stores of streamprune 0.1.0 keep no labels

    def _open_array(self, name: str) -> zarr.Array[Any]:
        return self._arrays[name] if name in self._arrays else zarr_array(self.group, name)

    def problems(self, index: Index | None = None) -> list[tuple[str, str]]:
        """What in the store's metadata disagrees, as `(file, problem)` pairs (empty: sound).

        Attributes against themselves and against each array's zarr.json (shape, data type,
        chunks, fill value, chunk key layout: `STATS_SCHEMA`), `shard_offset` against the
        attributes and, with `index`, the counts and `shard_offset` against the index. Reads
        metadata and `shard_offset` only.
        """
        out = [("zarr.json", p) for p in self._attribute_problems()]
        if out:
            return out
        metas = self._metas(out)
        self._held = self._agreed_counts(metas, out)
        for name, arr in metas.items():
            found = STATS_SCHEMA.meta_problems(name, arr, self._held)
            if found:
                out.append((f"{name}/zarr.json", f"array {name}: " + ", ".join(found)))
            else:
                self._arrays[name] = arr
        out += self._offset_problems(index)
        if index is not None:
            for key, v in (("n_samples", index.n_samples), ("n_shards", index.n_shards)):
                if self.attrs[key] != v:
                    out.append(("zarr.json", f"attribute {key} is {self.attrs[key]}, the index has {v}"))
        return out

    def _attribute_problems(self) -> list[str]:
        """Counts that are no integers of their least value, a fingerprint that is no string."""
        out = STATS_SCHEMA.count_problems(self.attrs)
        if not isinstance(self.attrs.get("fingerprint"), str):
            out.append(f"attribute fingerprint is {self.attrs.get('fingerprint')!r}, not a string")
        return out

    def _metas(self, out: list[tuple[str, str]]) -> dict[str, zarr.Array[Any]]:
        """The arrays of `STATS_SCHEMA` whose zarr.json zarr reads as one of 1 or 2 dimensions, by
        name; why each other one is unusable is added to `out`."""
        metas: dict[str, zarr.Array[Any]] = {}
        for spec in STATS_SCHEMA.arrays:
            name, file = spec.name, f"{spec.name}/zarr.json"
            try:
                arr = self.group[name]
            except KeyError:
                if not spec.optional:
                    out.append((file, f"array {name} is missing"))
                continue
            except Exception as exc:  # zarr.json edited into something zarr cannot read
                out.append((file, f"array {name}: " + _raw_meta_problem(self.root, name, exc)))
                continue
            if isinstance(arr, zarr.Array) and arr.ndim in (1, 2):
                metas[name] = arr
            else:
                out.append((file, f"{name} is not an array of 1 or 2 dimensions"))
        return metas

    def _agreed_counts(self, metas: dict[str, zarr.Array[Any]], out: list[tuple[str, str]]) -> dict[str, int]:
        """The counts the arrays' shapes and chunks agree on (ties go to the attribute); an
        attribute that disagrees with them is what was edited, added to `out`."""
        attrs, held = self.attrs, {}
        units = {c.key: c.unit for c in STATS_SCHEMA.counts}
        for key, values in STATS_SCHEMA.votes(metas).items():
            best = max((values.count(v) for v in values), default=0)
            held[key] = attrs[key] if values.count(attrs[key]) == best else max(set(values), key=values.count)
            if held[key] != attrs[key]:
                out.append(
                    ("zarr.json", f"attribute {key} is {attrs[key]}, but the arrays hold {held[key]} {units[key]}")
                )
        return held

    def _offset_problems(self, index: Index | None) -> list[tuple[str, str]]:
        """`shard_offset`'s values (kept as `_shard_offset`) against the sample count and, with
        `index`, against the index's."""
        if "shard_offset" not in self._arrays:
            return []
        file, n = "shard_offset/c/0", self._held["n_samples"]
        try:
            offsets = np.asarray(self._arrays["shard_offset"][:])
        except Exception as exc:
            return [(file, f"shard_offset is unreadable ({type(exc).__name__}: {exc})")]
        self._shard_offset = offsets
        decreases = bool((np.diff(offsets) < 0).any())
        if offsets[0] != 0 or offsets[-1] != n or decreases:
            runs = f"shard_offset runs {int(offsets[0])}..{int(offsets[-1])}" + (" and decreases" if decreases else "")
            return [(file, runs + f", expected 0..{n} (n_samples), never decreasing")]
        if index is not None and not np.array_equal(offsets, np.asarray(index.shard_offset)):
            return [(file, "shard_offset differs from the index's")]
        return []

    def chunk_path(self, name: str, chunk: int, epoch: int | None = None) -> str:
        """The file (object) of chunk `chunk` (and `epoch`, for `(N, T)` arrays) of array `name`."""
        return chunk_file(self.root, name, chunk, *(() if epoch is None else (epoch,)))

    def _chunk_label(self, name: str, chunk: int, epoch: int | None = None) -> str:
        r0, r1 = self.chunk_rows_range(chunk)
        key = f"{name}/c/{chunk}" + ("" if epoch is None else f"/{epoch}")
        return f"chunk {key} (rows [{r0}, {r1})" + ("" if epoch is None else f", epoch {epoch}") + ")"

    def needed_chunks(self, epochs: int | None = None) -> np.ndarray:
        """`(n_chunks, epochs)` bool: chunks some shard marked complete in that epoch has rows in."""
        epochs = self.epochs if epochs is None else epochs
        done = self.done()[:epochs]
        offsets = self.shard_offset
        has_rows = offsets[1:] > offsets[:-1]
        first = offsets[:-1] // self.chunk_rows
        last = (offsets[1:] - 1) // self.chunk_rows
        need = np.zeros((self.n_chunks + 1, epochs), dtype=np.int64)
        for t in range(epochs):
            sel = done[t] & has_rows
            np.add.at(need[:, t], first[sel], 1)
            np.add.at(need[:, t], last[sel] + 1, -1)
        return np.cumsum(need, axis=0)[:-1] > 0

    def present_chunks(self, name: str) -> np.ndarray:
        """Which chunks of array `name` exist (one listing of its chunk files or objects, nothing
        read): `(n_chunks, T)` or `(n_chunks,)` bool. Keys that are no chunk of the grid are ignored."""
        two = name in STATS
        have = np.zeros((self.n_chunks, self.epochs) if two else self.n_chunks, dtype=bool)
        for key in storage.files(storage.join(self.root, name, "c")):
            coords = key.split("/")
            if len(coords) != have.ndim or not all(c.isdecimal() for c in coords):
                continue
            at = tuple(int(c) for c in coords)
            if all(i < limit for i, limit in zip(at, have.shape, strict=True)):
                have[at] = True
        return have

    def missing_chunks(
        self, epochs: int | None = None, stats: tuple[str, ...] = STATS
    ) -> list[tuple[str, int, int | None]]:
        """Chunks that must exist and do not: each of `stats`' chunks of each row block of a shard
        marked complete, for the first `epochs`; every identity chunk. `(array, chunk, epoch)`."""
        epochs = self.epochs if epochs is None else epochs
        need = self.needed_chunks(epochs)
        out: list[tuple[str, int, int | None]] = []
        for name in ("id_hi", "id_lo"):
            out += [(name, int(i), None) for i in np.flatnonzero(~self.present_chunks(name))]
        for name in stats:
            missing = need & ~self.present_chunks(name)[:, :epochs]
            out += [(name, int(i), int(t)) for t, i in zip(*np.nonzero(missing.T), strict=True)]
        return out

    def check_chunks(self, epochs: int | None = None, stats: tuple[str, ...] = STATS) -> None:
        """Refuse a store missing a chunk it must have (`missing_chunks`, of the `stats` to be read):
        zarr would read the fill value, NaN, and the samples would silently count as having none."""
        missing = self.missing_chunks(epochs, stats)
        if not missing:
            return
        name, chunk, epoch = missing[0]
        where = self._chunk_label(name, chunk, epoch)
        why = "" if epoch is None else f" of epoch {epoch}, which is marked complete,"
        more = f" ({len(missing) - 1} more chunks are missing)" if len(missing) > 1 else ""
        raise DamagedRunError(f"stats store {self.path!r} is damaged: {where}{why} is missing{more}; {RECORD_AGAIN}")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        index: Index,
        epochs: int,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        config: dict[str, Any] | None = None,
        same: Iterable[str] = (),
    ) -> StatsStore:
        """Create `path` (a local path or an object-store URL) for `index` and `epochs` recorded
        epochs; reopen it if it exists for the same index, recorded with the same values of the
        `same` keys of `config` (else refused, naming them and the way out).

        The store is built whole, then committed at once (`commit.replacing`), so that a store
        half-created by a killed process is never opened. An existing store made for another index
        (fingerprint) or epoch count is refused, and so is something at `path` that is no store.
        """
        location = os.fspath(path)
        if epochs < 1:
            raise SettingsError(f"epochs must be >= 1, not {epochs}")
        if chunk_rows < 1:
            raise SettingsError(f"chunk_rows must be >= 1, not {chunk_rows}")
        if store_exists(location):
            store = cls.open(location, index=index)
            refusal = _other_settings(location, store.config, config or {}, same)
            if refusal is not None:
                raise refusal
            if store.epochs != epochs:
                raise SettingsError(f"stats store {location!r} has {store.epochs} epochs, not {epochs}")
            return store
        if commit.is_committed(location) and storage.names(location):
            raise DamagedRunError(f"{location!r} holds no stats store (no zarr.json), yet is not empty; {RECORD_AGAIN}")
        with commit.replacing(location) as place:
            _build(place, index, epochs, chunk_rows, config or {})
        return cls.open(location, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: AccessMode = "r+", index: Index | None = None) -> StatsStore:
        """Open an existing store (local, or the committed one of an object-store URL); with
        `index`, refuse a store made for another index."""
        location = os.fspath(path)
        root = store_root(location)
        if not has_store(root):
            raise FileNotFoundError(
                f"no stats store at {location!r}: run `streamprune record {storage.parent(location)}` first"
            )
        try:
            group = open_zarr(root, mode)
        except Exception as exc:
            raise DamagedRunError(
                f"stats store {location!r} is damaged: {storage.join(root, 'zarr.json')!r} is unreadable "
                f"({type(exc).__name__}: {exc}); {RECORD_AGAIN}"
            ) from None
        fingerprint = dict(group.attrs).get("fingerprint")
        if (
            index is not None
            and dict(group.attrs).get("format") == STATS_FORMAT.name
            and fingerprint != index.fingerprint
        ):
            raise DamagedRunError(
                f"stats store {location!r} was made for another index "
                f"(fingerprint {fingerprint}, index {index.fingerprint})"
            )
        return cls(group, location, index, root=root)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_rows)

    def labels(self, rows: slice = slice(None)) -> np.ndarray:
        """The recorded labels of `rows` (-1: never recorded); refuses a store without labels."""
        if not self.has_labels:
            raise DamagedRunError(
                f"stats store {self.path!r} has no labels (recorded by an older streamprune); "
                f"record it again in a new run directory"
            )
        return self.read(LABEL, rows)

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.attrs.get("config", {})
        return config

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
        done = zarr_array(self.group, "done")
        row = np.asarray(done[epoch, :])
        row[np.asarray(shards, dtype=np.int64)] = 1
        try:
            done[epoch, :] = row
        except OSError as exc:
            raise named_os_error(exc, chunk_file(self.root, "done", epoch, 0)) from None

    def done(self) -> np.ndarray:
        """Completion markers, `(T, S)` bool."""
        return np.asarray(zarr_array(self.group, "done")[:], dtype=bool)

    def complete_epochs(self) -> int:
        """How many leading epochs are complete for every shard."""
        full = self.done().all(axis=1)
        return int(np.argmin(full)) if not full.all() else self.epochs

    def read(self, name: str, rows: slice = slice(None), epochs: slice = slice(None)) -> np.ndarray:
        """Rows (and, for `(N, T)` arrays, epochs) of array `name`.

        A chunk that cannot be decoded, or whose values cannot be statistics (probabilities
        outside [0, 1], `correct` other than 0, 1, 255, labels below -1), is a `DamagedRunError`
        naming the array, chunk, rows and epoch.
        """
        arr = self._open_array(name)
        try:
            data = np.asarray(arr[rows] if arr.ndim == 1 else arr[rows, epochs])
        except Exception as exc:
            raise self._unreadable(arr, name, rows, epochs, exc) from None
        self._check_values(name, data, rows, epochs)
        return data

    @staticmethod
    def _index_of(sel: _Selection, size: int) -> np.ndarray:
        """The positions a selection (slice, integer, integer or bool array) picks, shaped as it picks them."""
        if isinstance(sel, slice):
            return np.arange(*sel.indices(size))
        sel = np.asarray(sel)
        return np.flatnonzero(sel) if sel.dtype == bool else np.where(sel < 0, sel + size, sel)

    def _unreadable(
        self, arr: zarr.Array[Any], name: str, rows: _Selection, epochs: _Selection, exc: Exception
    ) -> DamagedRunError:
        """The error for a failed read, naming the first chunk that cannot be read alone."""
        chunks = np.unique(np.atleast_1d(self._index_of(rows, self.n_samples)) // self.chunk_rows)
        ts = np.atleast_1d(self._index_of(epochs, self.epochs)) if arr.ndim == 2 else [None]
        for c in chunks.tolist():
            r0, r1 = self.chunk_rows_range(c)
            for t in ts:
                t = None if t is None else int(t)
                try:
                    arr[r0:r1] if t is None else arr[r0:r1, t]
                except Exception as chunk_exc:
                    return DamagedRunError(
                        f"stats store {self.path!r} is damaged: {self._chunk_label(name, c, t)} "
                        f"is unreadable ({type(chunk_exc).__name__}: {chunk_exc}); {RECORD_AGAIN}"
                    )
        return DamagedRunError(f"stats store {self.path!r}: reading {name} failed ({type(exc).__name__}: {exc})")

    def _check_values(self, name: str, data: np.ndarray, rows: _Selection, epochs: _Selection) -> None:
        """Refuse values array `name` cannot hold (its `STATS_SCHEMA` rule), naming the first one's chunk."""
        spec = STATS_SCHEMA[name]
        if spec.rule is None or not spec.by_row:
            return
        bad, what = spec.rule.bad(data), spec.rule.what
        if not bad.any():
            return
        first = tuple(np.argwhere(bad)[0])
        r = self._index_of(rows, self.n_samples)
        epoch: int | None = None
        if len(spec.shape) == 2:
            t = self._index_of(epochs, self.epochs)
            r, t = np.broadcast_arrays(r[:, None] if r.ndim == 1 and t.ndim == 1 else r, t)
            epoch = int(t[first])
        row = int(r[first])
        where = self._chunk_label(name, row // self.chunk_rows, epoch)
        raise DamagedRunError(
            f"stats store {self.path!r} is damaged: {where} holds {what} (row {row}: {data[first]!r}); {RECORD_AGAIN}"
        )

    def iter_blocks(
        self, block_rows: int | None = None, names: tuple[str, ...] = STATS, start: int = 0, stop: int | None = None
    ) -> Iterator[Block]:
        """Yield chunk-aligned row blocks `[r0, r1)` with the `(rows, T)` arrays of `names`.

        `block_rows` is rounded up to a multiple of the chunk size; `start` must be chunk-aligned.
        """
        step = self.chunk_rows * max(1, -(-(block_rows or self.chunk_rows) // self.chunk_rows))
        if start % self.chunk_rows:
            raise SettingsError(f"start row {start} is not a multiple of the chunk size {self.chunk_rows}")
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
            raise SettingsError(f"epoch {epoch} outside the store's {store.epochs} epochs")
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
            raise OwnershipError(
                f"rows {outside[:5].tolist()} are not in chunks {self.chunks.start}.."
                f"{self.chunks.stop - 1} owned by this writer"
            )
        chunk_of = rows // self.store.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for part in np.split(order, bounds):
            c = int(chunk_of[part[0]])
            if c in self._written:
                raise OwnershipError(
                    f"chunk {c} of epoch {self.epoch} was already written; row {int(rows[part[0]])} came late"
                )
            r0, r1 = self.store.chunk_rows_range(c)
            if c not in self._buf:
                self._buf[c] = {n: STATS_SCHEMA[n].empty(r1 - r0) for n in (*STATS, LABEL)}
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
            buf = missing_stats(r1 - r0)
        for n in STATS:  # written even when all missing: a chunk of a complete epoch always exists
            try:
                arr = self.store._open_array(n).with_config({"write_empty_chunks": True})
                arr[r0:r1, self.epoch : self.epoch + 1] = buf[n][:, None]
            except OSError as exc:
                raise named_os_error(exc, self.store.chunk_path(n, c, self.epoch)) from None
        given = buf.get(LABEL, np.full(0, LABEL_MISSING))
        known = given != LABEL_MISSING
        if self.store.has_labels and known.any():  # rows not given keep their label
            if not known.all():
                given = np.where(known, given, self.store.read(LABEL, slice(r0, r1)))
            try:
                self.store._open_array(LABEL)[r0:r1] = given
            except OSError as exc:
                raise named_os_error(exc, self.store.chunk_path(LABEL, c)) from None
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


def _other_settings(
    location: str, recorded: dict[str, Any], given: dict[str, Any], keys: Iterable[str]
) -> SettingsError | None:
    """The refusal to go on with the store at `location`, recorded with other values of `keys` than
    `given`, naming each and the way out; None when they agree."""
    changed = [k for k in keys if k in recorded and recorded[k] != given[k]]
    if not changed:
        return None
    values = "; ".join(f"{k}: {recorded[k]!r}, not {'unset' if given[k] is None else repr(given[k])}" for k in changed)
    return SettingsError(f"{location!r} was recorded with other settings ({values}); {RESTART}")


def clear_statistics(run: str | os.PathLike[str]) -> None:
    """Remove what recording wrote to `run`: the stats store, the spool of one's own loop, checkpoints,
    the skipped-sample log and Ray Train's storage, and what was drawn from them (`clear_drawn`);
    the index and `classes.json` stay. Hold the stats store's lock."""
    rd = RunDir(run)
    clear_drawn(run)
    commit.remove_output(rd.stats)  # a reader sees the whole store or none
    for path in (rd.stats_spool, rd.checkpoints, rd.bad_samples, rd.bad_sample_objects, rd.ray_train):
        storage.remove(path)


def clear_drawn(run: str | os.PathLike[str]) -> None:
    """Remove the scores and keep-lists in `run` (main and baselines), each under its own lock (a
    reduce writing one is named and refuses the restart): drawn from statistics being replaced,
    they would otherwise pass for the new ones' (`run CONFIG` skips a reduce whose list exists)."""
    rd = RunDir(run)
    for directory in (rd.root, *rd.baselines()):
        for output in (RunDir.scores_in(directory), RunDir.keep_in(directory)):
            with output_lock(output, writer="record --restart"):
                commit.remove_output(output)
