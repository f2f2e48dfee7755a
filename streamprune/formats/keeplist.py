"""The keep-list directory: which samples to keep, per shard; written atomically.

Self-contained (no index needed to use it): shard names with kept counts, each kept
sample's key, 128-bit identity and, when built from an index, its position in its tar and
its byte range there (what lets the loader seek past pruned samples without the index).
NumPy + JSON only, read without pickle, so the loader can import it without Ray or Zarr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from streamprune.errors import DamagedRunError, SettingsError
from streamprune.formats.atomic import (
    clean_stale_temps,
    named_os_error,
    output_lock,
    swap_in,
    temp_sibling,
)
from streamprune.formats.headers import KEEP_FORMAT, check_format, header
from streamprune.shards.identity import id128

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

    Keys are a UTF-8 blob with offsets and arrays may be memory-mapped, so a list of
    10^8+ samples loads in constant time.
    """

    def __init__(
        self,
        manifest: dict,
        names: list[str],
        kept: npt.ArrayLike,
        key_blob,
        key_offset: np.ndarray,
        ids: np.ndarray,
        positions: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        samples: npt.ArrayLike | None = None,
        ranges: np.ndarray | None = None,
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
        self._key_sets: dict[int, frozenset] = {}
        self.path: Path | None = None  # set by `load`: pickles by reference
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

    def __reduce__(self):
        if self.path is None:
            return super().__reduce__()
        return KeepList.load, (self.path,)

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
        return _damaged(self.path, file, f"shard {shard_name!r}: {problem}")

    def shard_keys(self, shard_name: str) -> list[str]:
        """Keys of a shard's kept samples, in tar order (checked: UTF-8 within keys.bin)."""
        s = self._by_name[shard_name]
        cuts = np.asarray(self.key_offset[self.offsets[s] : self.offsets[s + 1] + 1])
        if cuts[0] < 0 or cuts[-1] > len(self.key_blob) or (np.diff(cuts) < 0).any():
            raise self._damaged("key_offset.npy", shard_name, "key offsets that decrease or leave keys.bin")
        blob = bytes(self.key_blob[cuts[0] : cuts[-1]])
        try:
            return [blob[a - cuts[0] : b - cuts[0]].decode() for a, b in zip(cuts[:-1], cuts[1:])]
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

    def to_datacomp(self, path: str | os.PathLike) -> None:
        """Write kept identities as a sorted `u8,u8` `.npy`, as DataComp subsets are."""
        np.save(path, self.ids(), allow_pickle=False)

    def to_text(self, path: str | os.PathLike) -> None:
        """Write one `shard<TAB>key` line per kept sample."""
        with open(path, "w") as f:
            for name in self.names:
                f.writelines(f"{name}\t{key}\n" for key in self.shard_keys(name))

    @classmethod
    def from_keys(
        cls, pairs: Iterable[tuple[str, str]], *, fingerprint: str | None = None, method: str = "user"
    ) -> "KeepList":
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
    def from_rows(cls, index, rows: Iterable[int], path: str | os.PathLike, method: str = "user") -> "KeepList":
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the directory atomically: a reader sees the old list or the new one, never a mix."""
        opt = lambda a: None if a is None else np.asarray(a)
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
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KeepList":
        """Read a keep-list directory (memory-mapped); a half-written or edited one is refused.

        Headers, fields and per-shard counts are checked here, in time independent of the number
        of kept samples; a shard's keys, positions, byte ranges and weights when they are read
        (`shard_keys`, ...). Each problem is a DamagedRunError naming the file."""
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no keep-list at {str(path)!r} (no manifest.json)")
        manifest = check_format(_read_json(path, "manifest.json"), KEEP_FORMAT, f"keep-list {str(mpath)!r}")
        _check_manifest(path, manifest)
        names, kept, columns = _read_shards(path, _read_json(path, "shards.json"))
        k = sum(kept)
        if k != manifest["k"]:
            raise _damaged(path, "shards.json", f"the kept counts add up to {k}, manifest.json says k={manifest['k']}")
        arr = {name: _read_array(path, name, k) for name in ARRAY_DTYPES}
        key_offset, ids = arr["key_offset"], arr["ids"]
        if key_offset is None or ids is None:
            raise _damaged(path, "key_offset.npy" if key_offset is None else "ids.npy", "missing")
        if manifest.get("weights") is True and arr["weights"] is None:
            raise _damaged(path, "weights.npy", "missing, manifest.json says weights: true")
        try:
            size = (path / "keys.bin").stat().st_size
            blob = np.memmap(path / "keys.bin", dtype=np.uint8, mode="r") if size else b""
        except (OSError, ValueError) as exc:
            raise _damaged(path, "keys.bin", f"unreadable ({exc})") from None
        starts = key_offset[np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])]  # each shard's first key, the end
        if starts[0] != 0 or starts[-1] != size or (np.diff(starts) < 0).any():
            raise _damaged(
                path, "key_offset.npy", f"the shards' key offsets do not ascend from 0 to the {size} bytes of keys.bin"
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
        keep.path = path
        return keep


def _damaged(path: Path | None, file: str, problem: str) -> DamagedRunError:
    """A keep-list that cannot be used: names its directory (when saved) and the file."""
    where = "(not saved)" if path is None else repr(str(path))
    return DamagedRunError(
        f"keep-list {where} is damaged or incomplete: {file}: {problem}; write it again "
        "(`streamprune reduce`, or `KeepList.save` for a list of your own)"
    )


def _is_count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT


def _read_json(path: Path, file: str):
    try:
        return json.loads((path / file).read_bytes())
    except FileNotFoundError:
        raise _damaged(path, file, "missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise _damaged(path, file, f"not readable JSON ({exc})") from None


def _check_manifest(path: Path, m: dict) -> None:
    """The manifest's fields that readers use are of their types (all problems in one error)."""
    problems = [f"{f}={m.get(f)!r} is not an integer >= 0" for f in MANIFEST_COUNTS if not _is_count(m.get(f, 0))]
    problems += [f"{f}={m[f]!r} is not a string" for f in MANIFEST_TEXTS if not isinstance(m.get(f, ""), str)]
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


def _read_shards(path: Path, shards) -> tuple[list[str], list[int], dict[str, list[int] | None]]:
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
        for name, s in zip(names, shards):
            value = s.get(field)
            if not _is_count(value, low) or (field == "samples" and value < s["kept"]):
                raise _damaged(path, "shards.json", f"shard {name!r}: {field}={value!r} is not {what}")
        columns[field] = [s[field] for s in shards]
    kept = columns.pop("kept")
    assert kept is not None  # every entry's was checked above
    return names, kept, columns


def _read_array(path: Path, name: str, k: int) -> np.ndarray | None:
    """`NAME.npy` memory-mapped (None when absent), its dtype and shape those of `k` kept samples."""
    file = path / f"{name}.npy"
    if not file.exists():
        return None
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a damaged header raises many kinds in numpy (ValueError, SyntaxError, TokenError...)
        raise _damaged(path, file.name, f"not a readable .npy array ({type(exc).__name__}: {exc})") from None
    shape = {"key_offset": (k + 1,), "ranges": (k, 2)}.get(name, (k,))
    if not isinstance(array, np.ndarray) or array.dtype != ARRAY_DTYPES[name] or array.shape != shape:
        found = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise _damaged(
            path, file.name, f"{found}, not {ARRAY_DTYPES[name]} {shape} (shards.json counts {k} kept samples)"
        )
    return array


class _NpyOut:
    """An `.npy` file of a known shape written front to back with ordinary buffered writes.

    Never memory-mapped: a write into a mapped sparse file that finds the disk full kills the
    process with SIGBUS; a buffered write fails with an `OSError` naming the file instead.
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype = path, np.dtype(dtype)
        self.size = int(np.prod(shape))
        self.written = 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(
            self.file,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)},
        )

    def write(self, values) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self.written + values.size > self.size:
            raise SettingsError(f"{self.path.name}: more values than the {self.size} announced")
        self.file.write(memoryview(values).cast("B"))
        self.written += values.size

    def close(self, sync: bool = True) -> None:
        if self.file.closed:
            return
        try:
            if sync:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _fsync_dir(path: Path) -> None:
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


class KeepListWriter:
    """Writes a keep-list directory block by block (rows in index order), then swaps it in atomically.

    The new list is built in a hidden sibling with ordinary buffered writes (a full disk is an
    `OSError` naming the file, never SIGBUS) and synced before the swap; on any error the
    sibling is removed and the previous list stays as it was. The writer holds the output's
    lock and removes temporaries of killed writers of the same output first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict,
        names: list[str],
        k: int,
        samples: np.ndarray | None = None,
        shard_bytes: Sequence[int] | np.ndarray | None = None,
        with_positions: bool = True,
        with_weights: bool = False,
        with_ranges: bool = True,
    ):
        self.path = Path(path)
        self.tmp = temp_sibling(self.path)
        self.manifest, self.names, self.k = manifest, names, int(k)
        self.samples, self.shard_bytes = samples, shard_bytes
        self.kept = np.zeros(len(names), dtype=np.int64)
        self.with_positions, self.with_weights, self.with_ranges = with_positions, with_weights, with_ranges
        self._files: list[_NpyOut] = []
        self._stack: contextlib.ExitStack | None = None

    @classmethod
    def for_index(
        cls, path: str | os.PathLike, index, manifest: dict, k: int, with_weights: bool = False
    ) -> "KeepListWriter":
        """A writer for `k` rows of `index` (a `shardindex.Index`), with positions and byte ranges."""
        sizes = [-1 if s["size"] is None else s["size"] for s in index.shards]
        return cls(path, manifest, index.names, k, np.diff(index.shard_offset), sizes, with_weights=with_weights)

    def __enter__(self) -> "KeepListWriter":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(output_lock(self.path, reentrant=True))
        try:
            clean_stale_temps(self.path)
            self.tmp.mkdir(parents=True)

            def out(name, dtype, shape=(self.k,)):
                return self._open(_NpyOut, self.tmp / f"{name}.npy", dtype, shape)

            self.ids = out("ids", ID_DTYPE)
            self.positions = out("positions", np.int64) if self.with_positions else None
            self.weights = out("weights", np.float64) if self.with_weights else None
            self.ranges = out("ranges", np.int64, (self.k, 2)) if self.with_ranges else None
            self.key_offset = out("key_offset", np.int64, (self.k + 1,))
            self._guard(self.key_offset, self.key_offset.write, np.zeros(1, np.int64))
            self.keys = self._open(open, self.tmp / "keys.bin", "wb")
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError):
                raise named_os_error(exc, getattr(exc, "filename", None) or self.tmp) from None
            raise
        self.n, self._last_shard, self._key_end = 0, 0, 0
        return self

    def _open(self, opener, path: Path, *args):
        try:
            f = opener(path, *args)
        except OSError as exc:
            raise named_os_error(exc, path) from None
        self._files.append(f)
        return f

    @staticmethod
    def _guard(out, fn, *args) -> None:
        """`fn(*args)`; an `OSError` (a full disk) names the file being written."""
        try:
            fn(*args)
        except OSError as exc:
            raise named_os_error(exc, out.path if isinstance(out, _NpyOut) else out.name) from None

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
        if m:
            if (np.diff(shards) < 0).any() or shards[0] < self._last_shard:
                raise SettingsError("kept samples must be added in shard order")
        if self.n + m > self.k:
            raise SettingsError(f"more kept samples than the {self.k} the shard counts announce")
        if m:
            self.kept += np.bincount(shards, minlength=len(self.kept))
            self._last_shard = int(shards[-1])
        key_offset = np.asarray(key_offset, dtype=np.int64)
        self._guard(self.ids, self.ids.write, ids)
        self._guard(self.key_offset, self.key_offset.write, self._key_end + key_offset[1:] - key_offset[0])
        self._guard(self.keys, self.keys.write, key_blob)
        self._key_end += int(key_offset[-1] - key_offset[0])
        for out, values in ((self.positions, positions), (self.weights, weights), (self.ranges, ranges)):
            if out is not None:
                self._guard(out, out.write, values)
        self.n += m

    def add_rows(self, index, rows: np.ndarray, weight: float | None = None) -> None:
        """Append kept rows of `index` (sorted): identities, keys, positions, byte ranges, weights."""
        if not len(rows):
            return
        starts, ends = index.key_offset[rows], index.key_offset[rows + 1]
        with open(index.path / "keys.bin", "rb") as keys_file:
            keys_file.seek(int(starts[0]))
            span = np.frombuffer(keys_file.read(int(ends[-1] - starts[0])), dtype=np.uint8)
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

    def _abort(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close(sync=False) if isinstance(f, _NpyOut) else f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._stack is not None:
            self._stack.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self.n != self.k:
                raise SettingsError(f"keep-list got {self.n} samples, the shard counts announce {self.k}")
            for f in self._files:
                self._guard(f, f.close) if isinstance(f, _NpyOut) else self._guard(f, self._sync_close, f)
            shards = [{"name": n, "kept": int(c)} for n, c in zip(self.names, self.kept)]
            for field, values in (("samples", self.samples), ("bytes", self.shard_bytes)):
                if values is not None:
                    for entry, v in zip(shards, values):
                        entry[field] = int(v)
            self._write_text(self.tmp / "shards.json", json.dumps(shards))
            self._write_text(self.tmp / "manifest.json", json.dumps({**self.manifest, "k": self.k}, indent=1))
            _fsync_dir(self.tmp)
            swap_in(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self._abort()
            raise
        self._abort()  # nothing left to remove: releases the lock

    @staticmethod
    def _sync_close(f) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise named_os_error(exc, path) from None


def new_manifest(**fields) -> dict:
    """Manifest fields every keep-list carries, plus `fields`."""
    return {**header(KEEP_FORMAT), **fields}
