"""The reducer's exact selection as pure functions: each row's selection key and group, and the
per-group threshold keys found by radix refinement over row blocks (docs/scoring.md, section 6).

No Ray or Zarr: the reducer runs `block_keys` inside its tasks and hands `kth_thresholds` two
callables that map over blocks; tests hand it in-memory blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamprune.scoring import sampling
from streamprune.scoring.columns import LABEL, NO_GROUP
from streamprune.scoring.methods import LOWER_IS_HARDER
from streamprune.shards.identity import uniforms

CCS_BINS = 50


@dataclass(frozen=True)
class SelectionSpec:
    """What a block needs to compute its keys: the method's sampler and score, the seed, and
    what earlier passes found (the Beta anchor, the CCS cut and score range, groups left out)."""

    sampler: str  # topk | beta | ccs | random
    score: str | None
    seed: int
    ratio: float
    balance: bool  # groups are class labels (rows without a label are not selectable)
    c_d: float  # Beta sampler parameters (see `sampling.beta_params`)
    C: float
    alpha_plus_beta: float | None
    anchor: float = 0.5  # Beta sampler: mean p of the top-10 DUAL rows
    phase: str | None = None  # "cut": CCS's first pass, ranking by difficulty
    cut_threshold: tuple[int, ...] | None = None  # CCS: key words of the hardest row cut
    lo: float = 0.0  # CCS: score range of the rows left after the cut
    hi: float = 1.0
    excluded: tuple[int, ...] = ()  # groups with nothing to select

    def replace(self, **changes) -> SelectionSpec:
        return dataclasses.replace(self, **changes)

    def arrays(self) -> set[str]:
        """The score-store arrays `block_keys` reads."""
        names = {"id_hi", "id_lo", "mean_p", "dual"} if self.sampler == "beta" else {"id_hi", "id_lo"}
        if self.score:
            names.add(self.score)
        if self.balance:
            names.add(LABEL)
        return names


def block_keys(sc: dict[str, np.ndarray], r0: int, spec: SelectionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Selection words `(4, n)` and groups (`NO_GROUP`: not selectable) of the block of rows
    starting at `r0`, from its arrays `sc` (those `spec.arrays()` names)."""
    hi, lo = sc["id_hi"], sc["id_lo"]
    rows = np.arange(r0, r0 + len(hi))
    u = uniforms(spec.seed, hi, lo)
    sampler, score = spec.sampler, spec.score
    valid = np.ones(len(hi), dtype=bool) if score is None else np.isfinite(sc[score])
    if spec.balance:
        valid &= sc[LABEL] >= 0
    if sampler == "beta":
        valid &= np.isfinite(sc["mean_p"])
        w = np.zeros(len(hi))
        w[valid] = sampling.beta_weights(
            sc["dual"][valid],
            sc["mean_p"][valid],
            spec.ratio,
            c_d=spec.c_d,
            C=spec.C,
            alpha_plus_beta=spec.alpha_plus_beta,
            anchor=spec.anchor,
        )
        keys = sampling.weighted_keys(w, u)
    elif score is None or (sampler == "ccs" and spec.phase != "cut"):  # random; CCS within its bins
        keys = sampling.uniform_keys(u)
    else:  # topk, or CCS's cut of the hardest
        keys = sampling.score_keys(np.where(valid, sc[score], 0.0), score in LOWER_IS_HARDER)
    words = sampling.key_words(keys, hi, lo, rows)
    groups = np.where(valid, sc[LABEL] if spec.balance else 0, NO_GROUP)
    if sampler == "ccs" and spec.phase != "cut" and score is not None:
        harder = np.zeros(len(hi), dtype=bool)
        if spec.cut_threshold is not None:
            difficulty = sampling.key_words(
                sampling.score_keys(np.where(valid, sc[score], 0.0), score in LOWER_IS_HARDER), hi, lo, rows
            )
            harder = sampling.at_least(difficulty, np.asarray(spec.cut_threshold, dtype=np.uint64))
        groups = np.where(valid & ~harder, sampling.ccs_bin(sc[score], spec.lo, spec.hi, CCS_BINS), NO_GROUP)
    return words, exclude(groups, spec.excluded)


def exclude(groups: np.ndarray, excluded: tuple[int, ...] | list[int]) -> np.ndarray:
    """`groups` with the `excluded` groups set to `NO_GROUP`."""
    return np.where(np.isin(groups, excluded), NO_GROUP, groups) if len(excluded) else groups


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
