"""The one-command benchmarks run (quick sizes), so that they never rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_run_quick(ray_session, tmp_path):
    result = _load("run").main(["--quick", "--json", str(tmp_path / "figures.json")])
    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["figures"] == result["figures"] and saved["quick"] is True
    names = [f["figure"] for f in result["figures"]]
    assert any(n.startswith("index png-28px") for n in names) and any(n.startswith("record on cpu") for n in names)
    assert sum(n.startswith("reduce dual-beta") for n in names) == 2
    sections = result["sections"]
    assert 0 < sections["record"]["ratio"] < 10
    web = sections["record"]["web"]
    assert web["bad_samples"] == 0 and web["record_samples_per_s"] > 0 and web["decode_ratio"] > 0
    for row in sections["loader"]:
        assert row["ratio_keep100"] > 0 and row["ratio_keep10_vs_select"] > 1
        assert 0 < row["bytes_read_keep10"] < 0.2  # kept bytes plus small gaps, never a full read
    for row in sections["index"]:
        assert 0 < row["read_fraction"] < 0.5


def test_quality_quick_writes_its_tables(ray_session, tmp_path):
    result = _load("quality").main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "quality-quick.json").read_text())
    assert saved["rows"] == result["rows"]
    assert {(r["method"], r["ratio"]) for r in result["rows"]} == {
        (m, x) for m in ("random", "dual-beta+classes") for x in (0.5, 0.9)
    }
    n = result["train_samples"]
    for row in result["rows"]:
        assert row["kept"] == round((1 - row["ratio"]) * n) and 0.1 < row["mean"] <= 1
    for row in result["noise_rows"]:
        assert 0 <= row["noisy_kept_fraction"] <= 1 and row["kept"] == round((1 - row["ratio"]) * n)
    assert result["cost"]["record_s"] > 0 and result["cost"]["full_train_s"] > 0
    text = (tmp_path / "QUALITY-quick.md").read_text()
    assert "| dual-beta+classes |" in text and "mislabelled" in text and "Cost:" in text
    assert "as many SGD steps as the full-data run" in text
    for row in result["rows"]:  # the steps budget: epochs scale with N / k
        assert row["epochs"] == max(1, round(n / row["kept"])) and len(row["per_class_seed0"]) == 10
