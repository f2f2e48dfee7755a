"""Untrusted shard content: nothing is unpickled or executed, member paths never reach the
filesystem, keep-lists and indexes are read without pickle, `pipe:` only from the user's URLs."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import KeepList, PrunedWebDataset, index, reshard
from streamprune.formats.index import Index
from streamprune.training.decode import decode_image


class _Payload:
    """Unpickling this creates a folder: the proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker, 0o777, True)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(str(marker)))
    shard = _tar(tmp_path / "evil.tar", [("a.cls", b"1"), ("a.pyd", payload), ("a.pth", payload)])
    keep = KeepList.from_keys([("evil.tar", "a")])
    sample = next(iter(PrunedWebDataset(shard, keep=keep, shardshuffle=False).decode()))
    assert sample["pyd"] == payload and sample["pth"] == payload and sample["cls"] == 1
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot decode"):  # streamprune's decoding: allow_pickle=False
        decode_image({"__key__": "a", "npy": buf.getvalue(), "cls": b"1"})
    assert not marker.exists()
    with contextlib.suppress(Exception):  # webdataset's default decoders do unpickle (then fail on .pth)
        next(iter(wds.WebDataset(shard, shardshuffle=False).decode()))
    assert marker.exists()


def test_keep_lists_and_indexes_are_read_without_pickle(make_index, tmp_path, uneven_shards):
    paths, _ = uneven_shards
    idx = make_index(paths[:2], tmp_path / "run")
    keep = KeepList.from_rows(idx, [0, 1, 2], tmp_path / "keep")
    assert len(keep) == 3
    objects = np.array([_Payload(str(tmp_path / "unpickled"))] * 3, dtype=object)
    np.save(tmp_path / "keep" / "ids.npy", objects, allow_pickle=True)
    with pytest.raises(ValueError, match="damaged or incomplete"):
        KeepList.load(tmp_path / "keep")
    np.save(tmp_path / "run" / "index" / "id_hi.npy", objects, allow_pickle=True)
    with pytest.raises(ValueError):
        Index(tmp_path / "run")
    assert not (tmp_path / "unpickled").exists()


def test_member_paths_never_reach_the_filesystem(ray_session, tmp_path):
    inside = tmp_path / "work"
    inside.mkdir()
    absolute = str(tmp_path / "absolute-escape")
    names = [
        ("../../escape.cls", b"1"),
        ("../../escape.txt", b"x"),
        (absolute + ".cls", b"2"),
        (absolute + ".txt", b"y"),
        ("ok.cls", b"3"),
        ("ok.txt", b"z"),
    ]
    shard = _tar(inside / "paths.tar", names)
    idx = index([shard], inside / "run", progress=False)
    assert idx.keys(0) == ["../../escape", absolute, "ok"]
    keep = KeepList.from_rows(idx, [0, 1, 2], inside / "run" / "keep")
    got = list(PrunedWebDataset(shard, keep=keep, shardshuffle=False))
    assert [s["__key__"] for s in got] == ["../../escape", absolute, "ok"]
    out = inside / "resharded"
    reshard(inside / "run", out, 10, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["pruned-000000.tar", "reshard.json"]
    assert [s["__key__"] for s in wds.WebDataset(str(out / "pruned-000000.tar"), shardshuffle=False)] == [
        "../../escape",
        absolute,
        "ok",
    ]
    assert not list(tmp_path.parent.parent.glob("**/escape*")) and not Path(absolute + ".cls").exists()


def test_pipe_commands_come_only_from_the_users_urls(tmp_path, uneven_shards):
    paths, _ = uneven_shards
    marker = tmp_path / "ran"
    keep = KeepList.from_keys([(f"pipe:touch {marker}", "00000000"), ("train-000000.tar", "00000000")])
    got = list(PrunedWebDataset(paths[:1], keep=keep, shardshuffle=False))
    assert [s["__key__"] for s in got] == ["00000000"] and not marker.exists()
