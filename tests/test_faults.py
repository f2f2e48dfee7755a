"""Faults: processes killed and rerun give identical results, a full disk leaves what was
written intact, two writers of one output never mix."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamprune import KeepList, reduce, reshard
from streamprune.formats.atomic import output_lock
from streamprune.formats.stats_store import StatsStore


@pytest.fixture(scope="module")
def run(synthetic_run, uneven_shards, tmp_path_factory):
    """An index of the uneven shards with synthetic statistics (as test_reduce's run)."""
    paths, _ = uneven_shards
    run = tmp_path_factory.mktemp("faults-run")
    synthetic_run(run, paths, seed=5)
    return run


def _same_keep_list(a: Path, b: Path) -> None:
    ka, kb = KeepList.load(a), KeepList.load(b)
    assert {k: v for k, v in ka.manifest.items() if k != "created"} == {
        k: v for k, v in kb.manifest.items() if k != "created"
    }
    for name in ("ids.npy", "positions.npy", "ranges.npy", "key_offset.npy", "keys.bin", "shards.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("delay", [0.5, 2.0, 3.5])
def test_reduce_killed_anywhere_then_rerun_gives_the_same_keep_list(ray_python, run, tmp_path, delay):
    reference = tmp_path / "reference"
    reduce(run, 0.5, "dual-beta", window=5, out=reference, scores_out=tmp_path / "ref-scores.zarr", progress=False)
    out, scores = tmp_path / "keep", tmp_path / "scores.zarr"
    proc = ray_python(
        f"streamprune.reduce({str(run)!r}, 0.5, 'dual-beta', window=5, out={str(out)!r}, "
        f"scores_out={str(scores)!r}, progress=False)",
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # what a reader sees after the kill: nothing, or a complete list
        KeepList.load(out)
    reduce(run, 0.5, "dual-beta", window=5, out=out, scores_out=scores, progress=False)
    _same_keep_list(out, reference)


def test_reshard_killed_then_rerun_gives_the_same_shards(ray_python, run, tmp_path):
    keep = reduce(run, 0.3, "random", out=tmp_path / "keep", progress=False)
    reference = reshard(run, tmp_path / "reference", 50, keep=keep, progress=False)
    out = tmp_path / "out"
    proc = ray_python(
        f"streamprune.reshard({str(run)!r}, {str(out)!r}, 50, keep={str(tmp_path / 'keep')!r}, "
        "progress=False, max_in_flight=1)",
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("pruned-*.tar"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("pruned-*.tar"))) < len(reference)  # interrupted part-way
    paths = reshard(run, out, 50, keep=tmp_path / "keep", progress=False)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in reference]
    assert not list(out.glob("*.tmp-*"))


def test_a_full_disk_while_writing_the_keep_list_leaves_the_previous_one(ray_python, run, tmp_path):
    out = tmp_path / "keep"
    reduce(run, 0.5, "dual-beta", window=5, out=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = ray_python(
        f"""
import resource, signal, sys
from streamprune.cli.main import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
sys.exit(main(['reduce', {str(run)!r}, '--ratio', '0.2', '--window', '5', '--out', {str(out)!r}, '--quiet']))
""",
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "streamprune: error:" in err and "File too large" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert KeepList.load(out).manifest["ratio"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep.tmp")]


def test_a_full_disk_while_writing_the_store_leaves_earlier_epochs(run, tmp_path):
    import shutil

    copy = tmp_path / "stats.zarr"
    shutil.copytree(run / "stats.zarr", copy)
    store = StatsStore.open(copy)
    before = store.read("p_true", slice(None), slice(0, 1))
    code = f"""
import resource, signal
import numpy as np
from streamprune.formats.stats_store import STATS, ChunkWriter, StatsStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = StatsStore.open({str(copy)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
w = ChunkWriter(store, range(store.n_chunks), 1)
w.add(np.arange(store.n_samples), {{n: np.zeros(store.n_samples, np.uint8 if n == 'correct' else np.float32)
                                     for n in STATS}})
w.flush()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert f"{copy}/p_true/c/0/1" in done.stderr, done.stderr[-2000:]  # the message names the chunk
    again = StatsStore.open(copy, mode="r")
    assert np.array_equal(again.read("p_true", slice(None), slice(0, 1)), before, equal_nan=True)


def test_two_reduces_writing_one_keep_list_never_mix(ray_python, run, tmp_path):
    out = tmp_path / "keep"
    with output_lock(out):  # another writer holds it: refused at once, nothing written
        with pytest.raises(ValueError, match="another process is writing"):
            reduce(run, 0.5, "random", out=out, progress=False)
    assert not out.exists()
    refs = {
        r: reduce(run, r, "random", out=tmp_path / f"ref-{r}", scores_out=tmp_path / f"s-{r}.zarr", progress=False)
        for r in (0.3, 0.6)
    }
    procs = [
        ray_python(f"streamprune.reduce({str(run)!r}, {r}, 'random', out={str(out)!r}, progress=False)")
        for r in (0.3, 0.6)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and all(
        c == 0 or "another process is writing" in err for c, (_, err) in zip(codes, results, strict=True)
    )
    ratio = KeepList.load(out).manifest["ratio"]
    _same_keep_list(out, tmp_path / f"ref-{ratio}")
    assert json.loads((out / "manifest.json").read_text())["k"] == len(refs[ratio])
