"""Two Ray nodes on 127.0.0.1 that share nothing but a real S3 server (moto's): the run of
examples/ray_cluster.py lives in the bucket, and nothing of it touches a local disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from s3_server import free_port

from streamprune import KeepList, storage
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import StatsStore

pytestmark = pytest.mark.slow  # two Ray nodes and a training run

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Nodes started by hand on one machine: no token handed between them (Ray's token auth is for real clusters)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_cluster.py"
RUN_FILES = {"index", "stats.zarr", "keep", "scores.zarr", "checkpoints", "classes.json", "ray-train", ".index-parts"}


def _node(args: list[str], temp_dir: str) -> subprocess.Popen:
    """One Ray node in the foreground (`--block`), in a process group of its own; one CPU, so that
    the two training workers land one on each node."""
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
    )


def _wait_for_nodes(address: str, n: int, deadline: float) -> None:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(len([x for x in ray.nodes() if x['Alive']]))"
    )
    while time.monotonic() < deadline:
        ask = [sys.executable, "-c", code, address]
        out = subprocess.run(ask, capture_output=True, text=True, timeout=120, env=ENV)
        if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"the {n} Ray nodes did not come up")


def _ran_a_training_worker(temp_dir: str) -> bool:
    """Whether a Ray Train worker ran on the node of `temp_dir` (its worker logs name the actor)."""
    for folder, _, files in os.walk(temp_dir):
        for n in files:
            if n.startswith("worker-") and n.endswith(".out"):
                with open(os.path.join(folder, n), "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        return True
    return False


def _run_files_under(root: str) -> list[str]:
    """Paths under `root` named like a run's files."""
    return [os.path.join(folder, n) for folder, dirs, files in os.walk(root) for n in dirs + files if n in RUN_FILES]


def test_two_nodes_index_record_and_reduce_with_the_run_in_the_bucket_only(s3_server, uneven_shards, tmp_path):
    paths, sizes = uneven_shards
    bucket = s3_server.make_bucket("two-nodes")
    fs, _ = storage.filesystem(bucket)
    for p in paths:
        fs.put(p, f"two-nodes/shards/{os.path.basename(p)}")
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    worker_tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    work = tmp_path / "driver-cwd"
    work.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard=false"]
    nodes = [_node(head, head_tmp)]
    try:
        time.sleep(3)
        nodes.append(_node(["--address", address, "--node-ip-address", "127.0.0.1"], worker_tmp))
        _wait_for_nodes(address, 2, time.monotonic() + 180)
        run = f"{bucket}/run"
        out = subprocess.run(
            [sys.executable, str(EXAMPLE), "--address", address, "--shards", f"{bucket}/shards/*.tar"]
            + ["--run", run, "--epochs", "2", "--schedule-epochs", "10", "--workers", "2", "--ratio", "0.5"],
            cwd=work,
            env={**ENV, "HOME": str(work)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        keep = KeepList.load(RunDir(run).keep)
        assert len(keep) == round(0.5 * sum(sizes))
        assert StatsStore.open(RunDir(run).stats, mode="r").complete_epochs() == 2
        assert _ran_a_training_worker(head_tmp) and _ran_a_training_worker(worker_tmp)
        # nothing of the run on a local disk: not in the driver's folder (its cwd and HOME), nor in
        # the nodes' temp dirs, where Ray's workers run
        assert _run_files_under(str(work)) == []
        assert not (work / "s3:").exists() and not os.path.exists("s3:")
        assert _run_files_under(head_tmp) == [] and _run_files_under(worker_tmp) == []
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
