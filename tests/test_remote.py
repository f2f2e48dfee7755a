"""Shards over HTTP from a real local server (aiohttp's static file server on 127.0.0.1): index,
the loader's ranged reads without read-ahead, retries, errors naming shard and range."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import webdataset as wds

from streamprune import PrunedWebDataset, index, reshard
from streamprune.errors import InputError
from streamprune.formats.keeplist import KeepList


@pytest.fixture(scope="module")
def served(make_index, http_server, uneven_shards, tmp_path_factory):
    """The six uneven shards served over HTTP (also under the failure-injecting paths), their
    index over HTTP and the local one (both without Ray), and keep-all / keep-10% lists made
    from the HTTP index."""
    paths, _ = uneven_shards
    names = [os.path.basename(p) for p in paths]
    data = http_server.root / "data"
    data.mkdir(exist_ok=True)
    for p in paths:
        shutil.copy(p, data)
    urls = [f"{http_server.url}/data/{n}" for n in names]
    work = tmp_path_factory.mktemp("remote")
    local = make_index(paths, work / "local")
    idx = make_index(urls, work / "run")
    rows = np.sort(np.random.default_rng(5).choice(idx.n_samples, idx.n_samples // 10, replace=False))
    return {
        "urls": urls,
        "names": names,
        "paths": paths,
        "server": http_server,
        "work": work,
        "local": local,
        "index": idx,
        "rows": rows,
        "all": KeepList.from_rows(idx, np.arange(idx.n_samples), work / "keep-all"),
        "k10": KeepList.from_rows(idx, rows, work / "keep-10"),
        "ref": list(wds.WebDataset(paths, shardshuffle=False)),
        "total": sum(os.path.getsize(p) for p in paths),
    }


def test_index_over_http_gives_the_local_fingerprint(ray_session, served, tmp_path):
    served["server"].reset()
    idx, local = index(served["urls"], tmp_path / "run", progress=False), served["local"]
    assert idx.manifest["broken"] == [] and idx.n_samples == 1200
    assert idx.fingerprint == local.fingerprint == served["index"].fingerprint and idx.names == local.names
    for s in range(idx.n_shards):
        assert idx.keys(s) == local.keys(s)
    assert np.array_equal(np.asarray(idx.sample_start), np.asarray(local.sample_start))
    assert all(s["access"] == "through" for s in idx.shards)  # small members: one stream beats a request each
    assert served["server"].bytes_sent <= served["total"] * 1.01


def test_keep_all_over_http_yields_webdatasets_samples_in_order(served, sample_content):
    got = list(PrunedWebDataset(served["urls"], keep=served["all"], shardshuffle=False))
    assert sample_content(got) == sample_content(served["ref"]) and len(got) == 1200
    over_http = list(wds.WebDataset(served["urls"], shardshuffle=False))  # webdataset reads http through curl
    assert [s["__key__"] for s in got] == [s["__key__"] for s in over_http]


def test_keep_10_percent_over_http_transfers_only_the_kept_bytes(served, sample_content):
    server = served["server"]
    server.reset()
    ds = PrunedWebDataset(served["urls"], keep=served["k10"], shardshuffle=False)
    got = list(ds)
    want = [s for s in served["ref"] if (os.path.basename(s["__url__"]), s["__key__"]) in served["k10"]]
    assert sample_content(got) == sample_content(want) and len(got) == 120
    assert server.bytes_sent <= 0.15 * served["total"]  # what the server sent: kept samples and small gaps
    st = ds.read_counts
    assert st.bytes_received == pytest.approx(server.bytes_sent, abs=100)
    assert st.bytes_requested <= st.bytes_received and st.requests >= 6 and st.shards_read_through == 0


@pytest.fixture
def quick_retries(monkeypatch):
    """Retry pauses a tenth of the product's (0.1 s, doubled per try): the same tries, less waiting."""
    monkeypatch.setattr("streamprune.shards.remote.BACKOFF", 0.01)


def test_transient_server_errors_are_retried(served, quick_retries):
    urls = [u.replace("/data/", "/flaky/data/") for u in served["urls"]]
    ds = PrunedWebDataset(urls, keep=served["k10"], shardshuffle=False)
    got = list(ds)
    assert len(got) == 120 and ds.read_counts.retries >= 6  # every first request of a range answered 503


def test_a_server_error_mid_shard_names_the_shard_and_range(served, quick_retries):
    url = served["urls"][0].replace("/data/", "/fail-after/20000/data/")
    keep = served["all"]
    ds = PrunedWebDataset([url], keep=keep, shardshuffle=False)
    with pytest.raises(
        OSError,
        match=rf"{served['names'][0]}': bytes \d+\.\.\d+: (HTTP 500|IncompleteRead).*gave up "
        r"after 5 tries",
    ):
        list(ds)  # the first range runs past byte 20,000: its transfer is cut there, every time
    late = PrunedWebDataset([url], keep=served["k10"], shardshuffle=False)
    with pytest.raises(OSError, match=rf"{served['names'][0]}': bytes \d+\.\.\d+: HTTP 500"):
        list(late)


def test_a_transfer_cut_mid_stream_is_resumed_by_index(ray_session, served, tmp_path):
    url = served["urls"][1].replace("/data/", "/cut-once/30000/data/")
    idx = index([url], tmp_path / "run", progress=False)
    assert idx.manifest["broken"] == [] and idx.keys(0) == served["local"].keys(1)


def test_a_404_shard_is_broken_in_the_index_and_all_broken_is_an_error(ray_session, served, tmp_path, capsys):
    from streamprune.cli.main import main

    missing = f"{served['server'].url}/data/no-such-shard.tar"
    idx = index([served["urls"][0], missing], tmp_path / "run", progress=False)
    assert [b["shard"] for b in idx.manifest["broken"]] == ["no-such-shard.tar"]
    assert "404" in idx.manifest["broken"][0]["error"]
    assert main(["index", missing, "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "every shard is broken" in capsys.readouterr().err
    assert not (tmp_path / "none" / "index").exists()


def test_reshard_reads_kept_ranges_over_http(ray_session, served, tmp_path):
    run, keep = served["work"] / "run", served["work"] / "keep-10"
    with pytest.raises(InputError, match="pass --shards"):  # a URL stored in the run is never opened by itself
        reshard(run, tmp_path / "out", 50, keep=keep, progress=False)
    paths = reshard(run, tmp_path / "out", 50, keep=keep, progress=False, shards=served["urls"])
    got = [s["__key__"] for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]
    want = [s["__key__"] for s in served["ref"] if (os.path.basename(s["__url__"]), s["__key__"]) in served["k10"]]
    assert len(got) == 120 and set(got) == set(want)


def test_index_reads_large_members_headers_by_ranges(ray_session, http_server, tmp_path):
    rng = np.random.default_rng(0)
    big = http_server.root / "big"
    big.mkdir(exist_ok=True)
    paths = []
    for s in range(2):
        paths.append(str(big / f"big-{s:06d}.tar"))
        with wds.TarWriter(paths[-1]) as w:
            for i in range(3):
                w.write({"__key__": f"{s}-{i}", "bin": rng.bytes(1_200_000 + i), "cls": i})
    local = index(paths, tmp_path / "local", progress=False)
    http_server.reset()
    idx = index([f"{http_server.url}/big/{os.path.basename(p)}" for p in paths], tmp_path / "run", progress=False)
    assert idx.fingerprint == local.fingerprint and all(s["access"] == "headers" for s in idx.shards)
    total = sum(os.path.getsize(p) for p in paths)
    assert http_server.bytes_sent < 0.02 * total  # one 4 KiB block per member header, not the 1.2 MB members


def test_record_and_reduce_over_http(ray_session, served, tmp_path):
    from streamprune import record, reduce
    from streamprune.formats.stats_store import StatsStore

    run = tmp_path / "run"
    shutil.copytree(served["work"] / "run" / "index", run / "index")
    summary = record(run, 2, workers=1, schedule_epochs=6, loader_workers=1, progress=False, shards=served["urls"])
    assert summary.bad_samples == 0 and summary.samples == 2 * 1200
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.complete_epochs() == 2 and np.isfinite(store.read("p_true")).all()
    assert len(reduce(run, 0.5, "dual-beta", progress=False)) == 600


def test_other_fsspec_urls_fetch_kept_ranges_with_cat_file(ray_session, uneven_shards, tmp_path):
    """`local://` stands in for s3:// and gs://: any fsspec URL goes through the backend's
    `cat_file`, which reads exactly the ranges asked for (no read-ahead cache)."""
    paths, _ = uneven_shards
    urls = [f"local://{p}" for p in paths]
    idx = index(urls, tmp_path / "run", progress=False)
    assert idx.fingerprint == index(paths, tmp_path / "plain", progress=False).fingerprint
    rows = np.sort(np.random.default_rng(1).choice(idx.n_samples, idx.n_samples // 10, replace=False))
    keep = KeepList.from_rows(idx, rows, tmp_path / "keep")
    ds = PrunedWebDataset(urls, keep=keep, shardshuffle=False)
    got = [s["__key__"] for s in ds]
    ref = [s["__key__"] for s in wds.WebDataset(paths, shardshuffle=False)]
    assert got == [ref[r] for r in rows]
    total = sum(os.path.getsize(p) for p in paths)
    assert ds.read_counts.bytes_received <= 0.15 * total and ds.read_counts.shards_read_through == 0
