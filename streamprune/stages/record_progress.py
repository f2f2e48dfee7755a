"""`record`'s progress: the `Progress` actor the training workers report their counts to, the
driver's bars drawn from it (one per epoch: samples, loss, accuracy), and the time estimate
said once the first rates are measured."""

from __future__ import annotations

import time
from typing import Any

import ray

from streamprune.stages.record_resolved import ResolvedSettings


@ray.remote(num_cpus=0)
class Progress:
    """Collects per-rank counts so that the driver can draw a progress bar and a summary."""

    def __init__(self):
        self.state: dict = {}
        self.epochs: dict = {}

    def update(self, rank: int, epoch: int, n: int, loss: float, correct: int) -> None:
        first = {"n": 0, "loss": 0.0, "correct": 0, "t0": time.time(), "n0": n}  # n0: counted before t0
        s = self.state.setdefault((epoch, rank), first)
        s["n"] += n
        s["loss"] += loss
        s["correct"] += correct
        s["t1"] = time.time()

    def reset(self, rank: int, epoch: int) -> None:
        """Forget a rank's counts for an epoch it (re)starts, e.g. after a worker failure."""
        self.state.pop((epoch, rank), None)

    def epoch_done(self, epoch: int, seconds: float) -> None:
        self.epochs[epoch] = seconds

    def get(self) -> tuple[dict, dict]:
        return self.state, self.epochs


class Bars:
    """The driver's progress bars, one per epoch, from the `Progress` actor's state."""

    def __init__(self, n_samples: int):
        self.n_samples = n_samples
        self.bars: dict[int, Any] = {}

    def update(self, state: dict, epochs: dict) -> None:
        """Draw every epoch's samples, loss and accuracy so far; close the bars of finished epochs."""
        from streamprune.progress import progress_bar

        for epoch in sorted({e for e, _ in state}):
            rows = [v for (e, _), v in state.items() if e == epoch]
            n = sum(r["n"] for r in rows)
            bar = self.bars.get(epoch) or self.bars.setdefault(
                epoch, progress_bar(total=self.n_samples, desc=f"epoch {epoch}", unit="sample", leave=True)
            )
            bar.update(n - bar.n)
            bar.set_postfix(
                loss=f"{sum(r['loss'] for r in rows) / max(n, 1):.3f}",
                acc=f"{sum(r['correct'] for r in rows) / max(n, 1):.3f}",
                refresh=False,
            )
            if epoch in epochs:
                bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def estimate(state: dict, cfg: ResolvedSettings, n_samples: int) -> str | None:
    """'record: epoch 0: ~46 s per epoch at 130 samples/s (ETA for all epochs: 8 min)', from the first
    epoch in the tracker's `state` whose ranks have reported twice (samples since a rank's first
    report over the time since), extrapolated to all `cfg.workers`; None before."""
    for epoch in sorted({e for e, _ in state}):
        rows = [r for (e, _), r in state.items() if e == epoch and r["t1"] > r["t0"] and r["n"] > r["n0"]]
        if rows:
            rate = sum((r["n"] - r["n0"]) / (r["t1"] - r["t0"]) for r in rows) / len(rows) * cfg.workers
            seconds = n_samples / rate
            return (
                f"record: epoch {epoch}: ~{_duration(seconds)} per epoch at {rate:,.0f} samples/s "
                f"(ETA for all epochs: {_duration(seconds * (cfg.epochs - epoch))})"
            )
    return None


def _duration(seconds: float) -> str:
    """'46 s', '8 min', '2.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
