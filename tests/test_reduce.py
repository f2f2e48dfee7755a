"""The distributed reducer and the keep-list: determinism, exact k, reference equality, formats."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from streamprune import KeepList, PrunedWebDataset, index, reduce
from streamprune.cli.main import main
from streamprune.errors import SettingsError
from streamprune.formats.stats_store import STATS, ChunkWriter, StatsStore
from streamprune.scoring import sampling, scores
from streamprune.shards.identity import id128, uniforms


@pytest.fixture(scope="module")
def run(synthetic_run, uneven_shards, tmp_path_factory):
    paths, _ = uneven_shards
    run = tmp_path_factory.mktemp("reduce-run")
    idx, stats = synthetic_run(run, paths, seed=11)
    return run, idx, stats


def _kept_rows(keep: KeepList, idx) -> np.ndarray:
    return np.concatenate([idx.rows(idx.shard(n)).start + keep.shard_positions(n) for n in keep.names])


@pytest.mark.parametrize(
    "method,balance",
    [
        ("dual-beta", "none"),
        ("dual-beta", "classes"),
        ("forgetting", "none"),
        ("ccs:dual", "none"),
        ("random", "classes"),
        ("aum", "none"),
    ],
)
def test_keep_list_identical_across_workers_and_block_sizes(run, tmp_path, method, balance):
    path, idx, _ = run
    lists = [
        reduce(
            path,
            0.7,
            method,
            seed=3,
            window=5,
            workers=w,
            block_rows=b,
            gather_limit=g,
            balance=balance,
            out=tmp_path / f"k{w}-{b}-{g}",
            progress=False,
        )
        for w, b, g in ((1, 64, 1 << 20), (2, 128, 16), (4, 300, 3))
    ]
    for other in lists[1:]:
        assert np.array_equal(np.asarray(other.id_pairs), np.asarray(lists[0].id_pairs))
        assert np.array_equal(np.asarray(other.positions), np.asarray(lists[0].positions))
    assert len(lists[0]) == sampling.keep_count(idx.n_samples, 0.7)


@pytest.mark.parametrize("ratio", [0, 0.3, 0.9, 0.99])
@pytest.mark.parametrize(
    "method,balance", [("dual-beta", "classes"), ("dual-beta", "none"), ("ccs:el2n", "none"), ("dual", "classes")]
)
def test_exactly_k_kept(run, tmp_path, ratio, method, balance):
    path, idx, _ = run
    keep = reduce(path, ratio, method, window=5, out=tmp_path / "keep", gather_limit=8, balance=balance, progress=False)
    k = sampling.keep_count(idx.n_samples, ratio)
    assert len(keep) == keep.manifest["k"] == k and keep.kept.sum() == k
    assert len(set(_kept_rows(keep, idx).tolist())) == k


def test_distributed_selection_equals_in_memory_reference(run, tmp_path):
    path, idx, stats = run
    hi, lo = np.asarray(idx.id_hi), np.asarray(idx.id_lo)
    rows = np.arange(idx.n_samples)
    sc = scores.all_scores(stats, window=5)
    u = uniforms(9, hi, lo)
    k = sampling.keep_count(idx.n_samples, 0.8)
    anchor = sampling.anchor_of(sc["dual"], sc["mean_p"], hi, lo)
    w = sampling.beta_weights(sc["dual"], sc["mean_p"], 0.8, anchor=anchor)
    expected = {
        "dual-beta": sampling.select_top(sampling.key_words(sampling.weighted_keys(w, u), hi, lo, rows), k),
        "el2n": sampling.select_top(sampling.key_words(sc["el2n"], hi, lo, rows), k),
        "aum": sampling.select_top(sampling.key_words(-sc["aum"], hi, lo, rows), k),
        "random": sampling.select_top(sampling.key_words(-u, hi, lo, rows), k),
    }
    for method, mask in expected.items():
        keep = reduce(
            path, 0.8, method, seed=9, window=5, out=tmp_path / method, gather_limit=10, balance="none", progress=False
        )
        assert np.array_equal(np.sort(_kept_rows(keep, idx)), np.flatnonzero(mask)), method
    dual_keep = KeepList.load(tmp_path / "dual-beta")
    assert dual_keep.manifest["params"]["anchor"] == pytest.approx(anchor)
    assert dual_keep.manifest["filled_zero_weight"] == max(0, k - int((w > 0).sum()))
    # The scores store holds every score per sample.
    import zarr

    g = zarr.open_group(str(path / "scores.zarr"), mode="r")
    for name in scores.SCORES:
        np.testing.assert_allclose(g[name][:], sc[name], rtol=1e-12, equal_nan=True)


def test_class_balanced_selection_keeps_each_class_its_quota(run, synthetic, tmp_path):
    """Class quotas: exact k, each class its share by size, and inside each class the same
    keys as the unbalanced sampler (the in-memory reference per class)."""
    path, idx, stats = run
    hi, lo = np.asarray(idx.id_hi), np.asarray(idx.id_lo)
    rows = np.arange(idx.n_samples)
    labels = synthetic.labels(idx.n_samples)
    sc = scores.all_scores(stats, window=5)
    u = uniforms(4, hi, lo)
    anchor = sampling.anchor_of(sc["dual"], sc["mean_p"], hi, lo)
    w = sampling.beta_weights(sc["dual"], sc["mean_p"], 0.8, anchor=anchor, c_d=sampling.DEFAULT_C_D["classes"])
    for method, keys in (("dual-beta", sampling.weighted_keys(w, u)), ("random", -u), ("el2n", sc["el2n"])):
        keep = reduce(
            path,
            0.8,
            method,
            seed=4,
            window=5,
            out=tmp_path / method,
            gather_limit=7,
            balance="classes",
            progress=False,
        )
        counts = np.bincount(labels, minlength=10)
        quotas = sampling.class_quotas(counts, sampling.keep_count(idx.n_samples, 0.8))
        kept = np.sort(_kept_rows(keep, idx))
        assert len(keep) == quotas.sum() == sampling.keep_count(idx.n_samples, 0.8)
        assert np.bincount(labels[kept], minlength=10).tolist() == quotas.tolist()
        assert keep.manifest["balance"] == "classes" and keep.manifest["params"]["class_quotas"] == quotas.tolist()
        expected = []
        for c in range(10):
            members = np.flatnonzero(labels == c)
            words = sampling.key_words(keys[members], hi[members], lo[members], rows[members])
            expected += members[sampling.select_top(words, int(quotas[c]))].tolist()
        assert kept.tolist() == sorted(expected), method
    # the unbalanced list of the same scores starves no class here only by chance: the balanced one by design
    plain = reduce(path, 0.8, "el2n", window=5, out=tmp_path / "plain", balance="none", progress=False)
    assert plain.manifest["balance"] == "none" and "class_quotas" not in plain.manifest["params"]


def test_balance_needs_recorded_labels(ray_session, synthetic, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    idx = index(paths, tmp_path / "run", progress=False)
    store = StatsStore.create(tmp_path / "run" / "stats.zarr", idx, epochs=2, chunk_rows=64)
    stats = synthetic.stats(idx.n_samples, np.random.default_rng(0))
    for t in range(2):
        w = ChunkWriter(store, range(store.n_chunks), t)
        w.add(np.arange(idx.n_samples), {n: stats[n][:, t] for n in STATS})  # no labels given
        w.flush()
        store.mark_done(t, np.arange(idx.n_shards))
    with pytest.raises(ValueError, match="no sample of .* has a recorded label"):
        reduce(tmp_path / "run", 0.5, "random", balance="classes", progress=False)
    keep = reduce(tmp_path / "run", 0.5, "random", balance="none", out=tmp_path / "keep", progress=False)
    assert len(keep) == sampling.keep_count(idx.n_samples, 0.5)
    with pytest.raises(ValueError, match="balance must be one of"):
        reduce(tmp_path / "run", 0.5, "random", balance="class", progress=False)
    with pytest.raises(SettingsError, match="classes cannot be combined with ccs: methods"):
        reduce(tmp_path / "run", 0.5, "ccs:aum", balance="classes", progress=False)


def test_zero_weight_fill_up_is_counted(run, tmp_path):
    path, idx, _ = run
    keep = reduce(path, 0.0, "dual-beta", window=5, out=tmp_path / "k", progress=False)
    assert len(keep) == idx.n_samples and keep.manifest["filled_zero_weight"] >= idx.n_samples // 10


def test_ccs_keeps_no_sample_from_the_hardest_cut(run, tmp_path):
    path, idx, stats = run
    keep = reduce(path, 0.5, "ccs:el2n", cut=0.2, window=5, out=tmp_path / "k", progress=False)
    e = scores.el2n(stats["el2n"])
    kept = _kept_rows(keep, idx)
    hardest = np.argsort(-e, kind="stable")[: round(0.2 * idx.n_samples)]
    assert not set(hardest) & set(kept.tolist())
    assert len(keep.manifest["params"]["quotas"]) == 50 and sum(keep.manifest["params"]["quotas"]) == len(keep)


def test_missing_statistics_dropped_or_refused(run, synthetic, tmp_path):
    import shutil

    path, idx, _ = run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    store = StatsStore.open(copy / "stats.zarr")
    # one whole chunk of missing values, written as its owner writes (empty chunks are stored, never left out)
    store.group["p_true"].with_config({"write_empty_chunks": True})[0:64, 3:4] = np.full((64, 1), np.nan, np.float32)
    keep = reduce(copy, 0.5, "dual-beta", window=5, progress=False)
    assert keep.manifest["dropped_missing"] == 64 and keep.manifest["N"] == idx.n_samples - 64
    assert len(keep) == sampling.keep_count(idx.n_samples - 64, 0.5)
    assert not set(range(64)) & set(_kept_rows(keep, idx).tolist())
    with pytest.raises(
        ValueError, match=r"64 samples have missing statistics( or labels)? \(e.g. rows \[0, 1, 2, 3, 4\]\)"
    ):
        reduce(copy, 0.5, "dual-beta", window=5, missing="error", out=tmp_path / "x", progress=False)
    # infinite statistics (a corrupted store) count as missing too, for every score
    for name, value in (("p_true", np.inf), ("margin", -np.inf), ("el2n", np.inf), ("entropy", np.inf)):
        for t in range(synthetic.epochs):
            store.group[name][64:128, t : t + 1] = np.full((64, 1), value, np.float32)
    for method, dropped in (("dual-beta", 128), ("dyn-unc", 128), ("aum", 64), ("el2n", 64), ("entropy", 64)):
        keep = reduce(copy, 0.5, method, window=5, out=tmp_path / method, progress=False)
        assert keep.manifest["dropped_missing"] == dropped, method
        assert not set(range(64, 128)) & set(_kept_rows(keep, idx).tolist()), method


def test_bad_arguments_are_refused(run, tmp_path):
    path, _, _ = run
    with pytest.raises(ValueError, match="ratio: must be in"):
        reduce(path, 1.0, progress=False)
    with pytest.raises(ValueError, match="unknown method 'dul'"):
        reduce(path, 0.5, "dul", progress=False)
    with pytest.raises(ValueError, match="window must satisfy 2 <= window <= T; got window=13, T=12"):
        reduce(path, 0.5, window=13, progress=False)
    with pytest.raises(ValueError, match="CCS needs a score"):
        reduce(path, 0.5, "ccs:loss", progress=False)
    with pytest.raises(ValueError, match="scores: must be all or method"):
        reduce(path, 0.5, scores="some", progress=False)
    with pytest.raises(ValueError, match="c_d: must be > 0, not 0"):
        reduce(path, 0.5, window=5, c_d=0, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()  # refused before any work
    assert main(["reduce", str(path), "--ratio", "2"]) == 2


def test_keep_list_api_and_exports(run, tmp_path, capsys):
    path, idx, _ = run
    assert (
        main(["reduce", str(path), "--ratio", "0.6", "--window", "5", "--out", str(tmp_path / "keep"), "--quiet"]) == 0
    )
    assert f"kept {sampling.keep_count(idx.n_samples, 0.6):,} of {idx.n_samples:,}" in capsys.readouterr().out
    keep = KeepList.load(tmp_path / "keep")
    assert keep.fingerprint == idx.fingerprint and keep.manifest["method"] == "dual-beta"
    name = keep.names[2]
    kept_keys = keep.shard_keys(name)
    all_keys = idx.keys(idx.shard(name))
    assert keep.kept_count(name) == len(kept_keys) > 0
    assert all((name, k) in keep for k in kept_keys)
    assert sum((name, k) in keep for k in all_keys) == len(kept_keys)
    assert ("nope.tar", kept_keys[0]) not in keep and keep.kept_count("nope.tar") == 0
    assert [all_keys[p] for p in keep.shard_positions(name)] == kept_keys
    rows = _kept_rows(keep, idx)
    assert np.array_equal(keep.ranges, np.stack([idx.sample_start[rows], idx.sample_end[rows]], axis=1))
    assert [s["size"] for s in idx.shards] == keep.shard_bytes.tolist()
    applied = PrunedWebDataset([s["url"] for s in idx.shards], keep=keep, shardshuffle=False)
    assert [(os.path.basename(s["__url__"]), s["__key__"]) for s in applied] == [
        (n, k) for n in keep.names for k in keep.shard_keys(n)
    ]
    keep.to_datacomp(tmp_path / "subset.npy")
    subset = np.load(tmp_path / "subset.npy", allow_pickle=False)
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == len(keep)
    assert np.array_equal(subset, np.sort(subset)) and np.array_equal(subset, keep.ids())
    assert (int(subset[0][0]), int(subset[0][1])) in {id128(n, k) for n in keep.names for k in keep.shard_keys(n)}
    keep.to_text(tmp_path / "keep.txt")
    lines = (tmp_path / "keep.txt").read_text().splitlines()
    assert len(lines) == len(keep) and f"{name}\t{kept_keys[0]}" in lines
    # User-built lists round-trip; damaged ones are refused.
    mine = KeepList.from_keys([(name, kept_keys[0]), ("other.tar", "k1")], fingerprint="abc")
    mine.save(tmp_path / "mine")
    again = KeepList.load(tmp_path / "mine")
    assert len(again) == 2 and (name, kept_keys[0]) in again and again.fingerprint == "abc"
    manifest = json.loads((tmp_path / "mine" / "manifest.json").read_text())
    (tmp_path / "mine" / "manifest.json").write_text(json.dumps({**manifest, "k": 3}))
    with pytest.raises(ValueError, match="damaged"):
        KeepList.load(tmp_path / "mine")
    (tmp_path / "keep" / "ids.npy").unlink()
    with pytest.raises(ValueError, match="damaged or incomplete"):
        KeepList.load(tmp_path / "keep")


def test_method_scores_only_gives_the_same_keep_list(run, tmp_path):
    import zarr

    path, _, _ = run
    full = reduce(path, 0.5, "dual-beta", window=5, out=tmp_path / "a", progress=False)
    fast = reduce(path, 0.5, "dual-beta", window=5, out=tmp_path / "b", scores="method", progress=False)
    assert np.array_equal(np.asarray(full.id_pairs), np.asarray(fast.id_pairs))
    g = zarr.open_group(str(path / "scores.zarr"), mode="r")
    assert g.attrs["scores"] == ["dual", "mean_p"] and np.isnan(g["el2n"][:]).all()
