"""A run directory on object storage, end to end against a real S3 server (moto's, on 127.0.0.1):
shards in a bucket -> index -> record (2 workers) -> reduce -> PrunedWebDataset(keep=s3://...),
the same keep-list as a run on local disk; a killed record resumed from the bucket alone; a
second writer refused; a killed reduce leaves the previous keep-list readable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from sessions import kill_session

from streamprune import KeepList, PrunedWebDataset, index, reduce, storage
from streamprune.errors import SettingsError
from streamprune.formats.atomic import output_lock
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import StatsStore
from streamprune.stages.record import record

pytestmark = pytest.mark.slow  # trains a proxy model on Ray, twice

EPOCHS = 3
RECORD = {"workers": 2, "schedule_epochs": 10, "loader_workers": 0, "progress": False}
STREAMPRUNE = os.path.join(os.path.dirname(sys.executable), "streamprune")


def _upload(paths: list[str], bucket: str) -> str:
    """The shards copied into `bucket`/shards/; returns their glob."""
    fs, _ = storage.filesystem(bucket)
    for p in paths:
        fs.put(p, f"{bucket[len('s3://') :]}/shards/{os.path.basename(p)}")
    return f"{bucket}/shards/*.tar"


@pytest.fixture(scope="module")
def runs(ray_session, s3_server, uneven_shards, tmp_path_factory):
    """The same data and settings recorded and reduced twice: RUN on S3 (shards in the bucket)
    and RUN on local disk (local copies of the shards)."""
    paths, _ = uneven_shards
    bucket = s3_server.make_bucket("run-e2e")
    shards = _upload(paths, bucket)
    remote, local = f"{bucket}/run", str(tmp_path_factory.mktemp("local-run"))
    index(shards, remote, progress=False)
    index(paths, local, progress=False)
    for run, given in ((remote, shards), (local, paths)):
        record(run, EPOCHS, shards=given, **RECORD)  # a URL stored in a run is opened only when given
        reduce(run, 0.3, "dual-beta", window=3, progress=False)
    return {"bucket": bucket, "shards": shards, "remote": remote, "local": local, "paths": paths}


def test_a_run_on_s3_gives_the_local_runs_keep_list_and_the_loader_reads_it_from_the_bucket(
    runs, kept_samples, sample_content, tmp_path
):
    remote, local = KeepList.load(RunDir(runs["remote"]).keep), KeepList.load(RunDir(runs["local"]).keep)
    assert len(remote) == len(local) > 0
    assert np.array_equal(np.asarray(remote.id_pairs), np.asarray(local.id_pairs))
    stats = StatsStore.open(RunDir(runs["remote"]).stats, mode="r")
    assert stats.complete_epochs() == EPOCHS
    assert np.array_equal(stats.read("p_true"), StatsStore.open(RunDir(runs["local"]).stats, mode="r").read("p_true"))
    kept = [f"epoch-{EPOCHS - 1:04d}.pt", f"epoch-{EPOCHS:04d}.pt"]  # the last two
    assert [storage.name(c) for c in RunDir(runs["remote"]).checkpoint_files()] == kept
    # the loader: shards and keep-list both in the bucket, the same samples as local shards + local list
    urls = sorted(f"{runs['bucket']}/shards/{os.path.basename(p)}" for p in runs["paths"])
    got = list(PrunedWebDataset(urls, keep=RunDir(runs["remote"]).keep, shardshuffle=False))
    want = list(PrunedWebDataset(sorted(runs["paths"]), keep=RunDir(runs["local"]).keep, shardshuffle=False))
    assert len(got) == len(remote)
    assert sample_content(got) == sample_content(want)
    assert not os.path.exists("s3:"), "a URL run must never become a local folder named 's3:'"


def test_a_second_record_of_a_run_on_s3_is_refused_naming_the_first(runs):
    with output_lock(RunDir(runs["remote"]).stats, writer="record"), pytest.raises(SettingsError, match="record"):
        record(runs["remote"], EPOCHS, shards=runs["shards"], **RECORD)


def _wait_for_line(proc: subprocess.Popen, pattern: str, seconds: float) -> None:
    """Read `proc`'s stderr until a line matches `pattern`; fail if it ends first, and kill it
    (ending its output) if `seconds` pass."""
    timer = threading.Timer(seconds, kill_session, (proc,))
    timer.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if re.search(pattern, line):
                return
    finally:
        timer.cancel()
    raise AssertionError(f"no line matching {pattern!r} within {seconds} s:\n" + "".join(seen)[-3000:])


def test_a_record_killed_mid_epoch_resumes_from_the_bucket_alone_to_the_same_keep_list(
    runs, wait_for_a_recorded_epoch, tmp_path
):
    run = f"{runs['bucket']}/killed"
    index(runs["shards"], run, progress=False)
    env = {**os.environ, "STREAMPRUNE_LOCK_LEASE": "4"}  # its lease runs out soon after the kill
    proc = subprocess.Popen(
        [STREAMPRUNE, "record", run, "--epochs", str(EPOCHS), "--workers", "2", "--loader-workers", "0"]
        + ["--schedule-epochs", "10", "--shards", runs["shards"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        # epochs take about a second here: kill as soon as epoch 0 is whole, not on a timer
        _wait_for_line(proc, r"^epoch 0: 100%", 300)  # its bar closes after a worker's commit
        wait_for_a_recorded_epoch(proc, RunDir(run).stats, 60)  # ... and every worker's
    finally:
        kill_session(proc)
    done = StatsStore.open(RunDir(run).stats, mode="r").complete_epochs()
    assert 1 <= done < EPOCHS, f"killed after {done} whole epochs: not mid-run"
    time.sleep(5)  # the killed writer's lease expires; the rerun takes it over
    summary = record(run, EPOCHS, shards=runs["shards"], **RECORD)
    assert summary.epochs_run == list(range(done, EPOCHS))
    keep = reduce(run, 0.3, "dual-beta", window=3, progress=False)
    reference = KeepList.load(RunDir(runs["remote"]).keep)
    assert np.array_equal(np.asarray(keep.id_pairs), np.asarray(reference.id_pairs))


def test_a_killed_reduce_leaves_the_previous_keep_list_on_s3_intact(runs, ray_python):
    run = runs["remote"]
    before = KeepList.load(RunDir(run).keep)
    before_ids = np.asarray(before.id_pairs)  # read now: a list on S3 reads its arrays lazily
    proc = ray_python(
        f"streamprune.reduce({run!r}, 0.5, 'dual-beta', window=3, progress=False)",
        env={**os.environ, "STREAMPRUNE_LOCK_LEASE": "4"},  # its lease runs out soon after the kill
    )
    time.sleep(3.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    after = KeepList.load(RunDir(run).keep)
    if after.manifest["ratio"] == 0.3:  # killed before its commit: the previous list, whole
        assert np.array_equal(np.asarray(after.id_pairs), before_ids)
    else:  # committed before the kill: the new list, whole
        assert after.manifest["ratio"] == 0.5 and len(after) > len(before)
    again = reduce(run, 0.3, "dual-beta", window=3, progress=False)  # the killed run's lease has run out
    assert np.array_equal(np.asarray(again.id_pairs), before_ids)


def test_inspect_and_report_read_and_write_the_run_in_the_bucket(runs, capsys):
    from streamprune.cli.main import main

    run = runs["remote"]
    assert main(["inspect", run]) == 0
    text = capsys.readouterr().out
    for stage in ("index: done", "record: done", "reduce: done"):
        assert stage in text, text
    assert main(["report", run, "--shards", runs["shards"], "--max-rows", "2000", "--quiet"]) == 0
    page = RunDir(run).report_page
    assert capsys.readouterr().out.strip() == f"report: {page}"
    assert storage.read_bytes(page).startswith(b"<!DOCTYPE html>") or b"<html" in storage.read_bytes(page)[:200]
    assert "scores.png" in storage.names(RunDir(run).report)
    assert main(["inspect", run, "--verify"]) == 0
    assert "verify: clean" in capsys.readouterr().out
