"""`RUN/scores.zarr` (Zarr v3): each sample's scores, identity, label and selection key, by row.

Every array is `(N,)` chunked by `block_rows`: one block of rows is one chunk, written whole by
the one task that scores it. The reducer builds it in a temporary sibling and swaps it in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from streamprune.formats.atomic import named_os_error
from streamprune.formats.headers import (
    LABEL,
    LABEL_MISSING,
    NO_GROUP,
    SCORES_FORMAT,
    STAT_MISSING,
    check_format,
    header,
)
from streamprune.formats.stats_store import AccessMode, chunk_file, zarr_array
from streamprune.scoring.scores import SCORES

# name -> (dtype, fill value): the scores, the identities and label copied from the stats store,
# and the selection key and group of the last selection
ARRAYS: dict[str, tuple[np.dtype, object]] = {
    **{name: (np.dtype(np.float64), STAT_MISSING) for name in SCORES},
    "id_hi": (np.dtype(np.uint64), 0),
    "id_lo": (np.dtype(np.uint64), 0),
    "sel_key": (np.dtype(np.uint64), 0),
    LABEL: (np.dtype(np.int32), LABEL_MISSING),
    "sel_group": (np.dtype(np.int32), NO_GROUP),
}


class ScoresStore:
    """A scores store on disk: `create` a new one, `open` one (its header checked), read and write row blocks."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group, self.path = group, path

    @classmethod
    def create(cls, path: str | Path, n: int, block_rows: int) -> "ScoresStore":
        """A new store of `n` rows at `path` (replacing what is there), every array empty (fill values)."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
            for name, (dtype, fill) in ARRAYS.items():
                group.create_array(name, shape=(n,), chunks=(block_rows,), dtype=dtype, fill_value=fill)
            group.attrs.update(header(SCORES_FORMAT))
        except OSError as exc:
            raise named_os_error(exc, path) from None
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, mode: AccessMode = "r") -> "ScoresStore":
        """Open an existing store; a missing one is a `FileNotFoundError`, a header of another
        format a `DamagedRunError`, one of a newer streamprune a `NewerFormatError`."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"no scores at {str(path)!r}: run `streamprune reduce` first")
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        check_format(dict(group.attrs), SCORES_FORMAT, f"scores {str(path)!r}")
        return cls(group, path)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def set_attrs(self, attrs: dict) -> None:
        """Add `attrs` (the run's fingerprint, epochs, window, block size, scores listed, summary)."""
        try:
            self.group.attrs.update(attrs)
        except OSError as exc:
            raise named_os_error(exc, self.path / "zarr.json") from None

    @property
    def block_rows(self) -> int:
        return int(self.attrs.get("block_rows", 65536))

    @property
    def scores(self) -> list[str]:
        """The scores computed into this store (the others hold only missing values)."""
        return list(self.attrs["scores"])

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array:
        """Array `name` itself (for checks of its metadata and chunks)."""
        return zarr_array(self.group, name)

    def chunk_path(self, name: str, chunk: int) -> Path:
        """The file of chunk `chunk` of array `name`."""
        return chunk_file(self.path, name, chunk)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of array `name`."""
        return np.asarray(self.array(name)[rows])

    def write_block(self, r0: int, r1: int, values: dict[str, np.ndarray]) -> None:
        """Write rows `[r0, r1)` (one chunk) of several arrays; a full disk names the chunk file."""
        for name, v in values.items():
            arr = self.array(name)
            try:
                arr[r0:r1] = v
            except OSError as exc:
                raise named_os_error(exc, self.chunk_path(name, r0 // arr.chunks[0])) from None
