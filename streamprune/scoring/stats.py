"""Per-sample statistics of one training forward pass (docs/scoring.md, section 1)."""

from __future__ import annotations

import numpy as np
import torch

from streamprune.errors import SettingsError


@torch.no_grad()
def sample_stats(logits, labels) -> dict[str, np.ndarray]:
    """The six recorded statistics of each sample from its logits `(B, C)` and labels `(B,)`.

    Torch tensors (any device) or NumPy arrays in; NumPy out: `p_true`, `margin`, `el2n`,
    `entropy`, `loss` as float32 and `correct` as uint8.
    """
    z = torch.as_tensor(logits).detach().float()
    y = torch.as_tensor(labels, device=z.device).long()
    if z.ndim != 2 or y.shape != z.shape[:1]:
        raise SettingsError(f"logits must be (B, C) and labels (B,), got {tuple(z.shape)} and {tuple(y.shape)}")
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    logp_true = logp.gather(1, y[:, None])[:, 0]
    p_true = logp_true.exp()
    z_true = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    # ||softmax - onehot||^2 = sum_{c != y} p_c^2 + (1 - p_y)^2 with 1 - p_y = sum_{c != y} p_c:
    # sums of positive terms, where `sum p^2 - 2 p_y + 1` cancels for confident samples.
    # float64 keeps tiny probabilities and their squares from underflowing.
    rest = torch.log_softmax(z.double(), dim=1).exp().scatter(1, y[:, None], 0.0)
    el2n = ((rest * rest).sum(1) + rest.sum(1) ** 2).sqrt()
    out = {
        "p_true": p_true,
        "correct": (z.argmax(1) == y).to(torch.uint8),
        "margin": z_true - others.max(1).values,
        "el2n": el2n.float(),
        "entropy": -(p * logp).sum(1),
        "loss": -logp_true,
    }
    return {k: v.cpu().numpy() for k, v in out.items()}
