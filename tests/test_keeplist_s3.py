"""Keep-lists at object-store URLs, on a real S3 server (moto's, on 127.0.0.1): written whole
through `commit.replacing` (data first, one COMMIT object last), read lazily by exact byte
ranges, applied by `PrunedWebDataset` fetching only the slices of the shards it reads."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import webdataset as wds

from streamprune import PrunedWebDataset, storage
from streamprune.errors import DamagedRunError, SettingsError
from streamprune.formats.commit import COMMIT, committed
from streamprune.formats.keeplist import KeepList, KeepListWriter, new_manifest

NPY_HEADER = 128  # what the writer's .npy headers take: all that loading reads of each array


@pytest.fixture(scope="module")
def setup(make_index, uneven_shards, tmp_path_factory, s3_server):
    """The six uneven shards indexed, a 30% list of random rows written locally, and a bucket."""
    paths, _ = uneven_shards
    work = tmp_path_factory.mktemp("keep-s3")
    idx = make_index(paths, work / "run")
    rows = np.sort(np.random.default_rng(11).choice(idx.n_samples, int(0.3 * idx.n_samples), replace=False))
    local = KeepList.from_rows(idx, rows, work / "keep")
    return SimpleNamespace(
        paths=paths,
        index=idx,
        rows=rows,
        local=local,
        work=work,
        bucket=s3_server.make_bucket("keep-s3"),
        ref=list(wds.WebDataset(paths, shardshuffle=False)),
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder, so that a URL mistaken for a local path would show up in it."""
    monkeypatch.chdir(tmp_path)
    yield
    assert os.listdir(tmp_path) == [], "a URL was written as a local path"


def _content(keep: KeepList) -> dict:
    """Everything a keep-list says, shard by shard."""
    per_shard = {
        name: (
            keep.shard_keys(name),
            *(None if a is None else a.tolist() for a in (keep.shard_positions(name), keep.shard_ranges(name))),
            None if keep.shard_weights(name) is None else keep.shard_weights(name).tolist(),  # type: ignore[union-attr]
        )
        for name in keep.names
    }
    sizes = {what: None if a is None else a.tolist() for what, a in (("n", keep.samples), ("b", keep.shard_bytes))}
    manifest = {k: v for k, v in keep.manifest.items() if k != "created"}
    return {"manifest": manifest, "shards": per_shard, "ids": keep.ids().tolist(), **sizes}


def _slice_bytes(keep: KeepList, name: str, arrays: tuple[str, ...]) -> int:
    """The bytes of shard `name`'s slice of `arrays` (of keep_offset, keys.bin, ranges, ...)."""
    n = keep.kept_count(name)
    per = {
        "key_offset": 8 * (n + 1),
        "keys": sum(len(k.encode()) for k in keep.shard_keys(name)),
        "ranges": 16 * n,
        "positions": 8 * n,
        "weights": 8 * n,
    }
    return sum(per[a] for a in arrays)


def _settled(server):
    """`server` once the requests made so far are counted: it counts an answer when its body has
    gone out, which the client may see a moment earlier."""
    seen = -1
    while seen != server.requests:
        seen = server.requests
        time.sleep(0.2)
    return server


def _gets(server, suffix: str) -> list[tuple]:
    """The GET requests of the server's log for objects ending in `suffix`."""
    return [e for e in server.log if e[0] == "GET" and e[1].endswith(suffix)]


def test_a_keep_list_written_to_s3_reads_as_the_local_one(setup, s3_server):
    written = KeepList.from_rows(setup.index, setup.rows, setup.bucket + "/rt/keep")  # the writer, at the URL
    saved = setup.local.save(setup.bucket + "/rt/saved/")  # KeepList.save, trailing '/'
    assert saved == setup.bucket + "/rt/saved/"
    want = _content(setup.local)
    for url in (setup.bucket + "/rt/keep", setup.bucket + "/rt/saved"):
        keep = KeepList.load(url)
        assert keep.path == url and keep.place == committed(url)
        assert _content(keep) == want
        assert sorted(storage.names(url)) == sorted([COMMIT, storage.name(committed(url))])
        files = storage.names(committed(url))
        assert files == sorted(
            ["ids.npy", "key_offset.npy", "keys.bin", "manifest.json", "positions.npy", "ranges.npy", "shards.json"]
        )
    assert _content(written) == want
    # with importance weights
    url = setup.bucket + "/rt/weighted"
    manifest = new_manifest(method="user", k=len(setup.rows), weights=True)
    with KeepListWriter.for_index(url, setup.index, manifest, len(setup.rows), with_weights=True) as writer:
        writer.add_rows(setup.index, setup.rows, weight=2.5)
    keep = KeepList.load(url)
    assert {w for n in keep.names for w in keep.shard_weights(n).tolist()} == {2.5}  # type: ignore[union-attr]
    assert _content(KeepList.load(keep.save(setup.work / "weighted-copy")))["shards"] == _content(keep)["shards"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_writer_leaves_the_previous_keep_list_whole_and_nothing_behind(setup, where, tmp_path):
    out = str(tmp_path / "keep") if where == "local" else setup.bucket + "/killed/keep"
    first = KeepList.from_rows(setup.index, setup.rows[:100], out)
    before, place = _content(first), committed(out)
    manifest = new_manifest(method="user", k=len(setup.rows))
    with pytest.raises(RuntimeError, match="killed"):
        with KeepListWriter.for_index(out, setup.index, manifest, len(setup.rows)) as writer:
            writer.add_rows(setup.index, setup.rows[:50])
            raise RuntimeError("killed mid-write")
    with pytest.raises(SettingsError, match="got 50 samples"):  # fails while committing: short of its count
        with KeepListWriter.for_index(out, setup.index, manifest, len(setup.rows)) as writer:
            writer.add_rows(setup.index, setup.rows[:50])
    assert committed(out) == place and _content(KeepList.load(out)) == before
    if where == "local":
        assert sorted(os.listdir(tmp_path)) == [".keep.lock", "keep"]  # no temporaries left
        for name in os.listdir(tmp_path):  # `_in_tmp` wants the folder empty
            storage.remove(str(tmp_path / name))
        return
    assert sorted(storage.names(out)) == sorted([COMMIT, storage.name(place)])
    # what a kill -9 mid-write leaves: an uncommitted generation, invisible, removed by the next writer
    orphan = storage.join(out, "g-00000000000000000001-deadbeef")
    storage.write_bytes(storage.join(orphan, "ids.npy"), b"half-written")
    assert _content(KeepList.load(out)) == before
    again = KeepList.from_rows(setup.index, setup.rows, out)
    assert _content(again) == _content(setup.local)
    assert sorted(storage.names(out)) == sorted([COMMIT, storage.name(committed(out))])


def test_loading_reads_the_manifest_and_shard_table_and_a_shard_only_its_slices(setup, s3_server):
    url = setup.bucket + "/lazy/keep"
    KeepList.from_rows(setup.index, setup.rows, url)
    sizes = storage.sizes(committed(url))
    arrays = sum(v for f, v in sizes.items() if f.endswith(".npy") or f == "keys.bin")
    _settled(s3_server).reset()
    keep = KeepList.load(url)
    loaded = _settled(s3_server).bytes_sent
    parts = [(e[1].rsplit("/", 1)[1] or "(listing)", e[2], e[4]) for e in s3_server.log if e[0] == "GET"]
    print(f"load: {s3_server.gets} GETs, {loaded} bytes: {parts}")
    assert not _gets(s3_server, "keys.bin")
    npy = [e for e in s3_server.log if e[1].endswith(".npy")]
    assert npy and all(e[2] is not None and e[4] <= NPY_HEADER for e in npy), npy  # headers and two key offsets
    assert sum(e[4] for e in npy) <= 5 * NPY_HEADER + 16
    assert {e[1].rsplit("/", 1)[1] for e in _gets(s3_server, ".json")} == {"manifest.json", "shards.json"}
    name = keep.names[2]
    _settled(s3_server).reset()
    assert keep.shard_keys(name) == setup.local.shard_keys(name)
    assert keep.shard_ranges(name).tolist() == setup.local.shard_ranges(name).tolist()  # type: ignore[union-attr]
    assert keep.shard_positions(name).tolist() == setup.local.shard_positions(name).tolist()  # type: ignore[union-attr]
    fetched = _settled(s3_server).bytes_sent
    assert fetched == _slice_bytes(setup.local, name, ("key_offset", "keys", "ranges", "positions"))
    assert s3_server.gets == 4 and all(e[2] is not None for e in s3_server.log)  # one exact range each
    print(f"keep-list of {len(keep)} samples: {arrays} array bytes; load {loaded} bytes; shard {name}: {fetched}")


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_the_loader_fetches_only_the_slices_of_the_shards_it_reads(setup, s3_server, kept_samples):
    url = setup.bucket + "/loader/keep"
    KeepList.from_rows(setup.index, setup.rows, url)
    arrays = sum(v for f, v in storage.sizes(committed(url)).items() if f.endswith(".npy") or f == "keys.bin")
    _settled(s3_server).reset()
    KeepList.load(url)
    load = _settled(s3_server).bytes_sent
    local = setup.local
    figures = []
    for path in setup.paths:
        name = os.path.basename(path)
        _settled(s3_server).reset()
        ds = PrunedWebDataset([path], keep=url, shardshuffle=False)
        got = list(ds)
        assert got == list(PrunedWebDataset([path], keep=local, shardshuffle=False))
        assert len(got) == local.kept_count(name) and ds.read_counts.shards_opened == 1
        read = _settled(s3_server).bytes_sent - load
        assert read == _slice_bytes(local, name, ("key_offset", "keys", "ranges")), s3_server.log
        assert read <= arrays * local.kept_count(name) / len(local) + 8  # its share of the arrays, or less
        figures.append((name, local.kept_count(name), read))
    print(
        f"{len(local)} kept of {len(setup.paths)} shards, {arrays} array bytes, load {load} bytes; per shard: {figures}"
    )
    # all shards: exactly the local list's samples
    got = list(PrunedWebDataset(setup.paths, keep=url, shardshuffle=False))
    assert got == kept_samples(setup.ref, local) and len(got) == len(local)


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_dataloader_workers_and_ranks_read_only_their_shards_slices(setup, s3_server, monkeypatch):
    import torch

    url = setup.bucket + "/workers/keep"
    KeepList.from_rows(setup.index, setup.rows, url)
    keep = KeepList.load(url)
    blob = pickle.dumps(keep)
    assert len(blob) < 1000 and url.encode() in blob  # the location, not the arrays
    _settled(s3_server).reset()
    assert _content(pickle.loads(blob)) == _content(setup.local)
    _settled(s3_server).reset()
    pickle.loads(blob)
    reload = _settled(s3_server).bytes_sent  # what a worker given the pickled list reads
    every_slice = sum(_slice_bytes(setup.local, n, ("key_offset", "keys", "ranges")) for n in setup.local.names)
    ds = PrunedWebDataset(setup.paths, keep=url, shardshuffle=False).to_tuple("__key__", "cls")
    assert len(pickle.dumps(ds)) < 20_000
    want = sorted(k for n in setup.local.names for k in setup.local.shard_keys(n))
    for context, loads in (("fork", 0), ("spawn", 2)):  # spawned workers unpickle the list: they read it again
        _settled(s3_server).reset()
        loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=context)
        assert sorted(k for batch_keys, _ in loader for k in batch_keys) == want
        assert _settled(s3_server).bytes_sent == every_slice + loads * reload, context  # each slice once
    # a DDP rank (RANK and WORLD_SIZE as torchrun sets them) reads its shards' slices only
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _settled(s3_server).reset()
    mine = PrunedWebDataset(setup.paths, keep=url, shardshuffle=False, nodesplitter=wds.split_by_node)
    load = _settled(s3_server).bytes_sent
    got = list(mine)
    names = [os.path.basename(p) for p in setup.paths[1::2]]
    assert sorted(s["__key__"] for s in got) == sorted(k for n in names for k in setup.local.shard_keys(n))
    slices = sum(_slice_bytes(setup.local, n, ("key_offset", "keys", "ranges")) for n in names)
    assert _settled(s3_server).bytes_sent - load == slices
    print(f"all slices {every_slice} bytes, a worker's reload {reload}; rank 1 of 2: load {load}, slices {slices}")


def test_a_url_with_nothing_committed_is_named_with_what_to_run(setup):
    url = setup.bucket + "/nothing/keep"
    with pytest.raises(FileNotFoundError, match=re.escape(url) + ".*streamprune reduce"):
        KeepList.load(url)
    with pytest.raises(FileNotFoundError, match=re.escape(url) + ".*streamprune reduce"):
        PrunedWebDataset(setup.paths, keep=url, shardshuffle=False)


def _damage(url: str, file: str, edit) -> str:
    """Replace `file` of the committed keep-list `url` by `edit(its bytes)`; return the object."""
    obj = storage.join(committed(url), file)
    storage.write_bytes(obj, edit(storage.read_bytes(obj)))
    return obj


def _json_edit(change):
    def edit(raw: bytes) -> bytes:
        doc = json.loads(raw)
        change(doc)
        return json.dumps(doc).encode()

    return edit


DAMAGE = {
    "manifest_garbage": ("manifest.json", lambda raw: raw[:20], "not readable JSON"),
    "manifest_field": ("manifest.json", _json_edit(lambda m: m.__setitem__("k", "five")), "k='five'"),
    "manifest_k": ("manifest.json", _json_edit(lambda m: m.__setitem__("k", 5)), "manifest.json says k=5"),
    "shards_count": ("shards.json", _json_edit(lambda s: s[0].__setitem__("kept", s[0]["kept"] + 1)), "add up to"),
    "ranges_cut": ("ranges.npy", lambda raw: raw[:200], "not a readable .npy"),
    "ids_dtype": ("ids.npy", lambda raw: raw.replace(b"('f0', '<u8')", b"('f0', '<i8')"), "not [('f0'"),
    "key_offset_end": ("key_offset.npy", lambda raw: raw[:-8] + np.int64(10**6).tobytes(), "do not ascend"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_keep_list_on_s3_is_refused_naming_the_object(setup, kind):
    file, edit, words = DAMAGE[kind]
    url = f"{setup.bucket}/damaged-{kind}/keep"
    KeepList.from_rows(setup.index, setup.rows, url)
    obj = _damage(url, file, edit)
    named = storage.join(committed(url), "shards.json") if kind == "manifest_k" else obj  # k checked against it
    with pytest.raises(DamagedRunError, match=re.escape(named) + ".*" + re.escape(words)):
        KeepList.load(url)
    with pytest.raises(DamagedRunError, match=re.escape(named)):
        PrunedWebDataset(setup.paths, keep=url, shardshuffle=False)


def test_damage_inside_a_shards_slice_is_found_when_the_shard_is_read(setup):
    url = setup.bucket + "/damaged-slice/keep"
    keep = KeepList.from_rows(setup.index, setup.rows, url)
    name = keep.names[1]
    first = keep.shard_slice(name).start
    _damage(
        url,
        "ranges.npy",
        lambda raw: raw[: NPY_HEADER + 16 * first] + np.int64(-5).tobytes() + raw[NPY_HEADER + 16 * first + 8 :],
    )
    keep = KeepList.load(url)  # loading reads no slice
    keep.shard_ranges(keep.names[0])
    with pytest.raises(DamagedRunError, match=re.escape(storage.join(committed(url), "ranges.npy")) + ".*negative"):
        keep.shard_ranges(name)
    commit = storage.join(url, COMMIT)
    storage.write_bytes(commit, b"{}")
    with pytest.raises(DamagedRunError, match=re.escape(commit)):
        KeepList.load(url)
