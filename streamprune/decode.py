"""Default sample decoding and training augmentation (random crop with padding, flip).

No torchvision: the CPU route has no build of it, and these two transforms are short.
"""

from __future__ import annotations

import io

import numpy as np
import torch

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "npy")


def decode_sample(sample: dict) -> tuple[np.ndarray, int]:
    """`(C, H, W)` uint8 image and integer label of a webdataset sample dict.

    The image is the first member among png/jpg/jpeg/webp/npy; the label is `cls`.
    Raises ValueError naming the sample when either is missing or unreadable.
    """
    where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"{where}: no image member among {IMAGE_EXTS}")
    if "cls" not in sample:
        raise ValueError(f"{where}: no cls label")
    try:
        if ext == "npy":
            img = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        else:
            from PIL import Image

            img = np.asarray(Image.open(io.BytesIO(sample[ext])))
        label = int(sample["cls"])
    except Exception as exc:
        raise ValueError(f"{where}: cannot decode: {exc}") from None
    if img.ndim == 2:
        img = img[None]
    elif img.ndim == 3 and img.shape[-1] in (1, 3, 4) and img.shape[0] not in (1, 3):
        img = img.transpose(2, 0, 1)
    return np.array(img[:3], dtype=np.uint8, order="C"), label  # a writable copy


def augment(img: np.ndarray, rng: np.random.Generator, pad: int | None = None) -> np.ndarray:
    """Random crop of a zero-padded image back to its size, then a random horizontal flip."""
    c, h, w = img.shape
    pad = max(1, min(h, w) // 8) if pad is None else pad
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[:, y : y + h, x : x + w]
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 `(C, H, W)` to float in [-1, 1]."""
    return torch.from_numpy(img).float().div_(127.5).sub_(1.0)


class ToTensors:
    """Pipeline stage: a sample dict to `(float image tensor, label)`, augmented when asked.

    Picklable, with its random generator made in the process that uses it (each DataLoader
    worker gets its own stream)."""

    def __init__(self, seed: int = 0, do_augment: bool = True):
        self.seed, self.do_augment, self.rng = seed, do_augment, None

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        if self.rng is None:
            import os

            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, 0 if info is None else info.id + 1, os.getpid()])
        img, label = decode_sample(sample)
        return to_tensor(augment(img, self.rng) if self.do_augment else img), label
