"""Compressed shards (.tar.gz, .tgz, bz2, xz; also through `pipe:`) on real Fashion-MNIST shards.

They are told by their first bytes, as webdataset's `tarfile.open(mode="r|*")` tells them,
read through (no byte skipping inside a compressed stream), and indexed by offsets in the
decompressed tar.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import PrunedWebDataset, reshard
from streamprune.demo.datasets import encode_png
from streamprune.formats.keeplist import KeepList
from streamprune.shards.scan import scan_shard
from streamprune.shards.tarscan import TarFormatError
from streamprune.stages.index import index


def _gzip(src: str, dest: Path) -> str:
    dest.write_bytes(gzip.compress(Path(src).read_bytes(), mtime=0))
    return str(dest)


@pytest.fixture(scope="module")
def gz(make_index, uneven_shards, tmp_path_factory):
    """The uneven shards as .tar.gz files, indexed, with the plain set's index beside; keep-all
    and 10% keep-lists of the gzip index and the same 10% rows over the plain one."""
    paths, sizes = uneven_shards
    work = tmp_path_factory.mktemp("compressed")
    (work / "gz").mkdir()
    gz_paths = [_gzip(p, work / "gz" / (os.path.basename(p) + ".gz")) for p in paths]
    plain = make_index(paths, work / "plain")
    idx = make_index(gz_paths, work / "run")
    rows = np.sort(np.random.default_rng(3).choice(idx.n_samples, idx.n_samples // 10, replace=False))
    return {
        "paths": paths,
        "sizes": sizes,
        "gz": gz_paths,
        "work": work,
        "plain": plain,
        "index": idx,
        "rows": rows,
        "all": KeepList.from_rows(idx, np.arange(idx.n_samples), work / "keep-all"),
        "k10": KeepList.from_rows(idx, rows, work / "keep-10"),
        "plain10": KeepList.from_rows(plain, rows, work / "plain-keep-10"),
        "ref": list(wds.WebDataset(gz_paths, shardshuffle=False)),
    }


def test_index_of_gzip_shards_matches_the_plain_set_and_webdataset(gz):
    idx, plain = gz["index"], gz["plain"]
    assert idx.manifest["broken"] == [] and idx.n_samples == plain.n_samples == 1200
    assert np.array_equal(idx.shard_offset, plain.shard_offset)
    assert idx.names == [os.path.basename(p) for p in gz["gz"]]
    for s in range(idx.n_shards):
        assert idx.keys(s) == plain.keys(s)
    assert [s["__key__"] for s in gz["ref"]] == [k for s in range(idx.n_shards) for k in idx.keys(s)]
    # offsets are those of the decompressed tar, i.e. the plain tar's
    for name in ("sample_start", "sample_end", "member_count", "member_offset", "member_size"):
        assert np.array_equal(getattr(idx, name), getattr(plain, name)), name
    sizes = [os.path.getsize(p) for p in gz["gz"]]
    assert [s["compression"] for s in idx.shards] == ["gzip"] * 6
    assert all("compression" not in s for s in plain.shards)  # plain shards' metadata unchanged
    # size and bytes read are stored (compressed) bytes: a compressed shard is read whole
    assert [s["size"] for s in idx.shards] == [s["bytes_read"] for s in idx.shards] == sizes
    assert idx.manifest["bytes_total"] == idx.manifest["bytes_read"] == sum(sizes)


def test_keep_all_over_gzip_yields_exactly_webdatasets_samples(gz):
    ds = PrunedWebDataset(gz["gz"], keep=gz["all"], shardshuffle=False)
    got = list(ds)
    assert got == gz["ref"] and len(got) == 1200
    assert [s["png"] for s in got] == [s["png"] for s in wds.WebDataset(gz["paths"], shardshuffle=False)]
    total = sum(os.path.getsize(p) for p in gz["gz"])
    assert ds.read_counts.bytes_total == total and 0.95 * total <= ds.read_counts.bytes_read <= total
    assert ds.read_counts.shards_opened == ds.read_counts.shards_read_through == 6


def test_a_10_percent_list_over_gzip_yields_the_kept_samples_and_reads_whole_files(gz, kept_samples, sample_content):
    k10 = gz["k10"]
    assert all(k10.kept_count(n) > 0 for n in k10.names)
    ds = PrunedWebDataset(gz["gz"], keep=k10, shardshuffle=False)
    got = list(ds)
    assert got == kept_samples(gz["ref"], k10) and len(got) == 120
    total = sum(os.path.getsize(p) for p in gz["gz"])
    # nothing can be skipped inside gzip: compressed bytes up to each shard's last kept sample
    assert ds.read_counts.bytes_total == total and 0.9 * total <= ds.read_counts.bytes_read <= total
    assert ds.read_counts.fraction_read >= 0.9 and ds.read_counts.shards_read_through == 6
    # the same rows over the plain tars: pruned bytes are skipped
    plain = PrunedWebDataset(gz["paths"], keep=gz["plain10"], shardshuffle=False)
    assert sample_content(plain) == sample_content(got)
    assert plain.read_counts.fraction_read < 0.5 and plain.read_counts.shards_read_through == 0
    # a keep-list without byte ranges (header scan) gives the same
    by_keys = KeepList.from_keys([(n, k) for n in k10.names for k in k10.shard_keys(n)])
    assert list(PrunedWebDataset(gz["gz"], keep=by_keys, shardshuffle=False)) == got


def test_pipe_cat_of_gzip_shards(ray_session, gz, tmp_path, kept_samples, sample_content):
    piped = [f"pipe:cat {p}" for p in gz["gz"]]  # pipes cannot seek either: read through
    ds = PrunedWebDataset(piped, keep=gz["k10"], shardshuffle=False)
    assert sample_content(ds) == sample_content(kept_samples(gz["ref"], gz["k10"]))
    assert ds.read_counts.shards_read_through == 6
    idx = index(piped[:2], tmp_path, progress=False)
    assert idx.names == gz["index"].names[:2] and [s["compression"] for s in idx.shards] == ["gzip"] * 2
    for name in ("id_hi", "id_lo", "sample_start", "sample_end", "member_offset", "member_size"):
        mine = getattr(idx, name)
        assert np.array_equal(mine, getattr(gz["index"], name)[: len(mine)]), name
    assert [s["bytes_read"] for s in idx.shards] == [os.path.getsize(p) for p in gz["gz"][:2]]


def test_tgz_and_content_not_the_name_decides(ray_session, fmnist, tmp_path):
    images, labels = fmnist
    with wds.TarWriter(str(tmp_path / "a.tgz"), mtime=0) as sink:  # webdataset gzips a name ending in gz
        for i in range(40):
            sink.write({"__key__": f"a{i:04d}", "png": encode_png(images[i]), "cls": int(labels[i])})
    assert (tmp_path / "a.tgz").read_bytes()[:2] == b"\x1f\x8b"
    raw = gzip.decompress((tmp_path / "a.tgz").read_bytes())
    (tmp_path / "hidden.tar").write_bytes(gzip.compress(raw, mtime=0))  # gzip under a plain name
    (tmp_path / "plain.tar.gz").write_bytes(raw)  # a plain tar under a gzip name
    urls = [str(tmp_path / n) for n in ("a.tgz", "hidden.tar", "plain.tar.gz")]
    idx = index(urls, tmp_path / "run", progress=False)
    assert idx.manifest["broken"] == [] and idx.n_samples == 120
    assert [s.get("compression") for s in idx.shards] == ["gzip", "gzip", None]
    ref = list(wds.WebDataset(urls, shardshuffle=False))
    assert [k for s in range(3) for k in idx.keys(s)] == [s["__key__"] for s in ref]
    rows = np.arange(0, 120, 7)
    keep = KeepList.from_rows(idx, rows, tmp_path / "keep")
    assert list(PrunedWebDataset(urls, keep=keep, shardshuffle=False)) == [ref[r] for r in rows]


@pytest.mark.parametrize("kind", ["bz2", "xz"])
def test_bz2_and_xz_shards_are_read_as_tarfile_reads_them(uneven_shards, tmp_path, kind):
    paths, sizes = uneven_shards
    raw = Path(paths[0]).read_bytes()
    path = tmp_path / f"train-000000.tar.{kind}"
    path.write_bytes((bz2.compress if kind == "bz2" else lzma.compress)(raw))
    scan, plain = scan_shard(str(path), path.name), scan_shard(paths[0], path.name)
    assert scan.status == "ok" and scan.compression == kind and scan.keys == plain.keys
    assert all(np.array_equal(scan.arrays[k], plain.arrays[k]) for k in plain.arrays)
    ref = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in ref] == scan.keys and len(ref) == sizes[0]
    keep = KeepList.from_keys([(path.name, k) for k in scan.keys[::5]])
    assert list(PrunedWebDataset(str(path), keep=keep, shardshuffle=False)) == ref[::5]


@pytest.mark.timeout(120)
def test_truncated_and_corrupt_gzip_shards_are_named(ray_session, gz, tmp_path):
    data = Path(gz["gz"][0]).read_bytes()
    good = _gzip(gz["paths"][1], tmp_path / "good.tar.gz")
    (tmp_path / "cut").mkdir()
    cut = tmp_path / "cut" / os.path.basename(gz["gz"][0])  # same name: the keep-lists know it
    cut.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-6] ^= 0xFF  # the stored CRC-32: decompresses, but the checksum fails at the end
    (tmp_path / "crc.tar.gz").write_bytes(bytes(flipped))
    idx = index([good, str(cut), str(tmp_path / "crc.tar.gz")], tmp_path / "run", root=str(tmp_path), progress=False)
    broken = {b["shard"]: b["error"] for b in idx.manifest["broken"]}
    name = f"cut/{cut.name}"
    assert set(broken) == {name, "crc.tar.gz"}
    assert f"shard {name!r}: truncated: gzip stream ends early" in broken[name]
    assert "'crc.tar.gz': corrupt gzip stream (CRC check failed" in broken["crc.tar.gz"]
    assert [s["samples"] for s in idx.shards] == [gz["sizes"][1], 0, 0]
    # loader: by header scan (no sizes to compare), and by byte range through a pipe
    by_keys = KeepList.from_keys([(cut.name, k) for k in gz["plain"].keys(0)])
    with pytest.raises(TarFormatError, match=f"shard '{cut.name}': truncated: gzip stream ends early"):
        list(PrunedWebDataset(str(cut), keep=by_keys, shardshuffle=False))
    with pytest.raises(TarFormatError, match=f"shard '{cut.name}': truncated: gzip stream ends early"):
        list(PrunedWebDataset(f"pipe:cat {cut}", keep=gz["all"], shardshuffle=False, unknown_shards="error"))


def test_reshard_from_gzip_shards_writes_the_kept_samples(ray_session, gz, tmp_path, kept_samples, sample_content):
    paths = reshard(gz["work"] / "run", tmp_path / "out", 50, keep=gz["k10"], progress=False)
    assert len(paths) == 3 and all(p.read_bytes()[:2] != b"\x1f\x8b" for p in paths)  # plain tars
    written = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert sample_content(written) == sample_content(kept_samples(gz["ref"], gz["k10"]))


def test_record_and_reduce_over_gzip_shards(ray_session, gz, tmp_path):
    import shutil

    from streamprune import record, reduce
    from streamprune.formats.stats_store import StatsStore

    run = tmp_path / "run"
    shutil.copytree(gz["work"] / "run" / "index", run / "index")
    summary = record(run, 2, workers=2, schedule_epochs=6, loader_workers=1, progress=False)
    assert summary.bad_samples == 0 and summary.samples == 2 * 1200
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.complete_epochs() == 2 and np.isfinite(store.read("p_true")).all()
    labels = np.concatenate([[int(s["cls"]) for s in wds.WebDataset(p, shardshuffle=False)] for p in gz["paths"]])
    assert (store.labels() == labels).all()
    assert len(reduce(run, 0.7, "dual-beta", progress=False)) == 360
    from streamprune.inspection.run_state import run_state

    assert run_state(run)["index"]["compressed_shards"] == 6


def test_index_label_counts_classes_of_gzip_shards(gz, tmp_path):
    import shutil

    from streamprune.stages.label_scan import scan_classes

    run = tmp_path / "run"
    shutil.copytree(gz["work"] / "run" / "index", run / "index")
    classes = scan_classes(run, "cls")
    labels = np.concatenate([[int(s["cls"]) for s in wds.WebDataset(p, shardshuffle=False)] for p in gz["paths"]])
    assert classes.names is None and classes.counts == tuple(np.bincount(labels, minlength=classes.num_classes))
