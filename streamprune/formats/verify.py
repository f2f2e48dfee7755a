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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats import commit
from streamprune.formats.atomic import pid_alive
from streamprune.formats.headers import CORRECT_MISSING, LABEL_MISSING
from streamprune.formats.rundir import RunDir
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
    from streamprune.errors import StreamPruneError
    from streamprune.formats.index import Index
    from streamprune.shards.sources import local_source

    files: Where = path
    if isinstance(path, str):
        if not storage.exists(path):
            rep.note(path, "no index: nothing is checked against one")
            return None
        place = _committed_place(rep, path)
        if place is None:
            return None
        files = place
        if not storage.exists(storage.join(place, "manifest.json")):
            rep.add(
                storage.join(place, "manifest.json"), "missing: the index is incomplete (run `streamprune index` again)"
            )
            return None
    elif not (path / "manifest.json").exists():
        if path.exists():
            rep.add(path / "manifest.json", "missing: the index is incomplete (run `streamprune index` again)")
        else:
            rep.note(path, "no index: nothing is checked against one")
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
    off = np.asarray(index.shard_offset)
    for s in range(index.n_shards):
        found = index.range_problem(s)
        if found is not None:
            rep.add(_at(files, found[0]), found[1])
        try:
            local_source(index, s)
        except StreamPruneError as exc:
            if isinstance(path, str) and not isinstance(exc, DamagedRunError):
                continue  # a run in a bucket indexed shards by URL: opened only when given, as `record` does
            rep.add(_at(files, "shards.jsonl"), str(exc))
    fp = hashlib.blake2b(digest_size=16)  # as `write_index`: names, counts and identities, shard by shard
    for i, name in enumerate(index.names):
        a, b = int(off[i]), int(off[i + 1])
        fp.update(json.dumps([name, b - a]).encode())
        for c0 in range(a, b, BLOCK):
            c1 = min(b, c0 + BLOCK)
            fp.update(np.asarray(index.id_hi[c0:c1]).tobytes())
        for c0 in range(a, b, BLOCK):
            c1 = min(b, c0 + BLOCK)
            fp.update(np.asarray(index.id_lo[c0:c1]).tobytes())
    if fp.hexdigest() != index.fingerprint:
        rep.add(
            _at(files, "id_hi.npy"),
            "the identities, shard names or counts do not give the manifest's fingerprint "
            f"{index.fingerprint}: index files were edited or damaged",
        )
    return index


# -- the stats store --------------------------------------------------------------------------------


def _check_stats(rep: _Report, path: Where, index, root: str | None = None):
    """Problems of the stats store `path` (a URL's read from its committed generation `root`)."""
    import zarr

    from streamprune.formats.stats_store import LABEL, STATS, StatsStore, chunk_file, open_zarr

    where: Where = path if root is None else root
    try:
        if root is None:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
            store = StatsStore(group, path, index, strict=False)
        else:
            store = StatsStore(open_zarr(root, "r"), path, index, strict=False, root=root)
    except DamagedRunError as exc:  # its header: another format, or a newer version
        rep.add(_at(where, "zarr.json"), str(exc))
        return None
    except Exception as exc:
        rep.add(_at(where, "zarr.json"), f"unreadable ({type(exc).__name__}: {exc})")
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
        raw = store._arrays["done"]
        for t in range(store.epochs):
            row = np.asarray(raw[t, :])
            if ((row != 0) & (row != 1)).any():
                rep.add(
                    chunk_file(where, "done", t, 0),
                    f"completion markers of epoch {t} hold values other than 0 and 1",
                )
        try:
            for name, chunk, epoch in store.missing_chunks():
                r0, r1 = store.chunk_rows_range(chunk)
                rep.add(
                    store.chunk_path(name, chunk, epoch),
                    f"missing (rows [{r0}, {r1})"
                    + ("" if epoch is None else f", epoch {epoch}, marked complete")
                    + ")",
                )
        except Exception as exc:
            rep.add(where, f"chunks not listed ({type(exc).__name__}: {exc})")
    cr, n = store.chunk_rows, store.n_samples
    names = [x for x in (*STATS, LABEL, "id_hi", "id_lo") if x in store._arrays]
    rep.bar.total = (rep.bar.total or 0) + store.n_chunks * sum(store.epochs if x in STATS else 1 for x in names)
    rep.bar.refresh()
    for name in names:
        arr = store._arrays[name]
        two = name in STATS
        for c in range(store.n_chunks):
            r0, r1 = c * cr, min((c + 1) * cr, n)
            try:
                data = np.asarray(arr[r0:r1, :] if two else arr[r0:r1])
            except Exception:
                data = None
                for epoch in range(store.epochs) if two else [None]:
                    try:
                        arr[r0:r1] if epoch is None else arr[r0:r1, epoch]
                    except Exception as exc:
                        rep.add(
                            store.chunk_path(name, c, epoch),
                            f"unreadable (rows [{r0}, {r1})"
                            + ("" if epoch is None else f", epoch {epoch}")
                            + f": {type(exc).__name__}: {exc})",
                        )
            rep.tick(store.epochs if two else 1)
            if data is None:
                continue
            if name == "p_true":
                bad, what = np.isfinite(data) & ((data < 0) | (data > 1)), "probabilities outside [0, 1]"
            elif name == "correct":
                bad, what = (data > 1) & (data != CORRECT_MISSING), "values other than 0, 1 and 255"
            elif name == LABEL:
                bad, what = data < LABEL_MISSING, "labels below -1"
            elif name in ("id_hi", "id_lo") and index is not None:
                bad, what = data != np.asarray(getattr(index, name)[r0:r1]), "identities other than the index's"
            else:
                continue
            if two:
                for t in np.flatnonzero(bad.any(axis=0)).tolist():
                    rows = r0 + np.flatnonzero(bad[:, t])
                    rep.add(
                        store.chunk_path(name, c, t),
                        f"holds {what} (rows [{r0}, {r1}), epoch {t}; {len(rows)} values, e.g. row {rows[0]})",
                    )
            elif bad.any():
                rows = r0 + np.flatnonzero(bad)
                rep.add(
                    store.chunk_path(name, c),
                    f"holds {what} (rows [{r0}, {r1}); {len(rows)} values, e.g. row {rows[0]})",
                )
    return store


# -- scores.zarr ------------------------------------------------------------------------------------


def _check_scores(rep: _Report, path: Where, index, store) -> None:
    from streamprune.formats.scores_store import ARRAYS, ScoresStore
    from streamprune.formats.stats_store import LABEL
    from streamprune.scoring.scores import SCORES

    where: Where = path
    try:
        if isinstance(path, str):
            where = commit.committed(path)
        scores = ScoresStore.open(path)
        attrs = scores.attrs
    except DamagedRunError as exc:
        rep.add(_at(where, "zarr.json"), str(exc))
        return
    except Exception as exc:
        rep.add(_at(where, "zarr.json"), f"unreadable ({type(exc).__name__}: {exc})")
        return
    root = _at(where, "zarr.json")
    n = index.n_samples if index is not None else (store.n_samples if store is not None else None)
    if index is not None and attrs.get("fingerprint") != index.fingerprint:
        rep.add(root, f"fingerprint {attrs.get('fingerprint')!r} is not the index's {index.fingerprint}")
    block = attrs.get("block_rows")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        rep.add(root, f"attribute block_rows is {block!r}, not an integer >= 1")
        block = None
    for key in ("epochs", "window"):
        v = attrs.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            rep.add(root, f"attribute {key} is {v!r}, not an integer >= 1")
    if (
        store is not None
        and isinstance(attrs.get("epochs"), int)
        and store.epochs is not None
        and attrs["epochs"] > store.epochs
    ):
        rep.add(root, f"attribute epochs is {attrs['epochs']}, the stats store records only {store.epochs}")
    listed = attrs.get("scores")
    if not isinstance(listed, list) or not set(listed) <= set(SCORES):
        rep.add(root, f"attribute scores is {listed!r}, not a list of {list(SCORES)}")
        listed = []
    arrays = {}
    for name, (dtype, _) in ARRAYS.items():
        try:
            a = scores.array(name)
        except KeyError:
            rep.add(_at(where, name, "zarr.json"), f"array {name} is missing")
            continue
        except Exception as exc:
            rep.add(_at(where, name, "zarr.json"), f"unreadable ({type(exc).__name__}: {exc})")
            continue
        problems = []
        if n is not None and tuple(a.shape) != (n,):
            problems.append(f"shape {tuple(a.shape)}, expected ({n},)")
        if a.dtype != dtype:
            problems.append(f"data type {a.dtype}, expected {dtype}")
        if block is not None and tuple(a.chunks) != (block,):
            problems.append(f"chunks {tuple(a.chunks)}, expected ({block},) (block_rows)")
        if problems:
            rep.add(_at(where, name, "zarr.json"), f"array {name}: " + ", ".join(problems))
        else:
            arrays[name] = a
    if n is None or block is None:
        return
    n_chunks = -(-n // block)
    for name in ("id_hi", "id_lo"):
        if name in arrays:
            if isinstance(where, str):
                present = set(storage.names(storage.join(where, name, "c")))
            else:
                present = {e.name for e in os.scandir(where / name / "c")} if (where / name / "c").is_dir() else set()
            for c in range(n_chunks):
                if str(c) not in present:
                    rep.add(scores.chunk_path(name, c), f"missing (rows [{c * block}, {min(n, (c + 1) * block)}))")
    finite = {s: 0 for s in listed}
    check = [x for x in (*SCORES, "id_hi", "id_lo", LABEL) if x in arrays]
    rep.bar.total = (rep.bar.total or 0) + n_chunks * len(check)
    rep.bar.refresh()
    for c in range(n_chunks):
        r0, r1 = c * block, min(n, (c + 1) * block)
        for name in check:
            rep.tick()
            try:
                data = np.asarray(arrays[name][r0:r1])
            except Exception as exc:
                rep.add(scores.chunk_path(name, c), f"unreadable (rows [{r0}, {r1}): {type(exc).__name__}: {exc})")
                finite.pop(name, None)
                continue
            if name in finite:
                finite[name] += int(np.isfinite(data).sum())
            bad = None
            if name == "mean_p":
                bad, what = np.isfinite(data) & ((data < 0) | (data > 1)), "mean probabilities outside [0, 1]"
            elif name == LABEL:
                bad, what = data < LABEL_MISSING, "labels below -1"
            elif name in ("id_hi", "id_lo") and index is not None:
                bad, what = data != np.asarray(getattr(index, name)[r0:r1]), "identities other than the index's"
            if bad is not None and bad.any():
                rows = r0 + np.flatnonzero(bad)
                rep.add(
                    scores.chunk_path(name, c),
                    f"holds {what} (rows [{r0}, {r1}); {len(rows)} values, e.g. row {rows[0]})",
                )
    summary = attrs.get("summary", {}).get("finite", {}) if isinstance(attrs.get("summary"), dict) else {}
    for name, count in finite.items():
        if name in summary and summary[name] != count:
            rep.add(
                _at(where, name),
                f"holds {count} finite scores, the summary in zarr.json says {summary[name]}: "
                "a chunk was deleted or edited",
            )


# -- keep-lists -------------------------------------------------------------------------------------


def _check_keep(rep: _Report, path: Where, index) -> None:
    from streamprune.formats.keeplist import KeepList

    try:
        keep = KeepList.load(path)
    except Exception as exc:
        rep.add(path, f"{exc}")
        return
    m = keep.manifest
    if index is None:
        return
    place: Where = path if isinstance(path, Path) or keep.place is None else keep.place
    mfile = _at(place, "manifest.json")
    if m.get("fingerprint") != index.fingerprint:
        rep.add(
            mfile,
            f"fingerprint {m.get('fingerprint')!r} is not the index's {index.fingerprint}: a keep-list "
            "of another index",
        )
        return
    if m.get("n_rows") is not None and m["n_rows"] != index.n_samples:
        rep.add(mfile, f"n_rows {m['n_rows']}, the index has {index.n_samples} samples")
    if isinstance(m.get("N"), int) and m["N"] < len(keep):
        rep.add(mfile, f"N={m['N']} scorable samples but k={len(keep)} kept")
    sfile = _at(place, "shards.json")
    counts = np.diff(index.shard_offset)
    where = {name: i for i, name in enumerate(index.names)}
    mapped = np.array([where.get(name, -1) for name in keep.names], dtype=np.int64)
    if (mapped < 0).any():
        unknown = [keep.names[i] for i in np.flatnonzero(mapped < 0)[:3]]
        rep.add(sfile, f"shards not in the index: {unknown}")
        return
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
        return
    if keep.weights is not None:
        w = np.asarray(keep.weights)
        if not (np.isfinite(w) & (w > 0)).all():
            rep.add(_at(place, "weights.npy"), "weights that are not finite and positive")
    if keep.positions is None:
        return
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
        rows = np.asarray(index.shard_offset)[mapped[s]] + pos
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
        got_keys = bytes(keep.key_blob[int(ko[0]) : int(ko[-1])])
        starts, ends = np.asarray(index.key_offset[rows]), np.asarray(index.key_offset[rows + 1])
        lengths = ends - starts
        if not np.array_equal(np.diff(ko), lengths):
            rep.add(_at(place, "key_offset.npy"), f"kept samples {b0}..{b1 - 1}: key lengths differ from the index's")
            continue
        span = np.frombuffer(index.key_bytes(int(starts.min()), int(ends.max())), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        want_keys = span[np.repeat(starts - starts.min() - offsets[:-1], lengths) + np.arange(offsets[-1])]
        if got_keys != want_keys.tobytes():
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
