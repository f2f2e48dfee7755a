"""The samplers registered by name (no Ray): the registry's lookup and errors, and each sampler's
whole selection (prepare, keys, budget split, thresholds), run in memory the way the reducer runs
it over blocks, equal to the definition of docs/scoring.md written with the plain primitives."""

from __future__ import annotations

import numpy as np
import pytest

from streamprune.errors import SettingsError
from streamprune.scoring import sampling, selection
from streamprune.scoring.columns import LABEL, NO_GROUP
from streamprune.scoring.methods import METHOD_SCORE, Method
from streamprune.scoring.samplers import (
    CCS_BINS,
    SAMPLERS,
    BetaSampler,
    CCSSampler,
    RandomSampler,
    Sampler,
    SelectionSpec,
    TopKSampler,
    block_keys,
    exclude,
    make_sampler,
    register_sampler,
    sampler_class,
)
from streamprune.shards.identity import uniforms

N, SEED = 600, 5


def _spec(sampler: str, score: str | None, ratio: float, balance: bool = False, **changes) -> SelectionSpec:
    return SelectionSpec(sampler, score, SEED, ratio, balance, c_d=4.0, C=15.0, alpha_plus_beta=None, **changes)


@pytest.fixture(scope="module")
def sc() -> dict[str, np.ndarray]:
    """One block of scores: some missing, some rows unlabelled, many tied values."""
    rng = np.random.default_rng(21)
    missing = rng.random(N) < 0.05
    dual = np.where(rng.random(N) < 0.1, 0.0, rng.gamma(2.0, 0.5, N))  # a tenth of zero weights
    return {
        "id_hi": rng.integers(0, 4, N).astype(np.uint64),  # ties broken by id_lo
        "id_lo": rng.integers(0, 2**63, N).astype(np.uint64),
        "dual": np.where(missing, np.nan, dual),
        "mean_p": np.where(missing, np.nan, rng.uniform(0.05, 0.95, N)),
        "el2n": np.where(missing, np.nan, np.round(rng.random(N), 2)),
        "aum": np.where(missing, np.nan, np.round(rng.normal(size=N), 1)),
        LABEL: np.where(rng.random(N) < 0.05, -1, rng.integers(0, 4, N)).astype(np.int32),
    }


class _InMemory:
    """`samplers.Passes` over in-memory blocks of `sc` (what the reducer does with Ray tasks)."""

    def __init__(self, sc: dict[str, np.ndarray], size: int = 97):
        self.sc, self.size, self.stored = sc, size, (np.empty((4, 0), np.uint64), np.empty(0, np.int64))

    def _blocks(self, spec: SelectionSpec):
        for r0 in range(0, N, self.size):
            yield block_keys({n: v[r0 : r0 + self.size] for n, v in self.sc.items()}, r0, spec)

    def store_keys(self, spec, n_groups):
        parts = list(self._blocks(spec))
        self.stored = np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])
        words, groups = self.stored
        return np.bincount(groups[groups >= 0], minlength=n_groups), make_sampler(spec).positive(
            words, groups, n_groups
        )

    def words(self, spec) -> tuple[np.ndarray, np.ndarray]:
        return self.stored[0], exclude(self.stored[1], spec.excluded)

    def thresholds(self, spec, needs, counts):
        words, groups = self.words(spec)

        def active(ids):
            return np.where(np.isin(groups, ids), groups, NO_GROUP)

        def histogram(prefixes, ids, bits):
            return sampling.radix_histogram(words, active(ids), prefixes, bits)

        def gather(prefixes, ids, bits):
            mask = sampling.prefix_mask(words, active(ids), prefixes, bits)
            return words[:, mask], groups[mask]

        return selection.kth_thresholds(np.asarray(needs), np.asarray(counts), histogram, gather, 40)

    def score_range(self, spec):
        groups = np.concatenate([g for _, g in self._blocks(spec)])
        left = self.sc[spec.score][groups >= 0]
        return (float(left.min()), float(left.max())) if len(left) else (0.0, 0.0)


def _select(spec: SelectionSpec, sc: dict[str, np.ndarray], summary_rows: np.ndarray) -> tuple[np.ndarray, dict, int]:
    """The kept mask, the keep-list parameters and the zero-weight fill-up, as `reduce` finds them."""
    passes, sampler = _InMemory(sc), make_sampler(spec)
    top = sampling.top_rows(sc["dual"][summary_rows], sc["id_hi"][summary_rows], sc["id_lo"][summary_rows])
    summary = {"top": {"mean_p": sc["mean_p"][summary_rows][top].tolist()}}
    ok = (sc[LABEL] >= 0) if spec.balance else np.ones(N, dtype=bool)  # selectable: labelled with balance
    counted = {
        "rows": int(ok.sum()),
        **{n: int((np.isfinite(v) & ok).sum()) for n, v in sc.items() if v.dtype == float},
    }
    n_ok = sampler.selectable(counted)
    k = sampling.keep_count(n_ok, spec.ratio)
    spec, params = sampler.prepare(summary, n_ok, k, passes)
    sampler = make_sampler(spec)
    counts, positive = passes.store_keys(spec, sampler.n_groups(int(sc[LABEL].max()) + 1))
    spec, needs, split = sampler.quotas(counts, k)
    thresholds = passes.thresholds(spec, needs, counts)
    words, groups = passes.words(spec)
    kept = sampling.at_least(words, thresholds, groups)
    assert kept.sum() == k
    return kept, {**params, **split}, sampler.filled(needs, positive)


def _top(keys: np.ndarray, sc, rows: np.ndarray, k: int) -> np.ndarray:
    """Mask over all rows: the `k` largest `keys` among `rows` (ties to the smaller identity, then row)."""
    mask = np.zeros(N, dtype=bool)
    words = sampling.key_words(keys[rows], sc["id_hi"][rows], sc["id_lo"][rows], rows)
    mask[rows[sampling.select_top(words, k)]] = True
    return mask


def _per_class(keys: np.ndarray, sc, valid: np.ndarray, k: int) -> np.ndarray:
    labels = np.where(valid, sc[LABEL], -1)
    quotas = sampling.class_quotas(np.bincount(labels[labels >= 0], minlength=4), k)
    return np.any([_top(keys, sc, np.flatnonzero(labels == c), int(q)) for c, q in enumerate(quotas)], axis=0)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8, 0.99])
@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("score", ["el2n", "aum"])
def test_topk_keeps_the_highest_scores_lowest_for_aum(sc, ratio, balance, score):
    valid = np.isfinite(sc[score]) & ((sc[LABEL] >= 0) if balance else True)
    k = sampling.keep_count(int(valid.sum()), ratio)
    keys = -sc[score] if score == "aum" else sc[score]
    expected = _per_class(keys, sc, valid, k) if balance else _top(keys, sc, np.flatnonzero(valid), k)
    kept, params, filled = _select(_spec("topk", score, ratio, balance), sc, np.flatnonzero(valid))
    assert np.array_equal(kept, expected)
    assert filled == 0 and set(params) == ({"class_counts", "class_quotas"} if balance else set())


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("balance", [False, True])
def test_random_keeps_the_smallest_uniforms_with_weights(sc, ratio, balance):
    valid = (sc[LABEL] >= 0) if balance else np.ones(N, dtype=bool)
    k = sampling.keep_count(int(valid.sum()), ratio)
    keys = -uniforms(SEED, sc["id_hi"], sc["id_lo"])
    expected = _per_class(keys, sc, valid, k) if balance else _top(keys, sc, np.arange(N), k)
    kept, _, _ = _select(_spec("random", None, ratio, balance), sc, np.arange(N))
    assert np.array_equal(kept, expected)
    assert RandomSampler.weighted and RandomSampler(_spec("random", None, ratio)).weight(10, 4) == 2.5
    assert not TopKSampler.weighted and TopKSampler(_spec("topk", "el2n", ratio)).weight(10, 4) is None


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("balance", [False, True])
def test_beta_draws_by_es_keys_of_the_beta_weights(sc, ratio, balance):
    valid = np.isfinite(sc["dual"]) & np.isfinite(sc["mean_p"]) & ((sc[LABEL] >= 0) if balance else True)
    rows = np.flatnonzero(valid)
    k = sampling.keep_count(len(rows), ratio)
    anchor = sampling.anchor_of(sc["dual"][rows], sc["mean_p"][rows], sc["id_hi"][rows], sc["id_lo"][rows])
    w = np.zeros(N)
    w[rows] = sampling.beta_weights(sc["dual"][rows], sc["mean_p"][rows], ratio, c_d=4.0, anchor=anchor)
    keys = sampling.weighted_keys(w, uniforms(SEED, sc["id_hi"], sc["id_lo"]))
    expected = _per_class(keys, sc, valid, k) if balance else _top(keys, sc, rows, k)
    kept, params, filled = _select(_spec("beta", "dual", ratio, balance), sc, rows)
    assert np.array_equal(kept, expected)
    assert params["anchor"] == pytest.approx(anchor)
    assert (params["alpha"], params["beta"]) == sampling.beta_params(ratio, params["anchor"], c_d=4.0)
    assert list(params)[:6] == ["anchor", "alpha", "beta", "c_d", "C", "alpha_plus_beta"]
    if not balance:
        assert filled == max(0, k - int((w > 0).sum()))
    assert (filled > 0) == (ratio == 0.0)  # only when nearly everything is kept


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("cut", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("score", ["el2n", "aum"])
def test_ccs_cuts_the_hardest_then_fills_from_the_sparsest_bin(sc, ratio, cut, score):
    rows = np.flatnonzero(np.isfinite(sc[score]))
    k = sampling.keep_count(len(rows), ratio)
    n_cut = min(int(np.floor(cut * len(rows) + 0.5)), len(rows) - k)
    hardest = _top(-sc[score] if score == "aum" else sc[score], sc, rows, max(n_cut, 0))
    left = rows[~hardest[rows]]
    lo, hi = float(sc[score][left].min()), float(sc[score][left].max())
    bins = sampling.ccs_bin(sc[score][left], lo, hi, CCS_BINS)
    quotas = sampling.ccs_quotas(np.bincount(bins, minlength=CCS_BINS), k)
    u = -uniforms(SEED, sc["id_hi"], sc["id_lo"])
    expected = np.any([_top(u, sc, left[bins == b], int(q)) for b, q in enumerate(quotas)], axis=0)
    kept, params, _ = _select(_spec("ccs", score, ratio, cut=cut), sc, rows)
    assert np.array_equal(kept, expected)
    assert not (kept & hardest).any()
    assert params == {"cut": cut, "lo": lo, "hi": hi, "bins": CCS_BINS, "quotas": quotas.tolist()}


def test_registry_names_each_method_family_and_every_method_resolves():
    assert {"topk": TopKSampler, "beta": BetaSampler, "ccs": CCSSampler, "random": RandomSampler} == SAMPLERS
    for name in [*METHOD_SCORE, "ccs:el2n", "ccs:aum"]:
        method = Method.parse(name)
        assert sampler_class(method.sampler).name == method.sampler
    assert isinstance(make_sampler(_spec("beta", "dual", 0.5)), BetaSampler)


@pytest.mark.parametrize("name", ["top-k", "", None, "dual-beta"])
def test_unknown_sampler_is_refused_naming_the_known_ones(name):
    with pytest.raises(
        SettingsError, match=r"unknown sampler .*known samplers are \['beta', 'ccs', 'random', 'topk'\]"
    ):
        sampler_class(name)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="unknown sampler"):
        _spec(name, None, 0.5).arrays()  # type: ignore[arg-type]


def test_a_registered_sampler_is_looked_up_by_name_and_names_are_not_taken_twice(sc):
    @register_sampler("lowest-id")
    class LowestId(Sampler):
        def keys(self, sc, valid, u):
            return -sc["id_lo"].astype(np.float64)

    try:
        assert sampler_class("lowest-id") is LowestId and LowestId.name == "lowest-id"
        words, groups = block_keys(sc, 0, _spec("lowest-id", None, 0.5))
        assert np.array_equal(sampling.select_top(words, 3), _top(-sc["id_lo"].astype(float), sc, np.arange(N), 3))
        assert (groups == 0).all()
        with pytest.raises(ValueError, match="already registered"):
            register_sampler("topk")(LowestId)
    finally:
        SAMPLERS.pop("lowest-id")
    with pytest.raises(SettingsError, match="known samplers are"):
        sampler_class("lowest-id")


def test_each_sampler_names_the_scores_and_arrays_it_reads():
    assert make_sampler(_spec("random", None, 0.5)).scores() == ()
    assert make_sampler(_spec("topk", "aum", 0.5, balance=True)).arrays() == {"id_hi", "id_lo", "aum", LABEL}
    assert make_sampler(_spec("beta", "dual", 0.5)).scores() == ("dual",)
    assert make_sampler(_spec("beta", "dual", 0.5)).arrays() == {"id_hi", "id_lo", "dual", "mean_p"}
    assert make_sampler(_spec("ccs", "el2n", 0.5)).n_groups(10) == CCS_BINS
    assert make_sampler(_spec("topk", "el2n", 0.5, balance=True)).n_groups(10) == 10
    assert make_sampler(_spec("topk", "el2n", 0.5)).n_groups(10) == 1


def test_old_import_paths_still_work():
    assert selection.SelectionSpec is SelectionSpec and selection.block_keys is block_keys
    assert selection.exclude is exclude and selection.CCS_BINS == CCS_BINS
