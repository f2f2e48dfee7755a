"""Shards on object storage (`s3://`) from a real S3 server (moto's server mode on 127.0.0.1, the
`s3_server` fixture): globs and brace lists, the index, the loader's exact byte ranges (what the
server sent, counted server-side) and errors naming the URL."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import webdataset as wds

from streamprune import PrunedWebDataset
from streamprune.formats.keeplist import KeepList
from streamprune.shards.remote import open_remote
from streamprune.shards.urls import expand_urls

BUCKET = "test-s3-shards"
PREFIX = "fmnist"


def _upload(paths: list[str], where: str) -> list[str]:
    """Put local `paths` under `where` (`bucket/prefix`) with s3fs; their s3:// URLs, in order."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    urls = []
    for p in paths:
        fs.put(str(p), f"{where}/{os.path.basename(p)}")
        urls.append(f"s3://{where}/{os.path.basename(p)}")
    return urls


@pytest.fixture(scope="module")
def stored(s3_server, make_index, uneven_shards, tmp_path_factory):
    """The six uneven Fashion-MNIST shards in a bucket, their local index (no Ray), keep-all and
    keep-10% lists built on the local index, and what webdataset reads from the local copies."""
    paths, _ = uneven_shards
    s3_server.make_bucket(BUCKET)
    urls = _upload(paths, f"{BUCKET}/{PREFIX}")
    work = tmp_path_factory.mktemp("s3")
    local = make_index(paths, work / "local")
    rows = np.sort(np.random.default_rng(11).choice(local.n_samples, local.n_samples // 10, replace=False))
    return {
        "server": s3_server,
        "paths": paths,
        "urls": urls,
        "local": local,
        "work": work,
        "all": KeepList.from_rows(local, np.arange(local.n_samples), work / "keep-all"),
        "k10": KeepList.from_rows(local, rows, work / "keep-10"),
        "ref": list(wds.WebDataset(paths, shardshuffle=False)),
        "total": sum(os.path.getsize(p) for p in paths),
    }


def test_a_glob_and_a_brace_list_find_the_shards_in_the_bucket(stored):
    want = stored["urls"]
    assert len(want) == 6
    assert expand_urls(f"s3://{BUCKET}/{PREFIX}/train-*.tar") == want
    assert expand_urls(f"s3://{BUCKET}/{PREFIX}/train-{{000000..000005}}.tar") == want
    first, rest = f"s3://{BUCKET}/{PREFIX}/train-00000[0-2].tar", f"s3://{BUCKET}/{PREFIX}/train-00000{{3,4,5}}*"
    assert expand_urls(f"{first}::{rest}") == want  # a glob, then a brace list of globs


def test_a_glob_matching_nothing_names_the_pattern(stored):
    pattern = f"s3://{BUCKET}/{PREFIX}/val-*.tar"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no shard matches '{pattern}'")):
        expand_urls(pattern)
    missing_bucket = "s3://test-s3-no-such-bucket/shards/train-*.tar"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no shard matches '{missing_bucket}'")) as info:
        expand_urls(missing_bucket)
    assert "bucket does not exist" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # not botocore's traceback


def test_the_index_over_s3_matches_the_local_index(stored, make_index, tmp_path):
    server, local = stored["server"], stored["local"]
    server.reset()
    idx = make_index(f"s3://{BUCKET}/{PREFIX}/train-*.tar", tmp_path / "run")
    assert idx.manifest["broken"] == [] and idx.n_samples == local.n_samples == 1200
    assert idx.names == local.names and idx.fingerprint == local.fingerprint
    for s in range(idx.n_shards):
        assert idx.keys(s) == local.keys(s)
    assert np.array_equal(np.asarray(idx.id_hi), np.asarray(local.id_hi))
    assert np.array_equal(np.asarray(idx.id_lo), np.asarray(local.id_lo))
    assert np.array_equal(np.asarray(idx.sample_start), np.asarray(local.sample_start))
    assert server.bytes_sent <= 1.05 * stored["total"]  # each shard read through once, small probes aside


def test_keep_10_percent_over_s3_yields_the_kept_samples_and_sends_only_their_bytes(
    stored, sample_content, kept_samples
):
    server = stored["server"]
    server.reset()
    ds = PrunedWebDataset(stored["urls"], keep=stored["k10"], shardshuffle=False)
    got = list(ds)
    want = kept_samples(stored["ref"], stored["k10"])
    assert len(got) == len(want) == 120 and sample_content(got) == sample_content(want)
    assert [s["__url__"] for s in got] == [
        u for s in want for u in stored["urls"] if os.path.basename(u) == os.path.basename(s["__url__"])
    ]
    assert server.bytes_sent <= 0.15 * stored["total"]  # exact ranges: kept samples, small gaps and probes
    assert ds.read_counts.bytes_received == server.bytes_sent and ds.read_counts.shards_read_through == 0
    ranged = [r for r in server.log if r[0] == "GET" and r[2] is not None]
    assert len(ranged) == server.gets  # every GET asked for a range: none read the object through


def test_keep_all_over_s3_yields_every_sample_and_sends_each_byte_once(stored, sample_content):
    server = stored["server"]
    server.reset()
    got = list(PrunedWebDataset(stored["urls"], keep=stored["all"], shardshuffle=False))
    assert len(got) == 1200 and sample_content(got) == sample_content(stored["ref"])
    assert 0.9 * stored["total"] <= server.bytes_sent <= 1.05 * stored["total"]  # about 1x, not 2x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["object", "bucket"])
def test_a_missing_object_or_bucket_is_an_error_naming_the_url(stored, where):
    url = (
        f"s3://{BUCKET}/{PREFIX}/missing/train-000000.tar"
        if where == "object"
        else "s3://test-s3-no-such-bucket/fmnist/train-000000.tar"
    )
    began = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"shard '{url}': not found") as info:
        list(PrunedWebDataset([url], keep=stored["k10"], shardshuffle=False))
    assert time.monotonic() - began < 30  # no retrying what cannot come back
    assert info.value.__cause__ is None and info.value.__suppress_context__  # not botocore's traceback
    if where == "bucket":
        assert "bucket does not exist" in str(info.value)


@pytest.mark.timeout(60)
def test_an_object_deleted_after_opening_is_an_error_naming_the_url_and_range(stored):
    (url,) = _upload(stored["paths"][:1], f"{BUCKET}/{PREFIX}/deleted")
    f = open_remote(url)
    s3fs.S3FileSystem(skip_instance_cache=True).rm(url)
    with pytest.raises(FileNotFoundError, match=rf"shard '{url}': bytes 512\.\.1024: not found"):
        f.fetch(512, 1024)
    with pytest.raises(FileNotFoundError, match=f"shard '{url}'"):
        f.stream().read(1024)


def test_a_missing_shard_is_broken_in_the_index_named_by_its_url(stored, make_index, tmp_path):
    missing = f"s3://{BUCKET}/{PREFIX}/missing/train-000009.tar"
    idx = make_index([stored["urls"][0], missing], tmp_path / "run")
    assert [b["shard"] for b in idx.manifest["broken"]] == ["missing/train-000009.tar"]
    assert f"shard '{missing}': not found" in idx.manifest["broken"][0]["error"]
    assert idx.keys(0) == stored["local"].keys(0)


@pytest.mark.timeout(120)
def test_dataloader_workers_read_s3_shards_after_the_parent_did(stored, kept_samples):
    import torch

    list(PrunedWebDataset(stored["urls"][:1], keep=stored["k10"], shardshuffle=False))  # s3fs in use before fork
    ds = PrunedWebDataset(stored["urls"], keep=stored["k10"], shardshuffle=False).to_tuple("__key__", "cls")
    keys = [k for batch_keys, _ in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2) for k in batch_keys]
    assert sorted(keys) == sorted(s["__key__"] for s in kept_samples(stored["ref"], stored["k10"]))


def _bench_loader() -> Any:
    """benchmarks/bench_loader.py as a module (it imports its neighbour `shardsets`)."""
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_loader_s3", bench_dir / "bench_loader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench_dir))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench_dir))
    return module


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_the_loader_benchmarks_s3_mode_measures_exact_ranges(stored, kept_samples):
    bench_loader = _bench_loader()
    kept_keys = {s["__key__"] for s in kept_samples(stored["ref"], stored["k10"])}
    row = bench_loader.bench_s3(
        "test", stored["paths"], stored["server"], stored["all"], stored["k10"], kept_keys, "png", ("pil",), 1,
        stored["total"],
    )  # fmt: skip
    assert row["kept10_exact"] and row["shards"] == 6
    assert row["bytes_sent_keep10"] <= 0.15 and 0.9 <= row["bytes_sent_keep100"] <= 1.05
    assert row["wds-pipe_sps"] > 0 and row["ratio_keep100_vs_fsspec"] > 0
