"""The arrays of streamprune's Zarr stores, declared once as data: each array's name, data type,
fill value, shape and chunks (in terms of the store's counts) and the values it cannot hold.

The stores create their arrays from it, their readers check metadata and values by it, and
`inspect --verify` checks metadata and every chunk against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeGuard, Unpack

import numpy as np
import numpy.typing as npt

from streamprune.scoring.columns import CORRECT_MISSING, LABEL, LABEL_MISSING, NO_GROUP, STAT_MISSING
from streamprune.scoring.scores import SCORES

if TYPE_CHECKING:
    import zarr

Counts = Mapping[str, int | None]  # a store's counts (None: unknown, its checks are skipped)


@dataclass(frozen=True)
class Dim:
    """An extent given by a store count: `count` plus `plus`, at least `least`."""

    count: str
    plus: int = 0
    least: int = 0

    def size(self, counts: Counts) -> int | None:
        value = counts.get(self.count)
        return None if value is None else max(value + self.plus, self.least)


Extent = Dim | int
ROWS, EPOCHS, SHARDS = Dim("n_samples"), Dim("epochs"), Dim("n_shards")


def extents(dims: tuple[Extent, ...], counts: Counts) -> tuple[int, ...] | None:
    """The sizes of `dims` for `counts`; None when a count they need is unknown."""
    sizes = [d.size(counts) if isinstance(d, Dim) else d for d in dims]
    return None if None in sizes else tuple(int(s) for s in sizes if s is not None)


@dataclass(frozen=True)
class Count:
    """An integer attribute of a store: at least `least`; `unit` names what arrays hold of it."""

    key: str
    least: int
    unit: str = ""


def is_int(v: object) -> TypeGuard[int | np.integer]:
    """Whether `v` is an integer (a bool is not)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def count_problem(attrs: Mapping[str, Any], count: Count) -> str | None:
    """Why attribute `count.key` of `attrs` is no integer >= `count.least`; None when it is."""
    v = attrs.get(count.key)
    if is_int(v) and v >= count.least:
        return None
    return f"attribute {count.key} is {v!r}, not an integer >= {count.least}"


@dataclass(frozen=True)
class ValueRule:
    """Values an array cannot hold: `bad(data)` marks them, `what` names them in messages."""

    what: str
    bad: Callable[[np.ndarray], np.ndarray]


def _outside_unit(data: np.ndarray) -> np.ndarray:
    bad: np.ndarray = np.isfinite(data) & ((data < 0) | (data > 1))  # NaN, ±inf: missing, not damage
    return bad


PROBABILITIES = ValueRule("probabilities outside [0, 1]", _outside_unit)
MEAN_PROBABILITIES = ValueRule("mean probabilities outside [0, 1]", _outside_unit)
CORRECT = ValueRule("values other than 0, 1 and 255", lambda d: (d > 1) & (d != CORRECT_MISSING))
LABELS = ValueRule("labels below -1", lambda d: d < LABEL_MISSING)
MARKERS = ValueRule("values other than 0 and 1", lambda d: (d != 0) & (d != 1))


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store.

    `chunks_checked`: its chunk shape (and chunk key layout) is part of its checked metadata;
    `fill_checked`: so is its fill value; `chunks_read`: `verify` reads each of its chunks;
    `optional`: stores of older streamprunes lack it; `index_copy`: it is the index's array of
    the same name, row for row; `rule`: the values it cannot hold.
    """

    name: str
    dtype: np.dtype
    fill: float | int
    shape: tuple[Extent, ...]
    chunks: tuple[Extent, ...]
    compressors: Literal["auto"] | None = "auto"
    chunks_checked: bool = True
    fill_checked: bool = True
    chunks_read: bool = True
    optional: bool = False
    index_copy: bool = False
    rule: ValueRule | None = None

    @property
    def by_row(self) -> bool:
        """Whether row `r` of this array is sample `r` (its first extent is the sample count)."""
        return self.shape[0] == ROWS

    def empty(self, n: int) -> np.ndarray:
        """`n` rows of the fill value (no value)."""
        return np.full(n, self.fill, dtype=self.dtype)

    def create(self, group: zarr.Group, counts: Counts) -> zarr.Array[Any]:
        """Create this array, empty, in `group` for the store's `counts` (all of them known)."""
        shape, chunks = extents(self.shape, counts), extents(self.chunks, counts)
        if shape is None or chunks is None:
            raise ValueError(f"array {self.name}: the counts {dict(counts)} lack one of its extents")
        return group.create_array(
            self.name,
            shape=shape,
            chunks=chunks,
            dtype=self.dtype,
            fill_value=self.fill,
            compressors=self.compressors,
        )


def _same_fill(actual: Any, expected: float | int) -> bool:
    if isinstance(expected, float) and np.isnan(expected):
        return bool(np.isnan(actual))
    return bool(actual == expected)


def _key_problem(arr: zarr.Array[Any]) -> str | None:
    key = arr.metadata.encode_chunk_key((0,) * arr.ndim)
    return None if key == "c/" + "/".join("0" * arr.ndim) else f"chunk keys like {key!r}, expected 'c/0/...'"


@dataclass(frozen=True)
class StoreSchema:
    """A store's arrays and integer attributes. `keys_checked`: chunk key layouts are checked with
    the chunks; `chunks_note`: what a chunk mismatch's message adds (the attribute it comes from)."""

    arrays: tuple[ArraySpec, ...]
    counts: tuple[Count, ...]
    keys_checked: bool = True
    chunks_note: str = ""

    def __getitem__(self, name: str) -> ArraySpec:
        return {spec.name: spec for spec in self.arrays}[name]

    def count_problems(self, attrs: Mapping[str, Any]) -> list[str]:
        """Why the integer attributes of `attrs` cannot be the store's counts, in their order."""
        return [p for c in self.counts if (p := count_problem(attrs, c)) is not None]

    def meta_problems(self, name: str, arr: zarr.Array[Any], counts: Counts) -> list[str]:
        """What in the metadata of array `name` (`arr`) disagrees with its spec for `counts` (empty: nothing)."""
        spec, out = self[name], []
        shape = extents(spec.shape, counts)
        if shape is not None and tuple(arr.shape) != shape:
            out.append(f"shape {tuple(arr.shape)}, expected {shape}")
        if arr.dtype != spec.dtype:
            out.append(f"data type {arr.dtype}, expected {spec.dtype}")
        chunks = extents(spec.chunks, counts) if spec.chunks_checked else None
        if chunks is not None and tuple(arr.chunks) != chunks:
            out.append(f"chunks {tuple(arr.chunks)}, expected {chunks}{self.chunks_note}")
        if spec.fill_checked and arr.dtype == spec.dtype and not _same_fill(arr.fill_value, spec.fill):
            out.append(f"fill value {arr.fill_value!r}, expected {spec.fill!r}")
        if chunks is not None and self.keys_checked and arr.ndim == len(spec.shape) and (keys := _key_problem(arr)):
            out.append(keys)
        return out

    def votes(self, arrays: Mapping[str, zarr.Array[Any]]) -> dict[str, list[int]]:
        """The value of each count the shapes (and checked chunks) of `arrays` imply, array by array."""
        every = [d for s in self.arrays for d in s.shape] + [d for s in self.arrays for d in _voting_chunks(s)]
        out: dict[str, list[int]] = {d.count: [] for d in every if isinstance(d, Dim)}  # in the order shapes name them
        for name, arr in arrays.items():
            spec = self[name]
            for dims, sizes in ((spec.shape, arr.shape), (_voting_chunks(spec), arr.chunks)):
                for d, size in zip(
                    dims, sizes, strict=False
                ):  # a damaged array may have another rank: `problems` names it
                    if isinstance(d, Dim):
                        out[d.count].append(size - d.plus)
        return out


def _voting_chunks(spec: ArraySpec) -> tuple[Extent, ...]:
    """The chunk extents of `spec` that tell a count: those of its checked metadata."""
    return spec.chunks if spec.chunks_checked else ()


def _statistic(
    name: str, dtype: npt.DTypeLike = np.float32, fill: float | int = STAT_MISSING, rule: ValueRule | None = None
) -> ArraySpec:
    """An `(N, T)` statistic; float ones are stored raw (they barely compress, ~13%, and read ~1.6x faster)."""
    compressors: Literal["auto"] | None = None if np.dtype(dtype).kind == "f" else "auto"
    return ArraySpec(name, np.dtype(dtype), fill, (ROWS, EPOCHS), (Dim("chunk_rows"), 1), compressors, rule=rule)


class _ScoreOptions(TypedDict, total=False):
    """The `ArraySpec` flags `_score` passes on."""

    chunks_read: bool
    index_copy: bool
    rule: ValueRule | None


class _RowOptions(_ScoreOptions, total=False):
    """The `ArraySpec` flags `_by_row` passes on."""

    fill_checked: bool
    optional: bool


def _by_row(name: str, dtype: npt.DTypeLike, fill: int, **kw: Unpack[_RowOptions]) -> ArraySpec:
    """An `(N,)` array chunked like the statistics."""
    return ArraySpec(name, np.dtype(dtype), fill, (ROWS,), (Dim("chunk_rows"),), **kw)


# RUN/stats.zarr: the statistics, each row's identity, the labels, the shards' rows, the markers
STATS_SCHEMA = StoreSchema(
    arrays=(
        _statistic("p_true", rule=PROBABILITIES),
        _statistic("correct", np.uint8, CORRECT_MISSING, rule=CORRECT),
        _statistic("margin"),
        _statistic("el2n"),
        _statistic("entropy"),
        _statistic("loss"),
        _by_row("id_hi", np.uint64, 0, fill_checked=False, index_copy=True),
        _by_row("id_lo", np.uint64, 0, fill_checked=False, index_copy=True),
        _by_row(LABEL, np.int32, LABEL_MISSING, optional=True, rule=LABELS),  # 0.1.0 recorded none
        ArraySpec(
            "shard_offset",
            np.dtype(np.int64),
            0,
            (Dim("n_shards", 1),),
            (Dim("n_shards", 1),),
            chunks_checked=False,
            fill_checked=False,
            chunks_read=False,
            index_copy=True,
        ),
        ArraySpec(
            "done",
            np.dtype(np.uint8),
            0,
            (EPOCHS, SHARDS),
            (1, Dim("n_shards", least=1)),
            chunks_checked=False,
            chunks_read=False,
            rule=MARKERS,
        ),
    ),
    counts=(
        Count("n_samples", 0, "rows"),
        Count("n_shards", 0, "shards"),
        Count("epochs", 1, "epochs"),
        Count("chunk_rows", 1, "rows per chunk"),
    ),
)


def _score(name: str, dtype: npt.DTypeLike, fill: float | int, **kw: Unpack[_ScoreOptions]) -> ArraySpec:
    """An `(N,)` array of a scores store, chunked by `block_rows`; only its shape, type and chunks are checked."""
    return ArraySpec(name, np.dtype(dtype), fill, (ROWS,), (Dim("block_rows"),), fill_checked=False, **kw)


# RUN/scores.zarr: the scores, the identities and label copied from the stats store, and the
# selection key and group of the last selection
SCORES_SCHEMA = StoreSchema(
    arrays=(
        *(_score(n, np.float64, STAT_MISSING, rule=MEAN_PROBABILITIES if n == "mean_p" else None) for n in SCORES),
        _score("id_hi", np.uint64, 0, index_copy=True),
        _score("id_lo", np.uint64, 0, index_copy=True),
        _score("sel_key", np.uint64, 0, chunks_read=False),
        _score(LABEL, np.int32, LABEL_MISSING, rule=LABELS),
        _score("sel_group", np.int32, NO_GROUP, chunks_read=False),
    ),
    counts=(Count("block_rows", 1), Count("epochs", 1), Count("window", 1)),
    keys_checked=False,
    chunks_note=" (block_rows)",
)
