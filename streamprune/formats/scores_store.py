"""`RUN/scores.zarr` (Zarr v3): each sample's scores, identity, label and selection key, by row.

Every array is `(N,)` chunked by `block_rows`: one block of rows is one chunk, written whole by
the one task that scores it. The store is a local path or an object-store URL. The reducer
creates and fills a new one in a `commit.replacing(scores)` place (its tasks open it there), so
that readers of the scores see the old store or the new one; `open` reads the committed one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from streamprune import storage
from streamprune.formats.atomic import named_os_error
from streamprune.formats.headers import SCORES_FORMAT, check_format, header
from streamprune.formats.schema import SCORES_SCHEMA
from streamprune.formats.stats_store import AccessMode, chunk_file, has_store, open_zarr, store_root, zarr_array


class ScoresStore:
    """A scores store, local or on an object store: `create` a new one, `open` one (its header
    checked), read and write row blocks. `path` is its location as given (what messages name),
    `root` where its Zarr data is (`store_root`: the committed generation on an object store)."""

    def __init__(self, group: zarr.Group, path: str | os.PathLike[str], root: str | None = None):
        """Wrap a group opened at `root` (default `path`), the store of location `path`."""
        self.group, self.path = group, os.fspath(path)
        self.root = self.path if root is None else root

    @classmethod
    def create(cls, path: str | os.PathLike[str], n: int, block_rows: int) -> ScoresStore:
        """A new store of `n` rows at `path` (replacing what is there), every array empty (fill values).

        Create it in the place of `commit.replacing(output)` and fill it there (tasks open it by
        that place), so that readers of `output` see the old scores or the new, never a mix.
        """
        location = os.fspath(path)
        try:
            group = open_zarr(location, "w")
            for spec in SCORES_SCHEMA.arrays:
                spec.create(group, {"n_samples": n, "block_rows": block_rows})
            group.attrs.update(header(SCORES_FORMAT))
        except OSError as exc:
            raise named_os_error(exc, location) from None
        return cls(group, location)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: AccessMode = "r") -> ScoresStore:
        """Open an existing store: the committed one of an output, or one being filled in a
        `commit.replacing` place. A missing one is a `FileNotFoundError`, a header of another
        format a `DamagedRunError`, one of a newer streamprune a `NewerFormatError`."""
        location = os.fspath(path)
        root = store_root(location)
        if not has_store(root):
            raise FileNotFoundError(f"no scores at {location!r}: run `streamprune reduce` first")
        group = open_zarr(root, mode)
        check_format(dict(group.attrs), SCORES_FORMAT, f"scores {location!r}")
        return cls(group, location, root)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Add `attrs` (the run's fingerprint, epochs, window, block size, scores listed, summary)."""
        try:
            self.group.attrs.update(attrs)
        except OSError as exc:
            raise named_os_error(exc, storage.join(self.root, "zarr.json")) from None

    @property
    def block_rows(self) -> int:
        return int(self.attrs.get("block_rows", 65536))

    @property
    def scores(self) -> list[str]:
        """The scores computed into this store (the others hold only missing values)."""
        return list(self.attrs["scores"])

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array[Any]:
        """Array `name` itself (for checks of its metadata and chunks)."""
        return zarr_array(self.group, name)

    def chunk_path(self, name: str, chunk: int) -> str:
        """The file (object) of chunk `chunk` of array `name`."""
        return chunk_file(self.root, name, chunk)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of array `name`."""
        return np.asarray(self.array(name)[rows])

    def column(self, name: str) -> ScoresColumn:
        """Array `name` by row, read chunk by chunk (`ScoresColumn`)."""
        return ScoresColumn(self, name)

    def write_block(self, r0: int, r1: int, values: dict[str, np.ndarray]) -> None:
        """Write rows `[r0, r1)` (one chunk) of several arrays; a full disk names the chunk file."""
        for name, v in values.items():
            arr = self.array(name)
            try:
                arr[r0:r1] = v
            except OSError as exc:
                raise named_os_error(exc, self.chunk_path(name, r0 // arr.chunks[0])) from None


class ScoresColumn:
    """One array of a scores store by row, read chunk by chunk: rows asked in ascending order (in
    one call and over successive calls) read each chunk once, and only the chunks they fall in.
    The reader of `export` (rows shard by shard) and `report` (whole chunks drawn at random)."""

    def __init__(self, store: ScoresStore, name: str):
        self.name, self.array = name, store.array(name)
        self.chunk_rows = int(self.array.chunks[0])
        self.current, self.values = -1, np.empty(0, dtype=self.array.dtype)

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The value of each of `rows` (in the array's dtype; missing scores are NaN)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=self.array.dtype)
        chunks = rows // self.chunk_rows
        for c in np.unique(chunks).tolist():
            sel = chunks == c
            out[sel] = self._chunk(c)[rows[sel] - c * self.chunk_rows]
        return out

    def _chunk(self, c: int) -> np.ndarray:
        if c != self.current:
            self.values = np.asarray(self.array[c * self.chunk_rows : (c + 1) * self.chunk_rows])
            self.current = c
        return self.values
