"""Recording from your own training loop (StatsLogger, IndexedShards): real Fashion-MNIST shards,
real training steps, real Zarr stores; one process, and two ranks under torchrun."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamprune import IndexedShards, StatsLogger, index_in_process
from streamprune.errors import SettingsError
from streamprune.formats.index import Index
from streamprune.formats.sources import shard_urls
from streamprune.formats.stats_store import STATS, OwnershipError, StatsStore
from streamprune.scoring.sampling import keep_count
from streamprune.shards.labels import BadSample
from streamprune.training.decode import SampleDecoder, ToTensors, View
from streamprune.training.models import small_cnn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_training_loop.py"
CHUNK_ROWS = 128  # several chunks, so that two ranks each own some


@pytest.fixture(scope="module")
def shards(uneven_shards):
    """377 real images in three uneven shards (83, 131, 163 samples)."""
    paths, sizes = uneven_shards
    return [paths[2], paths[4], paths[5]], sizes[2] + sizes[4] + sizes[5]


def _true_labels(run: Path, fmnist_labels: np.ndarray) -> np.ndarray:
    idx = Index(run / "index")  # keys are the images' positions in Fashion-MNIST
    keys = [int(k) for s in range(idx.n_shards) for k in idx.keys(s)]
    return fmnist_labels[keys].astype(np.int32)


def _check_complete(run: Path, epochs: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    store = StatsStore.open(run / "stats.zarr", mode="r")
    got = {n: store.read(n) for n in STATS}
    assert store.done().all() and store.complete_epochs() == epochs and got["p_true"].shape[1] == epochs
    assert np.isfinite(got["p_true"]).all() and ((got["p_true"] >= 0) & (got["p_true"] <= 1)).all()
    assert set(np.unique(got["correct"])) <= {0, 1} and np.isfinite(got["margin"]).all()
    np.testing.assert_allclose(got["loss"], -np.log(np.maximum(got["p_true"], 1e-30)), rtol=1e-3, atol=1e-4)
    assert np.array_equal(store.labels(), labels)
    assert not (run / ".stats-spool").exists()
    return got


def _train(
    run: Path, epochs: int, *, interrupt_at: tuple[int, int] | None = None, spool_rows: int = 100, num_workers: int = 0
) -> StatsLogger:
    """A plain single-process loop; `interrupt_at=(epoch, step)` returns there, without end_epoch
    (what a killed process leaves)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = IndexedShards(run, ToTensors(seed=0), shuffle_buffer=200)
    net = small_cnn(10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    logger = StatsLogger(run, epochs, config={"lr": 0.05}, chunk_rows=CHUNK_ROWS, spool_rows=spool_rows)
    for epoch in range(logger.start_epoch, epochs):
        data.set_epoch(epoch)
        logger.begin_epoch(epoch)
        for step, (x, y, rows) in enumerate(torch.utils.data.DataLoader(data, batch_size=64, num_workers=num_workers)):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logger.log(rows, logits, y)
            if (epoch, step) == interrupt_at:
                return logger
        assert len(logger.end_epoch()) == 0
    return logger


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    paths, n = shards
    run = tmp_path_factory.mktemp("own") / "run"
    index_in_process(paths, run)
    _train(run, 2, num_workers=1)
    return run


def test_single_process_records_every_row_once_per_epoch_and_reduce_works(
    single, shards, fmnist, ray_session, tmp_path
):
    import streamprune

    run, (paths, n) = single, shards
    got = _check_complete(run, 2, _true_labels(run, fmnist[1]))
    assert got["p_true"].shape == (n, 2)
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.config["recorder"] == "own-loop" and store.config["lr"] == 0.05 and store.chunk_rows == CHUNK_ROWS
    assert StatsLogger(run, 2).start_epoch == 2  # nothing left to do
    with pytest.raises(ValueError, match="other settings .*lr"):
        StatsLogger(run, 2, config={"lr": 0.5})
    # the index made in-process (no Ray) is the index `streamprune index` makes
    assert Index(run / "index").fingerprint == streamprune.index(paths, tmp_path / "ray", progress=False).fingerprint
    keep = streamprune.reduce(run, ratio=0.5, method="dual-beta", window=2, progress=False)
    assert len(keep) == keep_count(n, 0.5) and keep.manifest["dropped_missing"] == 0


def test_two_ranks_under_torchrun(shards, fmnist, ray_session, tmp_path):
    import streamprune

    paths, n = shards
    run = tmp_path / "run"
    spec = "::".join(paths)
    args = [
        "--shards",
        spec,
        "--run-dir",
        str(run),
        "--epochs",
        "2",
        "--chunk-rows",
        str(CHUNK_ROWS),
        "--loader-workers",
        "1",
        "--batch-size",
        "64",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-12000:]
    assert f"epoch 1: {n} samples" in done.stdout and "complete epochs: 2 of 2" in done.stdout, done.stdout
    _check_complete(run, 2, _true_labels(run, fmnist[1]))
    assert (run / "checkpoints" / "epoch-0002.pt").exists()
    keep = streamprune.reduce(run, ratio=0.5, method="dual-beta", window=2, progress=False)
    assert len(keep) == keep_count(n, 0.5) and keep.manifest["dropped_missing"] == 0
    # rerun (single process): resumes at the first incomplete epoch, here none
    spec_ = importlib.util.spec_from_file_location("own_training_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(example)
    before = StatsStore.open(run / "stats.zarr", mode="r").read("p_true")
    example.main(args)
    assert np.array_equal(StatsStore.open(run / "stats.zarr", mode="r").read("p_true"), before)


def test_a_row_logged_twice_is_refused(single, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    logger = StatsLogger(run, 2)
    logger.begin_epoch(1)
    x, y, rows = next(iter(torch.utils.data.DataLoader(IndexedShards(run, ToTensors(seed=0)), batch_size=8)))
    logits = small_cnn(10, 1, 28)(x)
    logger.log(rows, logits, y)
    logger.log(rows[:3], logits[:3], y[:3])  # e.g. a sample read twice
    with pytest.raises(
        OwnershipError,
        match=rf"row {int(rows[:3].min())} \(shard .* key .*\) was logged twice "
        rf"in epoch 1 .*exactly once per epoch",
    ):
        logger.end_epoch()
    assert logger.complete_epochs() == 1  # unmarked when it began again; nothing marked after the error


def _padded_ranks(rank: int, world: int, run: str, rdzv: str, out: str) -> None:
    """Two ranks logging DistributedSampler's indices: padding repeats a row on the last rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        logger = StatsLogger(run, 2)
        n = logger.store.n_samples
        rows = torch.tensor(list(torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=False)))
        logger.begin_epoch(1)
        logger.log(rows, torch.randn(len(rows), 10), torch.randint(0, 10, (len(rows),)))
        try:
            logger.end_epoch()
            message = "no error"
        except OwnershipError as exc:
            message = f"OwnershipError: {exc}"
        Path(out, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_distributed_sampler_padding_is_refused_on_every_rank(single, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    n = Index(run / "index").n_samples
    assert n % 2 == 1  # DistributedSampler pads rank 1 with row 0, which rank 0 also has
    torch.multiprocessing.start_processes(
        _padded_ranks, args=(2, str(run), str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("OwnershipError") and "row 0 (shard" in message, message
        assert "logged twice in epoch 1" in message and "DistributedSampler" in message, message
    assert StatsStore.open(run / "stats.zarr", mode="r").complete_epochs() == 1


def test_an_interrupted_epoch_is_redone_and_the_result_is_complete(single, fmnist, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    store = StatsStore.open(run / "stats.zarr")
    before = store.read("p_true")
    # a run killed in its last epoch: half its rows written, no markers ...
    store.group["p_true"][: store.n_samples // 2, 1] = np.full(store.n_samples // 2, np.nan, np.float32)
    store.group["done"][1, :] = np.zeros(store.n_shards, np.uint8)
    # ... and a resumed attempt killed too, after spooling some parts (a logger dropped without end_epoch)
    first = _train(run, 2, interrupt_at=(1, 2), spool_rows=50)
    assert first.start_epoch == 1 and any((run / ".stats-spool" / "epoch-0001").iterdir())
    logger = _train(run, 2)  # stale parts of the killed attempt are discarded, not logged twice
    assert logger.start_epoch == 1 and logger.complete_epochs() == 2
    after = _check_complete(run, 2, _true_labels(run, fmnist[1]))
    assert np.array_equal(after["p_true"][:, 0], before[:, 0])  # the complete epoch is untouched


def _bad_sevens(sample: dict):
    """ToTensors, except that samples whose key ends in 7 cannot be decoded."""
    if sample["__key__"].endswith("7"):
        raise BadSample(f"sample {sample['__key__']!r}: cannot decode (test)")
    return ToTensors(do_augment=False)(sample)


def test_ranks_and_workers_read_every_row_once_and_undecodable_samples_are_skipped_as_record_does(single, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    idx = Index(run / "index")
    keys = np.array([k for s in range(idx.n_shards) for k in idx.keys(s)])
    bad = np.flatnonzero(np.char.endswith(keys, "7"))
    logger = StatsLogger(run, 2)
    logger.begin_epoch(1)
    seen = []
    for rank in (0, 1):  # two ranks' datasets, two DataLoader workers each, logged by one process
        data = IndexedShards(run, _bad_sevens, epoch=1, rank=rank, world_size=2, seed=3)
        for _x, y, rows in torch.utils.data.DataLoader(data, batch_size=32, num_workers=2):
            seen.append(rows.numpy())
            logger.log(rows, torch.randn(len(rows), 10), y)
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen)) and np.array_equal(
        np.sort(np.concatenate([seen, bad])), np.arange(idx.n_samples)
    )
    assert len(logger.end_epoch()) == 0  # skipped rows count as given: their shards complete
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.done().all()
    p_true = store.read("p_true")[:, 1]
    assert np.isnan(p_true[bad]).all() and np.isfinite(np.delete(p_true, bad)).all()
    listed = [json.loads(line) for line in (run / "bad-samples.jsonl").read_text().splitlines()]
    assert sorted(e["row"] for e in listed) == bad.tolist() and {e["epoch"] for e in listed} == {1}
    assert all(e["key"] == keys[e["row"]] and "cannot decode" in e["reason"] for e in listed)


class _OddSamples:
    """A transform of `record`'s form `(sample, rng)` (a SampleDecoder at the images' own size): keys
    ending in 7 cannot be decoded, and those ending in 3 decode one row short."""

    def __init__(self):
        self.decoder = SampleDecoder(View(1, 28, 28, False), "cls")

    def __call__(self, sample: dict, rng: np.random.Generator | None):
        key = sample["__key__"]
        if key.endswith("7"):
            raise BadSample(f"sample {key!r}: cannot decode (test)")
        x, y = self.decoder(sample, rng)
        return (x[:, 1:] if key.endswith("3") else x), y


def test_record_s_form_placeholders_and_augmentations_seeded_by_shard_whatever_the_workers(single, tmp_path):
    """What `record`'s workers read: a placeholder `(zeros, -1, row)` for each undecodable sample or
    one of another shape (listed in bad-samples.jsonl), and augmentations seeded by (seed, epoch,
    shard), so that every row's example is the same however many DataLoader workers read it."""
    run = tmp_path / "run"
    shutil.copytree(single, run)
    idx = Index(run / "index")
    keys = np.array([k for s in range(idx.n_shards) for k in idx.keys(s)])
    bad = np.char.endswith(keys, "7") | np.char.endswith(keys, "3")
    got = []
    for workers in (0, 2):
        data = IndexedShards(
            run,
            _OddSamples(),
            epoch=1,
            rank=0,
            world_size=1,
            seed=3,
            on_bad_sample="placeholder",
            shape=(1, 28, 28),
            shard_seeded=True,
            urls=shard_urls(idx),  # resolved already, as record's driver hands them over
        )
        examples = {}
        for x, y, rows in torch.utils.data.DataLoader(data, batch_size=32, num_workers=workers):
            examples |= {int(r): (xi, int(yi)) for xi, yi, r in zip(x, y, rows, strict=True)}
        assert sorted(examples) == list(range(idx.n_samples))  # every row once, placeholders included
        assert all((examples[r][1] == -1) == bad[r] for r in examples)
        assert all(not examples[r][0].any() for r in np.flatnonzero(bad))
        got.append(examples)
    assert all(torch.equal(got[0][r][0], got[1][r][0]) for r in got[0])
    listed = [json.loads(line) for line in (run / "bad-samples.jsonl").read_text().splitlines()]
    assert sorted(e["row"] for e in listed) == sorted(2 * np.flatnonzero(bad).tolist())
    assert all(("decoded to shape" in e["reason"]) == e["key"].endswith("3") for e in listed)
    with pytest.raises(BadSample, match="on_bad_sample='skip' skips such samples"):
        list(IndexedShards(run, _OddSamples(), shape=(1, 28, 28), shard_seeded=True, on_bad_sample="error"))
    with pytest.raises(SettingsError, match="needs the examples' shape"):
        IndexedShards(run, _OddSamples(), on_bad_sample="placeholder")
    with pytest.raises(SettingsError, match="not both"):
        IndexedShards(run, shards=shard_urls(idx), urls=shard_urls(idx))


def test_the_api_imports_no_ray_and_an_epoch_starts_none(single, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    code = (
        "import sys, torch, streamprune; assert 'streamprune.training.own_loop' not in sys.modules; "
        "from streamprune import StatsLogger, IndexedShards; assert 'ray' not in sys.modules, 'imported ray'; "
        f"logger = StatsLogger({str(run)!r}, 2); logger.begin_epoch(1); "
        f"data = IndexedShards({str(run)!r}, lambda s: (0, int(s['cls'])), epoch=1); "
        "rows = torch.tensor([r for _, _, r in data]); "
        "logger.log(rows, torch.randn(len(rows), 10), torch.zeros(len(rows), dtype=torch.long)); "
        "assert len(logger.end_epoch()) == 0 and logger.complete_epochs() == 2; "
        "assert 'ray' not in sys.modules or not sys.modules['ray'].is_initialized(), 'started ray'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
