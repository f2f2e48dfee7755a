"""Per-sample scores (docs/scoring.md, section 2), pure NumPy and vectorised; inputs are `(N, T)` =
samples x epochs.

Windowed scores use stride-1 windows `W_k = [k, k+J)`, `k = 0..T-J`, with the window mean
and the sample standard deviation (ddof = 1). All windows are summed at once in float64,
epoch-major, by binary doubling (log2 J vectorised adds, no prefix-sum cancellation), on
values shifted by each row's first value so that the variance is accurate to ~1e-15.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streamprune.errors import SettingsError

DUAL_SCALE = 10.0  # the reference implementation's constant; changes no ranking or Beta weight
_BLOCK = 8192  # rows per pass: keeps the temporaries in cache


DEFAULT_WINDOW = 10  # J of DUAL and Dyn-Unc; capped at the recorded epochs T when not given


def resolve_window(window: int | None, epochs: int) -> int:
    """The window J used: `window` as given, else DEFAULT_WINDOW capped at the `epochs` used."""
    return min(DEFAULT_WINDOW, epochs) if window is None else window


def _check_window(p: np.ndarray, window: int) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 2:
        raise SettingsError(f"expected an (N, T) array, got shape {p.shape}")
    if window < 2:
        raise SettingsError(f"window must be >= 2, not {window}")
    if p.shape[1] < window:
        raise SettingsError(f"window {window} is longer than the {p.shape[1]} recorded epochs (need T >= window)")
    return p


def _window_sums(x: np.ndarray, window: int) -> np.ndarray:
    """Sums of every stride-1 window of `window` rows of epoch-major `x` (T, B): (T-window+1, B)."""
    k = x.shape[0] - window + 1
    total: np.ndarray | None = None
    offset, width, power, bits = 0, 1, x, window
    while bits:
        if bits & 1:
            part = power[offset : offset + k]
            total = part.copy() if total is None else np.add(total, part, out=total)
            offset += width
        bits >>= 1
        if bits:
            power = power[:-width] + power[width:]
            width *= 2
    assert total is not None  # window >= 1 has a set bit
    return total


def _window_stats_t(p: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Window means and sample stds, epoch-major: two (K, B) float64 arrays."""
    x = p.T.astype(np.float64)
    first = x[0].copy()
    x -= first
    w1 = _window_sums(x, window)
    x *= x
    w2 = _window_sums(x, window)
    w2 -= w1 * w1 / window
    np.maximum(w2, 0.0, out=w2)
    w2 /= window - 1
    np.sqrt(w2, out=w2)
    w1 /= window
    w1 += first
    return w1, w2


def _per_block(p: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.concatenate([fn(p[i : i + _BLOCK]) for i in range(0, len(p), _BLOCK)]) if len(p) else np.zeros(0)


def window_stats(p_true: np.ndarray, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) of every stride-1 window: two `(N, T-J+1)` float64 arrays."""
    mean, std = _window_stats_t(_check_window(p_true, window), window)
    return mean.T, std.T


def _dual_block(p: np.ndarray, window: int) -> np.ndarray:
    mean, std = _window_stats_t(p, window)
    np.subtract(1.0, mean, out=mean)
    mean *= std
    out: np.ndarray = mean.sum(axis=0) * (DUAL_SCALE / len(mean))
    return out


def dual(p_true: np.ndarray, window: int = 10) -> np.ndarray:
    """DUAL: mean over windows of `10 * std_k * (1 - mean_k)`."""
    p = _check_window(p_true, window)
    return _per_block(p, lambda b: _dual_block(b, window))


def dyn_unc(p_true: np.ndarray, window: int = 10) -> np.ndarray:
    """Dynamic uncertainty: mean over windows of `10 * std_k`."""
    p = _check_window(p_true, window)
    return _per_block(p, lambda b: _window_stats_t(b, window)[1].sum(axis=0) * (DUAL_SCALE / (b.shape[1] - window + 1)))


def _epoch(values: np.ndarray, epoch: int) -> int:
    t = np.asarray(values).shape[1]
    if not -t <= epoch < t:
        raise SettingsError(f"epoch {epoch} is outside the {t} recorded epochs")
    return epoch


def el2n(el2n: np.ndarray, epoch: int | None = None) -> np.ndarray:
    """EL2N at `epoch` (default `min(20, T-1)`)."""
    values = np.asarray(el2n)
    return values[:, _epoch(values, min(20, values.shape[1] - 1) if epoch is None else epoch)].astype(np.float64)


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events: epochs `t >= 1` with `correct[t-1]` true and `correct[t]` false."""
    c = np.asarray(correct).astype(bool)
    events: np.ndarray = (c[:, :-1] & ~c[:, 1:]).sum(axis=1)
    return events.astype(np.float64)


def entropy(entropy: np.ndarray, epoch: int = -1) -> np.ndarray:
    """Prediction entropy at `epoch` (default the last recorded one)."""
    values = np.asarray(entropy)
    return values[:, _epoch(values, epoch)].astype(np.float64)


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin: mean logit margin over epochs (lower = harder)."""
    mean: np.ndarray = np.asarray(margin, dtype=np.float64).mean(axis=1)
    return mean


def mean_p(p_true: np.ndarray) -> np.ndarray:
    """Mean true-label probability over all recorded epochs (the Beta sampler's `m`)."""
    mean: np.ndarray = np.asarray(p_true, dtype=np.float64).mean(axis=1)
    return mean


SCORES = ("dual", "dyn_unc", "el2n", "forgetting", "entropy", "aum", "mean_p")
NEEDS = {
    "dual": "p_true",
    "dyn_unc": "p_true",
    "mean_p": "p_true",
    "el2n": "el2n",
    "forgetting": "correct",
    "entropy": "entropy",
    "aum": "margin",
}  # the statistic each score is computed from


def _dual_and_dyn_unc(p: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    def block(b: np.ndarray) -> np.ndarray:
        mean, std = _window_stats_t(b, window)
        scale = DUAL_SCALE / len(mean)
        dyn = std.sum(axis=0) * scale
        np.subtract(1.0, mean, out=mean)
        mean *= std
        return np.stack([mean.sum(axis=0) * scale, dyn], axis=1)

    both = _per_block(p, block).reshape(-1, 2)
    return both[:, 0], both[:, 1]


def all_scores(
    stats: dict[str, np.ndarray], window: int = 10, names: tuple[str, ...] = SCORES
) -> dict[str, np.ndarray]:
    """The scores `names` (default: every score) from `(N, T)` statistics; NaN where a
    statistic is missing. `stats` needs only the arrays those scores are computed from.

    DUAL and Dyn-Unc are NaN throughout when `T < window` (the reducer refuses methods that
    need them then).
    """
    out: dict[str, np.ndarray] = {}
    if {"dual", "dyn_unc"} & set(names):
        p = np.asarray(stats["p_true"])
        if p.shape[1] >= window >= 2:
            out["dual"], out["dyn_unc"] = _dual_and_dyn_unc(p, window)
        else:
            out["dual"], out["dyn_unc"] = np.full(len(p), np.nan), np.full(len(p), np.nan)
    if "forgetting" in names:
        correct = np.asarray(stats["correct"])
        out["forgetting"] = forgetting(correct)
        out["forgetting"][(correct == 255).any(axis=1)] = np.nan
    simple: dict[str, Callable[[], np.ndarray]] = {
        "el2n": lambda: el2n(stats["el2n"]),
        "entropy": lambda: entropy(stats["entropy"]),
        "aum": lambda: aum(stats["margin"]),
        "mean_p": lambda: mean_p(stats["p_true"]),
    }
    out.update({n: f() for n, f in simple.items() if n in names})
    return {n: out[n] for n in names}
