"""The reducer's exact selection as pure functions: the per-group threshold keys found by radix
refinement over row blocks (docs/scoring.md, section 6). Each row's selection key and group come
from its method's sampler (`samplers.block_keys`, re-exported here).

No Ray or Zarr: the reducer runs `block_keys` inside its tasks and hands `kth_thresholds` two
callables that map over blocks; tests hand it in-memory blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streamprune.scoring import sampling

# The keys themselves are the samplers' (`samplers`); these names stay importable from here.
from streamprune.scoring.samplers import CCS_BINS, SelectionSpec, block_keys, exclude

__all__ = ["CCS_BINS", "Gather", "Histogram", "SelectionSpec", "block_keys", "exclude", "kth_thresholds"]

# (prefixes, active groups, digit bits) -> the histograms of every block summed / the rows of every
# block under the prefixes, concatenated: (words (4, m), groups (m,))
Histogram = Callable[[np.ndarray, list[int], int], np.ndarray]
Gather = Callable[[np.ndarray, list[int], int], tuple[np.ndarray, np.ndarray]]


def kth_thresholds(
    needs: np.ndarray, counts: np.ndarray, histogram: Histogram, gather: Gather, gather_limit: int
) -> np.ndarray:
    """Per group `g`, the words `(4,)` of its `needs[g]`-th largest key among its `counts[g]`
    rows (all-zero words: keep the whole group, or nothing when `needs[g]` is 0). Radix digits
    narrow each group's bucket until every active bucket fits in `gather_limit` rows, which are
    then gathered and ranked exactly."""
    n_groups = len(needs)
    digit_bits = 16 if n_groups == 1 else 8  # per-bin (CCS) histograms stay small with 8-bit digits
    thresholds = np.zeros((4, n_groups), dtype=np.uint64)
    need, bucket = np.asarray(needs, dtype=np.int64).copy(), np.asarray(counts, dtype=np.int64).copy()
    active = [g for g in range(n_groups) if 0 < need[g] < counts[g]]
    prefixes = np.zeros((n_groups, 0), dtype=np.int64)
    level = 0
    while active:
        if bucket[active].sum() <= gather_limit or (level + 1) * digit_bits > 256:
            words, groups = gather(prefixes, active, digit_bits)
            for g in active:
                thresholds[:, g] = sampling.nth_largest(words[:, groups == g], int(need[g]))
            break
        hist = histogram(prefixes, active, digit_bits)
        digits = np.zeros(n_groups, dtype=np.int64)
        for g in active:
            digits[g], above, bucket[g] = sampling.refine(hist[g], int(need[g]))
            need[g] -= above
        prefixes = np.column_stack([prefixes, digits])
        level += 1
    return thresholds
