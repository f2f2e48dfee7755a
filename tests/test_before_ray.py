"""Commands that do not need Ray never start it (issue "the first hour", point 4): every refusal
that settings and the run's files decide comes before Ray starts, and `inspect`, `report` and the
loader do not even import Ray. Each check runs `streamprune.cli.main.main` in a fresh Python
process, which then says whether Ray was imported and started; real shards and stores."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from stat_values import stat_values

from streamprune.formats.stats_store import ChunkWriter, StatsStore

_MAINS = """
import contextlib, io, json, sys
import streamprune.loader  # first, alone: does the loader pull in Ray? (the first line printed)
print(json.dumps({"loader_imported_ray": "ray" in sys.modules}))
from streamprune.cli.main import main
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:  # refused by the parser
            status = exc.code
    ray = sys.modules.get("ray")
    started = ray is not None and ray.is_initialized()
    print(json.dumps({"status": status, "stderr": err.getvalue(), "imported": ray is not None, "started": started}))
"""


def _commands(*argvs: list[str]) -> tuple[bool, list[dict]]:
    """Each of `argvs` run by `main` in turn in one new Python process that first imported the
    loader alone: whether that import brought in Ray, and for each command its exit status,
    stderr, and whether Ray was imported and started by then."""
    done = subprocess.run(
        [sys.executable, "-c", _MAINS, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    loader, *results = [json.loads(line) for line in done.stdout.splitlines()]
    return loader["loader_imported_ray"], results


def _recorded(run, index, epochs: int) -> None:
    """`run/stats.zarr` with `epochs` complete epochs of statistics, written here (no Ray)."""
    store = StatsStore.create(run / "stats.zarr", index, epochs=epochs, chunk_rows=256)
    rows = np.arange(store.n_samples)
    for epoch in range(epochs):
        writer = ChunkWriter(store, range(store.n_chunks), epoch)
        writer.add(rows, stat_values(rows, epoch))
        writer.flush()
        store.mark_done(epoch, np.arange(index.n_shards))


def test_refusals_come_before_ray_starts(uneven_shards, make_index, tmp_path):
    paths, _ = uneven_shards
    bare, recorded = tmp_path / "bare", tmp_path / "recorded"
    make_index(paths, bare)
    _recorded(recorded, make_index(paths, recorded), epochs=3)
    cases = {  # argv: what stderr says
        ("reduce", str(bare), "--ratio", "90"): "--ratio: must be in [0, 1)",
        ("reduce", str(bare), "--ratio", "0.5", "--method", "bogus"): "bogus",
        ("reduce", str(bare), "--ratio", "0.5"): f"no statistics in {bare}: run `streamprune record {bare} --epochs N`",
        ("reduce", str(recorded), "--ratio", "0.5", "--epochs", "5"): "epochs must be in 1..3, not 5",
        ("reduce", str(recorded), "--ratio", "0.5", "--window", "5"): "2 <= window <= T; got window=5, T=3",
        ("record", str(bare), "--epochs", "0"): "--epochs",
        ("index", *paths, "--out", str(tmp_path / "other"), "--identity", "bogus"): "--identity",
        ("reshard", str(bare), "--out", str(tmp_path / "pruned"), "--shard-size", "0"): "--shard-size",
    }
    _, results = _commands(*[[*argv, "--quiet"] for argv in cases])
    for (argv, message), result in zip(cases.items(), results, strict=True):
        assert result["status"] == 2 and message in result["stderr"], (argv, result)
        assert not result["started"], argv
    assert not (tmp_path / "other").exists() and not (tmp_path / "pruned").exists()
    assert not (recorded / "keep").exists() and not (recorded / "scores.zarr").exists()


def test_inspect_report_and_the_loader_do_not_import_ray(uneven_shards, make_index, tmp_path):
    run = tmp_path / "run"
    make_index(uneven_shards[0], run)
    loader_imported_ray, (inspected, reported) = _commands(["inspect", str(run)], ["report", str(run), "--quiet"])
    assert not loader_imported_ray  # `import streamprune.loader`, first and alone in that process
    assert inspected["status"] == 0 and not inspected["imported"], inspected
    assert reported["status"] == 2 and not reported["imported"], reported  # no keep-list yet: refused


def test_a_stage_without_the_full_install_says_what_to_install(tmp_path):
    """The plain install (the loader's core) lacks the `all` extra: a stage that needs it exits 2
    naming `streamprune[all]`, not with a traceback. The missing module is made so by Python's own
    rule (None in sys.modules halts its import)."""
    code = (
        "import sys\n"
        "for name in ('ray', 'zarr', 'scipy', 'PIL', 'matplotlib', 'pyarrow'): sys.modules[name] = None\n"
        "from streamprune.cli.main import main\n"
        f"sys.exit(main(['reduce', {str(tmp_path / 'run')!r}, '--ratio', '0.5']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "`streamprune reduce` needs the full install (no module " in done.stderr
    assert "pip install 'streamprune[all]'; the plain install only applies keep-lists" in done.stderr
    assert "Traceback" not in done.stderr
