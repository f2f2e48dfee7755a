"""The report's class checks without Ray: starved classes, the warning, and the evaluation table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamprune.inspection.run_state import run_state
from streamprune.stages.report import (
    STARVED,
    _evaluation_section,
    _starvation_warning,
    class_kept_fractions,
    starved_classes,
)


def _mask(counts: list[int], kept: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels with `counts[c]` rows of class c, the first `kept[c]` of each kept."""
    labels = np.concatenate([np.full(n, c, dtype=np.int32) for c, n in enumerate(counts)])
    mask = np.concatenate([np.arange(n) < k for n, k in zip(counts, kept, strict=True)])
    return labels, mask


def test_a_class_kept_at_5_percent_of_50_is_starved():
    labels, kept = _mask([200, 200], [190, 10])
    starved, overall = starved_classes(labels, kept)
    assert overall == pytest.approx(0.5)
    assert starved == [(1, pytest.approx(0.05))]


def test_balanced_and_mildly_uneven_masks_are_not_starved():
    for counts, kept in (([100, 100, 100], [50, 50, 50]), ([100, 300], [20, 60]), ([100, 100], [70, 30])):
        labels, mask = _mask(counts, kept)
        assert starved_classes(labels, mask)[0] == [], (counts, kept)


def test_threshold_is_a_third_of_the_overall_and_unlabelled_rows_are_ignored():
    labels, kept = _mask([300, 300, 300], [290, 260, 50])  # overall 600/900; class 2 at 1/6 < 2/9
    labels = np.concatenate([labels, np.full(50, -1, dtype=np.int32)])
    kept = np.concatenate([kept, np.zeros(50, dtype=bool)])
    fractions, overall = class_kept_fractions(labels, kept)
    assert overall == pytest.approx(600 / 900)
    assert fractions == pytest.approx([290 / 300, 260 / 300, 50 / 300])
    assert starved_classes(labels, kept)[0] == [(2, pytest.approx(1 / 6))]
    assert STARVED * overall == pytest.approx(2 / 9)


def test_the_threshold_sits_at_a_third_of_the_overall_fraction():
    assert starved_classes(*_mask([100, 100], [80, 20]))[0] == []  # 0.20 vs 0.5 / 3
    assert starved_classes(*_mask([100, 100], [85, 15]))[0] == [(1, pytest.approx(0.15))]


def test_missing_class_ids_and_no_labels_give_no_warning():
    labels = np.array([0, 0, 2, 2], dtype=np.int32)  # class 1 never seen: nan, not starved
    kept = np.array([True, False, True, False])
    assert starved_classes(labels, kept) == ([], 0.5)
    starved, overall = starved_classes(np.full(3, -1, dtype=np.int32), np.ones(3, dtype=bool))
    assert starved == [] and np.isnan(overall)


def test_the_warning_names_the_classes_and_suggests_balance_only_when_off():
    text = _starvation_warning([(1, 0.05), (4, 0.1)], 0.5, {"balance": "none"})
    assert text.startswith('<p class="warn">')
    assert "class 1 kept 5.0%" in text and "class 4 kept 10.0%" in text and "50.0% overall" in text
    assert "--balance classes" in text
    assert "--balance" not in _starvation_warning([(1, 0.05)], 0.5, {"balance": "classes"})
    assert _starvation_warning([], 0.5, {"balance": "none"}) == ""


def _row(method: str, seed: int | None, accuracy: float, epochs: int) -> dict:
    row = {
        "method": method,
        "ratio": 0.0 if method == "full" else 0.5,
        "kept": 1000 if method == "full" else 500,
        "test_accuracy": accuracy,
        "epochs": epochs,
        "seconds": 1.0,
    }
    return row if seed is None else {**row, "seed": seed}


def test_evaluation_section_shows_mean_std_seeds_and_the_verdict():
    rows = [
        _row("dual-beta+classes", 0, 0.91, 4),
        _row("random", 0, 0.88, 4),
        _row("full", 0, 0.95, 2),
        _row("dual-beta+classes", 1, 0.93, 4),
        _row("random", 1, 0.89, 4),
        _row("full", 1, 0.95, 2),
    ]
    text = _evaluation_section(rows, "dual-beta+classes")
    assert text.count("<tr><td>") == 3
    assert "<td>4</td><td>2</td><td>0.9200 +- 0.0141</td>" in text
    assert "<td>0.8850 +- 0.0071</td>" in text
    assert "<td>2</td><td>2</td><td>0.9500 +- 0.0000</td>" in text
    assert "dual-beta+classes vs random: +3.5 points (2 seeds; per seed +3.0, +4.0, std 0.7): ahead of random" in text
    assert "as many SGD steps as the full-data run" in text and "fewer steps" not in text


def test_evaluation_section_reads_old_rows_without_seed_or_baseline():
    text = _evaluation_section([_row("dual-beta", None, 0.9, 3), _row("random", None, 0.91, 3)], "dual-beta")
    assert "<td>0.9000</td>" in text and "+-" not in text.split("</table>")[0]
    assert "dual-beta vs random: -1.0 points (1 seed; per seed -1.0): not judged (1 seed: no spread)" in text
    assert " vs random" not in _evaluation_section([_row("dual-beta", None, 0.9, 3)], "dual-beta")


def test_inspect_rows_carry_the_seed(tmp_path):
    (tmp_path / "evaluate.json").write_text(
        json.dumps({"rows": [_row("random", None, 0.9, 3), _row("random", 1, 0.8, 3)]})
    )
    rows = run_state(tmp_path)["evaluate"]["rows"]
    assert [(r["method"], r["seed"], r["test_accuracy"]) for r in rows] == [("random", 0, 0.9), ("random", 1, 0.8)]
