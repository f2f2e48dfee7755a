"""Real Fashion-MNIST reading (bundled subset and full files) and shard writing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import webdataset as wds

from streamprune.cli.main import main
from streamprune.demo.datasets import (
    BUNDLED,
    SHARED,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
    shard_sizes,
    write_idx,
    write_shards,
)


def test_bundled_subset_is_real_and_balanced():
    images, labels = load_fashion_mnist("train", BUNDLED)
    assert images.shape == (4000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [400] * 10
    test_images, test_labels = load_fashion_mnist("test", BUNDLED)
    assert test_images.shape == (1000, 28, 28) and np.bincount(test_labels).tolist() == [100] * 10
    assert (BUNDLED / "LICENSE").read_text().startswith("The MIT License")
    if (SHARED / "train-images-idx3-ubyte.gz").exists():  # the subset is the first 400 of each class
        full_x, full_y = load_fashion_mnist("train", SHARED)
        first = np.sort(np.concatenate([np.flatnonzero(full_y == c)[:400] for c in range(10)]))
        assert np.array_equal(full_x[first], images) and np.array_equal(full_y[first], labels)


def test_full_files_are_used_when_present():
    if not (SHARED / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("the full Fashion-MNIST files are not on this machine")
    assert fashion_mnist_dir() == SHARED
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10


def test_idx_round_trip_and_bad_files(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="bad'.*not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no Fashion-MNIST IDX files"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("valid")


def test_shard_sizes():
    assert shard_sizes(10, 3) == [4, 3, 3]
    sizes = shard_sizes(10000, 12, uneven=True, seed=3)
    assert sum(sizes) == 10000 and max(sizes) > 2 * min(sizes) > 0
    with pytest.raises(ValueError):
        shard_sizes(10, 0)


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_written_shards_read_back_with_webdataset(fmnist, tmp_path, fmt):
    images, labels = fmnist
    paths = write_shards(images[:50], labels[:50], tmp_path, sizes=[20, 0, 30], image_format=fmt)
    assert len(paths) == 3
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("l8"))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(50)]
    for i, s in enumerate(samples):
        assert s["cls"] == labels[i]
        assert np.array_equal(np.asarray(s[fmt]), images[i])
    with pytest.raises(ValueError, match="sum to 49"):
        write_shards(images[:50], labels[:50], tmp_path, sizes=[49])


def test_demo_runs_every_stage_on_real_shards(ray_session, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # a relative --out, as a new user types it
    assert (
        main(
            [
                "demo",
                "--out",
                tmp_path.name,
                "--samples",
                "1200",
                "--test-samples",
                "300",
                "--epochs",
                "3",
                "--ratio",
                "0.25",
                "--train-epochs",
                "1",
                "--seeds",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "samples 1200" in out and "3 epochs recorded" in out and "kept 900 of 1,200 samples" in out
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) == 4
    table = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["dual-beta+classes"], ["random"], ["full"]) and "vs" not in line.split()
    ]
    # method, ratio, kept, epochs (the full run's steps: round(1 x 1200 / 900) = 1), seeds, accuracy
    assert [tuple(r[:5]) for r in table] == [
        ("dual-beta+classes", "0.25", "900", "1", "2"),
        ("random", "0.25", "900", "1", "2"),
        ("full", "0.00", "1,200", "1", "1"),
    ]
    assert all(0 < float(r[5]) <= 1 for r in table)
    rows = json.loads((tmp_path / "run" / "evaluate.json").read_text())["rows"]
    diffs = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(rows[0:4:2], rows[1:4:2], strict=True)]
    assert f"dual-beta+classes vs random: {sum(diffs) / 2:+.1f} points (2 seeds; per seed " in out
    assert (tmp_path / "run" / "report" / "index.html").stat().st_size > 10000
    assert "streamprune run " + tmp_path.name + "/streamprune.yaml" in out
    urls = [json.loads(line)["url"] for line in (tmp_path / "run" / "index" / "shards.jsonl").open()]
    assert all(os.path.isabs(u) for u in urls)


def test_demo_says_when_it_asks_more_images_than_the_data_has():
    from streamprune.cli.main import demo_caps
    from streamprune.demo.datasets import BUNDLED

    notes = demo_caps(str(BUNDLED), 6000, 2000)  # the bundled subset: 4,000 training, 1,000 test images
    assert notes == [
        f"--samples 6,000: {BUNDLED} has 4,000 train images, all of them are used",
        f"--test-samples 2,000: {BUNDLED} has 1,000 test images, all of them are used",
    ]
    assert demo_caps(str(BUNDLED), 4000, 500) == []
