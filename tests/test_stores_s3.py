"""The stats and scores stores on object storage (a real S3 server: moto on 127.0.0.1), and alike
locally: created whole and committed at once, chunks listed and named by location, one writer per
chunk with concurrent writers, scores replaced whole."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from stat_values import stat_values

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats import commit
from streamprune.formats.scores_store import ScoresStore
from streamprune.formats.stats_store import (
    STATS,
    ChunkWriter,
    OwnershipError,
    StatsStore,
    _build,
    store_exists,
)

CHUNK_ROWS = 64


@pytest.fixture
def run_index(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    return make_index(paths, tmp_path / "run")


@pytest.fixture
def s3_run(s3_server, tmp_path) -> str:
    """A run folder of this test's own in the bucket `stores-tests`."""
    return f"{s3_server.make_bucket('stores-tests')}/{tmp_path.name}"


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path) -> str:
    """The same test on a local run folder and on an S3 one."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_run")


def _write_chunks(store: StatsStore, epoch: int, chunks: range) -> None:
    """Write `chunks` of `epoch` with `_values`, as the one writer owning them."""
    writer = ChunkWriter(store, chunks, epoch)
    rows = np.arange(chunks.start * store.chunk_rows, min(chunks.stop * store.chunk_rows, store.n_samples))
    writer.add(rows, stat_values(rows, epoch))
    writer.flush()


def test_a_stats_store_on_s3_is_committed_whole_and_reopened(run_index, s3_run):
    output = f"{s3_run}/stats.zarr"
    assert not store_exists(output)
    store = StatsStore.create(output, run_index, epochs=2, chunk_rows=CHUNK_ROWS, config={"lr": 0.1})
    generation = storage.name(commit.committed(output))
    assert storage.names(output) == [commit.COMMIT, generation]
    assert store.path == output and store.root == storage.join(output, generation)
    assert store_exists(output)
    again = StatsStore.create(output, run_index, epochs=2, chunk_rows=CHUNK_ROWS)  # reopened, not rebuilt
    assert storage.names(output) == [commit.COMMIT, generation]
    assert again.config == {"lr": 0.1} and again.fingerprint == run_index.fingerprint
    assert np.array_equal(again.read("id_lo"), np.asarray(run_index.id_lo))
    with pytest.raises(ValueError, match="has 2 epochs, not 3"):
        StatsStore.create(output, run_index, epochs=3, chunk_rows=CHUNK_ROWS)


def test_a_half_created_stats_store_on_s3_is_never_opened_and_the_next_create_replaces_it(run_index, s3_run):
    output = f"{s3_run}/stats.zarr"
    killed = storage.join(output, "g-00000000000000000001-deadbeef")
    _build(killed, run_index, 2, CHUNK_ROWS, {})  # what a create killed before its COMMIT leaves
    assert not store_exists(output)
    with pytest.raises(FileNotFoundError, match="no stats store at .*stats.zarr"):
        StatsStore.open(output)
    store = StatsStore.create(output, run_index, epochs=2, chunk_rows=CHUNK_ROWS)
    assert storage.names(output) == [commit.COMMIT, storage.name(store.root)]  # the leftover is gone
    assert store.root != killed and store.n_samples == run_index.n_samples


def test_something_that_is_no_stats_store_is_refused_not_replaced(run_index, run_root):
    output = storage.join(run_root, "stats.zarr")
    with commit.replacing(output) as place:
        storage.write_bytes(storage.join(place, "notes.txt"), b"not a store")
    with pytest.raises(DamagedRunError, match="holds no stats store"):
        StatsStore.create(output, run_index, epochs=1)
    assert storage.read_bytes(storage.join(commit.committed(output), "notes.txt")) == b"not a store"


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_chunks_are_listed_named_and_checked_alike_locally_and_on_s3(run_index, run_root):
    output = storage.join(run_root, "stats.zarr")
    store = StatsStore.create(output, run_index, epochs=2, chunk_rows=CHUNK_ROWS)
    _write_chunks(store, 0, range(store.n_chunks))
    _write_chunks(store, 1, range(3))  # chunk 3 of epoch 1 is never written
    _write_chunks(store, 1, range(4, store.n_chunks))
    store.mark_done(0, np.arange(store.n_shards))
    store.mark_done(1, np.arange(store.n_shards))
    reader = StatsStore.open(output, mode="r", index=run_index)
    assert reader.done().all() and reader.complete_epochs() == 2
    present = reader.present_chunks("loss")
    assert present.shape == (reader.n_chunks, 2) and present[:, 0].all()
    assert np.flatnonzero(~present[:, 1]).tolist() == [3]
    assert reader.present_chunks("id_hi").all()
    assert reader.missing_chunks() == [(name, 3, 1) for name in STATS]
    with pytest.raises(DamagedRunError, match=r"chunk p_true/c/3/1 \(rows \[192, 256\), epoch 1\).* is missing"):
        reader.check_chunks()
    reader.check_chunks(epochs=1)  # epoch 0 is whole
    _write_chunks(StatsStore.open(output), 1, range(3, 4))  # by another handle, after the listing
    assert storage.exists(reader.chunk_path("loss", 3, 1))  # no stale listing answers
    reader.check_chunks()
    chunk = reader.chunk_path("el2n", 5, 0)
    assert isinstance(chunk, str) and chunk.startswith(reader.root) and storage.exists(chunk)
    storage.remove(chunk)
    assert ("el2n", 5, 0) in StatsStore.open(output, mode="r").missing_chunks()
    rows = np.arange(reader.n_samples)
    assert np.array_equal(reader.read("margin")[:, 0], stat_values(rows, 0)["margin"])


def test_damaged_array_metadata_on_s3_is_named(run_index, s3_run):
    output = f"{s3_run}/stats.zarr"
    store = StatsStore.create(output, run_index, epochs=1, chunk_rows=CHUNK_ROWS)
    storage.write_bytes(storage.join(store.root, "el2n", "zarr.json"), b"{not json")
    with pytest.raises(DamagedRunError, match=r"stats.zarr/el2n/zarr.json: array el2n: zarr.json is unreadable"):
        StatsStore.open(output)


def _write_owned(output: str, writer: int, n_writers: int, epoch: int, barrier) -> tuple[float, float, int]:
    """One writer process (as a Ray `ChunkOwner`): its own handle, its own chunks, written in shuffled
    batches once every writer is ready. Returns when it wrote (start, end) and how many rows it wrote."""
    store = StatsStore.open(output)
    chunks = store.owned_chunks(writer, n_writers)
    rows = np.arange(chunks.start * store.chunk_rows, min(chunks.stop * store.chunk_rows, store.n_samples))
    chunk_writer = ChunkWriter(store, chunks, epoch)
    barrier.wait()
    start = time.time()
    for part in np.array_split(np.random.default_rng(writer).permutation(rows), 9):
        chunk_writer.add(part, stat_values(part, epoch))
    chunk_writer.flush()
    return start, time.time(), chunk_writer.rows_written


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_two_writers_on_s3_write_their_own_chunks_concurrently_and_exactly(run_index, s3_run):
    output = f"{s3_run}/stats.zarr"
    store = StatsStore.create(output, run_index, epochs=1, chunk_rows=CHUNK_ROWS)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(2, mp_context=context) as pool:
        barrier = manager.Barrier(2)
        runs = [pool.submit(_write_owned, output, w, 2, 0, barrier) for w in range(2)]
        (start_a, end_a, rows_a), (start_b, end_b, rows_b) = (r.result(timeout=300) for r in runs)
    assert start_a < end_b and start_b < end_a  # the two wrote at the same time
    assert rows_a + rows_b == store.n_samples
    reader = StatsStore.open(output, mode="r", index=run_index)
    rows = np.arange(reader.n_samples)
    for name in STATS:
        assert np.array_equal(reader.read(name)[:, 0], stat_values(rows, 0)[name]), name
    assert reader.present_chunks("p_true").all()


def test_a_writer_on_s3_is_refused_a_chunk_it_does_not_own(run_index, s3_run):
    output = f"{s3_run}/stats.zarr"
    StatsStore.create(output, run_index, epochs=1, chunk_rows=CHUNK_ROWS)
    store = StatsStore.open(output)  # a writer's own handle
    owned = store.owned_chunks(1, 2)
    writer = ChunkWriter(store, owned, 0)
    theirs = np.array([0, 1])  # rows of chunk 0, writer 0's
    with pytest.raises(OwnershipError, match=f"not in chunks {owned.start}..{owned.stop - 1} owned by this writer"):
        writer.add(theirs, stat_values(theirs, 0))
    mine = np.arange(owned.start * CHUNK_ROWS, owned.start * CHUNK_ROWS + 2)
    writer.add(mine, stat_values(mine, 0))
    with pytest.raises(OwnershipError, match=f"row {mine[0]} recorded twice"):
        writer.add(mine[:1], stat_values(mine[:1], 0))
    assert not StatsStore.open(output, mode="r").present_chunks("p_true")[0, 0]  # nothing reached chunk 0


def _replace_scores(output: str, value: float, fail: bool = False) -> np.ndarray | None:
    """Replace the scores at `output` with `value` everywhere, block by block as reduce's tasks do
    (each opens the store being built by its place); return what a reader of `output` saw meanwhile
    (None: nothing committed yet). `fail`: stop with an error after the first block."""
    with commit.replacing(output) as place:
        built = ScoresStore.create(place, 100, 40)
        for r0 in range(0, 100, 40):
            r1 = min(r0 + 40, 100)
            ScoresStore.open(place, "r+").write_block(r0, r1, {"mean_p": np.full(r1 - r0, value)})
            if fail:
                raise RuntimeError("a scoring task failed")
        built.set_attrs({"scores": ["mean_p"], "block_rows": 40})
        try:
            return ScoresStore.open(output).read("mean_p")
        except FileNotFoundError:
            return None


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_scores_are_replaced_whole_so_readers_see_the_old_or_the_new(run_root):
    output = storage.join(run_root, "scores.zarr")
    assert _replace_scores(output, 1.0) is None
    scores = ScoresStore.open(output)
    assert scores.scores == ["mean_p"] and (scores.read("mean_p") == 1.0).all()
    assert np.isnan(scores.read("dual")).all()  # never written: the fill value
    seen = _replace_scores(output, 2.0)
    assert seen is not None and (seen == 1.0).all()  # during the replacement: the old scores, whole
    assert (ScoresStore.open(output).read("mean_p") == 2.0).all()
    before = storage.names(run_root), storage.names(output)
    with pytest.raises(RuntimeError, match="a scoring task failed"):
        _replace_scores(output, 3.0, fail=True)
    assert (ScoresStore.open(output).read("mean_p") == 2.0).all()
    assert (storage.names(run_root), storage.names(output)) == before  # no temporary, no generation left
    chunk = ScoresStore.open(output).chunk_path("mean_p", 2)
    assert chunk.startswith(commit.committed(output)) and storage.exists(chunk)
