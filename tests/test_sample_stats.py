"""`sample_stats` against exact arithmetic: every float statistic to 1e-6 relative."""

from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest

from streamprune.formats.stats_store import stat_dtype
from streamprune.training.stats import sample_stats

FLOAT_STATS = ("p_true", "margin", "el2n", "entropy", "loss")


def exact_stats(row: np.ndarray, label: int) -> dict[str, float]:
    """The statistics of one sample in 60-digit decimal arithmetic from its (float32) logits."""
    getcontext().prec = 60
    z = [Decimal(float(v)) for v in row]
    e = [v.exp() for v in z]  # exp(-inf) = 0
    q = [v / sum(e) for v in e]
    onehot = [Decimal(int(c == label)) for c in range(len(z))]
    return {
        "p_true": float(q[label]),
        "margin": float(z[label] - max(v for c, v in enumerate(z) if c != label)),
        "el2n": float(sum((a - b) ** 2 for a, b in zip(q, onehot, strict=True)).sqrt()),
        "entropy": float(-sum(v * v.ln() for v in q if v > 0)),  # 0 log 0 = 0
        "loss": float(-q[label].ln()),
    }


def _logits() -> tuple[np.ndarray, np.ndarray]:
    """Uncertain samples, confident ones (p_true -> 1), confidently wrong ones (p_true -> 0),
    and a class masked with a -inf logit."""
    rng = np.random.default_rng(3)
    n = 40
    z = rng.normal(size=(3 * n, 10)).astype(np.float32)
    y = rng.integers(0, 10, 3 * n)
    rows = np.arange(n, 2 * n), np.arange(2 * n, 3 * n)
    z[rows[0], y[rows[0]]] += np.linspace(4, 40, n, dtype=np.float32)
    z[rows[1], y[rows[1]]] -= np.linspace(4, 40, n, dtype=np.float32)
    z[0, (y[0] + 1) % 10] = -np.inf
    return z, y


def test_every_statistic_matches_exact_arithmetic_to_1e_6_relative():
    """Measured: the float32 values written to the store against the exact values, so the
    float32 rounding (<= 6e-8) is part of the error allowed."""
    z, y = _logits()
    got = sample_stats(z, y)
    want = {name: np.array([exact_stats(z[i], int(y[i]))[name] for i in range(len(y))]) for name in FLOAT_STATS}
    assert want["p_true"].max() > 1 - 1e-15 and want["p_true"].min() < 1e-15  # both ends are covered
    assert min(want["el2n"].min(), want["entropy"].min()) < 1e-12 and want["loss"].min() < 1e-15
    for name in FLOAT_STATS:
        assert got[name].dtype == stat_dtype(name)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=0, err_msg=name)
    assert np.array_equal(got["correct"], (z.argmax(1) == y).astype(np.uint8))


@pytest.mark.parametrize(("dtype", "shift"), [(np.float16, 0.0), (np.float64, 1e4)])
def test_logits_of_other_precisions_are_not_rounded_to_float32_first(dtype, shift):
    """float64 logits are used as they are: shifted by 1e4 (the same softmax), a float32 cast
    would round each by up to 5e-4; float16 ones convert exactly."""
    z, y = _logits()
    z = (z.astype(np.float64) + shift).astype(dtype)
    got = sample_stats(z, y)
    for name in FLOAT_STATS:
        want = np.array([exact_stats(z[i], int(y[i]))[name] for i in range(len(y))])
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=0, err_msg=name)
