"""`streamprune reduce`: scores and an exact, deterministic keep-list, computed by Ray tasks.

Pass 1 scores chunk-aligned row blocks into `RUN/scores.zarr` (each block is one chunk,
written by its one task) and returns small summaries (counts, ranges, top-10 DUAL). The
kept set is the `k` rows with the largest selection keys (see `sampling`); the k-th key
is found by radix refinement over blocks, gathering only the final small bucket. Every
random choice comes from `(seed, identity)`, so the keep-list does not depend on the
number of workers or the block size. Memory per task is bounded by the block size.
"""

from __future__ import annotations

import os
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
from streamprune.formats.stats_store import LABEL, StatsStore, store_exists
from streamprune.progress import progress_bar
from streamprune.scoring import sampling
from streamprune.scoring.columns import LABEL_MISSING, NO_GROUP
from streamprune.scoring.methods import Method
from streamprune.scoring.scores import NEEDS, SCORES, all_scores, resolve_window
from streamprune.scoring.selection import CCS_BINS, SelectionSpec, block_keys, exclude, kth_thresholds
from streamprune.settings import ReduceSettings
from streamprune.stages.ray_cluster import bounded_map, ensure_ray

GATHER_LIMIT = 1 << 20


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
    group and, for DUAL+Beta, the positive weights per group."""
    sc = _read_block(scores_path, r0, r1, spec)
    words, groups = block_keys(sc, r0, spec)
    ScoresStore.open(scores_path, "r+").write_block(r0, r1, {"sel_key": words[0], "sel_group": groups})
    positive = np.zeros(n_groups, dtype=np.int64)
    if spec.sampler == "beta":  # ES keys of positive weights are > the zero-weight base
        pos = (groups >= 0) & (words[0] > np.uint64(sampling.POSITIVE_WEIGHT_BITS))
        positive = np.bincount(groups[pos], minlength=n_groups)
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

    def __init__(self, bounds: list[tuple[int, int]], workers: int):
        self.bounds, self.workers = bounds, workers

    def map(self, fn, *args, desc: str | None = None, progress: bool = False, sink=None):
        """Results in block order; with `sink(i, result)`, hand each over as it arrives instead."""
        out: list = [None] * len(self.bounds)
        bar = progress_bar(total=len(self.bounds), desc=desc, unit="block", disable=not progress, leave=False)
        bounded_map(lambda b: fn.remote(b[0], b[1], *args), self.bounds, self.workers, sink or out.__setitem__, bar)
        bar.close()
        return out


def _thresholds(
    blocks: _Blocks,
    scores_path: str,
    spec: SelectionSpec,
    needs: np.ndarray,
    counts: np.ndarray,
    progress: bool,
    gather_limit: int,
) -> np.ndarray:
    """`selection.kth_thresholds` over the blocks' stored keys (`_store_keys` of `spec` first)."""

    def histogram(prefixes: np.ndarray, active: list[int], digit_bits: int) -> np.ndarray:
        parts = blocks.map(
            _histogram_block, scores_path, spec, prefixes, active, digit_bits, desc="select", progress=progress
        )
        return np.sum(parts, axis=0)

    def gather(prefixes: np.ndarray, active: list[int], digit_bits: int) -> tuple[np.ndarray, np.ndarray]:
        parts = blocks.map(
            _gather_block, scores_path, spec, prefixes, active, digit_bits, desc="gather", progress=progress
        )
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])

    return kth_thresholds(needs, counts, histogram, gather, gather_limit)


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
    s = (settings or ReduceSettings()).replace(**options)
    ratio, method, seed, epochs, window, missing, cut, which = (
        s.ratio,
        s.method,
        s.seed,
        s.epochs,
        s.window,
        s.missing,
        s.cut,
        s.scores,
    )
    C, alpha_plus_beta = s.C, s.alpha_plus_beta
    m = Method.parse(method)
    balance = sampling.resolve_balance(s.balance, method)
    c_d = sampling.resolve_c_d(s.c_d, balance)
    run = storage.absolute(run)
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
    complete = store.complete_epochs()
    epochs = complete if epochs is None else epochs
    if not 1 <= epochs <= store.epochs:
        raise SettingsError(f"epochs must be in 1..{store.epochs}, not {epochs}")
    if epochs > complete:
        raise SettingsError(
            f"only {complete} epochs of {run} are completely recorded; run `streamprune record` "
            f"to finish, or set epochs={complete}"
        )
    names = (
        SCORES
        if which == "all"
        else tuple(dict.fromkeys([s for s in (m.score, "dual" if m.sampler == "beta" else None) if s] + ["mean_p"]))
    )
    # a deleted chunk would read as NaN: its samples silently "missing"
    store.check_chunks(epochs, tuple(dict.fromkeys(NEEDS[s] for s in names)))
    window = resolve_window(window, epochs)
    if m.score in ("dual", "dyn_unc") or m.sampler == "beta":
        if window < 2 or epochs < window:
            raise SettingsError(f"window must satisfy 2 <= window <= T; got window={window}, T={epochs}")
    scores_path = RunDir(run).scores if scores_out is None else storage.absolute(scores_out)
    out = storage.absolute(out) if out is not None else RunDir(run).keep
    with output_lock(out, writer="reduce"), output_lock(scores_path, writer="reduce"):
        clean_uncommitted(scores_path)  # of killed runs: we hold the locks, no one else writes them
        clean_uncommitted(out)
        ensure_ray(address)
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunk = store.chunk_rows
        block_rows = chunk * max(1, -(-(block_rows or 262144) // chunk))
        n = store.n_samples
        bounds = [(r0, min(r0 + block_rows, n)) for r0 in range(0, n, block_rows)]
        blocks = _Blocks(bounds, workers)
        summary = _score_all(blocks, store, scores_path, epochs, window, block_rows, names, progress)

        spec = SelectionSpec(
            m.sampler, m.score, seed, ratio, balance == "classes", c_d=c_d, C=C, alpha_plus_beta=alpha_plus_beta
        )
        n_classes = summary["max_label"] + 1
        if balance == "classes" and n_classes < 1:
            raise InputError(f"no sample of {run} has a recorded label: nothing to balance")
        # selectable rows: finite scores, and with class balance a label too
        counted = summary["labelled"] if balance == "classes" else {"rows": n, **summary["finite"]}
        n_ok = counted["rows"] if m.sampler == "random" else counted[m.score if m.sampler != "beta" else "dual"]
        if m.sampler == "beta":
            n_ok = min(n_ok, counted["mean_p"])
        n_groups = CCS_BINS if m.sampler == "ccs" else n_classes if balance == "classes" else 1
        dropped = n - n_ok
        if dropped and missing == "error":
            raise DamagedRunError(
                f"{dropped} samples have missing statistics{' or labels' if balance == 'classes' else ''} "
                f"(e.g. rows {summary['missing_rows'][:5]}); set missing='drop' to leave them out"
            )
        k = sampling.keep_count(n_ok, ratio)
        if k == 0 and sampling.keep_count(n, ratio) > 0:  # nothing kept because (nearly) every sample is missing
            what = "statistics" + (" or labels" if balance == "classes" else "")
            raise DamagedRunError(
                f"no sample of {run} can be kept: {dropped:,} of {n:,} samples have missing {what} "
                f"(e.g. rows {summary['missing_rows'][:5]}), so the keep-list would keep nothing; "
                f"{str(out)!r} is left as it is. Record the statistics again (`streamprune record`)"
            )
        params: dict = {"cut": cut} if m.sampler == "ccs" else {}
        if m.sampler == "beta":
            top = summary["top"]
            spec = spec.replace(anchor=float(np.mean(top["mean_p"])) if top["mean_p"] else 0.5)
            alpha, beta = sampling.beta_params(ratio, spec.anchor, c_d=c_d, C=C, alpha_plus_beta=alpha_plus_beta)
            params.update(anchor=spec.anchor, alpha=alpha, beta=beta, c_d=c_d, C=C, alpha_plus_beta=alpha_plus_beta)
        if m.sampler == "ccs":
            spec = _ccs_setup(blocks, scores_path, spec, n_ok, k, cut, progress, gather_limit)
        parts = blocks.map(_store_keys, scores_path, spec, n_groups, desc="keys", progress=progress)
        counts = sum(p[0] for p in parts)
        if m.sampler == "ccs":
            needs = sampling.ccs_quotas(counts, k)
            spec = spec.replace(excluded=tuple(int(g) for g in np.flatnonzero(needs == 0)))
            params.update(lo=spec.lo, hi=spec.hi, bins=CCS_BINS, quotas=needs.tolist())
        elif balance == "classes":
            needs = sampling.class_quotas(counts, k)
            spec = spec.replace(excluded=tuple(int(g) for g in np.flatnonzero(needs == 0)))
            params.update(class_counts=counts.tolist(), class_quotas=needs.tolist())
        else:
            needs = np.array([k])
            spec = spec.replace(excluded=(0,) if k == 0 else ())
        thresholds = _thresholds(
            blocks, scores_path, spec, np.asarray(needs), np.asarray(counts), progress, gather_limit
        )
        # ES keys rank every positive weight above the zero-weight fill-up.
        filled = int(np.maximum(0, needs - sum(p[1] for p in parts)).sum()) if m.sampler == "beta" else 0
        manifest = new_manifest(
            method=m.name,
            balance=balance,
            ratio=ratio,
            seed=seed,
            k=k,
            N=n_ok,
            n_rows=n,
            dropped_missing=dropped,
            filled_zero_weight=filled,
            epochs=epochs,
            window=window,
            params=params,
            fingerprint=index.fingerprint,
            index_root=index.root,
            weights=m.sampler == "random",
        )
        weight = n_ok / max(k, 1) if m.sampler == "random" else None
        with KeepListWriter.for_index(out, index, manifest, k, with_weights=weight is not None) as writer:
            blocks.map(
                _kept_block,
                scores_path,
                spec,
                thresholds,
                desc="keep",
                progress=progress,
                sink=_InOrder(lambda rows: writer.add_rows(index, rows, weight)),
            )
        return KeepList.load(out)


def _score_all(
    blocks: _Blocks,
    store: StatsStore,
    scores_path: str,
    epochs: int,
    window: int,
    block_rows: int,
    names: tuple[str, ...],
    progress: bool,
) -> dict:
    """Pass 1: every score of every row into a new `scores.zarr`, which replaces the old one when
    complete (a failed run leaves the old one and no temporary behind)."""
    with replacing(scores_path) as place:
        return _score_into(place, blocks, store, epochs, window, block_rows, names, progress)


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
    top = [(d, h, lo, mp) for p in parts for d, h, lo, mp in zip(*p["top"].values())]
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


def _ccs_setup(
    blocks: _Blocks,
    scores_path: str,
    spec: SelectionSpec,
    n_ok: int,
    k: int,
    cut: float,
    progress: bool,
    gather_limit: int,
) -> SelectionSpec:
    """`spec` with CCS's cut threshold (the hardest `cut` fraction, fewer if the budget needs
    them) and the score range of the samples that remain."""
    n_cut = min(int(np.floor(cut * n_ok + 0.5)), n_ok - k)
    cut_spec = spec.replace(phase="cut")
    threshold = None
    if n_cut > 0:
        blocks.map(_store_keys, scores_path, cut_spec, 1)
        words = _thresholds(blocks, scores_path, cut_spec, np.array([n_cut]), np.array([n_ok]), progress, gather_limit)
        threshold = tuple(int(x) for x in words[:, 0])
    ranges = blocks.map(_remaining_range, scores_path, spec.replace(cut_threshold=threshold, lo=0.0, hi=1.0))
    lo = min((r[0] for r in ranges if r is not None), default=0.0)
    hi = max((r[1] for r in ranges if r is not None), default=0.0)
    return spec.replace(cut_threshold=threshold, lo=lo, hi=hi)


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
