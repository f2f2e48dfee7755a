"""The reducer's exact selection as pure functions (no Ray): keys per block, thresholds by radix
refinement over in-memory blocks, equal to sorting everything at once."""

from __future__ import annotations

import numpy as np
import pytest

from streamprune.scoring import sampling
from streamprune.scoring.columns import LABEL, NO_GROUP
from streamprune.scoring.selection import SelectionSpec, block_keys, exclude, kth_thresholds


def _spec(sampler: str, score: str | None, **changes) -> SelectionSpec:
    return SelectionSpec(sampler, score, 7, 0.6, False, c_d=4.0, C=15.0, alpha_plus_beta=None).replace(**changes)


def _blocks(words: np.ndarray, groups: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(words[:, i : i + size], groups[i : i + size]) for i in range(0, len(groups), size)]


def _in_memory(blocks):
    """The two maps kth_thresholds needs, over in-memory blocks; counts the passes made."""
    calls = {"histogram": 0, "gather": 0}

    def active(groups, ids):
        return np.where(np.isin(groups, ids), groups, NO_GROUP)

    def histogram(prefixes, ids, bits):
        calls["histogram"] += 1
        return sum(sampling.radix_histogram(w, active(g, ids), prefixes, bits) for w, g in blocks)

    def gather(prefixes, ids, bits):
        calls["gather"] += 1
        masks = [sampling.prefix_mask(w, active(g, ids), prefixes, bits) for w, g in blocks]
        return (
            np.concatenate([w[:, m] for (w, _), m in zip(blocks, masks, strict=True)], axis=1),
            np.concatenate([g[m] for (_, g), m in zip(blocks, masks, strict=True)]),
        )

    return histogram, gather, calls


@pytest.mark.parametrize("gather_limit", [1 << 20, 500, 1])
def test_thresholds_over_blocks_keep_exactly_the_top_of_each_group(gather_limit):
    rng = np.random.default_rng(11)
    n = 4000
    keys = np.round(rng.normal(size=n), 1)  # many ties: broken by identity, then row
    words = sampling.key_words(keys, rng.integers(0, 3, n), rng.integers(0, 2**63, n), np.arange(n))
    groups = rng.integers(-1, 4, n)  # group -1: not selectable
    counts = np.bincount(groups[groups >= 0], minlength=4)
    needs = np.array([0, 1, counts[2] // 3, counts[3]])  # nothing, one, a third, the whole group
    histogram, gather, calls = _in_memory(_blocks(words, groups, 700))
    thresholds = kth_thresholds(needs, counts, histogram, gather, gather_limit)
    kept = sampling.at_least(words, thresholds, exclude(groups, [0]))
    for g in range(4):
        in_g = groups == g
        expected = sampling.select_top(words[:, in_g], int(needs[g]))
        assert np.array_equal(kept[in_g], expected), g
    assert not kept[groups == NO_GROUP].any()
    assert calls["gather"] == 1
    assert (calls["histogram"] > 0) == (gather_limit < counts[1:].sum())  # refined only when needed


def test_random_and_topk_keys_do_not_depend_on_the_block_split():
    rng = np.random.default_rng(3)
    n = 1000
    sc = {
        "id_hi": rng.integers(0, 2**63, n).astype(np.uint64),
        "id_lo": rng.integers(0, 2**63, n).astype(np.uint64),
        "el2n": np.where(rng.random(n) < 0.05, np.nan, rng.random(n)),
        LABEL: rng.integers(-1, 5, n).astype(np.int32),
    }
    for spec in (_spec("random", None), _spec("topk", "el2n"), _spec("topk", "el2n", balance=True)):
        whole = block_keys(sc, 0, spec)
        parts = [block_keys({k: v[i : i + 300] for k, v in sc.items()}, i, spec) for i in range(0, n, 300)]
        assert np.array_equal(whole[0], np.concatenate([p[0] for p in parts], axis=1)), spec
        assert np.array_equal(whole[1], np.concatenate([p[1] for p in parts])), spec
    _, groups = block_keys(sc, 0, _spec("topk", "el2n"))
    assert np.array_equal(groups == NO_GROUP, np.isnan(sc["el2n"]))  # missing scores are never selected
    _, groups = block_keys(sc, 0, _spec("topk", "el2n", balance=True))
    assert np.array_equal(groups, np.where(np.isnan(sc["el2n"]) | (sc[LABEL] < 0), NO_GROUP, sc[LABEL]))


def test_topk_threshold_keeps_the_highest_scores_and_aum_the_lowest():
    rng = np.random.default_rng(4)
    n = 500
    ids = {"id_hi": np.zeros(n, np.uint64), "id_lo": np.arange(n, dtype=np.uint64)}
    value = rng.permutation(n).astype(np.float64)
    for score, expected in (("el2n", value >= n - 50), ("aum", value < 50)):
        spec = _spec("topk", score)
        words, groups = block_keys({**ids, score: value}, 0, spec)
        histogram, gather, _ = _in_memory(_blocks(words, groups, 128))
        thresholds = kth_thresholds(np.array([50]), np.array([n]), histogram, gather, 10)
        assert np.array_equal(sampling.at_least(words, thresholds, groups), expected), score


def test_ccs_cut_removes_the_hardest_then_bins_the_rest():
    n = 100
    sc = {"id_hi": np.zeros(n, np.uint64), "id_lo": np.arange(n, dtype=np.uint64), "el2n": np.arange(n) / n}
    cut_words, _ = block_keys(sc, 0, _spec("ccs", "el2n", phase="cut"))
    threshold = sampling.nth_largest(cut_words, 10)  # the 10 hardest
    _, groups = block_keys(sc, 0, _spec("ccs", "el2n", cut_threshold=tuple(int(x) for x in threshold), hi=0.9))
    assert (groups[90:] == NO_GROUP).all() and (groups[:90] >= 0).all()
    assert groups[0] == 0 and groups[89] == 49  # 50 equal bins over [0, 0.9]
    _, groups = block_keys(sc, 0, _spec("ccs", "el2n", cut_threshold=tuple(int(x) for x in threshold), excluded=(0,)))
    assert (groups[groups != NO_GROUP] != 0).all()


def test_spec_names_the_arrays_each_sampler_reads():
    assert _spec("random", None).arrays() == {"id_hi", "id_lo"}
    assert _spec("beta", "dual", balance=True).arrays() == {"id_hi", "id_lo", "mean_p", "dual", LABEL}
    assert _spec("ccs", "aum").arrays() == {"id_hi", "id_lo", "aum"}
