"""The shard index with the run directory on a real S3 server (the `s3_server` fixture): written
through `formats.commit` (data objects first, one `COMMIT` object last), read back the same as a
local index, its parts (`RUN/.index-parts/`) written whole, damage named by object, and the
`index` stage (Ray and in-process) giving the same index as a local run."""

from __future__ import annotations

import io

import numpy as np
import pytest

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats.classes import Classes
from streamprune.formats.commit import COMMIT, committed
from streamprune.formats.index import Index, load_scan, save_scan, write_index
from streamprune.formats.rundir import RunDir
from streamprune.shards.identity import shard_names
from streamprune.shards.scan import scan_shard

BUCKET = "index-tests"


@pytest.fixture(scope="module")
def scans(uneven_shards):
    """Scans of the first four real Fashion-MNIST shards, and their paths."""
    paths, _ = uneven_shards
    names, root = shard_names(paths[:4])
    return [scan_shard(p, n) for p, n in zip(paths[:4], names, strict=True)], root, paths[:4]


def _same_index(a: Index, b: Index) -> None:
    """`a` and `b` hold the same shards, identities, keys and byte ranges."""
    assert (a.names, a.fingerprint, a.n_samples, a.root) == (b.names, b.fingerprint, b.n_samples, b.root)
    for k in ("id_hi", "id_lo", "sample_start", "sample_end", "member_count", "member_offset", "member_size"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert [a.keys(s) for s in range(a.n_shards)] == [b.keys(s) for s in range(b.n_shards)]
    rows = np.arange(0, a.n_samples, 7)
    assert np.array_equal(a.byte_ranges(rows), b.byte_ranges(rows))
    assert [{k: v for k, v in s.items() if k != "url"} for s in a.shards] == [
        {k: v for k, v in s.items() if k != "url"} for s in b.shards
    ]


def test_an_index_written_to_s3_commits_last_and_reads_back_as_the_local_one(s3_server, scans, tmp_path):
    found, root, _ = scans
    local = write_index(tmp_path / "run" / "index", found, root, "shard-key")
    run = s3_server.make_bucket(BUCKET) + "/written"
    s3_server.reset()
    remote = write_index(RunDir(run).index, found, root, "shard-key")
    puts = [path for method, path, *_ in s3_server.log if method == "PUT"]
    assert puts[-1].endswith("/written/index/COMMIT")  # the data objects, then the commit
    assert sum(p.endswith("/manifest.json") for p in puts) == 1 and puts[-2].endswith("/manifest.json")
    assert remote.path == RunDir(run).index and remote.files == committed(RunDir(run).index)
    _same_index(remote, local)
    _same_index(Index(run), local)  # the run directory finds its index, as locally
    assert sorted(storage.names(RunDir(run).index)) == [COMMIT, storage.name(remote.files)]


def test_an_index_url_with_nothing_committed_says_to_run_index(s3_server):
    run = s3_server.make_bucket(BUCKET) + "/empty"
    with pytest.raises(FileNotFoundError, match=rf"no shard index at '{run}' \(run `streamprune index` first\)"):
        Index(run)
    orphan = storage.join(RunDir(run).index, "g-00000000000000000001-deadbeef")
    storage.write_bytes(storage.join(orphan, "manifest.json"), b"{}")  # a killed writer's generation
    for where in (run, RunDir(run).index):
        with pytest.raises(FileNotFoundError, match=rf"no shard index at '{where}' \(run `streamprune index` first"):
            Index(where)


def test_a_failed_or_killed_write_leaves_the_committed_index(s3_server, scans, tmp_path):
    found, root, _ = scans
    index_url = RunDir(s3_server.make_bucket(BUCKET) + "/failed").index
    good = write_index(index_url, found[:2], root, "shard-key")
    damaged = storage.join(s3_server.make_bucket(BUCKET), "parts", "damaged.npz")
    storage.write_bytes(damaged, b"not a part")
    with pytest.raises(DamagedRunError, match=f"index part '{damaged}' is unreadable"):
        write_index(index_url, [*found, damaged], root, "shard-key")
    assert sorted(storage.names(index_url)) == [COMMIT, storage.name(good.files)]  # the failed one removed
    orphan = storage.join(index_url, "g-99999999999999999999-deadbeef")
    storage.write_bytes(storage.join(orphan, "manifest.json"), b"half")  # what a kill -9 mid-write leaves
    again = Index(index_url)
    assert (again.files, again.fingerprint, again.n_shards) == (good.files, good.fingerprint, 2)


def test_index_parts_on_s3_round_trip_and_a_damaged_one_is_named(s3_server, scans):
    found, _, _ = scans
    part = storage.join(s3_server.make_bucket(BUCKET), "run", ".index-parts", "00000000-0123456789abcdef.npz")
    save_scan(found[1], part)
    back = load_scan(part)
    assert back.keys == found[1].keys and back.meta() == found[1].meta()
    assert all(np.array_equal(back.arrays[k], v) for k, v in found[1].arrays.items())
    storage.write_bytes(part, storage.read_bytes(part)[:100])  # cut short
    with pytest.raises(DamagedRunError, match=f"index part '{part}' is unreadable"):
        load_scan(part)


def test_a_damaged_index_on_s3_is_refused_naming_the_object(s3_server, scans):
    found, root, _ = scans
    idx = write_index(RunDir(s3_server.make_bucket(BUCKET) + "/damaged").index, found, root, "shard-key")
    ends = idx.sample_end.copy()
    ends[5] += 1  # not the end of a tar block
    buffer = io.BytesIO()
    np.save(buffer, ends)
    storage.write_bytes(idx.file("sample_end.npy"), buffer.getvalue())
    edited = Index(idx.path)  # the cheap checks pass; the ranges are checked where they are used
    named = rf"index file '{idx.file('sample_end.npy')}' is damaged: shard 'train-000000.tar', row 5: byte range"
    with pytest.raises(DamagedRunError, match=named):
        edited.byte_ranges(np.array([5]))
    storage.write_bytes(idx.file("shards.jsonl"), b"{not json\n")
    with pytest.raises(DamagedRunError, match=rf"'{idx.file('shards.jsonl')}' is damaged: line 1"):
        Index(idx.path)
    storage.remove(idx.file("key_offset.npy"))
    storage.write_bytes(idx.file("manifest.json"), b"{")
    with pytest.raises(DamagedRunError, match=rf"'{idx.file('manifest.json')}' is damaged"):
        Index(idx.path)


def test_the_class_list_is_written_and_read_on_s3(s3_server):
    run = s3_server.make_bucket(BUCKET) + "/classes"
    assert Classes.load(run) is None
    classes = Classes(3, ("cat", "dog", "emu"), label="json:kind", counts=(5, 0, 2))
    assert classes.save(run) == RunDir(run).classes
    assert Classes.load(run) == classes and Classes.from_file(RunDir(run).classes) == classes
    storage.write_bytes(RunDir(run).classes, b"{")
    with pytest.raises(DamagedRunError, match=f"'{run}/classes.json' is damaged"):
        Classes.load(run)


def test_index_in_process_on_s3_is_the_local_index(s3_server, make_index, scans, tmp_path):
    _, _, paths = scans
    local = make_index(paths, tmp_path / "run")
    remote = make_index(paths, s3_server.make_bucket(BUCKET) + "/in-process")
    _same_index(remote, local)


def test_the_index_stage_on_s3_matches_local_reruns_as_a_no_op_and_repairs(ray_session, s3_server, scans, tmp_path):
    import streamprune
    from streamprune.stages.index import part_path
    from streamprune.stages.label_scan import build_classes

    _, _, paths = scans
    local = streamprune.index(paths, tmp_path / "run", progress=False)
    run = s3_server.make_bucket(BUCKET) + "/stage"
    names, _ = shard_names(paths)
    parts = RunDir(run).index_parts
    save_scan(scan_shard(paths[0], names[0]), part_path(parts, 0, paths[0], names[0], "shard-key"))  # a killed index
    storage.write_bytes(storage.join(parts, ".00000001-x.npz.tmp-1-2"), b"half a part")
    idx = streamprune.index(paths, run, progress=False)
    _same_index(idx, local)
    assert not storage.exists(parts)  # removed once the index is complete
    classes = build_classes(run, progress=False)
    assert Classes.load(run) == classes == build_classes(tmp_path / "run", progress=False)
    commit_before = storage.read_bytes(storage.join(RunDir(run).index, COMMIT))
    again = streamprune.index(paths, run, progress=False)  # complete, same shards: nothing to do
    assert storage.read_bytes(storage.join(RunDir(run).index, COMMIT)) == commit_before
    assert again.files == idx.files and not storage.exists(parts)
    ends = idx.sample_end.copy()
    ends[3] += 1
    buffer = io.BytesIO()
    np.save(buffer, ends)
    storage.write_bytes(idx.file("sample_end.npy"), buffer.getvalue())  # damaged: "index the shards again"
    repaired = streamprune.index(paths, run, progress=False)
    assert repaired.files != idx.files and repaired.range_problem(0) is None
    _same_index(repaired, local)
    fewer = streamprune.index(paths[:2], run, progress=False)  # other shards: indexed again
    assert fewer.n_shards == 2 and fewer.files != repaired.files
    assert sorted(storage.names(RunDir(run).index)) == [COMMIT, storage.name(fewer.files)]
