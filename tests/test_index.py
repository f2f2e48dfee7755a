"""The shard index on uneven, empty, duplicate-key, truncated and corrupt shards."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import Index, index
from streamprune.cli.main import main


def _tar(path, names, payload=b"x"):
    with tarfile.open(path, "w") as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)


def test_index_matches_webdataset_on_uneven_shards(ray_session, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    idx = index(paths, tmp_path, progress=False)
    assert idx.n_shards == 6 and idx.n_samples == sum(sizes) == 1200
    assert np.array_equal(idx.shard_offset, np.concatenate([[0], np.cumsum(sizes)]))
    assert len(set(sizes)) > 1
    assert idx.manifest["broken"] == [] and idx.manifest["empty"] == [] and idx.manifest["duplicates"]["rows"] == 0
    for s, path in enumerate(paths):
        samples = list(wds.WebDataset(path, shardshuffle=False))
        assert idx.keys(s) == [x["__key__"] for x in samples]
        raw = Path(path).read_bytes()
        for j in (0, len(samples) // 2, len(samples) - 1):
            row = idx.rows(s).start + j
            offsets, lengths = idx.members(row)
            got = {
                tarfile.TarInfo.frombuf(raw[o : o + 512], "utf-8", "strict").name.split(".", 1)[1]: raw[
                    o + 512 : o + 512 + n
                ]
                for o, n in zip(offsets, lengths, strict=True)
            }
            assert got == {k: v for k, v in samples[j].items() if not k.startswith("__")}
            assert idx.sample_start[row] == offsets[0]
            assert idx.sample_end[row] >= offsets[-1] + 512 + lengths[-1]
    # Local tars: headers only, seeking past member data.
    m = idx.manifest
    assert m["bytes_total"] == sum(os.path.getsize(p) for p in paths)
    assert m["bytes_read"] < 0.6 * m["bytes_total"]
    assert m["bytes_read"] == 512 * (2 * 1200 + 6)  # two headers a sample, one end-of-archive block a shard


def test_stream_reads_through(ray_session, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    idx = index([f"pipe:cat {p}" for p in paths[:2]], tmp_path, progress=False)
    # Streams cannot seek: every byte up to the end-of-archive block is read.
    assert idx.manifest["bytes_read"] == sum(int(idx.sample_end[idx.rows(s).stop - 1]) + 512 for s in range(2))


def test_empty_shard_and_duplicate_keys_reported(ray_session, tmp_path):
    empty = _tar(tmp_path / "empty.tar", [])
    dups = _tar(tmp_path / "dups.tar", ["a.cls", "a.png", "b.cls", "a.cls", "__meta__", "noext"])
    idx = index([empty, dups], tmp_path / "run", progress=False)
    assert idx.manifest["empty"] == ["empty.tar"]
    assert [s["samples"] for s in idx.shards] == [0, 3]
    assert idx.keys(1) == ["a", "b", "a"]
    assert idx.member_count.tolist() == [2, 1, 1]
    dup = idx.manifest["duplicates"]
    assert dup["rows"] == 2 and {(e["shard"], e["key"], e["row"]) for e in dup["examples"]} == {
        ("dups.tar", "a", 0),
        ("dups.tar", "a", 2),
    }


def test_truncated_and_corrupt_shards_named_and_healthy_ones_kept(ray_session, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    good = [shutil.copy(p, tmp_path / f"good-{i}.tar") for i, p in enumerate(paths[:2])]
    raw = Path(paths[2]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: 4 * 1024 + 300])  # inside the 2nd sample's png data
    bad = bytearray(raw)
    bad[2 * 2560 + 10] ^= 0xFF  # a name byte of the 3rd sample's first header: checksum breaks
    (tmp_path / "corrupt.tar").write_bytes(bytes(bad))
    (tmp_path / "noend.tar").write_bytes(raw[:5120])  # cut exactly at a sample boundary
    urls = [
        *map(str, good),
        str(tmp_path / "cut.tar"),
        str(tmp_path / "corrupt.tar"),
        str(tmp_path / "noend.tar"),
        str(tmp_path / "missing.tar"),
    ]
    idx = index(urls, tmp_path / "run", progress=False)
    broken = {b["shard"]: b for b in idx.manifest["broken"]}
    assert set(broken) == {"cut.tar", "corrupt.tar", "noend.tar", "missing.tar"}
    assert "truncated" in broken["cut.tar"]["error"] and "'cut.tar'" in broken["cut.tar"]["error"]
    assert broken["cut.tar"]["offset"] == 3584  # the header of the png member whose data is cut
    assert "checksum" in broken["corrupt.tar"]["error"] and broken["corrupt.tar"]["offset"] == 5120
    assert broken["noend.tar"]["offset"] == 5120 and "end-of-archive" in broken["noend.tar"]["error"]
    assert "cannot open" in broken["missing.tar"]["error"]
    assert [s["samples"] for s in idx.shards] == [sizes[0], sizes[1], 0, 0, 0, 0]
    assert idx.n_samples == sizes[0] + sizes[1]


def test_repeated_extension_in_a_sample_is_broken(ray_session, tmp_path):
    path = _tar(tmp_path / "rep.tar", ["a.cls", "a.cls"])
    good = _tar(tmp_path / "good.tar", ["a.cls", "a.png"])
    idx = index([path, good], tmp_path / "run", progress=False)
    assert "repeats extension .cls of sample 'a'" in idx.manifest["broken"][0]["error"] and idx.n_samples == 1


def test_an_index_whose_every_shard_is_broken_is_an_error_and_writes_nothing(ray_session, tmp_path):
    path = _tar(tmp_path / "rep.tar", ["a.cls", "a.cls"])
    with pytest.raises(ValueError, match=r"every shard is broken \(1\).*rep.tar: .*repeats extension .cls"):
        index([path], tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "index").exists()


def test_failing_pipe_command_is_broken(ray_session, tmp_path):
    with pytest.raises(ValueError, match=r"every shard is broken.*pipe:cat /nonexistent/dir/x.tar.*status 1"):
        index(["pipe:cat /nonexistent/dir/x.tar"], tmp_path / "run", progress=False)


def test_reindex_replaces_atomically_and_reload(ray_session, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    a = index(paths[:3], tmp_path, progress=False)
    b = index(paths, tmp_path, progress=False)
    assert a.n_shards == 3 and b.n_shards == 6 and a.fingerprint != b.fingerprint
    assert Index(tmp_path).n_samples == b.n_samples
    assert not (tmp_path / ".index-parts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index"]  # no temporary left


def test_cli_index_and_errors(ray_session, uneven_shards, tmp_path, capsys):
    paths, sizes = uneven_shards
    shard_dir = paths[0].rsplit("/", 1)[0]
    assert main(["index", f"{shard_dir}/train-{{000000..000005}}.tar", "--out", str(tmp_path), "--quiet"]) == 0
    assert f"shards 6  samples {sum(sizes)}" in capsys.readouterr().out
    assert main(["index", f"{shard_dir}/nothing-*.tar", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no shard matches" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no shard index"):
        Index(tmp_path / "elsewhere")


def test_a_pipe_still_writing_padding_after_the_archive_is_read_whole(ray_session, uneven_shards, tmp_path):
    # tar writers pad to whole records; a reader that stops at the end-of-archive marker and
    # closes the pipe kills the command (EPIPE, curl exit 23) unless it drains the rest
    paths, sizes = uneven_shards
    url = f"pipe:sh -c 'cat {paths[0]}; sleep 0.3; head -c 20480 /dev/zero' {paths[0]}"
    idx = index([url], tmp_path, progress=False)
    assert idx.manifest["broken"] == [] and idx.n_samples == sizes[0]
