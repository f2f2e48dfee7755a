"""The first hour with `record`: a CPU-sized default for images of mixed sizes with a time estimate,
the label spec of `index --label` remembered, `record --restart`, and messages naming the next step."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from streamprune import storage
from streamprune.cli.main import build_parser, main
from streamprune.demo.datasets import weblike_shards
from streamprune.errors import InputError, SettingsError
from streamprune.formats.atomic import output_lock
from streamprune.formats.classes import Classes
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import StatsStore, clear_statistics, store_exists
from streamprune.stages.record import record
from streamprune.stages.record_progress import estimate as _estimate
from streamprune.training.decode import CPU_SIZE, DEFAULT_SIZE, Probe, View


@pytest.fixture(scope="module")
def weblike(tmp_path_factory, fmnist):
    """400 real Fashion-MNIST images as web-like shards: 48-96 px, mixed modes, JSON class names."""
    images, labels = fmnist
    return weblike_shards(images[:400], labels[:400], tmp_path_factory.mktemp("web"), n_shards=4)


def _files(folder) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and bytes."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_images_of_mixed_sizes_get_a_small_square_on_cpus_and_their_own_size_when_they_agree():
    mixed = Probe(frozenset({(40, 40), (96, 120), (60, 50)}), grey=False)
    assert not mixed.native and mixed.describe() == "images of mixed sizes (40x40 .. 120x96)"
    assert mixed.view(None, CPU_SIZE) == View(3, CPU_SIZE, CPU_SIZE, True)
    assert mixed.view(None) == View(3, DEFAULT_SIZE, DEFAULT_SIZE, True)  # GPUs: as before
    assert mixed.view(32, CPU_SIZE) == View(3, 32, 32, True)  # a given size wins
    large = Probe(frozenset({(300, 300)}), grey=True)
    assert not large.native and large.describe() == "images of 300x300 px"
    assert large.view(None, CPU_SIZE) == View(1, CPU_SIZE, CPU_SIZE, True)
    small = Probe(frozenset({(28, 28)}), grey=True)
    assert small.native and small.view(None, CPU_SIZE) == View(1, 28, 28, False)


def test_the_estimate_extrapolates_the_first_measured_rate_to_all_workers_and_epochs():
    cfg = SimpleNamespace(workers=2, epochs=5)
    assert _estimate({}, cfg, 800) is None
    first = {"n": 20, "n0": 20, "t0": 10.0, "t1": 10.0}  # one report: no rate yet
    assert _estimate({(0, 0): first, (0, 1): first}, cfg, 800) is None
    state = {(0, 0): {"n": 100, "n0": 20, "t0": 10.0, "t1": 12.0}, (0, 1): first}  # rank 0: 40 samples/s
    line = _estimate(state, cfg, 800)
    assert line == "record: epoch 0: ~10 s per epoch at 80 samples/s (ETA for all epochs: 50 s)"
    resumed = {(3, 0): {"n": 30, "n0": 10, "t0": 0.0, "t1": 0.5}}  # 40 samples/s, 2 epochs left of 5
    assert (
        _estimate(resumed, cfg, 48_000)
        == "record: epoch 3: ~10 min per epoch at 80 samples/s (ETA for all epochs: 20 min)"
    )


def test_a_label_and_model_left_unset_are_the_runs_own_when_a_config_is_compared():
    from streamprune.settings import RecordSettings
    from streamprune.stages.record_resolved import changed_settings

    recipe = {"epochs": 2, "lr": 0.1, "label": "json:label", "model": "small-cnn", "image_size": None}
    assert changed_settings(recipe, RecordSettings(epochs=2)) == []
    assert changed_settings(recipe, RecordSettings(epochs=2, label="txt", model="resnet18", lr=0.2)) == [
        "lr",
        "model",
        "label",
    ]


def test_required_options_show_no_default_and_index_label_claims_none():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.required and action.option_strings:
                help_line = sub._get_formatter()._format_action(action)
                assert "default" not in help_line, (name, help_line)
    record_help = " ".join(commands["record"].format_help().split())
    assert "--epochs EPOCHS epochs to run and record (T) --workers" in record_help
    assert "else 224 on GPUs and 64 on CPUs" in record_help and "--restart" in record_help
    index_help = " ".join(commands["index"].format_help().split())
    assert "cls (default)" not in index_help and "which `record` then uses without --label" in index_help


def test_no_usable_label_names_the_members_and_the_option(make_index, tmp_path, weblike):
    run = tmp_path / "run"
    make_index(weblike, run)
    with pytest.raises(InputError) as info:
        record(run, 1, progress=False)
    assert str(info.value) == (
        f"none of the first 400 samples of {str(run)!r} has a label cls (sample '00000000' of "
        f"{weblike[0]!r}: no .cls member for the label); the shards' members are: jpg, json, png; "
        "pass --label SPEC (e.g. json:label)"
    )
    assert not (run / "stats.zarr").exists()


def test_an_explicit_label_other_than_the_class_lists_is_refused_naming_both(make_index, tmp_path, weblike):
    run = tmp_path / "run"
    make_index(weblike, run)
    Classes(2, ("a", "b"), "json:label").save(run)  # as `index --label json:label` leaves it
    with pytest.raises(SettingsError) as info:
        record(run, 1, label="txt", progress=False)
    path = RunDir(run).classes
    assert str(info.value) == (
        f"record --label txt: the run's class list {path!r} was counted with the label json:label (by "
        f"`index --label json:label` or an earlier record); leave --label out to record with json:label, "
        f"or remove {path!r} to count the labels of txt"
    )


def test_restart_waits_for_the_run_lock_and_clears_nothing_without_it(make_index, tmp_path, uneven_shards):
    run = tmp_path / "run"
    make_index(uneven_shards[0], run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch-0001.pt").write_bytes(b"model")
    with output_lock(RunDir(run).stats, writer="another record"):
        with pytest.raises(SettingsError, match="another process is writing .*stats.zarr"):
            record(run, 1, restart=True, progress=False)
    assert (run / "checkpoints" / "epoch-0001.pt").read_bytes() == b"model"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])  # s3: seconds of requests
def run_root(request, tmp_path) -> str:
    """A run folder on local disk and one on S3 (a real S3 server on 127.0.0.1)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_server').make_bucket('first-hour')}/{tmp_path.name}"


def test_clearing_statistics_keeps_the_index_and_class_list_locally_and_on_s3(
    run_root, make_index, tmp_path, uneven_shards
):
    idx = make_index(uneven_shards[0], tmp_path / "indexed")
    rd = RunDir(run_root)
    StatsStore.create(rd.stats, idx, epochs=2, chunk_rows=64, config={"lr": 0.1, "epochs": 2})
    with pytest.raises(SettingsError) as info:  # another setting: refused, naming the way out
        StatsStore.create(rd.stats, idx, epochs=3, config={"lr": 0.05, "epochs": 3}, same=["lr", "epochs"])
    assert str(info.value) == (
        f"{rd.stats!r} was recorded with other settings (lr: 0.1, not 0.05; epochs: 2, not 3); rerun with "
        "--restart (restart=True) to clear the statistics and record again, or use the same settings to resume"
    )
    kept = {storage.join(rd.index, "manifest.json"): b'{"n": 1}', rd.classes: b'{"names": null}'}
    drawn = [rd.keep, rd.scores, RunDir.keep_in(rd.baseline("random")), RunDir.scores_in(rd.baseline("random"))]
    cleared = [rd.checkpoint(1), storage.join(rd.bad_sample_objects, "e0000-r3.json"), rd.bad_samples]
    cleared += [storage.join(p, "manifest.json") for p in drawn]  # drawn from the statistics: they go too
    for path, data in [*kept.items(), *((p, b"x") for p in cleared)]:
        storage.write_bytes(path, data)
    with output_lock(rd.stats, writer="test"):
        clear_statistics(run_root)
    assert not store_exists(rd.stats) and not storage.exists(rd.stats)
    assert not any(storage.exists(p) for p in cleared)
    assert all(storage.read_bytes(p) == data for p, data in kept.items())
    again = StatsStore.create(rd.stats, idx, epochs=3, config={"lr": 0.05, "epochs": 3}, same=["lr", "epochs"])
    assert again.config == {"lr": 0.05, "epochs": 3} and again.complete_epochs() == 0


def test_index_label_is_remembered_cpu_default_size_estimate_and_restart(
    ray_session, tmp_path, weblike, capsys, caplog
):
    run = tmp_path / "run"
    assert main(["index", *weblike, "--out", str(run), "--label", "json:label", "--quiet"]) == 0
    capsys.readouterr()
    classes_json = (run / "classes.json").read_bytes()
    args = ["record", str(run), "--epochs", "1", "--schedule-epochs", "3", "--workers", "2", "--loader-workers", "1"]
    caplog.set_level(logging.INFO, logger="streamprune")
    assert main(args) == 0  # no --label: index's json:label; no --image-size: 64 px on CPUs
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("record: ")]
    assert lines[0].startswith("record: images of mixed sizes (") and lines[0].endswith(
        f") on CPU: training a small-cnn at {CPU_SIZE}x{CPU_SIZE} px; set --image-size / --model to choose"
    )
    assert lines[1].startswith("record: epoch 0: ~") and " per epoch at " in lines[1]
    assert lines[1].endswith(")") and "samples/s (ETA for all epochs: " in lines[1]
    assert "64x64 RGB, random resized crop; 10 classes (json:label, names in classes.json)" in capsys.readouterr().out
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.config["label"] == "json:label" and store.config["view"] == [3, CPU_SIZE, CPU_SIZE, True]
    assert store.config["model"] == "small-cnn"
    assert store.complete_epochs() == 1 and np.isfinite(store.read("p_true")).all()
    index_files = _files(run / "index")
    caplog.clear()
    assert main(args) == 0  # the same settings: done, on the size and model chosen; nothing to say
    assert not [r for r in caplog.records if r.getMessage().startswith("record: ")]
    assert StatsStore.open(run / "stats.zarr", mode="r").config == store.config

    assert main([*args, "--lr", "0.05", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was recorded with other settings (lr: 0.1, not 0.05); rerun with --restart (restart=True)" in err
    assert StatsStore.open(run / "stats.zarr", mode="r").config["lr"] == 0.1  # refused: nothing changed

    caplog.clear()
    assert main([*args, "--lr", "0.05", "--restart", "--quiet"]) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("record: ")]  # --quiet: no notes
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.config["lr"] == 0.05 and store.complete_epochs() == 1
    assert store.config["label"] == "json:label" and np.isfinite(store.read("p_true")).all()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-0001.pt"]
    assert _files(run / "index") == index_files and (run / "classes.json").read_bytes() == classes_json
    assert json.loads(classes_json)["label"] == "json:label"


def test_a_stats_logger_is_refused_naming_restart_and_restarts_from_epoch_0(make_index, tmp_path, uneven_shards):
    from streamprune.training.own_loop import StatsLogger

    run = tmp_path / "run"
    make_index(uneven_shards[0], run)
    logger = StatsLogger(run, 2, config={"lr": 0.1}, chunk_rows=64)
    logger.begin_epoch(0)
    logger.log(
        np.arange(logger.store.n_samples),
        np.zeros((logger.store.n_samples, 10)),
        np.zeros(1, int).repeat(logger.store.n_samples),
    )
    logger.end_epoch()
    assert StatsLogger(run, 2, config={"lr": 0.1}).start_epoch == 1
    assert (run / "stats.zarr" / "p_true" / "c").is_dir()  # the first epoch's chunks
    with pytest.raises(SettingsError, match=r"other settings \(lr: 0.1, not 0.05\); rerun with --restart"):
        StatsLogger(run, 2, config={"lr": 0.05})
    again = StatsLogger(run, 2, config={"lr": 0.05}, restart=True)
    assert again.start_epoch == 0 and again.store.config["lr"] == 0.05
    assert not (run / "stats.zarr" / "p_true" / "c").exists()  # no chunk of the first recording is left
