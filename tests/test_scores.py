"""Scores and samplers against cases worked by hand and against exact probabilities."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from streamprune.scoring import sampling, scores
from streamprune.shards.identity import uniforms


def _std1(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_dual_and_dyn_unc_by_hand():
    p = np.array([[0.1, 0.3, 0.2, 0.6], [0.5, 0.5, 0.5, 0.5]])
    # J = 3 gives T - J + 1 = 2 windows: [0.1, 0.3, 0.2] and [0.3, 0.2, 0.6].
    w1, w2 = [0.1, 0.3, 0.2], [0.3, 0.2, 0.6]
    assert _std1(w1) == pytest.approx(0.1)  # ddof = 1: sqrt((0.01 + 0.01 + 0) / 2)
    d = (10 * _std1(w1) * (1 - 0.2) + 10 * _std1(w2) * (1 - sum(w2) / 3)) / 2
    assert d == pytest.approx(1.0591943, abs=1e-6)
    np.testing.assert_allclose(scores.dual(p, window=3), [d, 0.0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        scores.dyn_unc(p, window=3), [(10 * _std1(w1) + 10 * _std1(w2)) / 2, 0.0], rtol=1e-12, atol=1e-15
    )
    mean, std = scores.window_stats(p, 3)
    assert mean.shape == std.shape == (2, 2)
    # J = T: one window; J = 2: three windows.
    assert scores.dual(p, window=4)[0] == pytest.approx(10 * _std1(p[0].tolist()) * (1 - p[0].mean()))
    assert scores.dyn_unc(p, window=2)[0] == pytest.approx(
        np.mean([10 * _std1(p[0, k : k + 2].tolist()) for k in range(3)])
    )


def test_dual_matches_loop_over_windows_on_random_data():
    rng = np.random.default_rng(3)
    p = rng.random((5000, 30)).astype(np.float32)
    p[:5] = 0.25  # constant rows: exactly zero
    ref = np.mean(
        [
            10
            * p[:, k : k + 10].astype(np.float64).std(axis=1, ddof=1)
            * (1 - p[:, k : k + 10].astype(np.float64).mean(axis=1))
            for k in range(21)
        ],
        axis=0,
    )
    np.testing.assert_allclose(scores.dual(p), ref, rtol=1e-10, atol=1e-13)
    assert (scores.dual(p)[:5] == 0).all()


def test_window_errors():
    p = np.random.default_rng(0).random((3, 5))
    with pytest.raises(ValueError, match="need T >= window"):
        scores.dual(p, window=6)
    with pytest.raises(ValueError, match="window must be >= 2"):
        scores.dyn_unc(p, window=1)


def test_other_scores_by_hand():
    correct = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=np.uint8)
    assert scores.forgetting(correct).tolist() == [2, 0, 1]
    margin = np.array([[1.0, -1.0, 3.0], [0.0, 0.0, -3.0]])
    assert scores.aum(margin).tolist() == [1.0, -1.0]
    e = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert scores.el2n(e).tolist() == [5.0, 11.0]  # min(20, T-1) = 5
    assert scores.el2n(e, epoch=1).tolist() == [1.0, 7.0]
    assert scores.entropy(e).tolist() == [5.0, 11.0] and scores.entropy(e, 0).tolist() == [0.0, 6.0]
    with pytest.raises(ValueError, match="outside the 6 recorded epochs"):
        scores.entropy(e, 6)
    stats = {
        "p_true": np.array([[0.2, np.nan, 0.4]]),
        "correct": np.array([[1, 255, 0]], np.uint8),
        "margin": np.array([[1.0, 2.0, 3.0]]),
        "el2n": np.array([[0.1, 0.2, 0.3]]),
        "entropy": np.array([[1.0, 1.0, 1.0]]),
    }
    sc = scores.all_scores(stats, window=2)
    assert np.isnan(sc["dual"][0]) and np.isnan(sc["mean_p"][0]) and np.isnan(sc["forgetting"][0])
    assert sc["aum"][0] == 2.0 and sc["el2n"][0] == pytest.approx(0.3)


def test_beta_weights_follow_the_formula():
    dual = np.array([0.5, 1.0, 2.0, 0.0])
    m = np.array([0.3, 0.9, 0.0, 0.6])
    alpha_beta = sampling.beta_params(0.5, 0.8)
    beta = 15 * (1 - 0.8) * (1 - 0.5**4)
    assert alpha_beta == pytest.approx((16 - beta, beta))
    a, b = alpha_beta
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    pdf = lambda x: math.exp((a - 1) * math.log(x) + (b - 1) * math.log(1 - x) - lbeta)
    expected = [pdf(0.3) * 0.5, pdf(0.9) * 1.0, pdf(1e-6) * 2.0, 0.0]  # m clipped to 1e-6
    np.testing.assert_allclose(sampling.beta_weights(dual, m, 0.5, anchor=0.8), expected, rtol=1e-10)
    # The anchor defaults to the mean m of the 10 highest-DUAL samples (here all 4).
    np.testing.assert_allclose(
        sampling.beta_weights(dual, m, 0.5), sampling.beta_weights(dual, m, 0.5, anchor=float(m.mean()))
    )
    a15, b15 = sampling.beta_params(0.5, 0.8, alpha_plus_beta=15)
    assert a15 + b15 == pytest.approx(15)
    with pytest.raises(ValueError, match="ratio must be in"):
        sampling.beta_params(1.0, 0.5)


def test_keep_count_rounds():
    assert [sampling.keep_count(10, r) for r in (0, 0.3, 0.25, 0.99)] == [10, 7, 8, 0]
    assert sampling.keep_count(1000, 0.9) == 100
    for bad in (-0.1, 1, 1.5, "0.3"):
        with pytest.raises(ValueError, match="ratio must be in"):
            sampling.keep_count(10, bad)


def _exact_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement, by enumeration."""
    p = np.zeros(len(w))
    for seq in itertools.permutations(range(len(w)), k):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        p[list(seq)] += prob
    return p


def test_weighted_keys_have_the_successive_sampling_law():
    w = np.array([0.5, 1.0, 2.0, 4.0, 0.25, 3.0])
    k, draws = 3, 20000
    exact = _exact_inclusion(w, k)
    ids = np.arange(6, dtype=np.uint64)
    ours = np.zeros(6)
    for seed in range(draws):
        keys = sampling.weighted_keys(w, uniforms(seed, ids, ids))
        ours += sampling.select_top(sampling.key_words(keys, ids, ids, ids.astype(np.int64)), k)
    rng = np.random.default_rng(0)
    theirs = np.zeros(6)
    for _ in range(draws):
        theirs[rng.choice(6, k, replace=False, p=w / w.sum())] += 1
    se = np.sqrt(exact * (1 - exact) / draws)
    assert (np.abs(ours / draws - exact) < 4.5 * se).all(), (ours / draws, exact)
    assert (np.abs(theirs / draws - exact) < 4.5 * se).all()
    assert (np.abs(ours / draws - theirs / draws) < 6.5 * se).all()


def test_zero_weights_fill_uniformly_after_all_positive_ones():
    w = np.array([0, 3.0, 0, 0, 1e-9, 0, 0, 0])
    ids = np.arange(8, dtype=np.uint64)
    u = uniforms(7, ids, ids)
    kept = sampling.select_top(sampling.key_words(sampling.weighted_keys(w, u), ids, ids, ids.astype(np.int64)), 4)
    assert kept[1] and kept[4]
    zeros = np.flatnonzero(w == 0)
    assert set(np.flatnonzero(kept)) - {1, 4} == set(zeros[np.argsort(u[zeros])[:2]])


def test_grouped_radix_selection_equals_sorting():
    rng = np.random.default_rng(5)
    n = 3000
    keys = np.round(rng.normal(size=n), 1)  # many exact ties: broken by identity, then row
    hi = rng.integers(0, 4, n).astype(np.uint64)  # identity ties too
    lo = rng.integers(0, 2**63, n).astype(np.uint64)
    words = sampling.key_words(keys, hi, lo, np.arange(n))
    for k in (1, 7, 1500, 2999):
        need, prefixes, groups = k, np.zeros((1, 0), np.int64), np.zeros(n, np.int64)
        for _ in range(64 * 4 // 8):
            hist = sampling.radix_histogram(words, groups, prefixes, 8)[0]
            digit, above, _ = sampling.refine(hist, need)
            need -= above
            prefixes = np.column_stack([prefixes, [digit]])
        cands = words[:, sampling.prefix_mask(words, groups, prefixes, 8)]
        thr = sampling.nth_largest(cands, need)
        assert np.array_equal(sampling.at_least(words, thr), sampling.select_top(words, k))
    assert sampling.ccs_quotas(np.array([5, 0, 100, 2, 40]), 60).tolist() == [5, 0, 26, 2, 27]
    with pytest.raises(ValueError, match="exceeds"):
        sampling.ccs_quotas(np.array([1, 2]), 4)


def test_class_quotas_split_the_budget_exactly_by_class_size():
    counts = np.array([400, 40, 0, 7, 553])
    for k in range(0, int(counts.sum()) + 1, 7):
        q = sampling.class_quotas(counts, k)
        exact = k * counts / counts.sum()
        assert q.sum() == k and (q <= counts).all() and (np.abs(q - exact) < 1).all()
        assert (q >= np.floor(exact)).all()
    assert sampling.class_quotas(counts, 500).tolist() == [200, 20, 0, 4, 276]  # 3.5 and 276.5: a tie, to class 3
    assert sampling.class_quotas([3, 3, 3], 4).tolist() == [2, 1, 1]  # equal remainders: the lower class first
    big = np.array([3 * 10**12, 10**12])  # k * n_c exceeds 2**63
    assert sampling.class_quotas(big, 3 * 10**12).tolist() == [2_250_000_000_000, 750_000_000_000]
    with pytest.raises(ValueError, match="budget 11 outside"):
        sampling.class_quotas([4, 6], 11)
