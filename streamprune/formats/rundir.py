"""`RunDir`: every path of a run directory, named once (what each file holds: README, On-disk formats).

Paths only: nothing is created or read; `baselines` and `checkpoint_files` list what exists.
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKPOINT = "epoch-"  # checkpoint files: epoch-NNNN.pt


class RunDir:
    """The paths of the run directory `root` (stages take a run directory and ask it for their files)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def index(self) -> Path:
        """The shard index directory."""
        return self.root / "index"

    @property
    def index_parts(self) -> Path:
        """Per-shard scans of an `index` in progress (kept until the index is written)."""
        return self.root / ".index-parts"

    @property
    def classes(self) -> Path:
        """The run's class list."""
        return self.root / "classes.json"

    @property
    def stats(self) -> Path:
        """The per-sample statistics store."""
        return self.root / "stats.zarr"

    @property
    def stats_spool(self) -> Path:
        """Part files of a recording from one's own loop (`StatsLogger`), for the epoch in progress."""
        return self.root / ".stats-spool"

    @property
    def bad_samples(self) -> Path:
        """Samples skipped as undecodable while recording, one JSON line each."""
        return self.root / "bad-samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The proxy model's checkpoints."""
        return self.root / "checkpoints"

    def checkpoint(self, epochs_done: int) -> Path:
        """The checkpoint after `epochs_done` epochs."""
        return self.checkpoints / f"{_CHECKPOINT}{epochs_done:04d}.pt"

    def checkpoint_files(self) -> list[Path]:
        """The checkpoints present, oldest first."""
        return sorted(self.checkpoints.glob(f"{_CHECKPOINT}*.pt"))

    @property
    def ray_train(self) -> Path:
        """Ray Train's own storage for `record`."""
        return self.root / "ray-train"

    @property
    def scores(self) -> Path:
        """The scores of the main keep-list."""
        return self.scores_in(self.root)

    @property
    def keep(self) -> Path:
        """The main keep-list."""
        return self.keep_in(self.root)

    @property
    def evaluate(self) -> Path:
        """Evaluation results."""
        return self.root / "evaluate.json"

    @property
    def report(self) -> Path:
        """The report directory."""
        return self.root / "report"

    @property
    def report_page(self) -> Path:
        """The report's HTML page."""
        return self.report / "index.html"

    @property
    def baseline_root(self) -> Path:
        """Keep-lists and scores of baselines and of other seeds, one directory each."""
        return self.root / "baseline"

    def baseline(self, name: str) -> Path:
        """The directory of baseline (or seed) `name`."""
        return self.baseline_root / name

    def baselines(self) -> list[Path]:
        """The baseline directories present, sorted by name."""
        root = self.baseline_root
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    @staticmethod
    def keep_in(directory: Path) -> Path:
        """The keep-list inside a baseline directory (or the run directory)."""
        return directory / "keep"

    @staticmethod
    def scores_in(directory: Path) -> Path:
        """The scores inside a baseline directory (or the run directory)."""
        return directory / "scores.zarr"
