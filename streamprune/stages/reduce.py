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
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import ray
import zarr
from tqdm.auto import tqdm

from streamprune.formats.atomic import clean_stale_temps, named_os_error, output_lock, swap_in, temp_sibling
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList, KeepListWriter, new_manifest
from streamprune.formats.stats_store import LABEL, LABEL_MISSING, StatsStore
from streamprune.scoring import sampling
from streamprune.scoring.methods import LOWER_IS_HARDER, Method
from streamprune.scoring.scores import NEEDS, SCORES, all_scores, resolve_window
from streamprune.settings import ReduceSettings
from streamprune.shards.identity import uniforms
from streamprune.stages.ray_cluster import bounded_map, ensure_ray

CCS_BINS = 50
GATHER_LIMIT = 1 << 20


def _scores_group(path: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(path, mode=mode, zarr_format=3)


def _write_block(g: zarr.Group, path: str, r0: int, r1: int, values: dict[str, np.ndarray]) -> None:
    """Write rows `[r0, r1)` (one chunk) of several score arrays; a full disk names the chunk file."""
    for name, v in values.items():
        try:
            g[name][r0:r1] = v
        except OSError as exc:
            raise named_os_error(exc, f"{path}/{name}/c/{r0 // g[name].chunks[0]}") from None


@ray.remote(num_cpus=1)
def _score_block(
    r0: int, r1: int, stats_path: str, scores_path: str, epochs: int, window: int, names: tuple[str, ...]
) -> dict:
    store = StatsStore.open(stats_path, mode="r")
    stats = {n: store.read(n, slice(r0, r1), slice(0, epochs)) for n in {NEEDS[s] for s in names}}
    sc = all_scores(stats, window, names)
    hi, lo = store.read("id_hi", slice(r0, r1)), store.read("id_lo", slice(r0, r1))
    labels = store.labels(slice(r0, r1)) if store.has_labels else np.full(r1 - r0, LABEL_MISSING, np.int32)
    g = _scores_group(scores_path, "r+")
    _write_block(g, scores_path, r0, r1, {**sc, "id_hi": hi, "id_lo": lo, LABEL: labels})
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


def block_keys(sc: dict[str, np.ndarray], r0: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Selection words and groups (`-1`: not selectable) of one block, from its scores and the spec."""
    hi, lo = sc["id_hi"], sc["id_lo"]
    rows = np.arange(r0, r0 + len(hi))
    u = uniforms(spec["seed"], hi, lo)
    sampler, score = spec["sampler"], spec["score"]
    valid = np.ones(len(hi), dtype=bool) if sampler == "random" else np.isfinite(sc[score])
    if spec.get("balance"):
        valid &= sc[LABEL] >= 0
    if sampler == "beta":
        valid &= np.isfinite(sc["mean_p"])
        w = np.zeros(len(hi))
        w[valid] = sampling.beta_weights(
            sc["dual"][valid], sc["mean_p"][valid], spec["ratio"], anchor=spec["anchor"], **spec["beta"]
        )
        keys = sampling.weighted_keys(w, u)
    elif sampler == "random":
        keys = sampling.uniform_keys(u)
    elif sampler == "topk" or spec.get("phase") == "cut":
        keys = sampling.score_keys(np.where(valid, sc[score], 0.0), score in LOWER_IS_HARDER)
    else:  # ccs, after the cut: uniform within bins
        keys = sampling.uniform_keys(u)
    words = sampling.key_words(keys, hi, lo, rows)
    groups = np.where(valid, sc[LABEL] if spec.get("balance") else 0, -1)
    if sampler == "ccs" and spec.get("phase") != "cut":
        harder = np.zeros(len(hi), dtype=bool)
        if spec["cut_threshold"] is not None:
            difficulty = sampling.key_words(
                sampling.score_keys(np.where(valid, sc[score], 0.0), score in LOWER_IS_HARDER), hi, lo, rows
            )
            harder = sampling.at_least(difficulty, np.asarray(spec["cut_threshold"], dtype=np.uint64))
        groups = np.where(valid & ~harder, sampling.ccs_bin(sc[score], spec["lo"], spec["hi"], CCS_BINS), -1)
    excluded = spec.get("excluded")
    if excluded:
        groups = np.where(np.isin(groups, excluded), -1, groups)
    return words, groups


def _read_block(scores_path: str, r0: int, r1: int, spec: dict) -> dict[str, np.ndarray]:
    g = _scores_group(scores_path)
    names = {"id_hi", "id_lo", "mean_p", "dual"} if spec["sampler"] == "beta" else {"id_hi", "id_lo"}
    if spec["score"]:
        names.add(spec["score"])
    if spec.get("balance"):
        names.add(LABEL)
    return {n: np.asarray(g[n][r0:r1]) for n in names}


@ray.remote(num_cpus=1)
def _store_keys(r0: int, r1: int, scores_path: str, spec: dict, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Compute the block's selection keys once into `sel_key`/`sel_group`; return the rows per
    group and, for DUAL+Beta, the positive weights per group."""
    sc = _read_block(scores_path, r0, r1, spec)
    words, groups = block_keys(sc, r0, spec)
    g = _scores_group(scores_path, "r+")
    _write_block(g, scores_path, r0, r1, {"sel_key": words[0], "sel_group": groups})
    positive = np.zeros(n_groups, dtype=np.int64)
    if spec["sampler"] == "beta":  # ES keys of positive weights are > the zero-weight base
        pos = (groups >= 0) & (words[0] > np.uint64(sampling.POSITIVE_WEIGHT_BITS))
        positive = np.bincount(groups[pos], minlength=n_groups)
    return np.bincount(groups[groups >= 0], minlength=n_groups), positive


def _stored_words(scores_path: str, r0: int, r1: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    g = _scores_group(scores_path)
    ids = [np.asarray(g[n][r0:r1]) for n in ("id_hi", "id_lo")]
    words = np.stack(
        [np.asarray(g["sel_key"][r0:r1]), ~ids[0], ~ids[1], ~np.arange(r0, r1, dtype=np.int64).astype(np.uint64)]
    )
    groups = np.asarray(g["sel_group"][r0:r1]).astype(np.int64)
    if spec.get("excluded"):
        groups = np.where(np.isin(groups, spec["excluded"]), -1, groups)
    return words, groups


def _active_words(scores_path: str, r0: int, r1: int, spec: dict, active: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stored words, with rows outside the groups still being refined set to group -1."""
    words, groups = _stored_words(scores_path, r0, r1, spec)
    return words, np.where(np.isin(groups, active), groups, -1)


@ray.remote(num_cpus=1)
def _histogram_block(
    r0: int, r1: int, scores_path: str, spec: dict, prefixes: np.ndarray, active: list[int], digit_bits: int
) -> np.ndarray:
    words, groups = _active_words(scores_path, r0, r1, spec, active)
    return sampling.radix_histogram(words, groups, prefixes, digit_bits)


@ray.remote(num_cpus=1)
def _gather_block(
    r0: int, r1: int, scores_path: str, spec: dict, prefixes: np.ndarray, active: list[int], digit_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    words, groups = _active_words(scores_path, r0, r1, spec, active)
    mask = sampling.prefix_mask(words, groups, prefixes, digit_bits)
    return words[:, mask], groups[mask]


@ray.remote(num_cpus=1)
def _kept_block(r0: int, r1: int, scores_path: str, spec: dict, thresholds: np.ndarray) -> np.ndarray:
    words, groups = _stored_words(scores_path, r0, r1, spec)
    return np.flatnonzero(sampling.at_least(words, thresholds, groups)) + r0


class _Blocks:
    """Runs one remote function over all row blocks with at most `workers` tasks in flight."""

    def __init__(self, bounds: list[tuple[int, int]], workers: int):
        self.bounds, self.workers = bounds, workers

    def map(self, fn, *args, desc: str | None = None, progress: bool = False, sink=None):
        """Results in block order; with `sink(i, result)`, hand each over as it arrives instead."""
        out: list = [None] * len(self.bounds)
        bar = tqdm(total=len(self.bounds), desc=desc, unit="block", disable=not progress, leave=False)
        bounded_map(lambda b: fn.remote(b[0], b[1], *args), self.bounds, self.workers, sink or out.__setitem__, bar)
        bar.close()
        return out


def _thresholds(
    blocks: _Blocks,
    scores_path: str,
    spec: dict,
    needs: np.ndarray,
    counts: np.ndarray,
    progress: bool,
    gather_limit: int,
) -> np.ndarray:
    """Per group, the words of its `needs[g]`-th largest stored key (all-zero words: keep the
    whole group). The keys of `spec` must have been stored (`_store_keys`)."""
    n_groups = len(needs)
    digit_bits = 16 if n_groups == 1 else 8  # per-bin (CCS) histograms stay small with 8-bit digits
    thresholds = np.zeros((4, n_groups), dtype=np.uint64)
    need, bucket = needs.astype(np.int64).copy(), counts.astype(np.int64).copy()
    active = [g for g in range(n_groups) if 0 < need[g] < counts[g]]
    prefixes = np.zeros((n_groups, 0), dtype=np.int64)
    level = 0
    while active:
        if bucket[active].sum() <= gather_limit or (level + 1) * digit_bits > 256:
            parts = blocks.map(
                _gather_block, scores_path, spec, prefixes, active, digit_bits, desc="gather", progress=progress
            )
            words = np.concatenate([p[0] for p in parts], axis=1)
            groups = np.concatenate([p[1] for p in parts])
            for g in active:
                thresholds[:, g] = sampling.nth_largest(words[:, groups == g], int(need[g]))
            break
        hist = sum(
            blocks.map(
                _histogram_block,
                scores_path,
                spec,
                prefixes,
                active,
                digit_bits,
                desc=f"select {level + 1}",
                progress=progress,
            )
        )
        digits = np.zeros(n_groups, dtype=np.int64)
        for g in active:
            digits[g], above, bucket[g] = sampling.refine(hist[g], int(need[g]))
            need[g] -= above
        prefixes = np.column_stack([prefixes, digits])
        level += 1
    return thresholds


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
    run = Path(run).resolve()
    index = Index(run / "index")
    store = StatsStore.open(run / "stats.zarr", mode="r", index=index)
    if balance == "classes":
        store.labels(slice(0, 0))  # refuses a store without labels before any work
    complete = store.complete_epochs()
    epochs = complete if epochs is None else epochs
    if not 1 <= epochs <= store.epochs:
        raise ValueError(f"epochs must be in 1..{store.epochs}, not {epochs}")
    if epochs > complete:
        raise ValueError(
            f"only {complete} epochs of {run} are completely recorded; run `streamprune record` "
            f"to finish, or pass --epochs {complete}"
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
            raise ValueError(f"window must satisfy 2 <= window <= T; got window={window}, T={epochs}")
    scores_path = str(run / "scores.zarr" if scores_out is None else Path(scores_out).resolve())
    out = Path(out) if out is not None else run / "keep"
    with output_lock(out), output_lock(scores_path):
        clean_stale_temps(Path(scores_path))  # of killed runs: we hold the locks, no one else writes them
        clean_stale_temps(out)
        ensure_ray(address)
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunk = store.chunk_rows
        block_rows = chunk * max(1, -(-(block_rows or 262144) // chunk))
        n = store.n_samples
        bounds = [(r0, min(r0 + block_rows, n)) for r0 in range(0, n, block_rows)]
        blocks = _Blocks(bounds, workers)
        summary = _score_all(blocks, store, scores_path, epochs, window, block_rows, names, progress)

        spec = {
            "sampler": m.sampler,
            "score": m.score,
            "seed": seed,
            "ratio": ratio,
            "phase": None,
            "beta": {"c_d": c_d, "C": C, "alpha_plus_beta": alpha_plus_beta},
            "excluded": [],
            "balance": balance == "classes",
        }
        n_classes = summary["max_label"] + 1
        if balance == "classes" and n_classes < 1:
            raise ValueError(f"no sample of {run} has a recorded label: nothing to balance")
        # selectable rows: finite scores, and with class balance a label too
        counted = summary["labelled"] if balance == "classes" else {"rows": n, **summary["finite"]}
        n_ok = counted["rows"] if m.sampler == "random" else counted[m.score if m.sampler != "beta" else "dual"]
        if m.sampler == "beta":
            n_ok = min(n_ok, counted["mean_p"])
        n_groups = CCS_BINS if m.sampler == "ccs" else n_classes if balance == "classes" else 1
        dropped = n - n_ok
        if dropped and missing == "error":
            raise ValueError(
                f"{dropped} samples have missing statistics{' or labels' if balance == 'classes' else ''} "
                f"(e.g. rows {summary['missing_rows'][:5]}); use --missing drop to leave them out"
            )
        k = sampling.keep_count(n_ok, ratio)
        if k == 0 and sampling.keep_count(n, ratio) > 0:  # nothing kept because (nearly) every sample is missing
            what = "statistics" + (" or labels" if balance == "classes" else "")
            raise ValueError(
                f"no sample of {run} can be kept: {dropped:,} of {n:,} samples have missing {what} "
                f"(e.g. rows {summary['missing_rows'][:5]}), so the keep-list would keep nothing; "
                f"{str(out)!r} is left as it is. Record the statistics again (`streamprune record`)"
            )
        params: dict = {"cut": cut} if m.sampler == "ccs" else {}
        if m.sampler == "beta":
            top = summary["top"]
            spec["anchor"] = float(np.mean(top["mean_p"])) if top["mean_p"] else 0.5
            alpha, beta = sampling.beta_params(ratio, spec["anchor"], **spec["beta"])
            params.update(anchor=spec["anchor"], alpha=alpha, beta=beta, **spec["beta"])
        if m.sampler == "ccs":
            spec["cut_threshold"], spec["lo"], spec["hi"] = _ccs_setup(
                blocks, scores_path, spec, n_ok, k, cut, progress, gather_limit
            )
        parts = blocks.map(_store_keys, scores_path, spec, n_groups, desc="keys", progress=progress)
        counts = sum(p[0] for p in parts)
        if m.sampler == "ccs":
            needs = sampling.ccs_quotas(counts, k)
            spec["excluded"] = [int(g) for g in np.flatnonzero(needs == 0)]
            params.update(lo=spec["lo"], hi=spec["hi"], bins=CCS_BINS, quotas=needs.tolist())
        elif balance == "classes":
            needs = sampling.class_quotas(counts, k)
            spec["excluded"] = [int(g) for g in np.flatnonzero(needs == 0)]
            params.update(class_counts=counts.tolist(), class_quotas=needs.tolist())
        else:
            needs = np.array([k])
            spec["excluded"] = [0] if k == 0 else []
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
    """Pass 1: every score of every row into a new `scores.zarr`, swapped in when complete."""
    tmp = temp_sibling(Path(scores_path))
    try:
        return _score_into(tmp, blocks, store, scores_path, epochs, window, block_rows, names, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves no temporary behind
        raise


def _score_into(
    tmp: Path,
    blocks: _Blocks,
    store: StatsStore,
    scores_path: str,
    epochs: int,
    window: int,
    block_rows: int,
    names: tuple[str, ...],
    progress: bool,
) -> dict:
    n = store.n_samples
    try:
        g = _scores_group(str(tmp), "w")
        for name in SCORES:
            g.create_array(name, shape=(n,), chunks=(block_rows,), dtype=np.float64, fill_value=np.nan)
        for name in ("id_hi", "id_lo", "sel_key"):
            g.create_array(name, shape=(n,), chunks=(block_rows,), dtype=np.uint64, fill_value=0)
        g.create_array(LABEL, shape=(n,), chunks=(block_rows,), dtype=np.int32, fill_value=LABEL_MISSING)
        g.create_array("sel_group", shape=(n,), chunks=(block_rows,), dtype=np.int32, fill_value=-1)
    except OSError as exc:
        raise named_os_error(exc, tmp) from None
    parts = blocks.map(
        _score_block, store.path.as_posix(), str(tmp), epochs, window, names, desc="score", progress=progress
    )
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
    try:
        g.attrs.update(
            {
                "fingerprint": store.fingerprint,
                "epochs": epochs,
                "window": window,
                "block_rows": block_rows,
                "scores": list(names),
                "summary": summary,
            }
        )
    except OSError as exc:
        raise named_os_error(exc, tmp / "zarr.json") from None
    swap_in(tmp, Path(scores_path))
    return summary


def _ccs_setup(
    blocks: _Blocks, scores_path: str, spec: dict, n_ok: int, k: int, cut: float, progress: bool, gather_limit: int
):
    """The cut threshold (the hardest `cut` fraction, fewer if the budget needs them) and the
    score range of the samples that remain."""
    n_cut = min(int(np.floor(cut * n_ok + 0.5)), n_ok - k)
    cut_spec = {**spec, "phase": "cut"}
    threshold = None
    if n_cut > 0:
        blocks.map(_store_keys, scores_path, cut_spec, 1)
        threshold = _thresholds(
            blocks, scores_path, cut_spec, np.array([n_cut]), np.array([n_ok]), progress, gather_limit
        )[:, 0]
        threshold = [int(x) for x in threshold]
    ranges = blocks.map(_remaining_range, scores_path, {**spec, "cut_threshold": threshold, "lo": 0.0, "hi": 1.0})
    lo = min((r[0] for r in ranges if r is not None), default=0.0)
    hi = max((r[1] for r in ranges if r is not None), default=0.0)
    return threshold, lo, hi


@ray.remote(num_cpus=1)
def _remaining_range(r0: int, r1: int, scores_path: str, spec: dict):
    sc = _read_block(scores_path, r0, r1, spec)
    _, groups = block_keys(sc, r0, spec)
    left = sc[spec["score"]][groups >= 0]
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
