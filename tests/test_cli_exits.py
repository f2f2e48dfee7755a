"""The command's exit statuses and messages (issue 24, "the first hour"): every line of an error,
`--debug` that only adds the traceback, Ctrl-C as 130, broken shards as 2 unless allowed, and next
steps named (refusals before Ray starts: test_before_ray.py); real shards, real `streamprune` processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sessions import kill_session

from streamprune.formats.index import Index
from streamprune.settings import IndexSettings

STREAMPRUNE = str(Path(sys.executable).with_name("streamprune"))  # the installed command


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`streamprune ARGV` run as its own process, its output captured as text."""
    return subprocess.run([STREAMPRUNE, *argv], capture_output=True, text=True, timeout=timeout)


def test_a_config_with_problems_prints_every_one_and_debug_keeps_exit_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: a.tar\nrecord: {epoch: 3}\nreduce: {ratio: high}\n")
    done = _cli("run", str(bad))
    assert done.returncode == 2, done.stderr
    assert f"config '{bad}' has 2 problem(s), nothing was run:" in done.stderr
    assert "record.epoch: unknown field (did you mean 'record.epochs'?)" in done.stderr
    assert "reduce.ratio: must be float, not 'high'" in done.stderr
    assert "Traceback" not in done.stderr

    debug = _cli("run", str(bad), "--debug")
    assert debug.returncode == 2, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.rstrip().endswith("reduce.ratio: must be float, not 'high'")


def test_required_options_show_no_default_in_help():
    for command, option in (("record", "--epochs EPOCHS"), ("reduce", "--ratio RATIO")):
        text = _cli(command, "--help").stdout
        help_of = text.split(f"  {option}", 1)[1].split("\n  --", 1)[0]
        assert "(T)" in help_of or "fraction removed" in help_of
        assert "default" not in help_of, help_of


def test_index_with_a_missing_shard_exits_2_unless_allowed_and_reruns_scan_only_it(
    ray_session, uneven_shards, tmp_path
):
    paths, sizes = uneven_shards
    data = tmp_path / "data"
    data.mkdir()
    for p in paths[:2]:
        shutil.copy(p, data)
    spec = f"{data}/train-{{000000..000002}}.tar"  # train-000002.tar is missing
    run = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address

    done = _cli("index", spec, "--out", str(run), "--address", address, "--quiet")
    assert done.returncode == 2, done.stderr
    assert "BROKEN train-000002.tar" in done.stdout
    assert "1 shard broken (listed above): exit status 2; pass --allow-broken (index.allow_broken" in done.stderr
    idx = Index(run)  # the healthy shards are indexed all the same
    assert idx.n_samples == sum(sizes[:2]) and [b["shard"] for b in idx.manifest["broken"]] == ["train-000002.tar"]
    assert (run / ".index-parts").is_dir()  # kept: a rerun scans only the broken shard

    allowed = _cli("index", spec, "--out", str(run), "--address", address, "--quiet", "--allow-broken")
    assert allowed.returncode == 0, allowed.stderr
    assert "BROKEN train-000002.tar" in allowed.stdout and allowed.stderr == ""

    shutil.copy(paths[2], data)  # fixed: indexed whole, exit 0, the parts gone
    fixed = _cli("index", spec, "--out", str(run), "--address", address, "--quiet")
    assert fixed.returncode == 0, fixed.stderr
    assert Index(run).n_samples == sum(sizes[:3]) and Index(run).manifest["broken"] == []
    assert not (run / ".index-parts").exists()


def test_run_stops_after_index_on_a_missing_shard_unless_the_config_allows_it(ray_session, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    spec = str(Path(paths[0]).parent / "train-{000000..000001}.tar") + "::" + str(tmp_path / "gone.tar")
    address = ray_session.get_runtime_context().gcs_address
    config = tmp_path / "c.yaml"
    config.write_text(f"shards: '{spec}'\nout: run\naddress: '{address}'\nrecord: {{epochs: 1}}\n")
    done = _cli("run", str(config), "--quiet")
    assert done.returncode == 2, done.stderr
    assert "1 shard broken (listed above): exit status 2; pass --allow-broken (index.allow_broken" in done.stderr
    assert Index(tmp_path / "run").n_samples == sum(sizes[:2])  # indexed, then stopped before record
    assert not (tmp_path / "run" / "stats.zarr").exists()
    assert IndexSettings(allow_broken=True).problems() == []


@pytest.mark.slow  # trains on a local Ray instance of its own
def test_ctrl_c_during_record_exits_130(uneven_shards, make_index, wait_for_a_recorded_epoch, tmp_path):
    run = tmp_path / "run"
    make_index(uneven_shards[0], run)
    # a terminal's Ctrl-C: SIGINT to the whole process group, the local Ray instance's processes too
    proc = subprocess.Popen(
        [STREAMPRUNE, "record", str(run), "--epochs", "40", "--workers", "1", "--loader-workers", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_a_recorded_epoch(proc, str(run / "stats.zarr"), 240)
        assert proc.poll() is None, "record ended before it could be interrupted"
        time.sleep(1)  # inside the second epoch
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc)  # what the local Ray instance left running
    assert proc.returncode == 130, (proc.returncode, err[-4000:])
    assert "streamprune: interrupted; rerun the same command to finish what is missing" in err
