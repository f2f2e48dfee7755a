"""The one-command performance benchmarks run (quick sizes), so that they never rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_benchmarks_run_quick(ray_session, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    result = run.main(["--quick", "--json", str(tmp_path / "figures.json")])
    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["figures"] == result["figures"] and saved["quick"] is True
    names = [f["figure"] for f in result["figures"]]
    assert any(n.startswith("index png-28px") for n in names) and any(n.startswith("record on cpu") for n in names)
    assert sum(n.startswith("reduce dual-beta") for n in names) == 2
    sections = result["sections"]
    assert 0 < sections["record"]["ratio"] < 10
    for row in sections["loader"]:
        assert row["ratio_keep100"] > 0 and row["ratio_keep10_vs_select"] > 1
        assert 0 < row["bytes_read_keep10"] < 0.2  # kept bytes plus small gaps, never a full read
    for row in sections["index"]:
        assert 0 < row["read_fraction"] < 0.5
