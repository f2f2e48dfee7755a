"""User plugins for the tests: a decode function for `npy` feature vectors and an MLP factory.

Ray workers import this module by name (tests/ is on their PYTHONPATH, see conftest.py).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn


def decode_features(sample: dict) -> tuple[torch.Tensor, int]:
    """A sample with a float32 feature vector in `.npy` and an integer label in `.cls`."""
    x = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    return torch.from_numpy(np.asarray(x, dtype=np.float32)), int(sample["cls"])


def mlp(num_classes: int, input_shape: tuple[int, ...], **_) -> nn.Module:
    """Two linear layers over a flat feature vector."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 64), nn.ReLU(), nn.Linear(64, num_classes))


def label_from_key(sample: dict) -> str:
    """A label function: the class name after the key's last dash."""
    return sample["__key__"].rsplit("-", 1)[-1]
