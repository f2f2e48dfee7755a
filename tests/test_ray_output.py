"""Ray's own output goes to the run's Ray log, not the terminal (issue "the first hour", point 6):
a real `streamprune record` prints none of Ray's lines, and `ray_output.routed_to` sends Ray's
worker output to its file and puts Ray's printing back afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from sessions import kill_session

from streamprune.formats.rundir import RunDir
from streamprune.stages.ray_cluster import ensure_ray
from streamprune.stages.ray_output import routed_to

STREAMPRUNE = str(Path(sys.executable).with_name("streamprune"))  # the installed command


@ray.remote
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _until(found, seconds: float = 60) -> bool:
    """Whether `found()` turns true within `seconds` (Ray forwards a worker's output asynchronously)."""
    deadline = time.monotonic() + seconds
    while not found():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_routed_output_goes_to_the_file_and_printing_comes_back(ray_session, tmp_path, capfd):
    log = tmp_path / "logs" / "ray.log"
    with routed_to(str(log)):
        ensure_ray()
        ray.get(_say.remote("routed line"))
        assert _until(lambda: log.exists() and "routed line" in log.read_text())
    printed = ""

    def shown() -> bool:
        nonlocal printed
        printed += capfd.readouterr().err
        return "printed line" in printed

    ray.get(_say.remote("printed line"))
    assert _until(shown)
    assert "routed line" not in printed and "printed line" not in log.read_text()


@pytest.mark.slow
def test_record_prints_none_of_rays_lines_and_logs_them(uneven_shards, make_index, tmp_path):
    run = tmp_path / "run"
    make_index(uneven_shards[0][:2], run)
    proc = subprocess.Popen(  # its own local Ray instance
        [STREAMPRUNE, "record", str(run), "--epochs", "1", "--workers", "1", "--loader-workers", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        kill_session(proc)  # what the local Ray instance left running
    assert proc.returncode == 0, err[-4000:]
    assert out.startswith("record: epochs 0..0 of"), out
    for ray_line in ("core_worker.cc", "Traceback", "TrainController", "RayTrainWorker"):
        assert ray_line not in err, err
    log = Path(RunDir(run).ray_log)
    assert log.is_file() and "TrainController" in log.read_text()
