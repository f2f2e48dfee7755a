"""Distinct, checkable per-sample statistics for store tests (local and on S3). No streamprune imports."""

from __future__ import annotations

import numpy as np


def stat_values(rows: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    """Distinct, checkable statistics for each (row, epoch)."""
    base = rows.astype(np.float64) * 10 + epoch
    return {
        "p_true": (base % 997 / 997).astype(np.float32),
        "correct": ((rows + epoch) % 2).astype(np.uint8),
        "margin": (base / 7 - 3).astype(np.float32),
        "el2n": (base % 13 / 10).astype(np.float32),
        "entropy": (base % 17 / 5).astype(np.float32),
        "loss": (base % 19 / 3).astype(np.float32),
    }
