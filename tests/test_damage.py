"""Damage: a full disk while the keep-list is written, store files deleted or edited, stale
temporaries, out-of-range seeds, and `inspect --verify` finding each of them.

Every damage here is made by the test on a copy of a small real run (a real index of the
uneven shards, a real stats store, a real `reduce`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamprune import KeepList, reduce
from streamprune.cli.main import main
from streamprune.formats.index import Index
from streamprune.formats.stats_store import STATS, ChunkWriter, StatsStore, missing_stats

CHUNK = 64  # the synthetic run's chunk rows


@pytest.fixture(scope="module")
def base(synthetic_run, uneven_shards, tmp_path_factory):
    """A complete run: index, stats (T epochs, 64-row chunks), scores.zarr and keep/ at ratio 0.5."""
    paths, _ = uneven_shards
    run = tmp_path_factory.mktemp("damage-run")
    synthetic_run(run, paths, seed=7)
    reduce(run, 0.5, "dual-beta", window=5, progress=False)
    return run


@pytest.fixture
def run(base, tmp_path):
    """A private copy of the complete run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(base, copy)
    return copy


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


# -- 1. a full disk while the keep-list is written ------------------------------------------------


def _tmpfs_command() -> list[str] | None:
    """`unshare` arguments giving a private mount namespace where a tmpfs may be mounted, or None."""
    if sys.platform != "linux" or shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for cmd in (["unshare", "-m", "--propagation", "private"], ["unshare", "-rm", "--propagation", "private"]):
        probe = subprocess.run(
            cmd + ["sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True
        )
        if probe.returncode == 0:
            return cmd
    return None


@pytest.mark.parametrize("free", [8 << 10, 36 << 10])
def test_a_really_full_disk_while_writing_the_keep_list_is_an_error_naming_the_file(ray_session, run, tmp_path, free):
    """A small tmpfs, filled up but `free` bytes: the keep-list's new arrays do not fit. Before the
    fix the process died by SIGBUS (writes into memory-mapped sparse files) and left its temp dir."""
    unshare = _tmpfs_command()
    if unshare is None:
        pytest.skip("no private mount namespace for a small tmpfs here (needs unshare and mount rights)")
    address = ray_session.get_runtime_context().gcs_address
    small = tmp_path / "small"
    small.mkdir()
    code = f"""
import json, os, shutil, sys
from pathlib import Path
from streamprune.cli.main import main
small = Path({str(small)!r})
shutil.copytree({str(run / "keep")!r}, small / 'keep')
before = {{p.name: p.read_bytes() for p in (small / 'keep').iterdir()}}
fd = os.open(small / 'filler', os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b'\\1' * 4096)
except OSError:
    pass
os.close(fd)
os.truncate(small / 'filler', os.path.getsize(small / 'filler') - {free})
rc = main(['reduce', {str(run)!r}, '--ratio', '0.2', '--window', '5', '--out', str(small / 'keep'), '--quiet'])
after = {{p.name: p.read_bytes() for p in (small / 'keep').iterdir()}}
print(json.dumps({{'rc': rc, 'same': after == before, 'left': sorted(os.listdir(small)),
                  'ratio': json.loads((small / 'keep' / 'manifest.json').read_text())['ratio']}}))
"""
    prelude = f"import ray; ray.init(address={address!r}, logging_level='ERROR')\n"
    script = tmp_path / "full_disk.py"
    script.write_text(prelude + code)
    done = subprocess.run(
        unshare + ["sh", "-c", f"mount -t tmpfs -o size=256k tmpfs '{small}' && exec '{sys.executable}' '{script}'"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # not 135 (SIGBUS)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 2
    assert "No space left on device" in done.stderr and str(small) in done.stderr, done.stderr[-2000:]
    assert result["same"] and result["ratio"] == 0.5  # the previous keep-list, byte for byte
    assert not [n for n in result["left"] if n.startswith(".keep.tmp") or n.startswith(".keep.old")]


def test_a_file_size_limit_while_writing_the_keep_list_names_the_file(ray_python, run):
    out = run / "keep"
    before = _files(out)
    proc = ray_python(
        f"""
import resource, signal, sys
from streamprune.cli.main import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
sys.exit(main(['reduce', {str(run)!r}, '--ratio', '0.2', '--window', '5', '--scores', 'method', '--quiet']))
"""
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "File too large" in err, err[-2000:]
    assert str(run) in err, err[-2000:]  # the file that could not be written
    assert _files(out) == before
    assert not [p for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- 2. deleted chunks, and a keep-list that keeps nothing ------------------------------------------


def test_a_deleted_chunk_of_a_complete_epoch_is_refused_naming_it(run, capsys):
    before = _files(run / "keep")
    (run / "stats.zarr" / "p_true" / "c" / "3" / "2").unlink()
    with pytest.raises(ValueError, match=r"p_true/c/3/2 .*rows \[192, 256\).*epoch 2.*record"):
        reduce(run, 0.5, "dual-beta", window=5, progress=False)
    assert main(["reduce", str(run), "--ratio", "0.3", "--window", "5", "--quiet"]) == 2
    assert "p_true/c/3/2" in capsys.readouterr().err
    assert _files(run / "keep") == before


def test_every_statistic_missing_never_replaces_the_keep_list_with_an_empty_one(ray_session, synthetic, run):
    T = synthetic.epochs
    before = _files(run / "keep")
    shutil.rmtree(run / "stats.zarr")
    idx = Index(run / "index")
    store = StatsStore.create(run / "stats.zarr", idx, epochs=T, chunk_rows=CHUNK)
    rows = np.arange(idx.n_samples)
    for t in range(T):  # every sample given, every one skipped as bad: complete epochs of missing values
        w = ChunkWriter(store, range(store.n_chunks), t)
        w.add(rows, missing_stats(len(rows)))
        w.flush()
        store.mark_done(t, np.arange(idx.n_shards))
    for balance in ("none", "classes"):
        with pytest.raises(ValueError, match="no sample|nothing"):
            reduce(run, 0.5, "dual-beta", window=5, balance=balance, progress=False)
    with pytest.raises(ValueError, match="no sample|nothing"):
        reduce(run, 0.5, "el2n", balance="none", progress=False)
    assert _files(run / "keep") == before


# -- 3. edited metadata, garbage chunks -----------------------------------------------------------


def _new(value, old):
    """`value`, or `value(old)` for a value made from the one it replaces."""
    return value(old) if callable(value) else value


def _set_attr(key, value):
    def edit(run: Path):
        _edit_json(
            run / "stats.zarr" / "zarr.json",
            lambda m: m["attributes"].__setitem__(key, _new(value, m["attributes"].get(key))),
        )

    return edit


def _array_meta(name, key, value):
    def edit(run: Path):
        _edit_json(run / "stats.zarr" / name / "zarr.json", lambda m: m.__setitem__(key, _new(value, m.get(key))))

    return edit


def _chunk_shape(name, shape):
    def edit(run: Path):
        _edit_json(
            run / "stats.zarr" / name / "zarr.json",
            lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", shape),
        )

    return edit


def _delete(rel):
    return lambda run: (run / rel).unlink()


EDITS = {
    "n_samples": (_set_attr("n_samples", 1205), r"n_samples"),
    "n_samples_string": (_set_attr("n_samples", "1200"), r"n_samples"),
    "n_shards": (_set_attr("n_shards", 5), r"n_shards"),
    "epochs": (_set_attr("epochs", lambda epochs: epochs + 1), r"epochs"),
    "chunk_rows_zero": (_set_attr("chunk_rows", 0), r"chunk_rows"),
    "chunk_rows_other": (_set_attr("chunk_rows", 128), r"chunk"),
    "newer_version": (_set_attr("version", 2), r"newer streamprune"),
    "shape": (_array_meta("p_true", "shape", lambda shape: [1190, shape[1]]), r"p_true.*shape"),
    "label_shape": (_array_meta("label", "shape", [1100]), r"label.*shape"),
    "dtype": (_array_meta("p_true", "data_type", "float64"), r"p_true.*(dtype|data type)"),
    "correct_dtype": (_array_meta("correct", "data_type", "int8"), r"correct.*(dtype|data type)"),
    "chunks": (_chunk_shape("loss", [32, 1]), r"loss.*chunk"),
    "zarr_json_garbage": (lambda run: (run / "stats.zarr" / "el2n" / "zarr.json").write_text("{not json"), r"el2n"),
    "array_deleted": (lambda run: shutil.rmtree(run / "stats.zarr" / "margin"), r"margin"),
    "shard_offset_chunk": (_delete("stats.zarr/shard_offset/c/0"), r"shard_offset"),
    "id_chunk": (_delete("stats.zarr/id_lo/c/4"), r"id_lo/c/4"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_store_metadata_is_refused_naming_what_disagrees(run, synthetic, edit, capsys):
    damage, pattern = EDITS[edit]
    before = _files(run / "keep")
    damage(run)
    idx = Index(run / "index")
    with pytest.raises(ValueError, match=pattern) as info:
        StatsStore.open(run / "stats.zarr", mode="r", index=idx).check_chunks(synthetic.epochs)
    assert "stats.zarr" in str(info.value)
    assert main(["reduce", str(run), "--ratio", "0.3", "--window", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "streamprune: error:" in err and "stats.zarr" in err and "Error;" not in err, err
    assert _files(run / "keep") == before


@pytest.mark.parametrize("name,chunk", [("p_true", "2/3"), ("correct", "1/0"), ("label", "5")])
def test_a_garbage_chunk_is_an_error_naming_the_array_and_chunk(run, name, chunk, capsys):
    before = _files(run / "keep")
    (run / "stats.zarr" / name / "c" / chunk).write_bytes(np.random.default_rng(0).bytes(100))
    assert main(["reduce", str(run), "--ratio", "0.3", "--window", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{name}/c/{chunk}" in err and "--debug shows" not in err, err
    assert _files(run / "keep") == before


def test_random_values_in_a_chunk_of_the_right_size_are_refused(run, capsys):
    """Uncompressed chunks of the right size decode; probabilities outside [0, 1] give them away."""
    path = run / "stats.zarr" / "p_true" / "c" / "4" / "1"
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    assert main(["reduce", str(run), "--ratio", "0.3", "--window", "5", "--quiet"]) == 2
    assert "p_true/c/4/1" in capsys.readouterr().err


# -- 4. stale temporaries of killed processes ------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_reduce_are_removed_by_the_next_reduce(run):
    pid = _dead_pid()
    stale = [
        run / f".keep.tmp-{pid}-123",
        run / f".keep.old-{pid}-124",
        run / f".scores.zarr.tmp-{pid}-125",
        run / f".scores.zarr.old-{pid}-126",
    ]
    for p in stale:
        p.mkdir()
        (p / "ids.npy").write_bytes(b"half-written")
    unrelated = run / ".other.tmp-1-2"
    unrelated.mkdir()
    reduce(run, 0.4, "random", progress=False)
    assert [p for p in stale if p.exists()] == []
    assert unrelated.exists()  # not an output of reduce: left alone
    assert KeepList.load(run / "keep").manifest["ratio"] == 0.4


def test_temporaries_of_a_live_writer_holding_the_lock_are_kept(run):
    from streamprune.formats.atomic import clean_stale_temps, output_lock

    mine = run / f".keep.tmp-{os.getpid()}-1"
    mine.mkdir()
    with output_lock(run / "keep"):
        assert clean_stale_temps(run / "keep") == []  # this process's own (being written)
    assert mine.exists()


# -- 6. seeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 2**64 + 3, 1.5])
def test_seeds_outside_the_hashed_range_are_refused(run, seed, capsys):
    with pytest.raises((ValueError, TypeError), match="seed"):
        reduce(run, 0.5, "random", seed=seed, progress=False)
    if isinstance(seed, int):
        assert main(["reduce", str(run), "--ratio", "0.5", "--method", "random", "--seed", str(seed), "--quiet"]) == 2
        assert "--seed" in capsys.readouterr().err


# -- 5. inspect --verify ----------------------------------------------------------------------------


def _verify(run: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["inspect", str(run), "--verify", "--quiet", *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_verify_a_clean_run(run, capsys):
    rc, text = _verify(run, capsys)
    assert rc == 0 and "verify: clean" in text, text
    rc, text = _verify(run, capsys, "--json")
    assert rc == 0
    report = json.loads(text[text.index("{") :])["verify"]
    assert report["damaged"] is False and report["problems"] == [] and report["chunks_checked"] > 0


def _garbage(rel, size=100):
    return lambda run: (run / rel).write_bytes(np.random.default_rng(2).bytes(size))


def _keep_array(name, fn):
    def edit(run: Path):
        a = np.load(run / "keep" / f"{name}.npy")
        fn(a)
        np.save(run / "keep" / f"{name}.npy", a)

    return edit


DAMAGE = {
    "missing_chunk": (_delete("stats.zarr/p_true/c/3/2"), "stats.zarr/p_true/c/3/2", "missing"),
    "garbage_chunk": (_garbage("stats.zarr/correct/c/1/0"), "stats.zarr/correct/c/1/0", "unreadable"),
    "random_chunk": (_garbage("stats.zarr/p_true/c/2/2", CHUNK * 4), "stats.zarr/p_true/c/2/2", "outside"),
    "attrs": (_set_attr("n_samples", 1300), "stats.zarr/zarr.json", "n_samples"),
    "shape": (_array_meta("p_true", "shape", lambda shape: [1190, shape[1]]), "stats.zarr/p_true/zarr.json", "shape"),
    "dtype": (_array_meta("entropy", "data_type", "float64"), "stats.zarr/entropy/zarr.json", "data type"),
    "ids": (_delete("stats.zarr/id_hi/c/2"), "stats.zarr/id_hi/c/2", "missing"),
    "keep_fingerprint": (
        lambda run: _edit_json(run / "keep" / "manifest.json", lambda m: m.__setitem__("fingerprint", "0" * 32)),
        "keep/manifest.json",
        "fingerprint",
    ),
    "keep_k": (lambda run: _edit_json(run / "keep" / "manifest.json", lambda m: m.__setitem__("k", 5)), "keep", "k=5"),
    "keep_positions": (_keep_array("positions", lambda a: a.__setitem__(3, 10**6)), "keep/positions.npy", "position"),
    "keep_ranges": (_keep_array("ranges", lambda a: a.__setitem__((5, 1), a[5, 1] + 512)), "keep/ranges.npy", "range"),
    "keep_ids": (_keep_array("ids", lambda a: a.__setitem__(7, (1, 2))), "keep/ids.npy", "identit"),
    "keep_truncated": (
        lambda run: (run / "keep" / "ranges.npy").write_bytes((run / "keep" / "ranges.npy").read_bytes()[:200]),
        "keep",
        "damaged",
    ),
    "scores_chunk": (_delete("scores.zarr/id_hi/c/0"), "scores.zarr/id_hi/c/0", "missing"),
    "scores_garbage": (_garbage("scores.zarr/dual/c/0"), "scores.zarr/dual/c/0", "unreadable"),
    "scores_fingerprint": (
        lambda run: _edit_json(
            run / "scores.zarr" / "zarr.json", lambda m: m["attributes"].__setitem__("fingerprint", "x")
        ),
        "scores.zarr/zarr.json",
        "fingerprint",
    ),
    "scores_shape": (
        lambda run: _edit_json(run / "scores.zarr" / "mean_p" / "zarr.json", lambda m: m.__setitem__("shape", [7])),
        "scores.zarr/mean_p/zarr.json",
        "shape",
    ),
    "index_offsets": (
        lambda run: np.save(run / "index" / "shard_offset.npy", np.load(run / "index" / "shard_offset.npy")[:-1]),
        "index/shard_offset.npy",
        "",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_reports_each_damage_naming_the_file(run, kind, capsys):
    damage, file, words = DAMAGE[kind]
    damage(run)
    rc, text = _verify(run, capsys)
    assert rc == 2, text
    lines = [line for line in text.splitlines() if file in line and words in line]
    assert lines, text
    rc, text = _verify(run, capsys, "--json")
    assert rc == 2
    report = json.loads(text[text.index("{") : text.rindex("}") + 1])["verify"]
    assert report["damaged"] and any(file in p["file"] for p in report["problems"]), report


def test_verify_lists_leftover_temporaries_without_calling_them_damage(run, capsys):
    (run / f".keep.tmp-{_dead_pid()}-9").mkdir()
    rc, text = _verify(run, capsys)
    assert rc == 0 and ".keep.tmp-" in text and "leftover" in text, text


def test_store_chunk_check_is_cheap_and_exact(run, synthetic):
    T = synthetic.epochs
    store = StatsStore.open(run / "stats.zarr", mode="r")
    store.check_chunks(T)
    (run / "stats.zarr" / "loss" / "c" / "18" / str(T - 1)).unlink()  # the short last chunk, last epoch
    with pytest.raises(ValueError, match=rf"loss/c/18/{T - 1} .*rows \[1152, 1200\)"):
        store.check_chunks(T)
    store.check_chunks(T - 1)  # epochs not used are not needed
    assert set(STATS) <= set(os.listdir(run / "stats.zarr"))
