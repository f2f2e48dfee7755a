"""Per-sample statistics of one training forward pass (docs/scoring.md, section 1)."""

from __future__ import annotations

import numpy as np
import torch

from streamprune.errors import SettingsError


@torch.no_grad()
def sample_stats(logits, labels) -> dict[str, np.ndarray]:
    """The six recorded statistics of each sample from its logits `(B, C)` and labels `(B,)`.

    Torch tensors (any device) or NumPy arrays in; NumPy out: `p_true`, `margin`, `el2n`,
    `entropy`, `loss` as float32 and `correct` as uint8. Computed in float64 from the logits
    as given, each within 1e-6 relative of the exact value (the float32 rounding included).
    """
    z = torch.as_tensor(logits).detach().double()
    y = torch.as_tensor(labels, device=z.device).long()
    if z.ndim != 2 or y.shape != z.shape[:1]:
        raise SettingsError(f"logits must be (B, C) and labels (B,), got {tuple(z.shape)} and {tuple(y.shape)}")
    # log q_c = (z_c - m) - log1p(s), m = max_c z_c, s = sum of exp(z_c - m) over every class
    # but one holding m: log1p keeps a confident sample's log q_top = -s (log(1 + s) rounds to 0).
    d = z - z.max(1, keepdim=True).values
    s = d.exp().scatter(1, d.argmax(1, keepdim=True), 0.0).sum(1, keepdim=True)
    logq = d - torch.log1p(s)
    q = logq.exp()
    logq_true = logq.gather(1, y[:, None])[:, 0]
    z_true = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    # ||q - onehot||^2 = sum_{c != y} q_c^2 + (1 - q_y)^2 with 1 - q_y = sum_{c != y} q_c:
    # sums of positive terms, where `sum q^2 - 2 q_y + 1` cancels for confident samples.
    rest = q.scatter(1, y[:, None], 0.0)
    out = {
        "p_true": logq_true.exp(),
        "correct": (z.argmax(1) == y).to(torch.uint8),
        "margin": z_true - others.max(1).values,
        "el2n": ((rest * rest).sum(1) + rest.sum(1) ** 2).sqrt(),
        "entropy": -torch.where(q > 0, q * logq, 0.0).sum(1),  # positive terms; 0 log 0 = 0
        "loss": -logq_true,
    }
    return {k: (v if k == "correct" else v.float()).cpu().numpy() for k, v in out.items()}
