"""`inspect --verify` of a run in an object store (a real S3 server: moto's, on 127.0.0.1): the
same checks and report as a local run, problems naming the damaged object, and what killed
writers leave (uncommitted generations, expired locks) listed as notes, not damage.

The run is built cheaply without Ray: an index of small tar shards written in this process,
a stats store of synthetic values, a scores store and a keep-list, all in the bucket."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np
import pytest

from streamprune import KeepList, storage
from streamprune.cli.main import main
from streamprune.formats import commit, object_lock
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.formats.stats_store import STATS, ChunkWriter, StatsStore
from streamprune.scoring.columns import LABEL

pytestmark = pytest.mark.slow  # hundreds of requests to the S3 server per verify

EPOCHS, CHUNK, BLOCK = 2, 64, 64  # few chunks: each object is a request to the server
SIZES = (12, 30, 20)  # samples per shard: one stats chunk


def _shards(folder) -> list[str]:
    """Small webdataset tar shards (`key.cls`, `key.txt` per sample) under local `folder`."""
    paths = []
    for s, n in enumerate(SIZES):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                for ext, data in (("cls", str(i % 3).encode()), ("txt", f"sample {s}/{i}".encode())):
                    info = tarfile.TarInfo(f"s{s}-{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _build(run: str, shards: list[str], make_index) -> None:
    """Index (of the shards uploaded into the bucket, as a run in a bucket has them), a complete
    stats store of EPOCHS epochs, scores.zarr and keep/ of `run` (a URL)."""
    rd = RunDir(run)
    fs, _ = storage.filesystem(run)
    for p in shards:
        fs.put(p, storage.filesystem(f"{run}-shards/{os.path.basename(p)}")[1])
    idx = make_index(f"{run}-shards/shard-{{000..{len(shards) - 1:03d}}}.tar", run)
    n, rng = idx.n_samples, np.random.default_rng(3)
    store = StatsStore.create(rd.stats, idx, epochs=EPOCHS, chunk_rows=CHUNK)
    rows = np.arange(n)
    labels = (rows % 3).astype(np.int32)
    for t in range(EPOCHS):
        p = rng.uniform(0.05, 0.95, n).astype(np.float32)
        stats = {
            "p_true": p,
            "correct": (p > 0.5).astype(np.uint8),
            "margin": np.log(p / (1 - p)).astype(np.float32),
            "el2n": (1 - p) * np.float32(1.2),
            "entropy": (-p * np.log(p) - (1 - p) * np.log(1 - p)).astype(np.float32),
            "loss": -np.log(p),
        }
        w = ChunkWriter(store, range(store.n_chunks), t)
        w.add(rows, {**{name: stats[name] for name in STATS}, LABEL: labels})
        w.flush()
        store.mark_done(t, np.arange(idx.n_shards))
    with commit.replacing(rd.scores) as place:
        scores = ScoresStore.create(place, n, BLOCK)
        for r0 in range(0, n, BLOCK):
            r1 = min(n, r0 + BLOCK)
            scores.write_block(r0, r1, {"id_hi": idx.id_hi[r0:r1], "id_lo": idx.id_lo[r0:r1], LABEL: labels[r0:r1]})
        scores.set_attrs({"fingerprint": idx.fingerprint, "block_rows": BLOCK, "epochs": EPOCHS, "window": 2})
        scores.set_attrs({"scores": [], "summary": {"finite": {}}})
    KeepList.from_rows(idx, np.arange(0, n, 3), rd.keep)


@pytest.fixture(scope="module")
def base(s3_server, make_index, tmp_path_factory):
    """A complete run in the bucket (built once), and the bytes of its objects."""
    bucket = s3_server.make_bucket("verify-s3")
    run = f"{bucket}/base"
    _build(run, _shards(tmp_path_factory.mktemp("verify-shards")), make_index)
    return run, {f: storage.read_bytes(f"{run}/{f}") for f in storage.files(run)}


@pytest.fixture
def run(base):
    """The complete run, put back as it was after the test: objects added are removed, and those
    the test named in `run.touched` (relative to the run) are written back (cheaper than a copy
    of the run per test)."""
    url, before = base
    touched: list[str] = []
    yield _Run(url, touched)
    for f in set(storage.files(url)) - set(before):
        storage.remove(f"{url}/{f}")
    for f in touched:
        storage.write_bytes(f"{url}/{f}", before[f])


class _Run(str):
    """A run URL that records the objects a test damages."""

    touched: list[str]

    def __new__(cls, url: str, touched: list[str]) -> _Run:
        self = super().__new__(cls, url)
        self.touched = touched
        return self


def _verify(run: str, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["inspect", run, "--verify", "--quiet", *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _report(run: str, capsys) -> dict:
    rc, text = _verify(run, capsys, "--json")
    report = json.loads(text[text.index("{") : text.rindex("}") + 1])["verify"]
    assert (rc == 2) == report["damaged"], text
    return report


def test_a_clean_run_on_s3_verifies_clean(run, capsys):
    rc, text = _verify(run, capsys)
    assert rc == 0 and "verify: clean" in text and "DAMAGED" not in text, text
    report = _report(run, capsys)
    assert report["run"] == run and report["problems"] == [] and report["notes"] == []
    assert report["chunks_checked"] > 0


def _place(run: str, output: str) -> str:
    """The committed generation of `output` of `run`, relative to the run ('stats.zarr/g-...')."""
    return commit.committed(f"{run}/{output}")[len(run) + 1 :]


def _garbage(url: str) -> None:
    storage.write_bytes(url, np.random.default_rng(2).bytes(100))


def _truncate(url: str) -> None:
    storage.write_bytes(url, storage.read_bytes(url)[:100])


def _edit_ids(url: str) -> None:
    ids = np.load(io.BytesIO(storage.read_bytes(url)))
    ids[2] = (1, 2)
    out = io.BytesIO()
    np.save(out, ids)
    storage.write_bytes(url, out.getvalue())


# kind -> (output, object in its committed generation (None: the output's own COMMIT), damage, words
# of the problem reported)
DAMAGE = {
    "stats_chunk_deleted": ("stats.zarr", "p_true/c/0/1", storage.remove, "missing"),
    "stats_chunk_garbage": ("stats.zarr", "correct/c/0/0", _garbage, "unreadable"),
    "keep_array_truncated": ("keep", "ranges.npy", _truncate, "damaged"),
    "keep_ids_edited": ("keep", "ids.npy", _edit_ids, "identit"),
    "index_array_garbage": ("index", "id_lo.npy", _garbage, "unreadable"),
    "scores_chunk_deleted": ("scores.zarr", "id_hi/c/0", storage.remove, "missing"),
    "commit_garbage": ("keep", None, _garbage, "not a commit object"),
}


# damages checked together (one verify each: every request to the server costs): those in one
# group touch different outputs, so each is found as it would be alone
GROUPS = {
    "stats_scores_keep": ["stats_chunk_deleted", "stats_chunk_garbage", "scores_chunk_deleted", "keep_array_truncated"],
    "index_and_commit": ["index_array_garbage", "commit_garbage"],
    "keep_ids": ["keep_ids_edited"],
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_damage_on_s3_is_reported_naming_the_object(run, group, capsys):
    wanted = []
    for kind in GROUPS[group]:
        output, rest, damage, words = DAMAGE[kind]
        name = f"{output}/COMMIT" if rest is None else f"{_place(run, output)}/{rest}"
        wanted.append((name, words))
        run.touched.append(name)
        damage(f"{run}/{name}")
    rc, text = _verify(run, capsys)
    assert rc == 2, text
    damaged = [line for line in text.splitlines() if line.startswith("DAMAGED")]
    for name, words in wanted:
        assert [line for line in damaged if name in line and words in line], (name, text)


def test_leftovers_of_killed_writers_on_s3_are_notes_not_damage(run, capsys):
    stray = f"{run}/keep/g-00000000000000000001-deadbeef"
    storage.write_bytes(f"{stray}/manifest.json", b"{}")  # a killed writer's uncommitted generation
    lock = object_lock.lock_folder(f"{run}/stats.zarr")
    storage.write_bytes(
        f"{lock}/{object_lock.lease_name(0)}", object_lock.lease_bytes("record, pid 1 on host h", "t", time.time() - 60)
    )
    rc, text = _verify(run, capsys)
    assert rc == 0 and "verify: clean" in text, text
    assert "note keep/g-00000000000000000001-deadbeef: uncommitted generation of keep" in text, text
    assert "note .stats.zarr.lock: leftover lock of stats.zarr" in text and "expired" in text, text
