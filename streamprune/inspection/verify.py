"""`streamprune inspect RUN --verify`: check every file, chunk and metadata field of a run
against its index and report what is damaged, one problem per line.

RUN is a local directory or an object-store URL (`s3://bucket/run`): there each output is read
from its committed generation (`commit.committed`) and problems name its objects; uncommitted
generations and lock folders with expired leases are listed as leftovers, like local temporaries.

Streaming: stores are read chunk by chunk (one row block of every epoch at a time), index
and keep-list arrays in blocks, so memory stays bounded by a block whatever the run's size.
Nothing is written or repaired.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats import commit
from streamprune.formats.atomic import pid_alive
from streamprune.formats.rundir import RunDir
from streamprune.formats.schema import SCORES_SCHEMA, STATS_SCHEMA, ArraySpec, ValueRule, count_problem
from streamprune.progress import progress_bar

BLOCK = 1 << 20  # index / keep-list rows per step
LIMIT = 50  # problems listed per file group before "... and N more"


Where = Path | str  # a local path, or an object's URL


def _at(base: Where, *parts: str) -> Where:
    """`base` with `parts` appended: a Path locally, a URL string on object stores."""
    return base.joinpath(*parts) if isinstance(base, Path) else storage.join(base, *parts)


@dataclass
class Problem:
    file: str  # relative to the run directory
    problem: str


class _Report:
    def __init__(self, run: Where, progress: bool):
        self.run = run
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []
        self._counts: dict[str, int] = {}
        self.chunks_checked = 0
        self.bar = progress_bar(desc="verify", unit="chunk", disable=not progress, leave=False)

    def rel(self, path: Path | str) -> str:
        if isinstance(self.run, str):  # an object-store run: the URL below it
            text = str(path)
            return text[len(self.run) + 1 :] if text.startswith(self.run + "/") else text
        try:
            return str(Path(path).relative_to(self.run))
        except ValueError:
            return str(path)

    def add(self, file: Path | str, problem: str, group: str | None = None) -> None:
        group = group or str(file).split("/c/")[0]
        self._counts[group] = self._counts.get(group, 0) + 1
        if self._counts[group] <= LIMIT:
            self.problems.append(Problem(self.rel(file), problem))

    def note(self, file: Path | str, text: str) -> None:
        self.notes.append(Problem(self.rel(file), text))

    def tick(self, n: int = 1) -> None:
        self.chunks_checked += n
        self.bar.update(n)

    def result(self) -> dict:
        self.bar.close()
        problems = [asdict(p) for p in self.problems]
        for group, count in self._counts.items():
            if count > LIMIT:
                problems.append(
                    {"file": self.rel(group), "problem": f"... and {count - LIMIT} more problems like those above"}
                )
        return {
            "run": str(self.run),
            "damaged": bool(problems),
            "problems": problems,
            "notes": [asdict(n) for n in self.notes],
            "chunks_checked": self.chunks_checked,
        }


def verify_run(run: str | os.PathLike, progress: bool = True) -> dict:
    """Check the run directory `run`; returns `run`, `damaged`, `problems` (`file`, `problem`),
    `notes` (leftover temporaries: not damage) and `chunks_checked`."""
    if storage.is_url(run):
        return _verify_url(storage.absolute(run), progress)
    run = Path(run).resolve()
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {str(run)!r}")
    rep, rd = _Report(run, progress), RunDir(run)
    index = _check_index(rep, Path(rd.index))
    store = _check_stats(rep, Path(rd.stats), index) if os.path.exists(rd.stats) else None
    outputs = [(Path(rd.keep), Path(rd.scores))] + [
        (Path(RunDir.keep_in(p)), Path(RunDir.scores_in(p))) for p in rd.baselines()
    ]
    for keep, scores in outputs:
        if scores.exists():
            _check_scores(rep, scores, index, store)
        if keep.exists():
            _check_keep(rep, keep, index)
    _leftovers(rep, run, outputs)
    return rep.result()


def _verify_url(run: str, progress: bool) -> dict:
    """`verify_run` of a run in an object store: each output read from its committed generation."""
    if not storage.exists(run):
        raise FileNotFoundError(f"no run directory {run!r}")
    rep, rd = _Report(run, progress), RunDir(run)
    index = _check_index(rep, rd.index)
    store = None
    if storage.exists(rd.stats) and (root := _committed_place(rep, rd.stats)) is not None:
        store = _check_stats(rep, rd.stats, index, root)
    outputs = [(rd.keep, rd.scores)] + [(RunDir.keep_in(p), RunDir.scores_in(p)) for p in rd.baselines()]
    for keep, scores in outputs:
        if storage.exists(scores) and _committed_place(rep, scores) is not None:
            _check_scores(rep, scores, index, store)
        if storage.exists(keep) and _committed_place(rep, keep) is not None:
            _check_keep(rep, keep, index)
    _url_leftovers(rep, [rd.index, rd.stats, *(p for pair in outputs for p in pair)])
    return rep.result()


def _committed_place(rep: _Report, output: str) -> str | None:
    """The committed generation of URL output `output`; None (a problem added unless only
    uncommitted generations are there, which `_url_leftovers` lists) when there is none."""
    try:
        return commit.committed(output)
    except DamagedRunError as exc:
        rep.add(commit.commit_object(output), str(exc))
    except FileNotFoundError:
        others = [n for n in storage.names(output) if not n.startswith("g-")]
        if others:
            rep.add(
                commit.commit_object(output),
                f"missing: {storage.name(output)} holds {others[:3]} but was never committed",
            )
    return None


# -- the index --------------------------------------------------------------------------------------


def _check_index(rep: _Report, path: Where):
    """Problems of `RUN/index`; the `Index` when it can be used to check the rest against."""
    from streamprune.formats.index import Index

    files = _index_files(rep, path)
    if files is None:
        return None
    try:
        index = Index(path, strict=False)
    except Exception as exc:
        rep.add(
            _at(files, "manifest.json"),
            f"the index cannot be read ({type(exc).__name__}: {exc}); run `streamprune index` again",
        )
        return None
    for file, problem in index.problems:
        rep.add(_at(files, file), problem)
    if index.problems:
        return None  # nothing else is checked against an index whose parts disagree
    _check_shards(rep, index, files, remote=isinstance(path, str))
    _check_fingerprint(rep, index, files)
    return index


def _index_files(rep: _Report, path: Where) -> Where | None:
    """Where the files of the index `path` are (a URL's committed generation); None when there is
    no complete index (noted when there is none at all, else a problem)."""
    incomplete = "missing: the index is incomplete (run `streamprune index` again)"
    if isinstance(path, Path):
        if (path / "manifest.json").exists():
            return path
        if path.exists():
            rep.add(path / "manifest.json", incomplete)
        else:
            rep.note(path, "no index: nothing is checked against one")
        return None
    if not storage.exists(path):
        rep.note(path, "no index: nothing is checked against one")
        return None
    place = _committed_place(rep, path)
    if place is not None and not storage.exists(storage.join(place, "manifest.json")):
        rep.add(storage.join(place, "manifest.json"), incomplete)
        return None
    return place


def _check_shards(rep: _Report, index, files: Where, remote: bool) -> None:
    """Each shard's byte ranges in the index, and that its tar opens (of a `remote` run, one indexed
    by path: a run in a bucket indexed shards by URL, opened only when given, as `record` does)."""
    from streamprune.errors import StreamPruneError
    from streamprune.formats.sources import local_source

    for s in range(index.n_shards):
        found = index.range_problem(s)
        if found is not None:
            rep.add(_at(files, found[0]), found[1])
        try:
            local_source(index, s)
        except StreamPruneError as exc:
            if isinstance(exc, DamagedRunError) or not remote:
                rep.add(_at(files, "shards.jsonl"), str(exc))


def _check_fingerprint(rep: _Report, index, files: Where) -> None:
    """The manifest's fingerprint against the one the index's files give (as `write_index`: names,
    counts and identities, shard by shard, read in blocks)."""
    off = np.asarray(index.shard_offset)
    fp = hashlib.blake2b(digest_size=16)
    for i, name in enumerate(index.names):
        a, b = int(off[i]), int(off[i + 1])
        fp.update(json.dumps([name, b - a]).encode())
        for ids in (index.id_hi, index.id_lo):
            for c0 in range(a, b, BLOCK):
                fp.update(np.asarray(ids[c0 : min(b, c0 + BLOCK)]).tobytes())
    if fp.hexdigest() != index.fingerprint:
        rep.add(
            _at(files, "id_hi.npy"),
            "the identities, shard names or counts do not give the manifest's fingerprint "
            f"{index.fingerprint}: index files were edited or damaged",
        )


# -- values of store chunks -------------------------------------------------------------------------


def _bad_values(spec: ArraySpec, data: np.ndarray, index, r0: int, r1: int) -> tuple[str, np.ndarray] | None:
    """What values of rows `[r0, r1)` of array `spec` cannot be (its rule's, or identities other
    than the index's), and which; None when nothing is checked of them."""
    if spec.rule is not None:
        return spec.rule.what, spec.rule.bad(data)
    if spec.index_copy and index is not None:
        return "identities other than the index's", data != np.asarray(getattr(index, spec.name)[r0:r1])
    return None


def _report_values(rep: _Report, files: Callable[..., Where], what: str, bad: np.ndarray, r0: int, r1: int) -> None:
    """A problem for each chunk of rows `[r0, r1)` holding values marked `bad`: `files(epoch)` for
    each epoch of an `(N, T)` array, `files()` for an `(N,)` one."""
    if bad.ndim == 2:
        for t in np.flatnonzero(bad.any(axis=0)).tolist():
            rows = r0 + np.flatnonzero(bad[:, t])
            rep.add(files(t), f"holds {what} (rows [{r0}, {r1}), epoch {t}; {len(rows)} values, e.g. row {rows[0]})")
    elif bad.any():
        rows = r0 + np.flatnonzero(bad)
        rep.add(files(), f"holds {what} (rows [{r0}, {r1}); {len(rows)} values, e.g. row {rows[0]})")


# -- the stats store --------------------------------------------------------------------------------


def _check_stats(rep: _Report, path: Where, index, root: str | None = None):
    """Problems of the stats store `path` (a URL's read from its committed generation `root`)."""
    where: Where = path if root is None else root
    store = _open_stats(rep, path, index, root)
    if store is None:
        return None
    for file, problem in store.metadata_problems:
        rep.add(_at(where, file), problem)
    if index is not None and store.fingerprint != index.fingerprint:
        rep.add(
            _at(where, "zarr.json"),
            f"fingerprint {store.fingerprint} is not the index's {index.fingerprint}: recorded for another index",
        )
    if (
        None in (store.n_samples, store.epochs, store.chunk_rows, store.n_shards)
        or store.shard_offset is None
        or "done" not in store._arrays
    ):
        rep.add(_at(where, "zarr.json"), "chunks not checked: the store's counts cannot be trusted")
        return None
    try:
        done = store.done()
    except Exception as exc:
        rep.add(_at(where, "done"), f"unreadable ({type(exc).__name__}: {exc})")
        return None
    if done.shape == (store.epochs, store.n_shards):
        _check_done(rep, store, where)
        _check_missing(rep, store, where)
    _check_stats_chunks(rep, store, index)
    return store


def _open_stats(rep: _Report, path: Where, index, root: str | None):
    """The stats store `path` opened for checking (`strict=False`); None, a problem added, when its
    header or root zarr.json cannot be read."""
    import zarr

    from streamprune.formats.stats_store import StatsStore, open_zarr

    where: Where = path if root is None else root
    try:
        if root is None:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
            return StatsStore(group, path, index, strict=False)
        return StatsStore(open_zarr(root, "r"), path, index, strict=False, root=root)
    except DamagedRunError as exc:  # its header: another format, or a newer version
        rep.add(_at(where, "zarr.json"), str(exc))
    except Exception as exc:
        rep.add(_at(where, "zarr.json"), f"unreadable ({type(exc).__name__}: {exc})")
    return None


def _check_done(rep: _Report, store, where: Where) -> None:
    """Completion markers other than 0 and 1, epoch by epoch."""
    from streamprune.formats.stats_store import chunk_file

    rule = cast(ValueRule, STATS_SCHEMA["done"].rule)
    for t in range(store.epochs):
        if rule.bad(np.asarray(store._arrays["done"][t, :])).any():
            rep.add(chunk_file(where, "done", t, 0), f"completion markers of epoch {t} hold {rule.what}")


def _check_missing(rep: _Report, store, where: Where) -> None:
    """Chunks missing that the completion markers say were written."""
    try:
        for name, chunk, epoch in store.missing_chunks():
            r0, r1 = store.chunk_rows_range(chunk)
            marked = "" if epoch is None else f", epoch {epoch}, marked complete"
            rep.add(store.chunk_path(name, chunk, epoch), f"missing (rows [{r0}, {r1}){marked})")
    except Exception as exc:
        rep.add(where, f"chunks not listed ({type(exc).__name__}: {exc})")


def _check_stats_chunks(rep: _Report, store, index) -> None:
    """Every chunk of the store's row arrays whose metadata is sound: readable, its values possible."""
    specs = sorted(  # values first, identities last: the order of the report
        (s for s in STATS_SCHEMA.arrays if s.chunks_read and s.name in store._arrays), key=lambda s: s.index_copy
    )
    rep.bar.total = (rep.bar.total or 0) + store.n_chunks * sum(store.epochs if len(s.shape) == 2 else 1 for s in specs)
    rep.bar.refresh()
    for spec in specs:
        epochs = store.epochs if len(spec.shape) == 2 else 1
        for c in range(store.n_chunks):
            data = _read_stats_chunk(rep, store, spec.name, c)
            rep.tick(epochs)
            r0, r1 = store.chunk_rows_range(c)
            found = None if data is None else _bad_values(spec, data, index, r0, r1)
            if found is not None:
                _report_values(rep, partial(store.chunk_path, spec.name, c), *found, r0, r1)


def _read_stats_chunk(rep: _Report, store, name: str, c: int) -> np.ndarray | None:
    """Chunk `c` of array `name` (every epoch of it); None, each unreadable chunk file a problem,
    when it cannot be read."""
    arr, (r0, r1) = store._arrays[name], store.chunk_rows_range(c)
    try:
        return np.asarray(arr[r0:r1, :] if arr.ndim == 2 else arr[r0:r1])
    except Exception:
        pass
    for epoch in range(store.epochs) if arr.ndim == 2 else [None]:
        try:
            arr[r0:r1] if epoch is None else arr[r0:r1, epoch]
        except Exception as exc:
            at = "" if epoch is None else f", epoch {epoch}"
            why = f"{type(exc).__name__}: {exc}"
            rep.add(store.chunk_path(name, c, epoch), f"unreadable (rows [{r0}, {r1}){at}: {why})")
    return None


# -- scores.zarr ------------------------------------------------------------------------------------


def _check_scores(rep: _Report, path: Where, index, store) -> None:
    """Problems of the scores store `path`, against the index and the stats store `store` (where
    there is one; the row count is the index's, else the stats store's)."""
    opened = _open_scores(rep, path)
    if opened is None:
        return
    scores, where, attrs = opened
    n = index.n_samples if index is not None else (store.n_samples if store is not None else None)
    block, listed = _check_scores_attrs(rep, _at(where, "zarr.json"), attrs, index, store)
    arrays = _scores_arrays(rep, scores, where, {"n_samples": n, "block_rows": block})
    if n is None or block is None:
        return
    _check_scores_ids_present(rep, scores, where, arrays, n, block)
    finite = _check_scores_chunks(rep, scores, arrays, listed, index, n, block)
    summary = attrs.get("summary", {}).get("finite", {}) if isinstance(attrs.get("summary"), dict) else {}
    for name, count in finite.items():
        if name in summary and summary[name] != count:
            rep.add(
                _at(where, name),
                f"holds {count} finite scores, the summary in zarr.json says {summary[name]}: "
                "a chunk was deleted or edited",
            )


def _open_scores(rep: _Report, path: Where):
    """`(store, where its data is, its attributes)` of the scores store `path`; None, a problem
    added, when it cannot be opened."""
    from streamprune.formats.scores_store import ScoresStore

    where: Where = path
    try:
        if isinstance(path, str):
            where = commit.committed(path)
        scores = ScoresStore.open(path)
        return scores, where, scores.attrs
    except DamagedRunError as exc:
        rep.add(_at(where, "zarr.json"), str(exc))
    except Exception as exc:
        rep.add(_at(where, "zarr.json"), f"unreadable ({type(exc).__name__}: {exc})")
    return None


def _check_scores_attrs(rep: _Report, root: Where, attrs: dict, index, store) -> tuple[int | None, list]:
    """Problems of a scores store's attributes (its zarr.json `root`); its block size (None when
    unusable) and the scores it lists (empty when unusable)."""
    from streamprune.scoring.scores import SCORES

    if index is not None and attrs.get("fingerprint") != index.fingerprint:
        rep.add(root, f"fingerprint {attrs.get('fingerprint')!r} is not the index's {index.fingerprint}")
    wrong = {c.key: p for c in SCORES_SCHEMA.counts if (p := count_problem(attrs, c)) is not None}
    for problem in wrong.values():
        rep.add(root, problem)
    epochs = attrs.get("epochs")
    if store is not None and isinstance(epochs, int) and store.epochs is not None and epochs > store.epochs:
        rep.add(root, f"attribute epochs is {epochs}, the stats store records only {store.epochs}")
    listed = attrs.get("scores")
    if not isinstance(listed, list) or not set(listed) <= set(SCORES):
        rep.add(root, f"attribute scores is {listed!r}, not a list of {list(SCORES)}")
        listed = []
    return (None if "block_rows" in wrong else attrs["block_rows"]), listed


def _scores_arrays(rep: _Report, scores, where: Where, counts: dict[str, int | None]) -> dict:
    """The arrays of `SCORES_SCHEMA` whose metadata agrees with it for `counts`, by name; a problem
    for each other one."""
    arrays = {}
    for spec in SCORES_SCHEMA.arrays:
        file = _at(where, spec.name, "zarr.json")
        try:
            a = scores.array(spec.name)
        except KeyError:
            rep.add(file, f"array {spec.name} is missing")
            continue
        except Exception as exc:
            rep.add(file, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        problems = SCORES_SCHEMA.meta_problems(spec.name, a, counts)
        if problems:
            rep.add(file, f"array {spec.name}: " + ", ".join(problems))
        else:
            arrays[spec.name] = a
    return arrays


def _chunk_names(where: Where, name: str) -> set[str]:
    """The names in the chunk folder of array `name` of the store at `where`."""
    if isinstance(where, str):
        return set(storage.names(storage.join(where, name, "c")))
    folder = where / name / "c"
    return {e.name for e in os.scandir(folder)} if folder.is_dir() else set()


def _check_scores_ids_present(rep: _Report, scores, where: Where, arrays: dict, n: int, block: int) -> None:
    """Every chunk of the identity arrays exists (zarr would read a missing one as zeros)."""
    for spec in SCORES_SCHEMA.arrays:
        if spec.index_copy and spec.name in arrays:
            present = _chunk_names(where, spec.name)
            for c in range(-(-n // block)):
                if str(c) not in present:
                    rep.add(scores.chunk_path(spec.name, c), f"missing (rows [{c * block}, {min(n, (c + 1) * block)}))")


def _check_scores_chunks(rep: _Report, scores, arrays: dict, listed: list, index, n: int, block: int) -> dict:
    """Every chunk of the checked arrays: readable, its values possible; the finite values of each
    listed score, counted (a score with an unreadable chunk left out)."""
    finite = {s: 0 for s in listed}
    specs = [s for s in SCORES_SCHEMA.arrays if s.chunks_read and s.name in arrays]
    n_chunks = -(-n // block)
    rep.bar.total = (rep.bar.total or 0) + n_chunks * len(specs)
    rep.bar.refresh()
    for c in range(n_chunks):
        r0, r1 = c * block, min(n, (c + 1) * block)
        for spec in specs:
            rep.tick()
            try:
                data = np.asarray(arrays[spec.name][r0:r1])
            except Exception as exc:
                rep.add(scores.chunk_path(spec.name, c), f"unreadable (rows [{r0}, {r1}): {type(exc).__name__}: {exc})")
                finite.pop(spec.name, None)
                continue
            if spec.name in finite:
                finite[spec.name] += int(np.isfinite(data).sum())
            found = _bad_values(spec, data, index, r0, r1)
            if found is not None:
                _report_values(rep, partial(scores.chunk_path, spec.name, c), *found, r0, r1)
    return finite


# -- keep-lists -------------------------------------------------------------------------------------


def _check_keep(rep: _Report, path: Where, index) -> None:
    """Problems of the keep-list `path` against the index."""
    from streamprune.formats.keeplist import KeepList

    try:
        keep = KeepList.load(path)
    except Exception as exc:
        rep.add(path, f"{exc}")
        return
    if index is None:
        return
    place: Where = path if isinstance(path, Path) or keep.place is None else keep.place
    if not _check_keep_manifest(rep, keep, index, _at(place, "manifest.json")):
        return
    mapped = _check_keep_shards(rep, keep, index, _at(place, "shards.json"))
    if mapped is None:
        return
    if keep.weights is not None:
        w = np.asarray(keep.weights)
        if not (np.isfinite(w) & (w > 0)).all():
            rep.add(_at(place, "weights.npy"), "weights that are not finite and positive")
    if keep.positions is not None:
        _check_keep_rows(rep, keep, index, place, mapped)


def _check_keep_manifest(rep: _Report, keep, index, mfile: Where) -> bool:
    """Problems of the manifest `mfile`; whether the keep-list is of this index (else nothing more is checked)."""
    m = keep.manifest
    if m.get("fingerprint") != index.fingerprint:
        rep.add(
            mfile,
            f"fingerprint {m.get('fingerprint')!r} is not the index's {index.fingerprint}: a keep-list "
            "of another index",
        )
        return False
    if m.get("n_rows") is not None and m["n_rows"] != index.n_samples:
        rep.add(mfile, f"n_rows {m['n_rows']}, the index has {index.n_samples} samples")
    if isinstance(m.get("N"), int) and m["N"] < len(keep):
        rep.add(mfile, f"N={m['N']} scorable samples but k={len(keep)} kept")
    return True


def _check_keep_shards(rep: _Report, keep, index, sfile: Where) -> np.ndarray | None:
    """Problems of the shard table `sfile`; each listed shard's number in the index, or None when
    the rows cannot be checked (a shard not in the index, more kept than it holds)."""
    counts = np.diff(index.shard_offset)
    where = {name: i for i, name in enumerate(index.names)}
    mapped = np.array([where.get(name, -1) for name in keep.names], dtype=np.int64)
    if (mapped < 0).any():
        unknown = [keep.names[i] for i in np.flatnonzero(mapped < 0)[:3]]
        rep.add(sfile, f"shards not in the index: {unknown}")
        return None
    if keep.samples is not None and not np.array_equal(keep.samples, counts[mapped]):
        first = int(np.flatnonzero(keep.samples != counts[mapped])[0])
        rep.add(
            sfile,
            f"shard {keep.names[first]!r}: samples {int(keep.samples[first])}, "
            f"the index has {int(counts[mapped[first]])}",
        )
    if (keep.kept > counts[mapped]).any():
        first = int(np.flatnonzero(keep.kept > counts[mapped])[0])
        rep.add(
            sfile, f"shard {keep.names[first]!r}: kept {int(keep.kept[first])} of {int(counts[mapped[first]])} samples"
        )
        return None
    return mapped


def _check_keep_rows(rep: _Report, keep, index, place: Where, mapped: np.ndarray) -> None:
    """The kept samples' positions, block by block (within their shard, ascending), then each
    block's ranges, identities and keys against the index's rows."""
    counts = np.diff(index.shard_offset)
    k = len(keep)
    rep.bar.total = (rep.bar.total or 0) + -(-k // BLOCK)
    rep.bar.refresh()
    prev_shard, prev_pos = -1, -1
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        rep.tick()
        s = np.searchsorted(keep.offsets, np.arange(b0, b1), side="right") - 1
        pos = np.asarray(keep.positions[b0:b1])
        within = (pos >= 0) & (pos < counts[mapped[s]])
        ps = np.concatenate([[prev_shard], s[:-1]])
        pp = np.concatenate([[prev_pos], pos[:-1]])
        ascending = (ps != s) | (pos > pp)
        if not (within & ascending).all():
            i = int(np.flatnonzero(~(within & ascending))[0])
            rep.add(
                _at(place, "positions.npy"),
                f"kept sample {b0 + i}: position {int(pos[i])} in shard "
                f"{keep.names[s[i]]!r} is outside [0, {int(counts[mapped[s[i]]])}) "
                "or not ascending",
            )
            return
        prev_shard, prev_pos = int(s[-1]), int(pos[-1])
        _check_keep_block(rep, keep, index, place, b0, b1, np.asarray(index.shard_offset)[mapped[s]] + pos)


def _check_keep_block(rep: _Report, keep, index, place: Where, b0: int, b1: int, rows: np.ndarray) -> None:
    """Kept samples `[b0, b1)`, the index's `rows`: their byte ranges, identities and keys."""
    if keep.ranges is not None:
        got = np.asarray(keep.ranges[b0:b1])
        want = np.stack([index.sample_start[rows], index.sample_end[rows]], axis=1)
        if not np.array_equal(got, want):
            i = int(np.flatnonzero((got != want).any(axis=1))[0])
            rep.add(
                _at(place, "ranges.npy"),
                f"kept sample {b0 + i}: byte range {got[i].tolist()}, the index has {want[i].tolist()}",
            )
    ids = np.asarray(keep.id_pairs[b0:b1])
    bad = (ids["f0"] != index.id_hi[rows]) | (ids["f1"] != index.id_lo[rows])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rep.add(
            _at(place, "ids.npy"),
            f"kept sample {b0 + i}: identity differs from the index's ({int(bad.sum())} in this block)",
        )
    ko = np.asarray(keep.key_offset[b0 : b1 + 1])
    starts, ends = np.asarray(index.key_offset[rows]), np.asarray(index.key_offset[rows + 1])
    lengths = ends - starts
    if not np.array_equal(np.diff(ko), lengths):
        rep.add(_at(place, "key_offset.npy"), f"kept samples {b0}..{b1 - 1}: key lengths differ from the index's")
        return
    span = np.frombuffer(index.key_bytes(int(starts.min()), int(ends.max())), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    want_keys = span[np.repeat(starts - starts.min() - offsets[:-1], lengths) + np.arange(offsets[-1])]
    if bytes(keep.key_blob[int(ko[0]) : int(ko[-1])]) != want_keys.tobytes():
        rep.add(_at(place, "keys.bin"), f"kept samples {b0}..{b1 - 1}: keys differ from the index's")


# -- leftovers --------------------------------------------------------------------------------------


def _leftovers(rep: _Report, run: Path, outputs: list[tuple[Path, Path]]) -> None:
    from streamprune.formats.atomic import temp_pid
    from streamprune.formats.stats_store import creation_temp

    rd = RunDir(run)
    targets = [Path(rd.index), *(p for pair in outputs for p in pair)]
    for target in targets:
        if not target.parent.is_dir():
            continue
        for temp in sorted(target.parent.iterdir()):
            pid = temp_pid(temp, target)
            if pid is not None:
                state = (
                    "its process is still running" if pid != os.getpid() and pid_alive(pid) else "its process is gone"
                )
                rep.note(
                    temp, f"leftover temporary of {target.name} ({state}); the next writer of {target.name} removes it"
                )
    if creation_temp(Path(rd.stats)).exists():
        rep.note(
            creation_temp(Path(rd.stats)), "leftover of an interrupted store creation; the next `record` replaces it"
        )
    parts = Path(rd.index_parts)
    if parts.is_dir():
        for p in sorted(parts.glob("*.tmp*")):
            rep.note(p, "leftover temporary index part of a killed `index`")


def _url_leftovers(rep: _Report, outputs: list[str]) -> None:
    """What killed writers left in an object store: uncommitted generations of each output, and
    lock folders whose leases expired (or that are still held: a writer may be running)."""
    from streamprune.formats import object_lock

    for output in outputs:
        name = storage.name(output)
        try:
            keep: str | None = storage.name(commit.committed(output))
        except (FileNotFoundError, DamagedRunError):
            keep = None
        for entry in storage.names(output, folders=True):
            if entry.startswith("g-") and entry != keep:
                rep.note(
                    storage.join(output, entry),
                    f"uncommitted generation of {name} (left by a killed writer); the next writer of {name} removes it",
                )
        folder = object_lock.lock_folder(output)
        found = [object_lock.read_lease(folder, n) for n in object_lock.leases(folder)]
        held = [lease for lease in found if lease is not None]
        if not held:
            continue
        last = held[-1]
        if any(lease.live() for lease in held):
            state = f"held by {last.owner} until {last.until()}: a writer may be running"
        else:
            state = f"its lease expired ({last.owner}, {last.until()})"
        rep.note(folder, f"leftover lock of {name} ({state}); the next writer of {name} takes it over")


def format_report(report: dict) -> str:
    """One line per problem (`DAMAGED file: problem`), leftover notes, then a summary line."""
    lines = [f"DAMAGED {p['file']}: {p['problem']}" for p in report["problems"]]
    lines += [f"note {n['file']}: {n['problem']}" for n in report["notes"]]
    files = len({p["file"] for p in report["problems"]})
    checked = f"{report['chunks_checked']:,} chunks checked"
    lines.append(
        f"verify: {len(report['problems'])} problems in {files} files ({checked})"
        if report["damaged"]
        else f"verify: clean ({checked})"
    )
    return "\n".join(lines)
