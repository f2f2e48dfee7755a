"""Evaluation rows summarised: each subset's name, mean and spread over seeds, and the verdict of
a method against a baseline (`run`'s table, the demo's verdict line and the report)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def subset_label(method: str, balance: str | None) -> str:
    """A keep-list's name in evaluation rows: its method, plus `+classes` when class-balanced."""
    return method + ("+classes" if balance == "classes" else "")


def summarize_evaluation(rows: list[dict]) -> list[dict]:
    """Evaluation rows grouped by subset, in first-seen order: `method`, `ratio`, `kept`,
    `epochs`, `seeds`, `accuracies`, `mean`, `std` (sample std; 0 for one seed)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in groups.items():
        acc = np.array([r["test_accuracy"] for r in rs])
        out.append(
            {
                "method": method,
                "ratio": rs[0]["ratio"],
                "kept": rs[0]["kept"],
                "epochs": rs[0]["epochs"],
                "seeds": len(rs),
                "accuracies": acc.tolist(),
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            }
        )
    return out


def judge(diffs: Sequence[float] | np.ndarray) -> str:
    """`ahead` when the mean of the per-seed differences `d` exceeds their spread,
    `mean(d) > std(d)` (sample std, ddof = 1), `behind` when `mean(d) < -std(d)`, `tie`
    otherwise; `not judged` for one seed (no spread to judge by)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return "not judged"
    mean, std = d.mean(), d.std(ddof=1)
    return "ahead" if mean > std else "behind" if mean < -std else "tie"


def verdict(rows: list[dict], method: str, baseline: str = "random") -> str | None:
    """`METHOD vs BASELINE: +x.x points (n seeds; per seed ..., std ...): JUDGEMENT`: the mean
    accuracy difference of the seeds both were trained with, in percentage points, judged
    against the spread of the per-seed differences (`judge`); None without both."""
    acc = {(r["method"], r.get("seed", 0)): r["test_accuracy"] for r in rows}
    seeds = sorted(s for m, s in acc if m == method and (baseline, s) in acc)
    if not seeds:
        return None
    diff = np.array([100 * (acc[(method, s)] - acc[(baseline, s)]) for s in seeds])
    spread = f", std {diff.std(ddof=1):.1f}" if len(diff) > 1 else ""
    said = {
        "ahead": f"ahead of {baseline} (beyond the seed spread)",
        "behind": f"behind {baseline} (beyond the seed spread)",
        "tie": f"tie with {baseline} (within the seed spread)",
        "not judged": "not judged (1 seed: no spread)",
    }[judge(diff)]
    return (
        f"{method} vs {baseline}: {diff.mean():+.1f} points ({len(seeds)} seed{'s' * (len(seeds) > 1)}; "
        f"per seed {', '.join(f'{d:+.1f}' for d in diff)}{spread}): {said}"
    )
