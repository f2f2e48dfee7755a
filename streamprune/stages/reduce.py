"""`streamprune reduce`: scores and an exact, deterministic keep-list, computed by Ray tasks.

Pass 1 scores chunk-aligned row blocks into `RUN/scores.zarr` (each block is one chunk,
written by its one task) and returns small summaries (counts, ranges, top-10 DUAL). The
kept set is the `k` rows with the largest selection keys (see `sampling`); the k-th key
is found by radix refinement over blocks, gathering only the final small bucket. Every
random choice comes from `(seed, identity)`, so the keep-list does not depend on the
number of workers or the block size. Memory per task is bounded by the block size.

`reduce` runs four steps: plan (check settings and run, decide blocks), score (the Ray tasks
above), select (the method's sampler, `scoring.samplers`, prepares its spec, sets each row's key
and group and splits the budget; thresholds per group) and write (the keep-list). Every
per-method decision is the sampler's: this module has no branch on the method.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import ray

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError, SettingsError
from streamprune.formats.atomic import lock_holder, output_lock
from streamprune.formats.commit import clean_uncommitted, replacing
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList, KeepListWriter, new_manifest
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.formats.stats_store import StatsStore, store_exists
from streamprune.progress import progress_bar
from streamprune.scoring import sampling
from streamprune.scoring.columns import LABEL, LABEL_MISSING, NO_GROUP
from streamprune.scoring.methods import Method
from streamprune.scoring.samplers import Sampler, SelectionSpec, block_keys, exclude, make_sampler
from streamprune.scoring.scores import NEEDS, SCORES, all_scores, resolve_window
from streamprune.scoring.selection import kth_thresholds
from streamprune.settings import ReduceSettings
from streamprune.stages.ray_cluster import bounded_map, ensure_ray

GATHER_LIMIT = 1 << 20
WINDOWED = frozenset({"dual", "dyn_unc"})  # scores over sliding windows of J epochs


@ray.remote(num_cpus=1)
def _score_block(
    r0: int, r1: int, stats_path: str, scores_path: str, epochs: int, window: int, names: tuple[str, ...]
) -> dict:
    store = StatsStore.open(stats_path, mode="r")
    stats = {n: store.read(n, slice(r0, r1), slice(0, epochs)) for n in {NEEDS[s] for s in names}}
    sc = all_scores(stats, window, names)
    hi, lo = store.read("id_hi", slice(r0, r1)), store.read("id_lo", slice(r0, r1))
    labels = store.labels(slice(r0, r1)) if store.has_labels else np.full(r1 - r0, LABEL_MISSING, np.int32)
    ScoresStore.open(scores_path, "r+").write_block(r0, r1, {**sc, "id_hi": hi, "id_lo": lo, LABEL: labels})
    nan = np.full(r1 - r0, np.nan)
    ok = np.isfinite(sc.get("dual", nan)) & np.isfinite(sc["mean_p"])
    best = sampling.top_rows(sc.get("dual", nan)[ok], hi[ok], lo[ok], 10)
    return {
        "finite": {n: int(np.isfinite(v).sum()) for n, v in sc.items()},
        "min": {n: float(np.nanmin(v)) if np.isfinite(v).any() else None for n, v in sc.items()},
        "max": {n: float(np.nanmax(v)) if np.isfinite(v).any() else None for n, v in sc.items()},
        "top": {
            "dual": sc.get("dual", nan)[ok][best].tolist(),
            "hi": hi[ok][best].tolist(),
            "lo": lo[ok][best].tolist(),
            "mean_p": sc["mean_p"][ok][best].tolist(),
        },
        "missing_rows": (np.flatnonzero(~np.isfinite(sc["mean_p"]))[:10] + r0).tolist(),
        "max_label": int(labels.max(initial=LABEL_MISSING)),
        "labelled": {
            "rows": int((labels >= 0).sum()),
            **{n: int((np.isfinite(v) & (labels >= 0)).sum()) for n, v in sc.items()},
        },
    }


def _read_block(scores_path: str, r0: int, r1: int, spec: SelectionSpec) -> dict[str, np.ndarray]:
    scores = ScoresStore.open(scores_path)
    return {n: scores.read(n, slice(r0, r1)) for n in spec.arrays()}


@ray.remote(num_cpus=1)
def _store_keys(
    r0: int, r1: int, scores_path: str, spec: SelectionSpec, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the block's selection keys once into `sel_key`/`sel_group`; return the rows per
    group and the rows with a positive weight per group (DUAL+Beta's; zeros for the others)."""
    sc = _read_block(scores_path, r0, r1, spec)
    words, groups = block_keys(sc, r0, spec)
    ScoresStore.open(scores_path, "r+").write_block(r0, r1, {"sel_key": words[0], "sel_group": groups})
    positive = make_sampler(spec).positive(words, groups, n_groups)
    return np.bincount(groups[groups >= 0], minlength=n_groups), positive


def _stored_words(scores_path: str, r0: int, r1: int, spec: SelectionSpec) -> tuple[np.ndarray, np.ndarray]:
    scores, rows = ScoresStore.open(scores_path), slice(r0, r1)
    ids = [scores.read(n, rows) for n in ("id_hi", "id_lo")]
    words = np.stack(
        [scores.read("sel_key", rows), ~ids[0], ~ids[1], ~np.arange(r0, r1, dtype=np.int64).astype(np.uint64)]
    )
    return words, exclude(scores.read("sel_group", rows).astype(np.int64), spec.excluded)


def _active_words(
    scores_path: str, r0: int, r1: int, spec: SelectionSpec, active: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored words, with rows outside the groups still being refined set to `NO_GROUP`."""
    words, groups = _stored_words(scores_path, r0, r1, spec)
    return words, np.where(np.isin(groups, active), groups, NO_GROUP)


@ray.remote(num_cpus=1)
def _histogram_block(
    r0: int, r1: int, scores_path: str, spec: SelectionSpec, prefixes: np.ndarray, active: list[int], digit_bits: int
) -> np.ndarray:
    words, groups = _active_words(scores_path, r0, r1, spec, active)
    return sampling.radix_histogram(words, groups, prefixes, digit_bits)


@ray.remote(num_cpus=1)
def _gather_block(
    r0: int, r1: int, scores_path: str, spec: SelectionSpec, prefixes: np.ndarray, active: list[int], digit_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    words, groups = _active_words(scores_path, r0, r1, spec, active)
    mask = sampling.prefix_mask(words, groups, prefixes, digit_bits)
    return words[:, mask], groups[mask]


@ray.remote(num_cpus=1)
def _kept_block(r0: int, r1: int, scores_path: str, spec: SelectionSpec, thresholds: np.ndarray) -> np.ndarray:
    words, groups = _stored_words(scores_path, r0, r1, spec)
    return np.flatnonzero(sampling.at_least(words, thresholds, groups)) + r0


class _Blocks:
    """Runs one remote function over all row blocks with at most `workers` tasks in flight."""

    def __init__(self, bounds: list[tuple[int, int]], workers: int, block_rows: int):
        self.bounds, self.workers, self.block_rows = bounds, workers, block_rows

    def map(self, fn, *args, desc: str | None = None, progress: bool = False, sink=None):
        """Results in block order; with `sink(i, result)`, hand each over as it arrives instead."""
        out: list = [None] * len(self.bounds)
        bar = progress_bar(total=len(self.bounds), desc=desc, unit="block", disable=not progress, leave=False)
        bounded_map(lambda b: fn.remote(b[0], b[1], *args), self.bounds, self.workers, sink or out.__setitem__, bar)
        bar.close()
        return out


class _Passes:
    """The passes over all blocks a sampler asks for (`samplers.Passes`), as Ray tasks."""

    def __init__(self, blocks: _Blocks, scores_path: str, progress: bool, gather_limit: int):
        self.blocks, self.scores_path, self.progress, self.gather_limit = blocks, scores_path, progress, gather_limit

    def store_keys(self, spec: SelectionSpec, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
        parts = self.blocks.map(_store_keys, self.scores_path, spec, n_groups, desc="keys", progress=self.progress)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def thresholds(self, spec: SelectionSpec, needs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """`selection.kth_thresholds` over the blocks' stored keys (`store_keys` of `spec` first)."""
        blocks, path, progress = self.blocks, self.scores_path, self.progress

        def histogram(prefixes: np.ndarray, active: list[int], digit_bits: int) -> np.ndarray:
            parts = blocks.map(
                _histogram_block, path, spec, prefixes, active, digit_bits, desc="select", progress=progress
            )
            return np.sum(parts, axis=0)

        def gather(prefixes: np.ndarray, active: list[int], digit_bits: int) -> tuple[np.ndarray, np.ndarray]:
            parts = blocks.map(
                _gather_block, path, spec, prefixes, active, digit_bits, desc="gather", progress=progress
            )
            return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])

        return kth_thresholds(np.asarray(needs), np.asarray(counts), histogram, gather, self.gather_limit)

    def score_range(self, spec: SelectionSpec) -> tuple[float, float]:
        ranges = self.blocks.map(_remaining_range, self.scores_path, spec)
        lo = min((r[0] for r in ranges if r is not None), default=0.0)
        hi = max((r[1] for r in ranges if r is not None), default=0.0)
        return lo, hi


@dataclass
class _Plan:
    """What `reduce` does, decided before any work: the settings, the method's sampler (its spec),
    the run's index and statistics, the epochs, window and scores used, and where the outputs go."""

    run: str
    settings: ReduceSettings
    method: Method
    balance: str
    spec: SelectionSpec
    index: Index
    store: StatsStore
    epochs: int
    window: int
    names: tuple[str, ...]
    scores_path: str
    out: str


@dataclass
class _Selection:
    """What the selection found: the final spec, the thresholds per group, the budget and the
    keep-list parameters."""

    spec: SelectionSpec
    thresholds: np.ndarray
    n_ok: int
    k: int
    dropped: int
    filled: int
    params: dict


def reduce(
    run: str | os.PathLike,
    ratio: float | None = None,
    method: str | None = None,
    *,
    settings: ReduceSettings | None = None,
    out: str | os.PathLike | None = None,
    scores_out: str | os.PathLike | None = None,
    address: str | None = None,
    workers: int | None = None,
    block_rows: int | None = None,
    gather_limit: int = GATHER_LIMIT,
    progress: bool = True,
    **options: Any,
) -> KeepList:
    """Score every sample of `run` and write the keep-list of `method` at pruning `ratio`.

    The settings are `settings` (a `ReduceSettings`, whose fields say what each does) with
    `ratio`, `method` and any of its fields given as keyword `options` on top; bad values are
    refused before any work. Writes the scores (default `run/scores.zarr`, or `scores_out`) and
    the keep-list (default `run/keep`, or `out`); returns the `KeepList`. `epochs` (T) defaults
    to the store's complete epochs. `workers` and `block_rows` size the Ray tasks (the result
    does not depend on them); `gather_limit`: the most candidate rows the driver gathers to
    finish the exact selection (radix refinement over blocks narrows them until they fit).
    """
    if ratio is not None:
        options["ratio"] = ratio
    if method is not None:
        options["method"] = method
    plan = _plan(run, (settings or ReduceSettings()).replace(**options), out, scores_out)
    with output_lock(plan.out, writer="reduce"), output_lock(plan.scores_path, writer="reduce"):
        clean_uncommitted(plan.scores_path)  # of killed runs: we hold the locks, no one else writes them
        clean_uncommitted(plan.out)
        blocks = _start(plan.store, address, workers, block_rows)
        summary = _score_all(plan, blocks, progress)
        selection = _select(plan, summary, _Passes(blocks, plan.scores_path, progress, gather_limit))
        _write(plan, selection, blocks, progress)
        return KeepList.load(plan.out)


def _plan(
    run: str | os.PathLike, s: ReduceSettings, out: str | os.PathLike | None, scores_out: str | os.PathLike | None
) -> _Plan:
    """Check the settings against the run (refused before any work) and decide what to compute."""
    m = Method.parse(s.method)
    balance = sampling.resolve_balance(s.balance, s.method)
    c_d = sampling.resolve_c_d(s.c_d, balance)
    spec = SelectionSpec(
        m.sampler, m.score, s.seed, s.ratio, balance == "classes", c_d, s.C, s.alpha_plus_beta, cut=s.cut
    )
    sampler = make_sampler(spec)
    run = storage.absolute(run)
    index, store = _open_stats(run, balance)
    epochs = _epochs(run, store, s.epochs)
    names = SCORES if s.scores == "all" else tuple(dict.fromkeys([*sampler.scores(), "mean_p"]))
    # a deleted chunk would read as NaN: its samples silently "missing"
    store.check_chunks(epochs, tuple(dict.fromkeys(NEEDS[n] for n in names)))
    window = resolve_window(s.window, epochs)
    if WINDOWED.intersection(sampler.scores()) and (window < 2 or epochs < window):
        raise SettingsError(f"window must satisfy 2 <= window <= T; got window={window}, T={epochs}")
    scores_path = RunDir(run).scores if scores_out is None else storage.absolute(scores_out)
    out = storage.absolute(out) if out is not None else RunDir(run).keep
    return _Plan(run, s, m, balance, spec, index, store, epochs, window, names, scores_path, out)


def _open_stats(run: str, balance: str) -> tuple[Index, StatsStore]:
    """The run's index and statistics store, refused while `record` writes it, or without labels
    for class balance."""
    recording = lock_holder(RunDir(run).stats)
    if recording is not None:
        raise SettingsError(
            f"record is still running on {str(run)!r} ({recording or 'another process'}); wait for it to "
            "finish, then reduce"
        )
    index = Index(RunDir(run).index)
    if not store_exists(RunDir(run).stats):
        raise FileNotFoundError(f"no statistics in {run}: run `streamprune record {run} --epochs N` first")
    store = StatsStore.open(RunDir(run).stats, mode="r", index=index)
    if balance == "classes":
        store.labels(slice(0, 0))  # refuses a store without labels before any work
    return index, store


def _epochs(run: str, store: StatsStore, epochs: int | None) -> int:
    """The epochs used (T): those asked for, all completely recorded by default."""
    complete = store.complete_epochs()
    epochs = complete if epochs is None else epochs
    if not 1 <= epochs <= store.epochs:
        raise SettingsError(f"epochs must be in 1..{store.epochs}, not {epochs}")
    if epochs > complete:
        raise SettingsError(
            f"only {complete} epochs of {run} are completely recorded; run `streamprune record` "
            f"to finish, or set epochs={complete}"
        )
    return epochs


def _start(store: StatsStore, address: str | None, workers: int | None, block_rows: int | None) -> _Blocks:
    """Ray, and the chunk-aligned row blocks its tasks work on."""
    ensure_ray(address)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk = store.chunk_rows
    block_rows = chunk * max(1, -(-(block_rows or 262144) // chunk))
    n = store.n_samples
    return _Blocks([(r0, min(r0 + block_rows, n)) for r0 in range(0, n, block_rows)], workers, block_rows)


def _select(plan: _Plan, summary: dict, passes: _Passes) -> _Selection:
    """The budget, then per group the threshold key of the kept rows: the sampler prepares its
    spec (Beta anchor, CCS cut), the blocks store their keys, the sampler splits the budget."""
    sampler = make_sampler(plan.spec)
    n_ok, k, dropped = _budget(plan, sampler, summary)
    spec, params = sampler.prepare(summary, n_ok, k, passes)
    sampler = make_sampler(spec)
    counts, positive = passes.store_keys(spec, sampler.n_groups(summary["max_label"] + 1))
    spec, needs, split = sampler.quotas(counts, k)
    thresholds = passes.thresholds(spec, needs, counts)
    # ES keys rank every positive weight above the zero-weight fill-up.
    filled = sampler.filled(needs, positive)
    return _Selection(spec, thresholds, n_ok, k, dropped, filled, {**params, **split})


def _budget(plan: _Plan, sampler: Sampler, summary: dict) -> tuple[int, int, int]:
    """`(selectable rows, k, rows dropped as missing)`, refused when missing rows are an error
    or leave nothing to keep."""
    n, classes, run = plan.store.n_samples, plan.balance == "classes", plan.run
    if classes and summary["max_label"] + 1 < 1:
        raise InputError(f"no sample of {run} has a recorded label: nothing to balance")
    # selectable rows: finite scores, and with class balance a label too
    n_ok = sampler.selectable(summary["labelled"] if classes else {"rows": n, **summary["finite"]})
    dropped = n - n_ok
    if dropped and plan.settings.missing == "error":
        raise DamagedRunError(
            f"{dropped} samples have missing statistics{' or labels' if classes else ''} "
            f"(e.g. rows {summary['missing_rows'][:5]}); set missing='drop' to leave them out"
        )
    k = sampling.keep_count(n_ok, plan.settings.ratio)
    if k == 0 and sampling.keep_count(n, plan.settings.ratio) > 0:  # nothing kept: (nearly) every sample missing
        what = "statistics" + (" or labels" if classes else "")
        raise DamagedRunError(
            f"no sample of {run} can be kept: {dropped:,} of {n:,} samples have missing {what} "
            f"(e.g. rows {summary['missing_rows'][:5]}), so the keep-list would keep nothing; "
            f"{str(plan.out)!r} is left as it is. Record the statistics again (`streamprune record`)"
        )
    return n_ok, k, dropped


def _write(plan: _Plan, sel: _Selection, blocks: _Blocks, progress: bool) -> None:
    """The keep-list: the rows at or above their group's threshold, block by block in row order."""
    s, sampler, index = plan.settings, make_sampler(sel.spec), plan.index
    manifest = new_manifest(
        method=plan.method.name,
        balance=plan.balance,
        ratio=s.ratio,
        seed=s.seed,
        k=sel.k,
        N=sel.n_ok,
        n_rows=plan.store.n_samples,
        dropped_missing=sel.dropped,
        filled_zero_weight=sel.filled,
        epochs=plan.epochs,
        window=plan.window,
        params=sel.params,
        fingerprint=index.fingerprint,
        index_root=index.root,
        weights=sampler.weighted,
    )
    weight = sampler.weight(sel.n_ok, sel.k)
    with KeepListWriter.for_index(plan.out, index, manifest, sel.k, with_weights=weight is not None) as writer:
        blocks.map(
            _kept_block,
            plan.scores_path,
            sel.spec,
            sel.thresholds,
            desc="keep",
            progress=progress,
            sink=_InOrder(lambda rows: writer.add_rows(index, rows, weight)),
        )


def _score_all(plan: _Plan, blocks: _Blocks, progress: bool) -> dict:
    """Pass 1: every score of every row into a new `scores.zarr`, which replaces the old one when
    complete (a failed run leaves the old one and no temporary behind)."""
    with replacing(plan.scores_path) as place:
        return _score_into(place, blocks, plan.store, plan.epochs, plan.window, blocks.block_rows, plan.names, progress)


def _score_into(
    tmp: str,
    blocks: _Blocks,
    store: StatsStore,
    epochs: int,
    window: int,
    block_rows: int,
    names: tuple[str, ...],
    progress: bool,
) -> dict:
    scores = ScoresStore.create(tmp, store.n_samples, block_rows)
    parts = blocks.map(_score_block, str(store.path), tmp, epochs, window, names, desc="score", progress=progress)
    summary = {
        "finite": {s: sum(p["finite"][s] for p in parts) for s in names},
        "min": {s: min((p["min"][s] for p in parts if p["min"][s] is not None), default=None) for s in names},
        "max": {s: max((p["max"][s] for p in parts if p["max"][s] is not None), default=None) for s in names},
        "missing_rows": sum((p["missing_rows"] for p in parts), [])[:10],
        "max_label": max(p["max_label"] for p in parts),
        "labelled": {s: sum(p["labelled"][s] for p in parts) for s in ("rows", *names)},
    }
    top = [(d, h, lo, mp) for p in parts for d, h, lo, mp in zip(*p["top"].values(), strict=True)]
    top.sort(key=lambda t: (-t[0], t[1], t[2]))
    summary["top"] = {
        "dual": [t[0] for t in top[:10]],
        "hi": [t[1] for t in top[:10]],
        "lo": [t[2] for t in top[:10]],
        "mean_p": [t[3] for t in top[:10]],
    }
    scores.set_attrs(
        {
            "fingerprint": store.fingerprint,
            "epochs": epochs,
            "window": window,
            "block_rows": block_rows,
            "scores": list(names),
            "summary": summary,
        }
    )
    return summary


@ray.remote(num_cpus=1)
def _remaining_range(r0: int, r1: int, scores_path: str, spec: SelectionSpec):
    sc = _read_block(scores_path, r0, r1, spec)
    _, groups = block_keys(sc, r0, spec)
    left = sc[cast(str, spec.score)][groups >= 0]
    return (float(left.min()), float(left.max())) if len(left) else None


class _InOrder:
    """Passes block results to `fn` in block order, holding only those that arrive early."""

    def __init__(self, fn):
        self.fn, self.next, self.early = fn, 0, {}

    def __call__(self, i: int, result) -> None:
        self.early[i] = result
        while self.next in self.early:
            self.fn(self.early.pop(self.next))
            self.next += 1
