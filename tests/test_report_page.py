"""The report page of a small real run: the summary at the top (what was pruned, the keep-list,
the lines that apply it, the verdict), class names from `classes.json`, and the figures' axes."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamprune import KeepList
from streamprune.demo.datasets import fashion_mnist_classes
from streamprune.stages.report import (
    _beta_note,
    _kept_mask,
    _plot_beta,
    _plot_fractions,
    build_report,
    class_kept_fractions,
)

FASHION_MNIST = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@pytest.fixture(scope="module")
def reduced(synthetic_run, uneven_shards, tmp_path_factory) -> Path:
    """A run of the uneven shards (synthetic statistics of ten classes, a real class-balanced `reduce`), to copy."""
    from streamprune import reduce

    paths, _ = uneven_shards
    run = tmp_path_factory.mktemp("report") / "run"
    synthetic_run(run, paths, seed=4)
    reduce(run, 0.5, "dual-beta", window=5, progress=False)
    return run


@pytest.fixture
def run(reduced, tmp_path) -> Path:
    shutil.copytree(reduced, tmp_path / "run")
    return tmp_path / "run"


def _summary(page: str) -> str:
    """The page's text before its first figure."""
    text = Path(page).read_text()
    return text[: text.index("<img")]


def test_the_summary_comes_before_the_figures_and_its_two_lines_apply_the_keep_list(run):
    summary = _summary(build_report(run, progress=False))
    keep = KeepList.load(run / "keep")
    assert '<section class="summary">' in summary and "Fresh models" not in summary
    assert (
        f"kept {len(keep):,} of 1,200 samples" in summary
        and "dual-beta (class-balanced) at pruning ratio 0.5" in summary
    )
    assert f"<code>{run / 'keep'}</code>" in summary
    assert "Evaluation</strong>: none saved" in summary
    code = html.unescape(re.search(r"<pre>(.*?)</pre>", summary, re.S).group(1))
    assert code.splitlines()[0] == "from streamprune import PrunedWebDataset"
    assert code.splitlines()[1].startswith("ds = PrunedWebDataset(") and f'keep="{run / "keep"}"' in code
    names: dict = {}
    exec(code, names)  # the lines as the reader pastes them: they stream exactly the kept samples
    assert sum(1 for _ in names["ds"]) == len(keep)


def test_class_names_of_classes_json_appear_in_the_report(run):
    assert re.search(r"per class [\d.]+% \(\d\) to [\d.]+% \(\d\)", _summary(build_report(run, progress=False)))
    fashion_mnist_classes().save(run)
    summary = _summary(build_report(run, progress=False))
    shown = re.search(r"per class [\d.]+% \((.+?)\) to [\d.]+% \((.+?)\)", summary).groups()
    assert set(shown) <= set(FASHION_MNIST)


def test_the_summary_gives_the_saved_verdict_and_a_full_run_below_a_subset_is_explained(run):
    rows = [
        {"method": m, "seed": s, "ratio": r, "kept": k, "test_accuracy": a, "epochs": e, "seconds": 1.0}
        for s, d in enumerate((0.02, 0.03))
        for m, r, k, a, e in (
            ("dual-beta+classes", 0.5, 600, 0.84 + d, 4),
            ("random", 0.5, 600, 0.83, 4),
            ("full", 0.0, 1200, 0.82, 2),
        )
        if m != "full" or s == 0
    ]
    (run / "evaluate.json").write_text(json.dumps({"key": {"settings": {"budget": "steps"}}, "rows": rows}))
    page = build_report(run, progress=False)
    line = "dual-beta+classes vs random: +3.5 points (2 seeds; per seed +3.0, +4.0, std 0.7): ahead of random"
    assert line in _summary(page) and "(table at the end)" in _summary(page)
    page = Path(page).read_text()
    assert "All samples (0.8200) scored below dual-beta+classes on 50% of them (0.8650)" in page
    assert "(4 epochs against 2)" in page and "The full run is one seed" in page


def test_the_class_axis_names_the_classes_and_the_shard_axis_has_integer_ticks(run):
    from streamprune.formats.index import Index
    from streamprune.formats.scores_store import ScoresStore
    from streamprune.scoring.columns import LABEL

    keep = KeepList.load(run / "keep")
    labels = np.asarray(ScoresStore.open(run / "scores.zarr").read(LABEL, slice(None)))
    fractions, _ = class_kept_fractions(labels, _kept_mask(Index(run / "index"), keep, np.arange(len(labels))))
    fig = _plot_fractions(keep, fractions, len(labels), fashion_mnist_classes().name)
    fig.canvas.draw()
    by_class, by_shard = fig.axes
    assert [t.get_text() for t in by_class.get_yticklabels()] == list(FASHION_MNIST)
    lo, hi = by_shard.get_xlim()
    shown = [
        t.get_text() for t, x in zip(by_shard.get_xticklabels(), by_shard.get_xticks(), strict=True) if lo <= x <= hi
    ]
    assert shown == [str(i) for i in range(6)]


def test_the_beta_legend_is_off_the_curve_and_kept_samples_without_weight_are_explained():
    manifest = {"ratio": 0.5, "balance": "classes", "params": {"alpha": 5.2, "beta": 10.8, "anchor": 0.28}}
    mean_p = np.array([0.3, 0.35, 0.8, 0.9, 0.97])
    kept = np.array([True, True, True, True, False])
    fig = _plot_beta(manifest, mean_p, kept)
    fig.canvas.draw()
    legend, ax = fig.legends[0], fig.axes[0]
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    assert any(t.get_text().startswith("anchor 0.28") for t in legend.get_texts())
    note = _beta_note(manifest, mean_p, kept)
    assert "2 of the 4 kept samples lie where the density is near zero" in note and "quota" in note


def test_the_demo_class_list_names_the_fashion_mnist_classes(tmp_path):
    from streamprune.formats.classes import Classes

    classes = fashion_mnist_classes()
    assert classes.names == FASHION_MNIST and classes.label == "cls"
    assert classes.index_of(9) == 9 and classes.name(9) == "Ankle boot"  # the shards' integer labels
    classes.save(tmp_path)
    assert Classes.load(tmp_path) == classes
