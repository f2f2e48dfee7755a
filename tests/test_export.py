"""`streamprune export` (issue 26): a keep-list's kept or removed samples as Parquet, a DataComp
subset or one identity per line; real runs of real shards, locally and on a real S3 server
(moto's), read back with pyarrow and NumPy."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from streamprune import export, storage
from streamprune.cli.main import main
from streamprune.errors import SettingsError
from streamprune.formats import commit
from streamprune.formats.keeplist import ID_DTYPE, KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.shards.identity import value_to_id128

STREAMPRUNE = str(Path(sys.executable).with_name("streamprune"))  # the installed command
BLOCK = 64  # score rows per chunk: shards cross chunks


def _build_run(paths: list[str], run: str, make_index) -> SimpleNamespace:
    """`run` (a path or URL): the shards indexed, a 40% keep-list of random rows and scores whose
    `dual` is each row's number over 10,000 (NaN for every seventh row: no score)."""
    idx = make_index(paths, run)
    n = idx.n_samples
    rows = np.sort(np.random.default_rng(5).choice(n, int(0.4 * n), replace=False))
    keep = KeepList.from_rows(idx, rows, RunDir(run).keep)
    dual = np.arange(n) / 10_000
    dual[::7] = np.nan
    with commit.replacing(RunDir(run).scores) as place:
        scores = ScoresStore.create(place, n, BLOCK)
        for r0 in range(0, n, BLOCK):
            r1 = min(n, r0 + BLOCK)
            scores.write_block(r0, r1, {"dual": dual[r0:r1], "id_hi": idx.id_hi[r0:r1], "id_lo": idx.id_lo[r0:r1]})
        scores.set_attrs({"fingerprint": idx.fingerprint, "block_rows": BLOCK, "scores": ["dual"]})
    ids = np.empty(n, dtype=ID_DTYPE)
    ids["f0"], ids["f1"] = idx.id_hi, idx.id_lo
    samples = [(name, key) for s, name in enumerate(idx.names) for key in idx.keys(s)]
    return SimpleNamespace(run=run, index=idx, keep=keep, rows=rows, dual=dual, ids=ids, samples=samples)


@pytest.fixture(scope="module")
def local(uneven_shards, make_index, tmp_path_factory):
    """A local run of the six uneven shards (1,200 samples)."""
    paths, _ = uneven_shards
    return _build_run(paths, str(tmp_path_factory.mktemp("export") / "run"), make_index)


def _pairs(uids: list[str]) -> np.ndarray:
    """32-hex-digit uids as `u8,u8` identities (DataComp's reading of a uid)."""
    out = np.empty(len(uids), dtype=ID_DTYPE)
    out[:] = [value_to_id128(u) for u in uids]
    return out


def _read_parquet(location: str):
    """The Parquet file at `location` (a path or URL) as a pyarrow `ParquetFile`."""
    return pq.ParquetFile(io.BytesIO(storage.read_bytes(location)))


def test_parquet_of_kept_samples_holds_the_lists_ids_keys_and_scores(local, tmp_path):
    out = tmp_path / "keep.parquet"
    done = export(local.keep.path, out)
    assert done.rows == len(local.keep) and done.out == str(out)

    table = pq.read_table(out)
    assert table.column_names == ["id", "shard", "key", "score", "kept"]
    assert str(table.schema.field("score").type) == "double" and str(table.schema.field("kept").type) == "bool"
    uids = table.column("id").to_pylist()
    assert all(len(u) == 32 for u in uids)
    assert np.array_equal(np.sort(_pairs(uids)), local.keep.ids())
    assert np.array_equal(_pairs(uids), local.ids[local.rows])  # index order
    assert list(zip(table.column("shard").to_pylist(), table.column("key").to_pylist(), strict=True)) == [
        local.samples[r] for r in local.rows
    ]
    assert all(table.column("kept").to_pylist())
    scores = table.column("score").to_pylist()
    expected = local.dual[local.rows]
    assert [s is None for s in scores] == np.isnan(expected).tolist() and any(s is None for s in scores)
    assert np.allclose([s for s in scores if s is not None], expected[~np.isnan(expected)])

    meta = pq.read_schema(out).metadata
    assert meta[b"streamprune.export"] == b"1" and meta[b"streamprune.what"] == b"keep"
    assert meta[b"streamprune.score"] == b"dual"
    keep_meta = json.loads(meta[b"streamprune.keep"])
    assert keep_meta["fingerprint"] == local.index.fingerprint and keep_meta["method"] == "user"
    assert keep_meta["k"] == len(local.keep)

    other = pq.read_table(export(local.keep.path, tmp_path / "dyn-unc.parquet", score="dyn-unc").out)
    assert other.schema.metadata[b"streamprune.score"] == b"dyn_unc"
    assert other.column("score").null_count == len(local.keep)  # not computed into this store


def test_kept_and_removed_partition_the_index(local, tmp_path):
    export(local.keep.path, tmp_path / "keep.parquet")
    export(local.keep.path, tmp_path / "remove.parquet", what="remove")
    export(local.keep.path, tmp_path / "all.parquet", what="all")
    kept, removed, every = (pq.read_table(tmp_path / f"{w}.parquet") for w in ("keep", "remove", "all"))

    def samples(t) -> list[tuple[str, str]]:
        return list(zip(t.column("shard").to_pylist(), t.column("key").to_pylist(), strict=True))

    assert not set(samples(kept)) & set(samples(removed))
    assert sorted(samples(kept) + samples(removed)) == sorted(local.samples)
    assert not any(removed.column("kept").to_pylist())
    assert samples(every) == local.samples
    mask = np.isin(np.arange(len(local.samples)), local.rows)
    assert every.column("kept").to_pylist() == mask.tolist()
    assert np.array_equal(_pairs(removed.column("id").to_pylist()), local.ids[~mask])
    assert every.column("score").null_count == int(np.isnan(local.dual).sum())


def test_row_groups_are_bounded_on_a_multi_shard_run(local, tmp_path):
    n = len(local.samples)
    out = tmp_path / "all.parquet"
    export(local.keep.path, out, what="all", group_rows=100)
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert local.index.n_shards > 1 and sum(sizes) == n
    assert meta.num_row_groups == -(-n // 100) > 1 and max(sizes) == 100


def test_datacomp_subsets_of_kept_and_removed_samples(local, tmp_path):
    export(local.keep.path, tmp_path / "keep.npy", format="datacomp")
    done = export(local.keep.path, tmp_path / "remove.npy", format="datacomp", what="remove")
    kept, removed = (np.load(tmp_path / f"{w}.npy", allow_pickle=False) for w in ("keep", "remove"))
    assert kept.dtype == removed.dtype == ID_DTYPE
    assert np.array_equal(kept, local.keep.ids())
    complement = np.sort(local.ids[~np.isin(np.arange(len(local.ids)), local.rows)])
    assert np.array_equal(removed, complement) and done.rows == len(complement)
    assert np.array_equal(np.sort(np.concatenate([kept, removed])), np.sort(local.ids))


def test_ids_file_has_one_uid_per_kept_sample(local, tmp_path):
    out = tmp_path / "keep.txt"
    export(local.keep.path, out, format="ids")
    lines = out.read_text().splitlines()
    assert len(lines) == len(local.keep) == out.read_text().count("\n")
    assert np.array_equal(_pairs(lines), local.ids[local.rows])
    export(local.keep.path, tmp_path / "remove.txt", format="ids", what="remove")
    removed = (tmp_path / "remove.txt").read_text().splitlines()
    assert len(removed) + len(lines) == len(local.samples) and not set(removed) & set(lines)


def test_a_list_saved_apart_needs_run_for_removed_samples(local, tmp_path):
    apart = local.keep.save(tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match="no shard index at .*pass --run RUN"):
        export(apart, tmp_path / "remove.parquet", what="remove")
    export(apart, tmp_path / "remove.parquet", what="remove", run=local.run)
    assert pq.read_metadata(tmp_path / "remove.parquet").num_rows == len(local.samples) - len(local.keep)
    no_scores = pq.read_table(export(apart, tmp_path / "keep.parquet").out)  # no index there: no scores
    assert no_scores.num_rows == len(local.keep) and no_scores.column("score").null_count == len(local.keep)


def test_a_list_of_keys_matches_the_index_by_key(local, tmp_path):
    pairs = [local.samples[r] for r in local.rows[:50]]
    mine = KeepList.from_keys(pairs)  # no fingerprint, no positions; unsaved: RUN is given
    export(mine, tmp_path / "remove.npy", format="datacomp", what="remove", run=local.run)
    removed = np.load(tmp_path / "remove.npy", allow_pickle=False)
    assert np.array_equal(removed, np.sort(np.delete(local.ids, local.rows[:50])))


def test_bad_arguments_and_existing_outputs_are_refused_naming_them(local, tmp_path):
    with pytest.raises(SettingsError) as caught:
        export(local.keep.path, tmp_path / "x", format="csv", what="most", score="dula", group_rows=0)
    assert [p.split(" ")[0] for p in caught.value.problems] == ["format", "what", "score", "group_rows"]
    with pytest.raises(FileNotFoundError, match=f"no keep-list at '{tmp_path}/none'"):
        export(tmp_path / "none", tmp_path / "x")

    out = tmp_path / "keep.parquet"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=f"{out}: already exists; pass --force"):
        export(local.keep.path, out)
    assert out.read_bytes() == b"mine"
    export(local.keep.path, out, force=True)
    assert pq.read_metadata(out).num_rows == len(local.keep)


def _unknown_key_last(local) -> KeepList:
    """A list of keys whose last shard names a key the index lacks: refused mid-write."""
    last = local.samples[-1][0]
    return KeepList.from_keys([*local.samples[:30], (last, "not-indexed")])


def test_a_refused_export_leaves_no_output_and_no_temporary(local, uneven_shards, make_index, tmp_path):
    out = tmp_path / "out" / "remove.parquet"
    with pytest.raises(SettingsError, match="keeps 1 samples of shard .*, the index has 0 of them"):
        export(_unknown_key_last(local), out, what="remove", run=local.run, group_rows=10)
    assert os.listdir(out.parent) == []

    paths, _ = uneven_shards
    other = make_index(paths[:3], tmp_path / "other")
    foreign = KeepList.from_rows(other, np.arange(10), tmp_path / "other" / "keep")
    with pytest.raises(SettingsError, match="drawn from another index"):
        export(foreign.path, out, what="remove", run=local.run)
    assert os.listdir(out.parent) == []


def test_cli_exports_and_exits_2_on_a_bad_format(local, tmp_path, capsys):
    out = tmp_path / "remove.txt"
    assert main(["export", str(local.keep.path), "--format", "ids", "--what", "remove", "--out", str(out)]) == 0
    removed = len(local.samples) - len(local.keep)
    assert f"export: {removed:,} samples (remove) as ids to {out}" in capsys.readouterr().out
    assert main(["export", str(local.keep.path), "--format", "ids", "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err

    done = subprocess.run(
        [STREAMPRUNE, "export", str(local.keep.path), "--format", "csv", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "argument --format: invalid choice: 'csv'" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # seconds of requests to the S3 server; the fast tier reads keep-lists on S3 in test_keeplist_s3
def test_export_from_a_run_on_s3(s3_server, uneven_shards, make_index, tmp_path, monkeypatch):
    paths, _ = uneven_shards
    bucket = s3_server.make_bucket("export-s3")
    remote = _build_run(paths, f"{bucket}/run", make_index)
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would show up here

    export(f"{remote.run}/keep", f"{bucket}/out/keep.parquet")
    export(f"{remote.run}/keep", tmp_path / "remove.parquet", what="remove")
    export(f"{remote.run}/keep", f"{bucket}/out/remove.npy", format="datacomp", what="remove")
    export(f"{remote.run}/keep", f"{bucket}/out/keep.txt", format="ids")
    assert sorted(os.listdir(tmp_path)) == ["remove.parquet"]

    kept = _read_parquet(f"{bucket}/out/keep.parquet").read()
    assert np.array_equal(np.sort(_pairs(kept.column("id").to_pylist())), remote.keep.ids())
    scores = np.array(kept.column("score").to_pylist(), dtype=float)  # None: NaN
    assert np.array_equal(scores, remote.dual[remote.rows], equal_nan=True)
    removed = pq.read_table(tmp_path / "remove.parquet")
    both = kept.column("key").to_pylist() + removed.column("key").to_pylist()
    assert len(both) == len(set(both)) == len(remote.samples)
    npy = np.load(io.BytesIO(storage.read_bytes(f"{bucket}/out/remove.npy")), allow_pickle=False)
    assert np.array_equal(npy, np.sort(_pairs(removed.column("id").to_pylist())))
    lines = storage.read_bytes(f"{bucket}/out/keep.txt").decode().splitlines()
    assert lines == kept.column("id").to_pylist()

    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        export(f"{remote.run}/keep", f"{bucket}/out/keep.txt", format="ids")
    with pytest.raises(SettingsError, match="the index has 0 of them"):  # mid-write: the upload is abandoned
        export(_unknown_key_last(remote), f"{bucket}/out/refused.parquet", what="all", run=remote.run, group_rows=10)
    assert not storage.exists(f"{bucket}/out/refused.parquet")
