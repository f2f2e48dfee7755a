"""Samplers of docs/scoring.md (top-k, DUAL+Beta, CCS, random) as selection keys, and exact k-selection.

Every sampler is expressed as a key per sample: the kept samples are the `k` with the
largest keys. Ties break on the identity (smaller first), then on the row, so the order is
total. Keys are mapped to four uint64 words `(key bits, ~id_hi, ~id_lo, ~row)` whose
lexicographic order is that total order; the k-th largest is found by radix refinement
over digits (`radix_histogram` per block, `refine` to combine), per group when a sampler
needs several thresholds (CCS: one per bin), which the distributed reducer runs blockwise.
Pure NumPy: no Ray or Zarr here.
"""

from __future__ import annotations

import numpy as np

from streamprune.errors import InputError, SettingsError

ZERO_WEIGHT_BASE = -1e300  # zero-weight samples rank below every positive-weight key

BALANCES = ("none", "classes")  # how the budget is spread: over all samples, or by class quotas
DEFAULT_BALANCE = "classes"
# c_d by balance: the paper's 4 over all samples; 8 with class quotas, chosen on a validation
# split of Fashion-MNIST (benchmarks/VALIDATION.md): the mode stays at mid-difficulty longer.
DEFAULT_C_D = {"none": 4.0, "classes": 8.0}


def resolve_balance(balance: str | None, method: str) -> str:
    """The balance a method runs with: the one asked for, else `classes`, except for `ccs:`
    methods, which stratify by score bins instead (`none`)."""
    if balance is None:
        return "none" if method.startswith("ccs:") else DEFAULT_BALANCE
    if balance not in BALANCES:
        raise SettingsError(f"balance must be one of {list(BALANCES)}, not {balance!r}")
    return balance


def resolve_c_d(c_d: float | None, balance: str) -> float:
    """The Beta sampler's c_d: the one asked for, else the default of the balance (`DEFAULT_C_D`)."""
    return DEFAULT_C_D[balance] if c_d is None else c_d


def check_ratio(ratio: float) -> float:
    """The pruning ratio `r` (fraction removed), which must lie in [0, 1)."""
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise SettingsError(f"ratio must be in [0, 1) (the fraction of samples removed), not {ratio!r}")
    return float(ratio)


def keep_count(n: int, ratio: float) -> int:
    """`k = round((1 - r) * n)`, rounding halves up."""
    return int(np.floor((1.0 - check_ratio(ratio)) * n + 0.5))


def beta_params(
    ratio: float, anchor: float, *, c_d: float = 4.0, C: float = 15.0, alpha_plus_beta: float | None = None
) -> tuple[float, float]:
    """`(alpha, beta)`: `beta = C (1 - anchor)(1 - r**c_d)`, `alpha = (C + 1) - beta` by default
    (the reference code); `alpha_plus_beta` selects another sum (e.g. `C`, the paper's text)."""
    beta = C * (1.0 - anchor) * (1.0 - check_ratio(ratio) ** c_d)
    alpha = (C + 1.0 if alpha_plus_beta is None else alpha_plus_beta) - beta
    if alpha <= 0 or beta <= 0:
        raise SettingsError(
            f"Beta parameters alpha={alpha:.4g}, beta={beta:.4g} are not positive "
            f"(anchor {anchor:.4g}, ratio {ratio}, C {C}, alpha+beta {alpha_plus_beta})"
        )
    return alpha, beta


def top_rows(score: np.ndarray, id_hi: np.ndarray, id_lo: np.ndarray, n: int = 10) -> np.ndarray:
    """Indices of the `n` highest scores, ties to the smaller identity, best first."""
    order = np.lexsort((id_lo, id_hi, -np.asarray(score, dtype=np.float64)))
    return order[:n]


def anchor_of(dual: np.ndarray, mean_p: np.ndarray, id_hi: np.ndarray, id_lo: np.ndarray, n: int = 10) -> float:
    """The Beta anchor: mean of `mean_p` over the `n` samples with the highest DUAL score."""
    best = top_rows(dual, id_hi, id_lo, n)
    return float(np.mean(np.asarray(mean_p, dtype=np.float64)[best]))


def beta_weights(
    dual: np.ndarray,
    mean_p: np.ndarray,
    ratio: float,
    *,
    c_d: float = 4.0,
    C: float = 15.0,
    alpha_plus_beta: float | None = None,
    anchor: float | None = None,
) -> np.ndarray:
    """Unnormalised DUAL+Beta weights `BetaPDF(clip(m, 1e-6, 1-1e-6); alpha, beta) * dual`.

    Without `anchor`, it is the mean `m` of the 10 highest-DUAL samples of these inputs
    (ties to the lower index); the distributed reducer passes the global one.
    """
    dual = np.asarray(dual, dtype=np.float64)
    m = np.asarray(mean_p, dtype=np.float64)
    if anchor is None:
        idx = np.arange(len(dual), dtype=np.uint64)
        anchor = anchor_of(dual, m, idx, idx)
    alpha, beta = beta_params(ratio, anchor, c_d=c_d, C=C, alpha_plus_beta=alpha_plus_beta)
    from scipy import stats  # here: settings validate balances through this module, on the core install too

    weights: np.ndarray = stats.beta.pdf(np.clip(m, 1e-6, 1 - 1e-6), alpha, beta) * dual
    return weights


def weighted_keys(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Efraimidis-Spirakis keys `log(u) / w`: the k largest are a weighted draw without
    replacement (successive sampling). Zero weights rank below all others, by smallest `u`
    (the uniform fill-up of docs/scoring.md, section 4)."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise InputError("weights must be finite and >= 0")
    with np.errstate(divide="ignore"):
        es = np.maximum(np.log(u) / w, ZERO_WEIGHT_BASE * 0.5)
    return np.where(w > 0, es, ZERO_WEIGHT_BASE * (1.0 + u))


def score_keys(score: np.ndarray, lower_is_harder: bool = False) -> np.ndarray:
    """Top-k keys: the score itself (negated for AUM, where lower is harder)."""
    s = np.asarray(score, dtype=np.float64)
    return -s if lower_is_harder else s


def uniform_keys(u: np.ndarray) -> np.ndarray:
    """Random selection: the k smallest uniforms."""
    return -np.asarray(u, dtype=np.float64)


def key_bits(keys: np.ndarray) -> np.ndarray:
    """Float64 keys as uint64 with the same order (NaN refused)."""
    k = np.asarray(keys, dtype=np.float64)
    if np.isnan(k).any():
        raise InputError("selection keys contain NaN")
    bits = k.view(np.uint64)
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


POSITIVE_WEIGHT_BITS = int(key_bits(np.array([ZERO_WEIGHT_BASE * 0.75]))[0])  # keys above: positive weights


def key_words(keys: np.ndarray, id_hi: np.ndarray, id_lo: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`(4, n)` uint64 words whose lexicographic order is the selection order (larger first)."""
    return np.stack(
        [
            key_bits(keys),
            ~np.asarray(id_hi, np.uint64),
            ~np.asarray(id_lo, np.uint64),
            ~np.asarray(rows, np.int64).astype(np.uint64),
        ]
    )


def _digit(words: np.ndarray, level: int, digit_bits: int) -> np.ndarray:
    word, pos = divmod(level * digit_bits, 64)
    shift = np.uint64(64 - digit_bits - pos)
    row: np.ndarray = words[word]
    return ((row >> shift) & np.uint64((1 << digit_bits) - 1)).astype(np.int64)


def prefix_mask(words: np.ndarray, groups: np.ndarray, prefixes: np.ndarray, digit_bits: int) -> np.ndarray:
    """Rows in an active group (`>= 0`) whose leading digits equal their group's prefix row."""
    mask = groups >= 0
    g = np.where(mask, groups, 0)
    for level in range(prefixes.shape[1]):
        mask &= _digit(words, level, digit_bits) == prefixes[g, level]
    return mask


def radix_histogram(words: np.ndarray, groups: np.ndarray, prefixes: np.ndarray, digit_bits: int) -> np.ndarray:
    """One block's `(G, 2**digit_bits)` counts of the next digit among rows matching their
    group's prefix. `groups[i] = -1` leaves row `i` out."""
    mask = prefix_mask(words, groups, prefixes, digit_bits)
    size = 1 << digit_bits
    flat = groups[mask] * size + _digit(words[:, mask], prefixes.shape[1], digit_bits)
    return np.bincount(flat, minlength=len(prefixes) * size).reshape(len(prefixes), size)


def refine(hist: np.ndarray, need: int) -> tuple[int, int, int]:
    """From one group's combined histogram, the digit holding its `need`-th largest row:
    `(digit, rows above it, rows in it)`."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # rows with a larger digit
    digit = int(np.flatnonzero((above < need) & (above + hist >= need))[0])
    return digit, int(above[digit]), int(hist[digit])


def nth_largest(candidates: np.ndarray, need: int) -> np.ndarray:
    """The `need`-th largest column of gathered candidate words `(4, m)`."""
    order = np.lexsort(candidates[::-1])[::-1]
    return candidates[:, order[need - 1]]


def at_least(words: np.ndarray, thresholds: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Rows whose words are >= their group's threshold lexicographically (the kept rows).

    `thresholds` is `(4,)`, or `(4, G)` with `groups` (rows in group -1 are never kept;
    all-zero threshold words keep a whole group).
    """
    if groups is None:
        thr = thresholds[:, None]
        valid = np.ones(words.shape[1], dtype=bool)
    else:
        valid = groups >= 0
        thr = thresholds[:, np.where(valid, groups, 0)]
    ge = np.zeros(words.shape[1], dtype=bool)
    eq = np.ones(words.shape[1], dtype=bool)
    for w in range(words.shape[0]):
        ge |= eq & (words[w] > thr[w])
        eq &= words[w] == thr[w]
    return (ge | eq) & valid


def select_top(words: np.ndarray, k: int) -> np.ndarray:
    """In-memory reference: a mask of the `k` largest rows of `words`."""
    mask = np.zeros(words.shape[1], dtype=bool)
    if k > 0:
        mask[np.lexsort(words[::-1])[::-1][:k]] = True
    return mask


def class_quotas(counts: np.ndarray, k: int) -> np.ndarray:
    """Split the budget `k` across classes in proportion to their sizes `counts`, exactly:
    `floor(k n_c / N)` each, then one more to the classes with the largest remainders (ties to
    the lower class). Sums to `k`; no class gets more than it has."""
    sizes = [int(c) for c in np.asarray(counts, dtype=np.int64)]
    n = sum(sizes)
    if not 0 <= k <= n:
        raise SettingsError(f"budget {k} outside [0, {n}] (the samples in all classes)")
    if n == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    quotas = [k * c // n for c in sizes]  # Python ints: k * c can exceed 2**63
    order = sorted(range(len(sizes)), key=lambda c: (-(k * sizes[c] % n), c))
    for c in order[: k - sum(quotas)]:
        quotas[c] += 1
    return np.array(quotas, dtype=np.int64)


def ccs_bin(score: np.ndarray, lo: float, hi: float, n_bins: int = 50) -> np.ndarray:
    """The equal-width bin (0..n_bins-1) of each score within [lo, hi]."""
    s = np.asarray(score, dtype=np.float64)
    width = (hi - lo) / n_bins if hi > lo else 1.0
    return np.clip(((s - lo) / width).astype(np.int64), 0, n_bins - 1)


def ccs_quotas(counts: np.ndarray, budget: int) -> np.ndarray:
    """CCS budget split: bins in order of size, sparsest first, each taking all it has or an
    equal share of the budget left, whichever is smaller."""
    counts = np.asarray(counts, dtype=np.int64)
    if budget > counts.sum():
        raise SettingsError(f"CCS budget {budget} exceeds the {counts.sum()} samples left after the cut")
    quotas = np.zeros_like(counts)
    left = budget
    order = [b for b in np.argsort(counts, kind="stable") if counts[b] > 0]
    for i, b in enumerate(order):
        quotas[b] = min(counts[b], -(-left // (len(order) - i)))
        left -= quotas[b]
    return quotas
