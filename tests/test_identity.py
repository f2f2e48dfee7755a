"""Sample identity is stable across URL forms; user identities; duplicate reporting."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from streamprune import index
from streamprune.shards.identity import id128, shard_names, url_path, value_to_id128


def test_url_path_strips_pipe_scheme_and_host():
    assert url_path("/data/ds/train-000.tar") == "/data/ds/train-000.tar"
    assert url_path("file:///data/ds/train-000.tar") == "/data/ds/train-000.tar"
    assert url_path("pipe:cat /data/ds/train-000.tar") == "/data/ds/train-000.tar"
    assert url_path("pipe:curl -s -L https://host.example/data/ds/train-000.tar") == "/data/ds/train-000.tar"
    assert url_path("pipe:aws s3 cp s3://bucket/data/ds/train-000.tar -") == "/data/ds/train-000.tar"
    assert url_path("s3://bucket/data/ds/train-000.tar") == "/data/ds/train-000.tar"


def test_names_relative_to_root_match_across_storage():
    local, root_a = shard_names(["/mnt/x/ds/a/0.tar", "/mnt/x/ds/b/1.tar"])
    remote, root_b = shard_names(["gs://bkt/ds/a/0.tar", "gs://bkt/ds/b/1.tar"], root="gs://bkt/ds")
    assert local == remote == ["a/0.tar", "b/1.tar"]
    assert root_a == "/mnt/x/ds" and root_b == "/ds"
    with pytest.raises(ValueError, match="not under the dataset root"):
        shard_names(["/elsewhere/0.tar"], root="/mnt/x/ds")
    with pytest.raises(ValueError, match="names no path"):
        url_path("pipe:cat")


def test_identity_same_for_path_file_pipe_and_fsspec_urls(ray_session, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    forms = {
        "path": paths,
        "file": [f"file://{p}" for p in paths],
        "pipe-cat": [f"pipe:cat {p}" for p in paths],
        "pipe-curl": [f"pipe:curl -s file://{p}" for p in paths],
        "fsspec": [f"local://{p}" for p in paths],
    }
    ids = {}
    for form, urls in forms.items():
        idx = index(urls, tmp_path / form, progress=False)
        assert idx.manifest["broken"] == [], form
        assert idx.n_samples == sum(sizes)
        ids[form] = (np.asarray(idx.id_hi), np.asarray(idx.id_lo), idx.names, idx.fingerprint)
    ref = ids["path"]
    for form, got in ids.items():
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), form
        assert got[2] == ref[2] and got[3] == ref[3], form


def test_default_identity_is_hash_of_name_and_key(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    idx = make_index(paths, tmp_path)
    keys = idx.keys(2)
    row = idx.rows(2).start + 5
    assert (int(idx.id_hi[row]), int(idx.id_lo[row])) == id128(idx.names[2], keys[5])


def _json_shard(path, uids):
    with tarfile.open(path, "w") as tf:
        for i, uid in enumerate(uids):
            for ext, data in (("json", json.dumps({"uid": uid}).encode()), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_json_uid_identity_and_cross_shard_duplicates(make_index, tmp_path):
    hexes = [f"{i:032x}" for i in (7, 2**70 + 3, 11)]
    _json_shard(tmp_path / "a.tar", hexes[:2])
    _json_shard(tmp_path / "b.tar", [hexes[2], hexes[0]])  # hexes[0] again: a duplicate identity
    idx = make_index([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], tmp_path / "run", identity="json:uid")
    assert (int(idx.id_hi[1]), int(idx.id_lo[1])) == (2**6, 3)  # DataComp convention: hex uid is the identity
    dup = idx.manifest["duplicates"]
    assert dup["rows"] == 2
    assert sorted((e["shard"], e["key"]) for e in dup["examples"]) == [("a.tar", "s0000"), ("b.tar", "s0001")]


def test_identity_values():
    assert value_to_id128(5) == (0, 5)
    assert value_to_id128("ab" * 16) == (0xABABABABABABABAB, 0xABABABABABABABAB)
    assert value_to_id128("plain") == value_to_id128(b"plain") != value_to_id128("plain2")
    with pytest.raises(ValueError):
        value_to_id128(2**128)
    with pytest.raises(ValueError):
        value_to_id128(None)
