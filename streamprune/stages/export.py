"""`export`: a keep-list's kept or removed samples (or all, flagged) as files other tools read.

Formats: `parquet` (one row per sample: `id`, `shard`, `key`, `score`, `kept`; NeMo Curator's
convention of an `id` column naming the documents to keep or remove), `datacomp` (a sorted
`u8,u8` `.npy`, as DataComp subsets are) and `ids` (one identity per line, 32 hex digits).

Samples are streamed shard by shard in index order: memory holds one shard and one Parquet row
group, never the whole dataset (except `datacomp` of removed or all samples: that format is one
sorted array). The output appears whole or not at all, locally or at an object-store URL
(`storage.writing`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamprune import storage
from streamprune.errors import DamagedRunError, SettingsError
from streamprune.formats.index import Index
from streamprune.formats.keeplist import ID_DTYPE, KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresColumn, ScoresStore
from streamprune.scoring.methods import Method
from streamprune.scoring.scores import SCORES

FORMATS = ("parquet", "datacomp", "ids")
WHATS = ("keep", "remove", "all")
EXPORT_VERSION = 1
GROUP_ROWS = 1 << 19  # Parquet rows per row group: about 50 MB held at once
DEFAULT_SCORE = "dual"  # the score of lists whose method has none (random, your own)
MANIFEST_FIELDS = ("method", "balance", "ratio", "seed", "k", "N", "fingerprint", "created")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("score", pa.float64()),
        ("kept", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: where, how many samples, in which format, which of them."""

    out: str
    rows: int
    format: str
    what: str


@dataclass(frozen=True)
class _Block:
    """Samples of one shard in tar order: keys, identities (`u8,u8`), whether kept, and their
    index rows (None: read from the keep-list alone, which places no scores)."""

    shard: str
    keys: list[str]
    ids: np.ndarray
    kept: np.ndarray
    rows: np.ndarray | None

    def take(self, mask: np.ndarray) -> _Block:
        """The samples where `mask` is true."""
        rows = None if self.rows is None else self.rows[mask]
        return _Block(
            self.shard, [k for k, m in zip(self.keys, mask, strict=True) if m], self.ids[mask], self.kept[mask], rows
        )


def export(
    keep: str | os.PathLike | KeepList,
    out: str | os.PathLike,
    *,
    format: str = "parquet",
    what: str = "keep",
    run: str | os.PathLike | None = None,
    score: str | None = None,
    force: bool = False,
    group_rows: int | None = None,
) -> Exported:
    """Write the kept (`what="keep"`), removed (`"remove"`: the index's samples the list does not
    keep) or all (`"all"`) samples of keep-list `keep` to `out` (a path or URL) as `format`.

    `run`: the run directory whose `index` and `scores.zarr` are read (default: the keep-list's
    folder's parent, `RUN` of `RUN/keep`); removed and all samples need its index. `score`: the
    score in the Parquet `score` column (default: the one the list's method drew by, else `dual`).
    An existing `out` is refused unless `force`. `group_rows`: Parquet rows per row group, what
    memory holds at once (None: `GROUP_ROWS`)."""
    group_rows = GROUP_ROWS if group_rows is None else group_rows
    score = _check(format, what, score, group_rows)
    keep_list = keep if isinstance(keep, KeepList) else KeepList.load(keep)
    run_dir = _run_of(keep_list, run)
    index = _open_index(run_dir, needed=what != "keep") if what != "keep" or format == "parquet" else None
    if index is not None:
        _check_same_index(keep_list, index)
    scores = None
    if format == "parquet" and index is not None:
        scores = _open_scores(index, score or _method_score(keep_list))
    blocks = _selected(_blocks(keep_list, index), what)
    try:
        with storage.writing(out, replace=force) as f:
            if format == "parquet":
                rows = _write_parquet(f, blocks, scores, _metadata(keep_list, what, scores), group_rows)
            elif format == "datacomp":
                rows = _write_datacomp(f, keep_list, blocks, what)
            else:
                rows = _write_ids(f, blocks)
    except FileExistsError as exc:
        raise FileExistsError(f"{exc}; pass --force (force=True) to replace it") from None
    return Exported(storage.absolute(out), rows, format, what)


def _check(format: str, what: str, score: str | None, group_rows: int) -> str | None:
    """The arguments refused before any work, every problem named; returns `score` as stored."""
    problems = []
    if format not in FORMATS:
        problems.append(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    if what not in WHATS:
        problems.append(f"what {what!r}: choose one of {', '.join(WHATS)}")
    name = None if score is None else score.replace("-", "_")
    if name is not None and name not in SCORES:
        problems.append(f"score {score!r}: choose one of {', '.join(s.replace('_', '-') for s in SCORES)}")
    if isinstance(group_rows, bool) or not isinstance(group_rows, int) or group_rows < 1:
        problems.append(f"group_rows {group_rows!r}: must be an integer >= 1")
    if problems:
        raise SettingsError("; ".join(problems), problems=problems)
    return name


def _run_of(keep: KeepList, run: str | os.PathLike | None) -> str | None:
    """The run directory given, else the one holding the keep-list (None: an unsaved list)."""
    if run is not None:
        return os.fspath(run)
    return None if keep.path is None else storage.parent(keep.path)


def _open_index(run: str | None, needed: bool) -> Index | None:
    """The run's index; when it is missing, an error naming it if `needed`, else None."""
    try:
        if run is None:
            raise FileNotFoundError("no run directory: the keep-list was never saved")
        return Index(run)
    except FileNotFoundError as exc:
        if needed:
            raise FileNotFoundError(f"{exc}; removed samples come from the run's index: pass --run RUN") from None
        return None


def _open_scores(index: Index, name: str) -> ScoresColumn | None:
    """Score `name` of the `scores.zarr` beside `index` (None: the run has none), refused when it
    scores another index."""
    try:
        store = ScoresStore.open(RunDir(storage.parent(index.path)).scores)
    except FileNotFoundError:
        return None
    fingerprint = store.attrs.get("fingerprint")
    if fingerprint != index.fingerprint:
        raise SettingsError(
            f"scores {store.path!r} score another index (fingerprint {fingerprint}) than {index.path!r} "
            f"({index.fingerprint}): run `streamprune reduce` again"
        )
    shape = store.array(name).shape
    if shape != (index.n_samples,):
        raise DamagedRunError(f"scores {store.path!r}: {name} has shape {shape}, not ({index.n_samples},) as the index")
    return store.column(name)


def _method_score(keep: KeepList) -> str:
    """The score the keep-list's method drew by (`dual` for methods without one)."""
    try:
        return Method.parse(keep.manifest.get("method", "")).score or DEFAULT_SCORE
    except SettingsError:  # a list of your own ("user")
        return DEFAULT_SCORE


def _blocks(keep: KeepList, index: Index | None) -> Iterator[_Block]:
    """Every sample shard by shard, with whether the list keeps it: the index's samples when
    there is an index, else the keep-list's own."""
    if index is None:
        for name in keep.names:
            keys = keep.shard_keys(name)
            ids = np.asarray(keep.id_pairs[keep.shard_slice(name)])
            yield _Block(name, keys, ids, np.ones(len(keys), dtype=bool), None)
        return
    for s, name in enumerate(index.names):
        rows = index.rows(s)
        keys = index.keys(s)
        ids = np.empty(len(rows), dtype=ID_DTYPE)
        ids["f0"], ids["f1"] = index.id_hi[rows.start : rows.stop], index.id_lo[rows.start : rows.stop]
        yield _Block(name, keys, ids, _kept_mask(keep, name, keys), np.arange(rows.start, rows.stop))


def _check_same_index(keep: KeepList, index: Index) -> None:
    """Refuse a keep-list drawn from another index, or keeping samples of shards the index lacks."""
    if keep.fingerprint is not None and keep.fingerprint != index.fingerprint:
        raise SettingsError(
            f"keep-list {keep.path!s} was drawn from another index (fingerprint {keep.fingerprint}) than "
            f"{index.path!r} ({index.fingerprint}): pass --run with the run directory it was drawn from"
        )
    known = set(index.names)
    unknown = [n for n in keep.names if keep.kept_count(n) and n not in known]
    if unknown:
        raise SettingsError(
            f"keep-list {keep.path!s} keeps samples of {len(unknown)} shards not in {index.path!r}: {unknown[:3]}"
        )


def _kept_mask(keep: KeepList, name: str, keys: list[str]) -> np.ndarray:
    """Which of a shard's samples (its index keys) the list keeps: by position for lists drawn
    from this index, by key for lists of keys (`KeepList.from_keys`)."""
    mask = np.zeros(len(keys), dtype=bool)
    k = keep.kept_count(name)
    if not k:
        return mask
    positions = keep.shard_positions(name) if keep.fingerprint is not None else None
    if positions is None:
        wanted = set(keep.shard_keys(name))
        mask[:] = [key in wanted for key in keys]
    elif positions[-1] < len(keys):
        mask[positions] = True
    if mask.sum() != k:
        raise SettingsError(
            f"keep-list {keep.path!s} keeps {k} samples of shard {name!r}, the index has {mask.sum()} of them"
        )
    return mask


def _selected(blocks: Iterable[_Block], what: str) -> Iterator[_Block]:
    """The samples `what` names (kept, removed or all) of each block."""
    for b in blocks:
        yield b if what == "all" else b.take(b.kept if what == "keep" else ~b.kept)


def _hex(ids: np.ndarray) -> list[str]:
    """Identities as DataComp's `uid`: 32 hex digits, the high word first."""
    words = np.empty((len(ids), 2), dtype=">u8")
    words[:, 0], words[:, 1] = ids["f0"], ids["f1"]
    text = words.tobytes().hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]


def _metadata(keep: KeepList, what: str, scores: ScoresColumn | None) -> dict[str, str]:
    """The Parquet file's key-value metadata: this format's version, what it holds, the list's manifest."""
    manifest = {f: keep.manifest.get(f) for f in MANIFEST_FIELDS}
    return {
        "streamprune.export": str(EXPORT_VERSION),
        "streamprune.what": what,
        "streamprune.score": "" if scores is None else scores.name,
        "streamprune.keep": json.dumps({**manifest, "location": None if keep.path is None else os.fspath(keep.path)}),
    }


def _table(b: _Block, scores: ScoresColumn | None) -> pa.Table:
    """A block as rows of the Parquet schema."""
    values = np.full(len(b.keys), np.nan) if scores is None or b.rows is None else scores.at(b.rows).astype(np.float64)
    columns = [
        pa.array(_hex(b.ids), pa.string()),
        pa.array([b.shard] * len(b.keys), pa.string()),
        pa.array(b.keys, pa.string()),
        pa.array(values, pa.float64(), mask=np.isnan(values)),
        pa.array(b.kept, pa.bool_()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _write_parquet(
    f: IO[bytes], blocks: Iterable[_Block], scores: ScoresColumn | None, metadata: dict[str, str], group_rows: int
) -> int:
    """Write the blocks as Parquet row groups of `group_rows` rows (the last one smaller)."""
    schema = SCHEMA.with_metadata(metadata)
    pending: list[pa.Table] = []
    held = total = 0
    with pq.ParquetWriter(f, schema) as writer:
        for b in blocks:
            table = _table(b, scores)
            pending.append(table)
            held += len(table)
            total += len(table)
            if held >= group_rows:
                whole = pa.concat_tables(pending)
                full = held - held % group_rows
                writer.write_table(whole.slice(0, full), row_group_size=group_rows)
                pending, held = [whole.slice(full)], held - full
        if held:
            writer.write_table(pa.concat_tables(pending), row_group_size=group_rows)
    return total


def _write_datacomp(f: IO[bytes], keep: KeepList, blocks: Iterable[_Block], what: str) -> int:
    """Write the identities as a sorted `u8,u8` `.npy` (DataComp's subset format)."""
    if what == "keep":
        keep.to_datacomp(f)
        return len(keep)
    ids = np.sort(np.concatenate([np.empty(0, dtype=ID_DTYPE), *(b.ids for b in blocks)]))
    np.save(f, ids, allow_pickle=False)
    return len(ids)


def _write_ids(f: IO[bytes], blocks: Iterable[_Block]) -> int:
    """Write one identity (32 hex digits) per line."""
    total = 0
    for b in blocks:
        if len(b.ids):
            f.write(("\n".join(_hex(b.ids)) + "\n").encode())
            total += len(b.ids)
    return total
