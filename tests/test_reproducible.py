"""A fresh model's training is a function of the seed: the same subset and seed give the same
weights, bit for bit, on CPU, with augmentation in a DataLoader worker."""

from __future__ import annotations

import pytest
import torch

from streamprune.demo.datasets import write_shards
from streamprune.stages.evaluate import train_subset

pytestmark = pytest.mark.slow  # trains three small models (about 15 s)


def test_same_seed_trains_identical_weights_with_augmenting_workers(tmp_path, fmnist):
    images, labels = fmnist
    train = write_shards(images[:320], labels[:320], tmp_path / "train", samples_per_shard=80)
    test = write_shards(images[320:420], labels[320:420], tmp_path / "test", prefix="test")

    def weights(seed: int) -> tuple[dict[str, torch.Tensor], float, list[dict]]:
        res = train_subset(
            train, test, None, epochs=2, batch_size=64, seed=seed, device="cpu", loader_workers=2, progress=False
        )
        return res.model.state_dict(), res.test_accuracy, res.history

    first, second, other = weights(7), weights(7), weights(8)
    assert first[0].keys() == second[0].keys()
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    assert first[1:] == second[1:]
    assert not all(torch.equal(first[0][k], other[0][k]) for k in first[0])  # the seed matters
