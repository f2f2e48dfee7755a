"""The command end to end: `run` from a config (interrupted and resumed), `report`, `inspect`,
`init-config`, errors and help, on a small real dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamprune.cli.main import build_parser, main
from streamprune.config import ConfigError, load_config
from streamprune.demo.datasets import fashion_mnist_shards
from streamprune.formats.stats_store import StatsStore
from streamprune.inspection.run_state import run_state

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp: Path, address: str) -> Path:
    fashion_mnist_shards(tmp / "data", limit=600, n_shards=4, uneven=True, progress=False)
    fashion_mnist_shards(tmp / "data", split="test", limit=200, n_shards=2, progress=False)
    cfg = {
        "shards": "data/train-*.tar",
        "out": "run",
        "address": address,
        "record": {"epochs": 4, "schedule_epochs": 12, "num_classes": 10, "loader_workers": 1},
        "reduce": {"ratio": 0.5, "window": 3},
        "evaluate": {"test_shards": "data/test-*.tar", "epochs": 1, "seeds": 2, "baseline": "random", "full": False},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_resumes_after_a_kill_then_report_and_inspect(ray_session, tmp_path, capsys):
    address = ray_session.get_runtime_context().gcs_address
    cfg = _config(tmp_path, address)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamprune.cli.main", "run", str(cfg), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if StatsStore.open(run / "stats.zarr", mode="r").complete_epochs() >= 1:
                break
        except (FileNotFoundError, ValueError, KeyError, OSError):
            pass
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = run_state(run)
    assert state["index"]["state"] == "done" and state["record"]["state"] == "partial"
    assert state["reduce"]["state"] == "missing"
    index_mtime = (run / "index" / "manifest.json").stat().st_mtime_ns
    first_epoch = StatsStore.open(run / "stats.zarr", mode="r").read("p_true", slice(None), slice(0, 1))

    assert main(["run", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "index: already complete, skipped" in out and "random" in out
    assert (run / "index" / "manifest.json").stat().st_mtime_ns == index_mtime
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.complete_epochs() == 4
    assert np.array_equal(store.read("p_true", slice(None), slice(0, 1)), first_epoch, equal_nan=True)
    rows = json.loads((run / "evaluate.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("dual-beta+classes", 0),
        ("random", 0),
        ("dual-beta+classes", 1),
        ("random", 1),
    ]
    assert all(r["kept"] == 300 and r["epochs"] == 2 for r in rows)  # the full run's steps: 1 epoch x 600 / 300
    assert all(0 < r["test_accuracy"] <= 1 for r in rows)
    diffs = [100 * (rows[i]["test_accuracy"] - rows[i + 1]["test_accuracy"]) for i in (0, 2)]
    assert f"dual-beta+classes vs random: {np.mean(diffs):+.1f} points (2 seeds; per seed " in out
    keep = json.loads((run / "keep" / "manifest.json").read_text())
    assert keep["balance"] == "classes" and sum(keep["params"]["class_quotas"]) == 300
    assert json.loads((run / "baseline" / "random-seed1" / "keep" / "manifest.json").read_text())["seed"] == 1
    report = run / "report"
    page = (report / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "dual-beta" in page
    for name in ("scores", "beta", "kept-fraction", "grids", "training"):
        data = (report / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000

    assert main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    assert "record: done" in text and "reduce: done" in text and run_state(run)["index"]["fingerprint"] in text
    assert main(["run", str(cfg), "--quiet"]) == 0  # nothing left to do
    again = capsys.readouterr().out
    assert all(f"{s}: already complete, skipped" in again for s in ("index", "record", "reduce", "evaluate"))

    settings = yaml.safe_load(cfg.read_text())
    settings["reduce"]["c_d"] = 2.0  # a sampler setting changed: the keep-list is redrawn, the proxy kept
    cfg.write_text(yaml.safe_dump(settings))
    assert main(["run", str(cfg), "--quiet"]) == 0
    changed = capsys.readouterr().out
    assert "record: already complete, skipped" in changed and "reduce: already complete" not in changed
    params = json.loads((run / "keep" / "manifest.json").read_text())["params"]
    assert params["c_d"] == 2.0 and params["beta"] == pytest.approx(15 * (1 - params["anchor"]) * (1 - 0.5**2))

    settings["record"]["lr"] = 0.05  # a training setting changed: refused, not silently reused
    cfg.write_text(yaml.safe_dump(settings))
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "was recorded with other settings (lr: 0.1, not 0.05); rerun with --restart" in capsys.readouterr().err
    assert StatsStore.open(run / "stats.zarr", mode="r").complete_epochs() == 4
    old_keep = keep["created"]
    assert main(["run", str(cfg), "--quiet", "--restart"]) == 0  # the way out the refusal names
    restarted = capsys.readouterr().out
    assert "index: already complete, skipped" in restarted and "record: already complete" not in restarted
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.config["lr"] == 0.05 and store.complete_epochs() == 4
    assert "reduce: already complete" not in restarted and "evaluate: already complete" not in restarted
    assert json.loads((run / "keep" / "manifest.json").read_text())["created"] != old_keep
    _render_if_possible(report / "index.html", tmp_path / "page.png")


def _render_if_possible(page: Path, png: Path) -> None:
    """The report as Chromium draws it: a tall page, not blank (skipped without Chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={png}",
            "--window-size=1200,4000",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape[0] >= 4000 and pixels.std() > 20


def test_init_config_writes_an_example_that_loads(tmp_path):
    path = tmp_path / "sp.yaml"
    assert main(["init-config", str(path)]) == 0
    cfg = load_config(path)
    assert cfg.reduce.balance is None and cfg.evaluate.budget == "steps" and cfg.evaluate.seeds == 3
    assert cfg.reduce.method == "dual-beta" and cfg.reduce.c_d is None
    assert cfg.shards == str(tmp_path / "data/train-{000000..000009}.tar")
    assert main(["init-config", str(path)]) == 2  # refuses to overwrite
    toml = tmp_path / "sp.toml"
    toml.write_text('shards = ["a.tar"]\n[reduce]\nratio = 0.7\n')
    assert load_config(toml).reduce.ratio == 0.7
    for text, match in [
        ("shards: a.tar\nrecord: {epoch: 3}\n", "record.epoch: unknown field \\(did you mean 'record.epochs'\\?\\)"),
        ("shards: a.tar\nreduce: {ratio: high}\n", "reduce.ratio: must be float, not 'high'"),
        ("out: x\n", "shards: missing required field"),
        ("shards: a.tar\nrecord: 3\n", "record: must be a section of fields"),
        ("shards: [a.tar\n", "cannot parse"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(path)


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    cases = [
        ["reduce", str(tmp_path), "--ratio", "0.5"],
        ["inspect", str(tmp_path / "none")],
        ["run", str(tmp_path / "missing.yaml")],
        ["report", str(tmp_path)],
    ]
    for argv in cases:
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("streamprune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["inspect", str(tmp_path / "none"), "--debug"]) == 2  # the same status, with the traceback
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.splitlines()[-1].startswith("streamprune: error: ")


def test_every_command_has_help_with_an_example():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"demo", "run", "init-config", "index", "record", "reduce", "reshard", "report", "inspect"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example:" in text and f"streamprune {name}" in text and "--quiet" in text and "--debug" in text
