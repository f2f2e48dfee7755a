"""The keep-list directory: which samples to keep, per shard; written atomically.

Self-contained (no index needed to use it): shard names with kept counts, each kept
sample's key, 128-bit identity and, when built from an index, its position in its tar and
its byte range there (what lets the loader seek past pruned samples without the index).
NumPy + JSON only, read without pickle, so the loader can import it without Ray or Zarr.

A keep-list lives in a local folder or at an object-store URL (`s3://bucket/run/keep`); either is
written whole through `commit.replacing` (a rename swap locally; data objects first and one
`COMMIT` object last on object stores) and read from `commit.committed`: locally memory-mapped,
on object stores the manifest and shard table at once and each shard's slice of the per-sample
arrays by exact byte ranges when it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from streamprune import storage
from streamprune.errors import DamagedRunError, SettingsError
from streamprune.formats import commit
from streamprune.formats.atomic import named_os_error, output_lock
from streamprune.formats.headers import KEEP_FORMAT, check_format, header
from streamprune.shards.identity import id128

if TYPE_CHECKING:
    from streamprune.formats.index import Index

ID_DTYPE = np.dtype("u8,u8")  # DataComp's subset format: (hi, lo) pairs
ARRAY_DTYPES = {
    "key_offset": np.dtype(np.int64),
    "ids": ID_DTYPE,
    "positions": np.dtype(np.int64),
    "weights": np.dtype(np.float64),
    "ranges": np.dtype(np.int64),
}
MAX_COUNT = 2**63 - 1  # counts, sizes and offsets are int64
MANIFEST_COUNTS = ("k", "N", "n_rows", "dropped_missing", "filled_zero_weight", "epochs", "window", "seed")
MANIFEST_TEXTS = ("method", "balance", "fingerprint", "index_root", "created", "streamprune_version")


class KeepList:
    """Kept samples grouped by shard, in index order; positions are per-shard tar positions.

    Keys are a UTF-8 blob with offsets and arrays may be memory-mapped (or, on object stores,
    `RangedArray`s read by byte ranges), so a list of 10^8+ samples loads in constant time.
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        names: list[str],
        kept: npt.ArrayLike,
        key_blob: bytes | np.ndarray | RangedArray,
        key_offset: Any,
        ids: Any,
        positions: Any = None,
        weights: Any = None,
        samples: npt.ArrayLike | None = None,
        ranges: Any = None,
        shard_bytes: npt.ArrayLike | None = None,
    ):
        self.manifest, self.names = manifest, list(names)
        self.kept = np.asarray(kept, dtype=np.int64)
        self.samples = None if samples is None else np.asarray(samples, dtype=np.int64)
        self.shard_bytes = None if shard_bytes is None else np.asarray(shard_bytes, dtype=np.int64)
        self.key_blob, self.key_offset, self.id_pairs = key_blob, key_offset, ids
        self.positions, self.weights, self.ranges = positions, weights, ranges
        self.offsets = np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)
        self._by_name = {n: i for i, n in enumerate(self.names)}
        self._key_sets: dict[int, frozenset[str]] = {}
        self.path: Path | str | None = None  # set by `load` (the location given): pickles by reference
        self.place: str | None = None  # set by `load`: where it was read (the committed generation on object stores)
        n = int(self.offsets[-1])
        lengths = {
            "keys": len(key_offset) - 1,
            "identities": len(ids),
            "positions": positions,
            "weights": weights,
            "byte ranges": ranges,
        }
        lengths = {what: v if isinstance(v, int) else len(v) for what, v in lengths.items() if v is not None}
        if any(v != n for v in lengths.values()):
            raise DamagedRunError(
                f"inconsistent: {n} kept by shard counts, " + ", ".join(f"{v} {what}" for what, v in lengths.items())
            )

    def __reduce__(self) -> str | tuple[Any, ...]:
        """A loaded list pickles as its location (DataLoader workers, Ray tasks read it again, the
        same committed generation on object stores), never as its arrays."""
        if self.path is None or self.place is None:
            return super().__reduce__()
        return _reopen, (self.path, self.place)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __contains__(self, item: tuple[str, str]) -> bool:
        name, key = item
        s = self._by_name.get(name)
        if s is None:
            return False
        if s not in self._key_sets:
            self._key_sets[s] = frozenset(self.shard_keys(name))
        return key in self._key_sets[s]

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("fingerprint")

    def kept_count(self, shard_name: str) -> int:
        """Kept samples of a shard (0 for a shard the list does not know)."""
        s = self._by_name.get(shard_name)
        return 0 if s is None else int(self.kept[s])

    def _damaged(self, file: str, shard_name: str, problem: str) -> DamagedRunError:
        return _damaged(self.place, file, f"shard {shard_name!r}: {problem}")

    def shard_keys(self, shard_name: str) -> list[str]:
        """Keys of a shard's kept samples, in tar order (checked: UTF-8 within keys.bin)."""
        s = self._by_name[shard_name]
        cuts = np.asarray(self.key_offset[self.offsets[s] : self.offsets[s + 1] + 1])
        if cuts[0] < 0 or cuts[-1] > len(self.key_blob) or (np.diff(cuts) < 0).any():
            raise self._damaged("key_offset.npy", shard_name, "key offsets that decrease or leave keys.bin")
        blob = bytes(self.key_blob[cuts[0] : cuts[-1]])
        try:
            return [blob[a - cuts[0] : b - cuts[0]].decode() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        except UnicodeDecodeError as exc:
            raise self._damaged("keys.bin", shard_name, f"a key is not UTF-8 ({exc.reason})") from None

    def shard_index(self, shard_name: str) -> int | None:
        """Position of a shard in `names`, None when the list does not know it."""
        return self._by_name.get(shard_name)

    def shard_slice(self, shard_name: str) -> slice:
        """The kept samples of a shard as a slice of the per-sample arrays."""
        s = self._by_name[shard_name]
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def shard_positions(self, shard_name: str) -> np.ndarray | None:
        """Sorted tar positions of a shard's kept samples (None when built without an index)."""
        if self.positions is None:
            return None
        pos = np.asarray(self.positions[self.shard_slice(shard_name)])
        s = self._by_name[shard_name]
        limit = MAX_COUNT if self.samples is None else int(self.samples[s])
        if len(pos) and (pos[0] < 0 or pos[-1] >= limit or (np.diff(pos) <= 0).any()):
            raise self._damaged("positions.npy", shard_name, f"positions not strictly ascending in [0, {limit})")
        return pos

    def shard_ranges(self, shard_name: str) -> np.ndarray | None:
        """`(start, end)` byte ranges of a shard's kept samples in its tar (None without an index)."""
        if self.ranges is None:
            return None
        ranges = np.asarray(self.ranges[self.shard_slice(shard_name)])
        starts, ends = ranges[:, 0], ranges[:, 1]  # past the tar's end: the reader refuses (it knows the size)
        if len(ranges) and (starts[0] < 0 or (ends <= starts).any() or (starts[1:] < ends[:-1]).any()):
            raise self._damaged("ranges.npy", shard_name, "byte ranges that are negative, empty, overlap or descend")
        return ranges

    def shard_weights(self, shard_name: str) -> np.ndarray | None:
        """Importance weights of a shard's kept samples (None when the list carries none)."""
        if self.weights is None:
            return None
        weights = np.asarray(self.weights[self.shard_slice(shard_name)])
        if not (np.isfinite(weights) & (weights > 0)).all():
            raise self._damaged("weights.npy", shard_name, "weights that are not finite and > 0")
        return weights

    def ids(self) -> np.ndarray:
        """Kept identities as a sorted `u8,u8` array."""
        return np.sort(np.asarray(self.id_pairs))

    def to_datacomp(self, path: str | os.PathLike[str] | IO[bytes]) -> None:
        """Write kept identities as a sorted `u8,u8` `.npy`, as DataComp subsets are (to a path or
        an open binary file)."""
        np.save(path, self.ids(), allow_pickle=False)

    def to_text(self, path: str | os.PathLike[str]) -> None:
        """Write one `shard<TAB>key` line per kept sample."""
        with open(path, "w") as f:
            for name in self.names:
                f.writelines(f"{name}\t{key}\n" for key in self.shard_keys(name))

    @classmethod
    def from_keys(
        cls, pairs: Iterable[tuple[str, str]], *, fingerprint: str | None = None, method: str = "user"
    ) -> KeepList:
        """A keep-list from the user's own `(shard_name, key)` pairs (default identities)."""
        by_shard: dict[str, list[str]] = {}
        for name, key in pairs:
            by_shard.setdefault(name, []).append(key)
        names = sorted(by_shard)
        keys = [k for n in names for k in by_shard[n]]
        pairs_ = np.array([id128(n, k) for n in names for k in by_shard[n]], dtype=np.uint64).reshape(-1, 2)
        ids = np.empty(len(keys), dtype=ID_DTYPE)
        ids["f0"], ids["f1"] = pairs_[:, 0], pairs_[:, 1]
        encoded = [k.encode() for k in keys]
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        return cls(
            new_manifest(method=method, k=len(keys), fingerprint=fingerprint),
            names,
            [len(by_shard[n]) for n in names],
            b"".join(encoded),
            offsets,
            ids,
        )

    @classmethod
    def from_rows(
        cls, index: Index, rows: Iterable[int], path: str | os.PathLike[str], method: str = "user"
    ) -> KeepList:
        """Write and load a keep-list of the given rows of `index` (a `shardindex.Index`)."""
        rows = np.unique(np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= index.n_samples):
            raise SettingsError(f"rows must lie in [0, {index.n_samples}); got {rows[0]}..{rows[-1]}")
        manifest = new_manifest(
            method=method,
            k=len(rows),
            N=index.n_samples,
            fingerprint=index.fingerprint,
            index_root=index.root,
            weights=False,
        )
        with KeepListWriter.for_index(path, index, manifest, len(rows)) as writer:
            writer.add_rows(index, rows)
        return cls.load(path)

    def save(self, path: str | os.PathLike[str]) -> Path | str:
        """Write the list to a folder or object-store URL, replacing what is there whole: a reader
        sees the old list or the new one, never a mix. Returns `path` (a `Path` when local)."""

        def opt(a: Any) -> np.ndarray | None:
            return None if a is None else np.asarray(a)

        with KeepListWriter(
            path,
            self.manifest,
            self.names,
            len(self),
            self.samples,
            self.shard_bytes,
            with_positions=self.positions is not None,
            with_weights=self.weights is not None,
            with_ranges=self.ranges is not None,
        ) as w:
            w.add(
                np.repeat(np.arange(len(self.names)), self.kept),
                np.asarray(self.id_pairs),
                np.asarray(self.key_offset),
                bytes(self.key_blob[: self.key_offset[-1]]),
                opt(self.positions),
                opt(self.weights),
                opt(self.ranges),
            )
        return os.fspath(path) if storage.is_url(path) else Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeepList:
        """Read a keep-list: a local folder (memory-mapped) or an object-store URL (its committed
        generation: the manifest and shard table now, each shard's slice of the per-sample arrays
        by exact byte ranges when it is read). A half-written or edited one is refused.

        Headers, fields and per-shard counts are checked here, in time independent of the number
        of kept samples; a shard's keys, positions, byte ranges and weights when they are read
        (`shard_keys`, ...). Each problem is a DamagedRunError naming the file."""
        location = _location(path)
        return cls._read(Path(location) if not storage.is_url(location) else location, _committed_place(location))

    @classmethod
    def _read(cls, path: Path | str, place: str) -> KeepList:
        """The keep-list `path` as read from `place` (its folder locally, its committed generation
        on an object store)."""
        manifest_at = storage.join(place, "manifest.json")
        manifest = check_format(_read_json(place, "manifest.json"), KEEP_FORMAT, f"keep-list {manifest_at!r}")
        _check_manifest(place, manifest)
        names, kept, columns = _read_shards(place, _read_json(place, "shards.json"))
        k = sum(kept)
        if k != manifest["k"]:
            raise _damaged(place, "shards.json", f"the kept counts add up to {k}, manifest.json says k={manifest['k']}")
        listing = storage.sizes(place) if storage.is_url(place) else None
        arr = {name: _read_array(place, name, k, listing) for name in ARRAY_DTYPES}
        key_offset, ids = arr["key_offset"], arr["ids"]
        if key_offset is None or ids is None:
            raise _damaged(place, "key_offset.npy" if key_offset is None else "ids.npy", "missing")
        if manifest.get("weights") is True and arr["weights"] is None:
            raise _damaged(place, "weights.npy", "missing, manifest.json says weights: true")
        blob, size = _open_blob(place, listing)
        starts = _shard_key_starts(key_offset, kept)
        if starts[0] != 0 or starts[-1] != size or (np.diff(starts) < 0).any():
            raise _damaged(
                place, "key_offset.npy", f"the shards' key offsets do not ascend from 0 to the {size} bytes of keys.bin"
            )
        keep = cls(
            manifest,
            names,
            kept,
            blob,
            key_offset,
            ids,
            arr["positions"],
            arr["weights"],
            columns["samples"],
            arr["ranges"],
            columns["bytes"],
        )
        keep.path, keep.place = path, place
        return keep


def _reopen(path: Path | str, place: str) -> KeepList:
    """A pickled keep-list read again where it was read (on an object store the same committed
    generation, so that every DataLoader worker sees the list the main process saw)."""
    return KeepList._read(path, place)


def _location(path: str | os.PathLike[str]) -> str:
    """A keep-list's location as a string (an object-store URL without a trailing '/')."""
    text = os.fspath(path)
    return text.rstrip("/") if storage.is_url(text) else text


def _committed_place(location: str) -> str:
    """Where the keep-list `location` is read from; FileNotFoundError naming it when there is none."""
    hint = "write one with `streamprune reduce` (or `KeepList.save`)"
    try:
        place = commit.committed(location)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no keep-list at {location!r} (nothing committed there: no {commit.COMMIT} object); {hint}"
        ) from None
    if not storage.is_url(place) and not os.path.exists(os.path.join(place, "manifest.json")):
        raise FileNotFoundError(f"no keep-list at {location!r} (no manifest.json); {hint}")
    return place


def _damaged(place: str | os.PathLike[str] | None, file: str, problem: str) -> DamagedRunError:
    """A keep-list that cannot be used: names where it was read (when saved) and the file (the
    whole object's URL on an object store)."""
    where = "(not saved)" if place is None else repr(os.fspath(place))
    named = storage.join(place, file) if place is not None and storage.is_url(place) else file
    return DamagedRunError(
        f"keep-list {where} is damaged or incomplete: {named}: {problem}; write it again "
        "(`streamprune reduce`, or `KeepList.save` for a list of your own)"
    )


def _is_count(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT


def _read_json(place: str, file: str) -> object:
    """The JSON document `file` of the keep-list at `place`."""
    try:
        raw = storage.read_bytes(storage.join(place, file))
    except FileNotFoundError:
        raise _damaged(place, file, "missing") from None
    except OSError as exc:
        if storage.is_url(place):
            raise  # the store failed, not the file
        raise _damaged(place, file, f"not readable JSON ({exc})") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise _damaged(place, file, f"not readable JSON ({exc})") from None


def _is_text(value: Any, field: str) -> bool:
    """A string; `fingerprint` may also be null: a list of keys drawn from no index (`from_keys`)."""
    return isinstance(value, str) or (field == "fingerprint" and value is None)


def _check_manifest(path: str, m: dict[str, Any]) -> None:
    """The manifest's fields that readers use are of their types (all problems in one error)."""
    problems = [f"{f}={m.get(f)!r} is not an integer >= 0" for f in MANIFEST_COUNTS if not _is_count(m.get(f, 0))]
    problems += [f"{f}={m[f]!r} is not a string" for f in MANIFEST_TEXTS if not _is_text(m.get(f, ""), f)]
    ratio = m.get("ratio", 0)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
        problems.append(f"ratio={ratio!r} is not a number in [0, 1)")
    if not isinstance(m.get("weights", False), bool):
        problems.append(f"weights={m['weights']!r} is not true or false")
    if not isinstance(m.get("params", {}), dict):
        problems.append(f"params={m['params']!r} is not an object")
    if "k" not in m:
        problems.insert(0, "k is missing")
    if problems:
        raise _damaged(path, "manifest.json", "; ".join(problems))


def _read_shards(path: str, shards: object) -> tuple[list[str], list[int], dict[str, list[int] | None]]:
    """shards.json's names, kept counts and `samples` and `bytes` columns (None when absent), checked."""
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise _damaged(path, "shards.json", "not a list of shard entries ({name, kept, ...})")
    names = [s.get("name") for s in shards]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _damaged(path, "shards.json", f"entry {i}: name {name!r} is not a shard name")
    if len(set(names)) < len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise _damaged(path, "shards.json", f"shard {twice!r} is listed twice")
    columns: dict[str, list[int] | None] = {}
    for field, low, what in (
        ("kept", 0, "an integer >= 0"),
        ("samples", 0, "an integer >= kept"),
        ("bytes", -1, "a size or -1"),
    ):
        if field != "kept" and not any(field in s for s in shards):
            columns[field] = None
            continue
        for name, s in zip(names, shards, strict=True):
            value = s.get(field)
            if not _is_count(value, low) or (field == "samples" and value < s["kept"]):
                raise _damaged(path, "shards.json", f"shard {name!r}: {field}={value!r} is not {what}")
        columns[field] = [s[field] for s in shards]
    kept = columns.pop("kept")
    assert kept is not None  # every entry's was checked above
    return names, kept, columns


def _read_array(place: str, name: str, k: int, listing: dict[str, int] | None) -> Any:
    """`NAME.npy` (None when absent), its dtype and shape those of `k` kept samples: memory-mapped
    locally, a `RangedArray` on object stores (`listing`: the sizes of the generation's objects)."""
    file = f"{name}.npy"
    try:
        array = _open_array(place, file, listing)
    except Exception as exc:  # a damaged header raises many kinds in numpy (ValueError, SyntaxError, TokenError...)
        if isinstance(exc, OSError) and storage.is_url(place):
            raise  # the store failed, not the file
        raise _damaged(place, file, f"not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if array is None:
        return None
    shape = {"key_offset": (k + 1,), "ranges": (k, 2)}.get(name, (k,))
    if not isinstance(array, (np.ndarray, RangedArray)) or array.dtype != ARRAY_DTYPES[name] or array.shape != shape:
        found = f"{array.dtype} {array.shape}" if isinstance(array, (np.ndarray, RangedArray)) else type(array).__name__
        raise _damaged(place, file, f"{found}, not {ARRAY_DTYPES[name]} {shape} (shards.json counts {k} kept samples)")
    return array


def _open_array(place: str, file: str, listing: dict[str, int] | None) -> Any:
    """The `.npy` `file` of the keep-list at `place`, unread (None when absent)."""
    if listing is not None:
        return RangedArray.open(storage.join(place, file), listing[file]) if file in listing else None
    path = os.path.join(place, file)
    return np.load(path, mmap_mode="r", allow_pickle=False) if os.path.exists(path) else None


def _open_blob(place: str, listing: dict[str, int] | None) -> tuple[Any, int]:
    """`keys.bin` unread and its size: memory-mapped locally (b"" when empty), a `RangedArray` of
    bytes on object stores."""
    if listing is not None:
        if "keys.bin" not in listing:
            raise _damaged(place, "keys.bin", "missing")
        size = listing["keys.bin"]
        return RangedArray(storage.join(place, "keys.bin"), np.dtype(np.uint8), (size,), 0), size
    path = os.path.join(place, "keys.bin")
    try:
        size = os.stat(path).st_size
        return (np.memmap(path, dtype=np.uint8, mode="r") if size else b""), size
    except (OSError, ValueError) as exc:
        raise _damaged(place, "keys.bin", f"unreadable ({exc})") from None


def _shard_key_starts(key_offset: Any, kept: list[int]) -> np.ndarray:
    """Each shard's first key offset and the end, to check at load. On object stores only the
    first and the end (two small reads, not one per shard): a shard's own offsets are checked
    when its keys are read (`shard_keys`)."""
    if isinstance(key_offset, RangedArray):
        return np.array([key_offset[0], key_offset[len(key_offset) - 1]], dtype=np.int64)
    return np.asarray(key_offset[np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])])


_NPY_HEAD = 128  # the header's length as np.save and `_NpyOut` write it for these dtypes: one small read
_NPY_HEAD_MAX = 1 << 16


class RangedArray:
    """A C-order array in an object at `location` (from byte `offset`), read by exact byte ranges:
    `a[i:j]` fetches those rows only, `a[i]` one, `np.asarray(a)` all. What a memory map is to a
    local keep-list, for one on an object store; it pickles as its location."""

    def __init__(self, location: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.location, self.dtype, self.shape, self.offset = location, dtype, tuple(shape), offset
        self.row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    @classmethod
    def open(cls, location: str, size: int) -> RangedArray:
        """The `.npy` object at `location` (`size` bytes): its header read (one small request) for
        dtype, shape and where the data starts; ValueError when it is not a whole `.npy` array."""
        head = storage.read_bytes(location, 0, min(size, _NPY_HEAD))
        length = _npy_header_length(head)
        if length > len(head):
            if length > min(size, _NPY_HEAD_MAX):
                raise ValueError(f"a header of {length} bytes in an object of {size}")
            head = storage.read_bytes(location, 0, length)
        stream = io.BytesIO(head[:length])
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
        if dtype.hasobject or (fortran_order and len(shape) > 1):
            raise ValueError("Python objects or Fortran order: not an array this reads")
        need = length + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if size < need:
            raise ValueError(f"{size} bytes, its header announces {need}")
        return cls(location, dtype, shape, length)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise IndexError(f"{self.location}: only contiguous slices are read")
            return self._rows(start, max(start, stop))
        i = operator.index(item)  # a list or array of indices: a TypeError (one request each is not served)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.location}: index {i} is out of its {len(self)} rows")
        i %= len(self)
        return self._rows(i, i + 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self._rows(0, len(self))
        return rows if dtype is None else rows.astype(dtype)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in one range request (none when empty)."""
        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        first = self.offset + start * self.row_bytes
        want = (stop - start) * self.row_bytes
        try:
            data = storage.read_bytes(self.location, first, first + want)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.location}: gone: the keep-list was replaced while in use (a newer generation was "
                "committed and this one removed); load it again"
            ) from None
        if len(data) != want:
            raise DamagedRunError(
                f"{self.location}: {len(data)} bytes at {first}, {want} expected: the object was cut short "
                "or replaced while read; write the keep-list again"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


def _npy_header_length(head: bytes) -> int:
    """The length of the `.npy` header (magic, version, length, dictionary) that `head` starts with."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file (no magic string)")
    if head[6] == 1:
        return 10 + int.from_bytes(head[8:10], "little")
    if head[6] in (2, 3) and len(head) >= 12:
        return 12 + int.from_bytes(head[8:12], "little")
    raise ValueError(f"unsupported .npy version {head[6]}.{head[7]}")


def _create(location: str) -> IO[bytes]:
    """`location` opened to be written front to back: a local file, or an object-store upload
    (streamed in parts; the object appears whole when closed)."""
    if storage.is_url(location):
        fs, path = storage.filesystem(location)
        upload: IO[bytes] = fs.open(path, "wb")
        return upload
    return open(location, "wb")


class _Out:
    """A file of a new keep-list written front to back with ordinary buffered writes; an
    `OSError` (a full disk) names it.

    Never memory-mapped: a write into a mapped sparse file that finds the disk full kills the
    process with SIGBUS; a buffered write fails with an `OSError` naming the file instead.
    """

    def __init__(self, location: str):
        self.path = location
        try:
            self.file = _create(location)
        except OSError as exc:
            raise named_os_error(exc, location) from None

    def write(self, data: Any) -> None:
        """Append `data` (bytes or a contiguous array)."""
        try:
            self.file.write(data)
        except OSError as exc:
            raise named_os_error(exc, self.path) from None

    def close(self) -> None:
        """Finish the file: synced to disk locally, uploaded on an object store."""
        if self.file.closed:
            return
        try:
            try:
                if not storage.is_url(self.path):
                    self.file.flush()
                    os.fsync(self.file.fileno())
            finally:
                self.file.close()
        except OSError as exc:
            raise named_os_error(exc, self.path) from None

    def abandon(self) -> None:
        """Stop writing without syncing or uploading what is buffered (its folder is removed)."""
        if self.file.closed:
            return
        with contextlib.suppress(Exception):
            if storage.is_url(self.path):
                discard = getattr(self.file, "discard", None)
                if discard is not None:
                    discard()  # aborts a multipart upload under way
                self.file.closed = True  # type: ignore[misc]  # fsspec files: close() would upload the rest
            else:
                self.file.close()


class _NpyOut(_Out):
    """An `.npy` file of a known shape: the header, then the values as they come."""

    def __init__(self, location: str, dtype: npt.DTypeLike, shape: tuple[int, ...]):
        super().__init__(location)
        self.dtype = np.dtype(dtype)
        self.size = int(np.prod(shape))
        self.written = 0
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)},
        )
        super().write(header.getvalue())

    def write(self, data: Any) -> None:
        """Append values (of the file's dtype), no more than its shape announced."""
        values = np.ascontiguousarray(data, dtype=self.dtype)
        if self.written + values.size > self.size:
            raise SettingsError(f"{storage.name(self.path)}: more values than the {self.size} announced")
        super().write(values.data.cast("B"))
        self.written += values.size


def _fsync_dir(path: str) -> None:
    """Sync a local folder's entries to disk (nothing to do on object stores)."""
    if storage.is_url(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


_OutT = TypeVar("_OutT", bound=_Out)


class KeepListWriter:
    """Writes a keep-list block by block (rows in index order), then commits it whole.

    Locally the new list is built in a hidden sibling with ordinary buffered writes (a full disk
    is an `OSError` naming the file, never SIGBUS), synced, and swapped in by renames; at an
    object-store URL it is uploaded into a new generation and committed by one `COMMIT` object
    written last (`commit.replacing`). On any error the new files are removed and the previous
    list stays as it was, readable. The writer holds the output's lock and removes what killed
    writers of the same output left first (`commit.clean_uncommitted`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: dict[str, Any],
        names: list[str],
        k: int,
        samples: np.ndarray | None = None,
        shard_bytes: Sequence[int] | np.ndarray | None = None,
        with_positions: bool = True,
        with_weights: bool = False,
        with_ranges: bool = True,
    ):
        self.path = _location(path)
        self.manifest, self.names, self.k = manifest, names, int(k)
        self.samples, self.shard_bytes = samples, shard_bytes
        self.kept = np.zeros(len(names), dtype=np.int64)
        self.with_positions, self.with_weights, self.with_ranges = with_positions, with_weights, with_ranges
        self._files: list[_Out] = []
        self._stack: contextlib.ExitStack | None = None

    @classmethod
    def for_index(
        cls, path: str | os.PathLike[str], index: Index, manifest: dict[str, Any], k: int, with_weights: bool = False
    ) -> KeepListWriter:
        """A writer for `k` rows of `index` (a `shardindex.Index`), with positions and byte ranges."""
        sizes = [-1 if s["size"] is None else s["size"] for s in index.shards]
        return cls(path, manifest, index.names, k, np.diff(index.shard_offset), sizes, with_weights=with_weights)

    def __enter__(self) -> KeepListWriter:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(output_lock(self.path, reentrant=True))
        try:
            commit.clean_uncommitted(self.path)
            self._stack.callback(_fsync_dir, storage.parent(self.path))  # after the swap, before the unlock
            self.place = self._stack.enter_context(commit.replacing(self.path))

            def out(name: str, dtype: npt.DTypeLike, shape: tuple[int, ...] = (self.k,)) -> _NpyOut:
                return self._open(_NpyOut, f"{name}.npy", dtype, shape)

            self.ids = out("ids", ID_DTYPE)
            self.positions = out("positions", np.int64) if self.with_positions else None
            self.weights = out("weights", np.float64) if self.with_weights else None
            self.ranges = out("ranges", np.int64, (self.k, 2)) if self.with_ranges else None
            self.key_offset = out("key_offset", np.int64, (self.k + 1,))
            self.key_offset.write(np.zeros(1, np.int64))
            self.keys = self._open(_Out, "keys.bin")
        except BaseException as exc:
            self._abort(exc)
            if isinstance(exc, OSError):
                raise named_os_error(exc, getattr(exc, "filename", None) or self.path) from None
            raise
        self.n, self._last_shard, self._key_end = 0, 0, 0
        return self

    def _open(self, kind: type[_OutT], file: str, *args: object) -> _OutT:
        """A new file `file` of the list being written (`kind`: `_Out` or `_NpyOut`)."""
        f = kind(storage.join(self.place, file), *args)
        self._files.append(f)
        return f

    def add(
        self,
        shards: np.ndarray,
        ids: np.ndarray,
        key_offset: np.ndarray,
        key_blob: bytes,
        positions: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        ranges: np.ndarray | None = None,
    ) -> None:
        """Append kept samples in index order: their shard numbers, identities, keys (blob +
        offsets from 0) and positions, weights and byte ranges."""
        m = len(ids)
        if m and ((np.diff(shards) < 0).any() or shards[0] < self._last_shard):
            raise SettingsError("kept samples must be added in shard order")
        if self.n + m > self.k:
            raise SettingsError(f"more kept samples than the {self.k} the shard counts announce")
        if m:
            self.kept += np.bincount(shards, minlength=len(self.kept))
            self._last_shard = int(shards[-1])
        key_offset = np.asarray(key_offset, dtype=np.int64)
        self.ids.write(ids)
        self.key_offset.write(self._key_end + key_offset[1:] - key_offset[0])
        self.keys.write(key_blob)
        self._key_end += int(key_offset[-1] - key_offset[0])
        for out, values in ((self.positions, positions), (self.weights, weights), (self.ranges, ranges)):
            if out is not None:
                out.write(values)
        self.n += m

    def add_rows(self, index: Index, rows: np.ndarray, weight: float | None = None) -> None:
        """Append kept rows of `index` (sorted): identities, keys, positions, byte ranges, weights."""
        if not len(rows):
            return
        starts, ends = index.key_offset[rows], index.key_offset[rows + 1]
        first, last = int(starts[0]), int(ends[-1])
        raw = storage.read_bytes(index.file("keys.bin"), first, last) if last > first else b""
        span = np.frombuffer(raw, dtype=np.uint8)
        lengths = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        blob = span[np.repeat(starts - starts[0] - offsets[:-1], lengths) + np.arange(offsets[-1])].tobytes()
        ids = np.empty(len(rows), dtype=ID_DTYPE)
        ids["f0"], ids["f1"] = index.id_hi[rows], index.id_lo[rows]
        shards = index.shard_of(rows)
        self.add(
            shards,
            ids,
            offsets,
            blob,
            rows - index.shard_offset[shards],
            None if self.weights is None else np.full(len(rows), weight),
            index.byte_ranges(rows),
        )

    def _abort(self, exc: BaseException | None) -> None:
        """Stop: every file abandoned, then (`exc`: what went wrong) the new folder removed, or
        (None) the new list committed; the lock released either way."""
        for f in self._files:
            f.abandon()
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if exc is None:
            stack.close()
        else:
            stack.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._abort(exc)
            return
        try:
            if self.n != self.k:
                raise SettingsError(f"keep-list got {self.n} samples, the shard counts announce {self.k}")
            for f in self._files:
                f.close()
            shards = [{"name": n, "kept": int(c)} for n, c in zip(self.names, self.kept, strict=True)]
            for field, values in (("samples", self.samples), ("bytes", self.shard_bytes)):
                if values is not None:
                    for entry, v in zip(shards, values, strict=True):
                        entry[field] = int(v)
            self._write_text("shards.json", json.dumps(shards))
            self._write_text("manifest.json", json.dumps({**self.manifest, "k": self.k}, indent=1))
            _fsync_dir(self.place)
        except BaseException as err:
            self._abort(err)
            raise
        self._abort(None)  # commits: the swap locally, the COMMIT object on an object store

    def _write_text(self, file: str, text: str) -> None:
        """Write the text file `file` of the new list whole."""
        out = self._open(_Out, file)
        out.write(text.encode())
        out.close()


def new_manifest(**fields: Any) -> dict[str, Any]:
    """Manifest fields every keep-list carries, plus `fields`."""
    return {**header(KEEP_FORMAT), **fields}
