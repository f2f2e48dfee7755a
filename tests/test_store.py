"""The Zarr stats store: round trip, missing values, ownership, concurrent writers, markers."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from stat_values import stat_values

from streamprune.formats.stats_store import STATS, ChunkWriter, OwnershipError, StatsStore
from streamprune.stages.record_writers import StoreWriters


@pytest.fixture
def run_index(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    return make_index(paths, tmp_path)


def test_round_trip_all_six_statistics_with_missing_marked(run_index, tmp_path):
    store = StatsStore.create(tmp_path / "stats.zarr", run_index, epochs=3, chunk_rows=128, config={"lr": 0.1})
    n = store.n_samples
    assert store.n_chunks == -(-n // 128) and n % 128 != 0  # a short last chunk
    rng = np.random.default_rng(0)
    missing = np.array([5, 130, n - 1])
    for epoch in range(3):
        writer = ChunkWriter(store, range(store.n_chunks), epoch)
        rows = rng.permutation(np.setdiff1d(np.arange(n), missing))
        for part in np.array_split(rows, 17):
            writer.add(part, stat_values(part, epoch))
        assert np.array_equal(writer.flush(), missing)
    again = StatsStore.open(tmp_path / "stats.zarr", mode="r", index=run_index)
    assert again.config == {"lr": 0.1} and again.fingerprint == run_index.fingerprint
    assert np.array_equal(again.read("id_hi", slice(None)), np.asarray(run_index.id_hi))
    present = np.setdiff1d(np.arange(n), missing)
    for name in STATS:
        got = again.read(name)
        assert got.shape == (n, 3) and got.dtype == (np.uint8 if name == "correct" else np.float32)
        for epoch in range(3):
            assert np.array_equal(got[present, epoch], stat_values(present, epoch)[name]), name
        if name == "correct":
            assert (got[missing] == 255).all()
        else:
            assert np.isnan(got[missing]).all()
    blocks = list(again.iter_blocks(block_rows=300))
    assert [b.start for b in blocks] == list(range(0, n, 384))
    assert np.array_equal(np.concatenate([b.data["loss"] for b in blocks]), again.read("loss"), equal_nan=True)


def test_writer_refuses_rows_it_does_not_own_and_rows_twice(run_index, tmp_path):
    store = StatsStore.create(tmp_path / "stats.zarr", run_index, epochs=1, chunk_rows=100)
    owned = store.owned_chunks(1, 3)
    writer = ChunkWriter(store, owned, 0)
    inside = np.arange(owned.start * 100, owned.start * 100 + 3)
    writer.add(inside, stat_values(inside, 0))
    with pytest.raises(OwnershipError, match="not in chunks"):
        writer.add(np.array([0]), stat_values(np.array([0]), 0))
    with pytest.raises(OwnershipError, match="recorded twice"):
        writer.add(inside[:1], stat_values(inside[:1], 0))
    # The writers' chunk ranges partition the store.
    parts = [store.owned_chunks(w, 5) for w in range(5)]
    assert sum((list(p) for p in parts), []) == list(range(store.n_chunks))


def test_store_for_another_index_is_refused(run_index, make_index, uneven_shards, tmp_path):
    StatsStore.create(tmp_path / "stats.zarr", run_index, epochs=2)
    other = make_index(uneven_shards[0][:2], tmp_path / "other")
    with pytest.raises(ValueError, match="made for another index"):
        StatsStore.create(tmp_path / "stats.zarr", other, epochs=2)
    with pytest.raises(ValueError, match="has 2 epochs, not 3"):
        StatsStore.create(tmp_path / "stats.zarr", run_index, epochs=3)


@ray.remote
def _produce(writers: StoreWriters, rows: np.ndarray, epoch: int, batch: int) -> int:
    refs = []
    for part in np.array_split(rows, max(1, len(rows) // batch)):
        refs += writers.add(part, stat_values(part, epoch))
    ray.get(refs)
    return len(rows)


def test_concurrent_producers_lose_nothing(ray_session, run_index, tmp_path):
    """Four producer processes hand interleaved rows to three owner actors; every value lands.

    Each chunk receives rows from every producer, so any writer that wrote partial chunks
    directly would lose data (zarr-python issue 3682) and this test would fail.
    """
    store = StatsStore.create(tmp_path / "stats.zarr", run_index, epochs=2, chunk_rows=64)
    writers = StoreWriters(tmp_path / "stats.zarr", n_writers=3)
    n = store.n_samples
    rng = np.random.default_rng(1)
    for epoch in range(2):
        writers.begin(epoch)
        rows = rng.permutation(n)
        if epoch == 1:
            rows = rows[rows != 7]  # one sample lost in epoch 1: its shard must stay incomplete
        counts = ray.get([_produce.remote(writers, part, epoch, 25) for part in np.array_split(rows, 4)])
        assert sum(counts) == len(rows)
        missing = writers.finish(epoch)
        assert missing.tolist() == ([] if epoch == 0 else [7])
    store = StatsStore.open(tmp_path / "stats.zarr", mode="r")
    for name in STATS:
        got = store.read(name)
        for epoch in range(2):
            rows = np.arange(n) if epoch == 0 else np.setdiff1d(np.arange(n), [7])
            assert np.array_equal(got[rows, epoch], stat_values(rows, epoch)[name]), (name, epoch)
    assert np.isnan(store.read("p_true")[7, 1])
    done = store.done()
    assert done[0].all() and not done[1, 0] and done[1, 1:].all()
    assert store.complete_epochs() == 1
