"""Recording on Ray Train: real DDP training on uneven real shards, faults and resume."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from streamprune import index
from streamprune.cli.main import main
from streamprune.errors import SettingsError
from streamprune.formats.stats_store import STATS, StatsStore
from streamprune.stages.record import record
from streamprune.training.samples import assign_shards
from streamprune.training.stats import sample_stats

EPOCHS = 3


def _check_complete(run, epochs: int) -> dict[str, np.ndarray]:
    store = StatsStore.open(run / "stats.zarr", mode="r")
    got = {n: store.read(n) for n in STATS}
    assert store.done().all() and store.complete_epochs() == epochs
    assert not np.isnan(got["p_true"]).any() and (got["correct"] != 255).all()
    assert ((got["p_true"] >= 0) & (got["p_true"] <= 1)).all()
    assert np.isfinite(got["margin"]).all() and set(np.unique(got["correct"])) <= {0, 1}
    assert ((got["el2n"] >= 0) & (got["el2n"] <= np.sqrt(2) + 1e-5)).all() and (got["entropy"] >= -1e-6).all()
    np.testing.assert_allclose(got["loss"], -np.log(np.maximum(got["p_true"], 1e-30)), rtol=1e-3, atol=1e-4)
    assert np.array_equal(got["correct"] == 1, got["margin"] > 0)
    return got


@pytest.fixture(scope="module")
def recorded(ray_session, uneven_shards, tmp_path_factory):
    paths, sizes = uneven_shards
    run = tmp_path_factory.mktemp("run")
    index(paths, run, progress=False)
    summary = record(run, EPOCHS, workers=2, schedule_epochs=10, loader_workers=1, chunk_rows=256, progress=False)
    return run, summary, sizes


def test_every_sample_recorded_once_per_epoch_and_learning(recorded, fmnist):
    run, summary, sizes = recorded
    fmnist_labels = fmnist[1]
    assert summary.epochs_run == list(range(EPOCHS)) and summary.samples == EPOCHS * sum(sizes)
    assert len(summary.samples_per_s_per_worker) == 2 * EPOCHS
    got = _check_complete(run, EPOCHS)
    assert got["p_true"].shape == (sum(sizes), EPOCHS)
    means = got["p_true"].mean(axis=0)
    assert means[-1] > means[0] + 0.1, means
    assert got["correct"][:, -1].mean() > 0.5  # 10 classes: well above chance after 3 epochs
    store = StatsStore.open(run / "stats.zarr", mode="r")  # each row's label, as trained on
    assert np.array_equal(store.labels(), fmnist_labels[: sum(sizes)].astype(np.int32))


def test_rerun_of_a_finished_run_does_nothing(recorded):
    run, _, _ = recorded
    before = StatsStore.open(run / "stats.zarr", mode="r").read("p_true")
    assert record(run, EPOCHS, workers=2, schedule_epochs=10, progress=False).epochs_run == []
    assert np.array_equal(StatsStore.open(run / "stats.zarr", mode="r").read("p_true"), before)
    with pytest.raises(ValueError, match="other settings .*lr"):
        record(run, EPOCHS, workers=2, schedule_epochs=10, lr=0.5, progress=False)


def test_interrupted_run_resumes_at_first_incomplete_epoch(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded[0], run)
    store = StatsStore.open(run / "stats.zarr")
    before = {n: store.read(n) for n in STATS}
    # The state a run killed during the last epoch leaves: its rows partly written, no markers.
    store.group["p_true"][: store.n_samples // 2, EPOCHS - 1] = np.full(store.n_samples // 2, np.nan, np.float32)
    store.group["done"][EPOCHS - 1, :] = np.zeros(store.n_shards, np.uint8)
    summary = record(run, EPOCHS, workers=2, schedule_epochs=10, loader_workers=1, progress=False)
    assert summary.epochs_run == [EPOCHS - 1]
    after = _check_complete(run, EPOCHS)
    for n in STATS:
        assert np.array_equal(after[n][:, : EPOCHS - 1], before[n][:, : EPOCHS - 1]), n
    # the resumed epoch starts from rank 0's checkpoint, which every rank also holds after an
    # uninterrupted epoch: the same statistics, so the same keep-list
    for n in STATS:
        assert np.array_equal(after[n], before[n], equal_nan=True), n
    from streamprune import reduce

    a = reduce(recorded[0], 0.5, "dual-beta", window=3, out=tmp_path / "a", progress=False)
    b = reduce(run, 0.5, "dual-beta", window=3, out=tmp_path / "b", progress=False)
    assert np.array_equal(np.asarray(a.id_pairs), np.asarray(b.id_pairs))


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes, found by the process title Ray gives them."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_worker_killed_mid_run_recovers_with_a_full_store(ray_session, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    index(paths, tmp_path, progress=False)
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            s=record(tmp_path, 4, workers=2, schedule_epochs=10, loader_workers=1, chunk_rows=256, progress=False)
        )
    )
    thread.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
        try:
            done = StatsStore.open(tmp_path / "stats.zarr", mode="r").done()
        except (FileNotFoundError, ValueError):
            continue
        if done[0].all() and not done[1].all():
            workers = _train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
    thread.join(600)
    assert killed is not None, "the run finished before a worker could be killed"
    assert "s" in result, "record did not finish after the worker was killed"
    _check_complete(tmp_path, 4)


def test_sample_stats_matches_definitions():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 7)).astype(np.float32) * 3
    y = rng.integers(0, 7, 64)
    got = sample_stats(z, y)
    assert got == {} or set(got) == set(STATS)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    onehot = np.eye(7)[y]
    others = np.where(onehot == 1, -np.inf, z)
    expected = {
        "p_true": q[np.arange(64), y],
        "correct": (z.argmax(1) == y).astype(np.uint8),
        "margin": z[np.arange(64), y] - others.max(1),
        "el2n": np.linalg.norm(q - onehot, axis=1),
        "entropy": -(q * np.log(q)).sum(1),
        "loss": -np.log(q[np.arange(64), y]),
    }
    for n in STATS:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-5, err_msg=n)
    assert got["correct"].dtype == np.uint8 and got["p_true"].dtype == np.float32
    torch_in = sample_stats(torch.from_numpy(z), torch.from_numpy(y))
    for n in STATS:
        assert np.array_equal(torch_in[n], got[n])
    with pytest.raises(ValueError, match="logits must be"):
        sample_stats(z[0], y)


def test_assign_shards_balances_counts_and_covers_each_shard_once():
    counts = np.array([363, 192, 85, 74, 446, 492, 348, 10, 0, 120])
    ids = np.arange(10) * 3
    for epoch in range(5):
        parts = assign_shards(counts, ids, 3, seed=1, epoch=epoch)
        assert sorted(np.concatenate(parts).tolist()) == sorted(ids.tolist())
        loads = [counts[p // 3].sum() for p in parts]
        assert max(loads) - min(loads) <= 2 * counts.max()
    assert not np.array_equal(
        np.concatenate(assign_shards(counts, ids, 3, 1, 0)), np.concatenate(assign_shards(counts, ids, 3, 1, 1))
    )


def _shards_with_bad_samples(out, fmnist, png_claiming) -> tuple[list[str], dict[str, str]]:
    """Two real shards with three bad samples (not an image, no label, a decompression bomb) and one
    image of another size, which is resized, not skipped."""
    import webdataset as wds

    from streamprune.demo.datasets import encode_png

    images, labels = fmnist
    out.mkdir()
    bad = {"00000005": "cannot decode", "00000012": "no .cls member", "00000031": "decompression bomb"}
    paths = []
    for s in range(2):
        path = str(out / f"bad-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(s * 30, s * 30 + 30):
                key = f"{i:08d}"
                sample = {"__key__": key, "png": encode_png(images[i]), "cls": str(int(labels[i])).encode()}
                if key == "00000005":
                    sample["png"] = b"this is not a PNG"
                elif key == "00000012":
                    del sample["cls"]
                elif key == "00000031":
                    sample["png"] = png_claiming(100_000, 100_000)
                elif key == "00000040":
                    sample["png"] = encode_png(np.zeros((14, 14), np.uint8))
                w.write(sample)
        paths.append(path)
    return paths, bad


def test_undecodable_samples_are_skipped_counted_and_listed_or_refused(ray_session, tmp_path, fmnist, png_claiming):
    import json

    from streamprune import reduce

    paths, bad = _shards_with_bad_samples(tmp_path / "shards", fmnist, png_claiming)
    run = tmp_path / "run"
    idx = index(paths, run, progress=False)
    # whichever rank meets its bad sample first stops the run, naming sample, shard and reason
    with pytest.raises(
        ValueError,
        match=r"sample '(00000005|00000012|00000031)' of .*bad-00000[01]\.tar.*"
        r"(cannot decode|no .cls member|decompression bomb).*on_bad_sample='skip'",
    ):
        record(
            run, 2, workers=2, schedule_epochs=10, num_classes=10, on_bad_sample="error", max_failures=0, progress=False
        )
    shutil.rmtree(run / "stats.zarr")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    summary = record(run, 2, workers=2, schedule_epochs=10, num_classes=10, max_failures=0, progress=False)
    assert summary.bad_samples == 3
    listed = [json.loads(line) for line in (run / "bad-samples.jsonl").open()]
    assert {e["key"] for e in listed} == set(bad) and all(bad[e["key"]] in e["reason"] for e in listed)
    assert {e["shard"] for e in listed} == {"bad-000000.tar", "bad-000001.tar"}
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.complete_epochs() == 2  # skipped samples do not leave the epoch incomplete
    rows = sorted(e["row"] for e in listed)
    p = store.read("p_true")
    assert np.isnan(p[rows]).all() and np.isfinite(np.delete(p, rows, axis=0)).all()
    assert np.isfinite(p[40]).all()  # the 14 x 14 image was resized to the run's 28 x 28
    assert (store.read("correct")[rows] == 255).all()
    keep = reduce(run, 0.5, "dual-beta", window=2, progress=False)
    assert keep.manifest["dropped_missing"] == 3 and idx.n_samples == 60


def test_a_label_outside_the_class_range_stops_the_run_naming_it(ray_session, tmp_path, fmnist):
    import webdataset as wds

    from streamprune.demo.datasets import encode_png

    images, labels = fmnist
    (tmp_path / "shards").mkdir()
    path = str(tmp_path / "shards" / "labels-000000.tar")
    with wds.TarWriter(path) as w:
        for i in range(40):
            w.write(
                {
                    "__key__": f"{i:08d}",
                    "png": encode_png(images[i]),
                    "cls": b"12" if i == 7 else str(int(labels[i])).encode(),
                }
            )
    index([path], tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"00000007.*labels-000000.tar.*label 12 is outside \[0, 10\)"):
        record(tmp_path / "run", 1, workers=1, schedule_epochs=5, num_classes=10, max_failures=0, progress=False)


def _cli(*argv: str) -> list[str]:
    """The `streamprune` command line run by another Python process."""
    return [sys.executable, "-m", "streamprune.cli.main", *argv]


def test_workers_the_cluster_cannot_place_are_refused_in_seconds_naming_its_cpus(
    ray_session, uneven_shards, make_index, tmp_path
):
    assert ray_session.cluster_resources()["CPU"] == 2
    make_index(uneven_shards[0], tmp_path)
    address = ray_session.get_runtime_context().gcs_address
    t0 = time.monotonic()
    done = subprocess.run(
        _cli("record", str(tmp_path), "--epochs", "1", "--workers", "6", "--gpus-per-worker", "0")
        + ["--max-failures", "0", "--address", address, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - t0
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(
        r"record: 6 workers x 1 CPU need 6 CPUs, the Ray cluster has 2 CPUs \(\d+ GPUs\); use --workers 2 or fewer",
        done.stderr,
    ), done.stderr[-3000:]
    assert seconds < 30, seconds  # the command's start (torch, joining Ray) included
    assert not (tmp_path / "stats.zarr").exists()


def test_a_worker_needing_more_gpus_than_the_cluster_has_is_refused(ray_session, uneven_shards, make_index, tmp_path):
    gpus = ray_session.cluster_resources().get("GPU", 0)
    make_index(uneven_shards[0], tmp_path)
    t0 = time.monotonic()
    with pytest.raises(
        SettingsError,
        match=rf"record: 1 worker x 1 CPU \+ {gpus + 1:g} GPUs? needs? 1 CPU and {gpus + 1:g} GPUs?, "
        rf"the Ray cluster has 2 CPUs \({gpus:g} GPUs?\); use .*--gpus-per-worker",
    ):
        record(tmp_path, 1, gpus_per_worker=gpus + 1, max_failures=0, progress=False)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "stats.zarr").exists()


def test_max_failures_0_stops_when_the_workers_cannot_start(uneven_shards, make_index, tmp_path):
    """Workers the cluster could hold but cannot now (other work holds one of its two CPUs): with
    max_failures=0 `record` stops after one start timeout, naming it, instead of retrying forever."""
    make_index(uneven_shards[0], tmp_path)
    code = f"""
import ray
from ray.util.placement_group import placement_group
from streamprune.stages.record import record
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
ray.get(placement_group([{{"CPU": 1}}]).ready())
record({str(tmp_path)!r}, 1, workers=2, max_failures=0, progress=False)
"""
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert re.search(
        r"SettingsError: record: the worker group startup timed out after 5.0 seconds waiting for 2 workers, "
        r"1 time \(--max-failures 0\); other work holds the Ray cluster's 2 CPUs \(0 GPUs\) \(free now: 1 CPU ",
        done.stderr,
    ), done.stderr[-3000:]


def test_a_second_record_and_a_reduce_during_a_record_are_refused_naming_it(
    ray_session, uneven_shards, make_index, tmp_path, capsys
):
    make_index(uneven_shards[0], tmp_path)
    address = ray_session.get_runtime_context().gcs_address
    argv = ["record", str(tmp_path), "--epochs", "2", "--schedule-epochs", "10", "--num-classes", "10"]
    argv += ["--workers", "1", "--loader-workers", "1", "--address", address, "--quiet"]
    first = subprocess.Popen(_cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".stats.zarr.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    holder = f"record, pid {first.pid} on host {socket.gethostname()}"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another process is writing" in err and holder in err, err
    assert main(["reduce", str(tmp_path), "--ratio", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "record is still running" in err and holder in err, err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert StatsStore.open(tmp_path / "stats.zarr", mode="r").complete_epochs() == 2
    assert main(["reduce", str(tmp_path), "--ratio", "0.5", "--quiet"]) == 0  # the lock was given back
