"""`RunDir`: every path of a run directory, named once (what each file holds: README, On-disk formats).

Locations only, as strings (a local path or an object-store URL, `s3://bucket/run`: see
`streamprune.storage`): nothing is created or read; `baselines` and `checkpoint_files` list what exists.
"""

from __future__ import annotations

import os

from streamprune import storage

_CHECKPOINT = "epoch-"  # checkpoint files: epoch-NNNN.pt


class RunDir:
    """The locations of the run directory `root` (stages take a run directory and ask it for their files)."""

    def __init__(self, root: str | os.PathLike[str]):
        text = os.fspath(root)
        self.root = storage.absolute(text)

    def __repr__(self) -> str:
        return f"RunDir({self.root!r})"

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def index(self) -> str:
        """The shard index directory."""
        return self._at("index")

    @property
    def index_parts(self) -> str:
        """Per-shard scans of an `index` in progress (kept until the index is written)."""
        return self._at(".index-parts")

    @property
    def classes(self) -> str:
        """The run's class list."""
        return self._at("classes.json")

    @property
    def stats(self) -> str:
        """The per-sample statistics store."""
        return self._at("stats.zarr")

    @property
    def stats_spool(self) -> str:
        """Part files of a recording from one's own loop (`StatsLogger`), for the epoch in progress."""
        return self._at(".stats-spool")

    @property
    def bad_samples(self) -> str:
        """Samples skipped as undecodable while recording, one JSON line each."""
        return self._at("bad-samples.jsonl")

    @property
    def bad_sample_objects(self) -> str:
        """The same on an object store (which cannot append): one object per skipped sample."""
        return self._at("bad-samples")

    @property
    def checkpoints(self) -> str:
        """The proxy model's checkpoints."""
        return self._at("checkpoints")

    def checkpoint(self, epochs_done: int) -> str:
        """The checkpoint after `epochs_done` epochs."""
        return storage.join(self.checkpoints, f"{_CHECKPOINT}{epochs_done:04d}.pt")

    def checkpoint_files(self) -> list[str]:
        """The checkpoints present, oldest first."""
        found = storage.names(self.checkpoints)
        return [storage.join(self.checkpoints, n) for n in found if n.startswith(_CHECKPOINT) and n.endswith(".pt")]

    @property
    def ray_train(self) -> str:
        """Ray Train's own storage for `record`."""
        return self._at("ray-train")

    @property
    def ray_log(self) -> str:
        """The output of Ray's workers and actors during `streamprune`'s commands (not the terminal)."""
        return self._at("logs", "ray.log")

    @property
    def scores(self) -> str:
        """The scores of the main keep-list."""
        return self.scores_in(self.root)

    @property
    def keep(self) -> str:
        """The main keep-list."""
        return self.keep_in(self.root)

    @property
    def evaluate(self) -> str:
        """Evaluation results."""
        return self._at("evaluate.json")

    @property
    def report(self) -> str:
        """The report directory."""
        return self._at("report")

    @property
    def report_page(self) -> str:
        """The report's HTML page."""
        return storage.join(self.report, "index.html")

    @property
    def baseline_root(self) -> str:
        """Keep-lists and scores of baselines and of other seeds, one directory each."""
        return self._at("baseline")

    def baseline(self, name: str) -> str:
        """The directory of baseline (or seed) `name`."""
        return storage.join(self.baseline_root, name)

    def baselines(self) -> list[str]:
        """The baseline directories present, sorted by name."""
        return [storage.join(self.baseline_root, n) for n in storage.names(self.baseline_root, folders=True)]

    @staticmethod
    def keep_in(directory: str | os.PathLike[str]) -> str:
        """The keep-list inside a baseline directory (or the run directory)."""
        return storage.join(directory, "keep")

    @staticmethod
    def scores_in(directory: str | os.PathLike[str]) -> str:
        """The scores inside a baseline directory (or the run directory)."""
        return storage.join(directory, "scores.zarr")
