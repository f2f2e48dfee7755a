"""Guards against silent wrong answers and endless loops: a stale index part, an endless shard
stream in which nothing is kept, an output prefix that leaves the output folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import PrunedWebDataset, index, reshard
from streamprune.formats.keeplist import KeepList
from streamprune.loader import _KeptShards, _Selection
from streamprune.shards.reader import ReadCounts


@pytest.fixture
def two_shards(uneven_shards, tmp_path):
    paths, _ = uneven_shards
    copies = []
    for p in paths[:2]:
        copies.append(str(tmp_path / os.path.basename(p)))
        shutil.copy(p, copies[-1])
    return copies


def test_a_shard_rewritten_after_an_interrupted_index_is_scanned_again(ray_session, two_shards, tmp_path, fmnist):
    from streamprune.demo.datasets import write_shards
    from streamprune.formats.index import save_scan
    from streamprune.shards.identity import shard_names
    from streamprune.shards.scan import scan_shard
    from streamprune.stages.index import part_path

    run = tmp_path / "run"
    parts = run / ".index-parts"
    parts.mkdir(parents=True)
    names, _ = shard_names(two_shards)
    for i, (url, name) in enumerate(
        zip(two_shards, names, strict=True)
    ):  # what an index killed before its merge leaves
        save_scan(scan_shard(url, name), part_path(parts, i, url, name, "shard-key"))
    images, labels = fmnist
    write_shards(images[:7], labels[:7], tmp_path / "new", sizes=[7], prefix="x")
    os.replace(tmp_path / "new" / "x-000000.tar", two_shards[0])  # then the shard is rewritten
    idx = index(two_shards, run, progress=False)
    assert idx.keys(0) == [s["__key__"] for s in wds.WebDataset(two_shards[0], shardshuffle=False)]
    assert idx.n_samples == 7 + len(idx.keys(1)) and not parts.exists()


def test_resampled_streams_over_shards_with_nothing_kept_stop_with_an_error(make_index, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    idx = make_index(paths, tmp_path / "run")
    keep = KeepList.from_rows(idx, np.arange(idx.rows(0).start, idx.rows(0).stop), tmp_path / "keep")  # shard 0 only
    with pytest.raises(ValueError, match="keeps no sample of these 2 shards"):
        PrunedWebDataset(paths[1:3], keep=keep, resampled=True)
    stage = _KeptShards(_Selection(keep, None, "error"), ReadCounts())
    endless = ({"url": paths[1 + i % 2]} for i in range(10**9))
    with pytest.raises(ValueError, match=r"nothing is kept in any of the 2 shards this stream repeats"):
        next(stage(endless))
    got = list(PrunedWebDataset(paths[:2], keep=keep, shardshuffle=False))
    assert len(got) == sizes[0]


def test_reshard_refuses_a_prefix_that_is_a_path(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    idx = make_index(paths, tmp_path / "run")
    KeepList.from_rows(idx, np.arange(10), tmp_path / "run" / "keep")
    for prefix in ("../../x", "a/b", "", ".hidden", "x\ny"):
        with pytest.raises(ValueError, match="prefix .*a file name, not a path"):
            reshard(tmp_path / "run", tmp_path / "out", 5, prefix=prefix, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x-000000.tar").exists()


def test_what_a_rewritten_shard_check_detects_and_what_it_does_not(make_index, two_shards, tmp_path):
    from streamprune.errors import ChangedShardError

    idx = make_index(two_shards, tmp_path / "run")
    keep = KeepList.from_rows(idx, np.arange(idx.n_samples), tmp_path / "keep")
    original = next(iter(wds.WebDataset(two_shards[0], shardshuffle=False)))["png"]
    data = bytearray(Path(two_shards[0]).read_bytes())
    start, end = int(idx.sample_start[0]), int(idx.sample_end[0])
    pos = data.index(b"IHDR", start, end) + 8  # a byte of the first image's header chunk
    data[pos] ^= 0xFF
    Path(two_shards[0]).write_bytes(bytes(data))  # same size, same keys: served as it now is
    first = next(iter(PrunedWebDataset(two_shards, keep=keep, shardshuffle=False)))
    now = next(iter(wds.WebDataset(two_shards[0], shardshuffle=False)))
    assert first["__key__"] == idx.keys(0)[0] and first["png"] == now["png"] != original
    with open(two_shards[0], "ab") as f:  # another size: refused
        f.write(bytes(512))
    with pytest.raises(ChangedShardError, match="re-index"):
        list(PrunedWebDataset(two_shards, keep=keep, shardshuffle=False))


def test_index_removes_what_a_killed_index_left(ray_session, two_shards, tmp_path):
    run = tmp_path / "run"
    (run / ".index-parts").mkdir(parents=True)
    (run / ".index-parts" / "00000000-abc.tmp.npz").write_bytes(b"half a part")
    (run / ".index.tmp-999999-1").mkdir()  # a merge being written by a killed process
    index(two_shards, run, progress=False)
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(".lock")) == ["index"]


def test_an_index_written_by_a_newer_streamprune_is_refused(make_index, two_shards, tmp_path):
    import json

    from streamprune import Index
    from streamprune.errors import NewerFormatError

    make_index(two_shards, tmp_path / "run")
    manifest = tmp_path / "run" / "index" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    with pytest.raises(NewerFormatError, match="written by a newer streamprune.*version 99"):
        Index(tmp_path / "run" / "index")
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json' is damaged"):
        Index(tmp_path / "run" / "index")
