"""The demo's verdict: a method is ahead of or behind the baseline only beyond the seed spread."""

from __future__ import annotations

from streamprune.stages.verdicts import judge, verdict


def test_ahead_or_behind_only_beyond_the_spread_of_the_per_seed_differences():
    assert judge([2.7, 1.3, -1.3]) == "tie"  # mean +0.9, std 2.0: the README's tie
    assert judge([2.4, 0.5, -0.2]) == "tie"  # mean +0.9, std 1.3
    assert judge([2.1, 0.9, 0.5]) == "ahead"  # mean +1.17, std 0.83
    assert judge([-2.1, -0.9, -0.5]) == "behind"
    assert judge([3.0, 4.0]) == "ahead"
    assert judge([1.0, 1.0]) == "ahead"  # no spread at all: any difference counts
    assert judge([0.0, 0.0]) == "tie"
    assert judge([1.0, -1.0]) == "tie"
    assert judge([2.0, 0.0]) == "tie"  # mean 1.0, std 1.41: not above it
    assert judge([0.9]) == "not judged"  # one seed: no spread to judge by


def test_the_verdict_line_says_the_judgement_and_its_rule():
    def rows(diffs: list[float]) -> list[dict]:
        out = []
        for seed, d in enumerate(diffs):
            out.append({"method": "dual", "seed": seed, "test_accuracy": 0.8 + d / 100})
            out.append({"method": "random", "seed": seed, "test_accuracy": 0.8})
        return out

    assert verdict(rows([2.7, 1.3, -1.3]), "dual") == (
        "dual vs random: +0.9 points (3 seeds; per seed +2.7, +1.3, -1.3, std 2.0): "
        "tie with random (within the seed spread)"
    )
    assert verdict(rows([3.0, 4.0]), "dual").endswith("std 0.7): ahead of random (beyond the seed spread)")
    assert verdict(rows([-3.0, -4.0]), "dual").endswith("std 0.7): behind random (beyond the seed spread)")
    one = "dual vs random: +0.9 points (1 seed; per seed +0.9): not judged (1 seed: no spread)"
    assert verdict(rows([0.9]), "dual") == one
    assert verdict(rows([]), "dual") is None
