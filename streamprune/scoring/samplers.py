"""The samplers of docs/scoring.md, one class per method family, registered by name.

A sampler owns every per-method decision of the reducer's selection: which score-store arrays
a block reads (`arrays`), which scores must be computed (`scores`), which rows are selectable
and the key and group of each (`block_keys`), how many rows are selectable (`selectable`), the
groups the budget is split over (`n_groups`, `quotas`), what it must find before keys can be
computed (`prepare`: the Beta anchor, CCS's cut and score range) and what it adds to the
keep-list (`params`, `filled`, `weight`). The reducer looks a sampler up by name
(`sampler_class`, `make_sampler`) and runs it blockwise on Ray; the samplers themselves are
pure NumPy (no Ray or Zarr): the passes over blocks that `prepare` needs come in as a `Passes`.

Registered: `topk` (the score baselines), `beta` (DUAL + ratio-adaptive Beta), `ccs`
(coverage-centric, stratified), `random`. Add one with `@register_sampler("name")` on a
`Sampler` subclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, cast

import numpy as np

from streamprune.errors import SettingsError
from streamprune.scoring import sampling
from streamprune.scoring.columns import LABEL, NO_GROUP
from streamprune.scoring.methods import LOWER_IS_HARDER
from streamprune.shards.identity import uniforms

CCS_BINS = 50


@dataclass(frozen=True)
class SelectionSpec:
    """What a block needs to compute its keys: the method's sampler (a registered name) and
    score, the seed, and what earlier passes found (the Beta anchor, the CCS cut and score range,
    groups left out). Small and picklable: the reducer hands it to its Ray tasks."""

    sampler: str  # a name of `SAMPLERS`: topk | beta | ccs | random
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
    cut: float = 0.2  # CCS: the hardest fraction dropped first

    def replace(self, **changes: Any) -> SelectionSpec:
        return dataclasses.replace(self, **changes)

    def arrays(self) -> set[str]:
        """The score-store arrays `block_keys` reads."""
        return make_sampler(self).arrays()


def exclude(groups: np.ndarray, excluded: tuple[int, ...] | list[int]) -> np.ndarray:
    """`groups` with the `excluded` groups set to `NO_GROUP`."""
    return np.where(np.isin(groups, excluded), NO_GROUP, groups) if len(excluded) else groups


class Passes(Protocol):
    """The passes over all row blocks a sampler's `prepare` may ask of the reducer."""

    def store_keys(self, spec: SelectionSpec, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
        """Compute and store every block's keys and groups under `spec`; per group, its rows and
        those with a positive weight (`Sampler.positive`)."""
        ...

    def thresholds(self, spec: SelectionSpec, needs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """`selection.kth_thresholds` over the stored keys of `spec`: words `(4, G)`."""
        ...

    def score_range(self, spec: SelectionSpec) -> tuple[float, float]:
        """Min and max of `spec.score` over the rows selectable under `spec` ((0, 0): none)."""
        ...


class Sampler:
    """One selection method: the kept rows are, per group, those with the largest keys. The base
    class is a top-k over `spec.score`; subclasses change the keys, groups and budget split."""

    name: ClassVar[str] = ""
    weighted: ClassVar[bool] = False  # the keep-list carries sample weights

    def __init__(self, spec: SelectionSpec):
        self.spec = spec

    # -- what a block reads and computes
    def scores(self) -> tuple[str, ...]:
        """The scores this sampler selects by (computed even with `scores="method"`)."""
        return (self.spec.score,) if self.spec.score else ()

    def arrays(self) -> set[str]:
        """The score-store arrays `block_keys` reads."""
        names = {"id_hi", "id_lo", *self.scores()}
        if self.spec.balance:
            names.add(LABEL)
        return names

    def valid(self, sc: dict[str, np.ndarray]) -> np.ndarray:
        """Selectable rows: a finite score, and with class balance a label."""
        n = len(sc["id_hi"])
        score = self.spec.score
        valid = np.ones(n, dtype=bool) if score is None else np.isfinite(sc[score])
        if self.spec.balance:
            valid &= sc[LABEL] >= 0
        return valid

    def keys(self, sc: dict[str, np.ndarray], valid: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Float64 selection keys (larger: kept first)."""
        score = cast(str, self.spec.score)
        return sampling.score_keys(np.where(valid, sc[score], 0.0), score in LOWER_IS_HARDER)

    def groups(self, sc: dict[str, np.ndarray], valid: np.ndarray, r0: int) -> np.ndarray:
        """Each row's group (`NO_GROUP`: not selectable): its class with balance, else 0."""
        return np.where(valid, sc[LABEL] if self.spec.balance else 0, NO_GROUP)

    def block_keys(self, sc: dict[str, np.ndarray], r0: int) -> tuple[np.ndarray, np.ndarray]:
        """Selection words `(4, n)` and groups of the block of rows starting at `r0`, from its
        arrays `sc` (those `arrays()` names)."""
        hi, lo = sc["id_hi"], sc["id_lo"]
        valid = self.valid(sc)
        keys = self.keys(sc, valid, uniforms(self.spec.seed, hi, lo))
        words = sampling.key_words(keys, hi, lo, np.arange(r0, r0 + len(hi)))
        return words, exclude(self.groups(sc, valid, r0), self.spec.excluded)

    def positive(self, words: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
        """Per group, the rows of a block with a positive sampling weight (see `filled`)."""
        return np.zeros(n_groups, dtype=np.int64)

    # -- the driver's decisions
    def selectable(self, counted: dict[str, int]) -> int:
        """The selectable rows, from the counts of rows (`rows`) and of finite values per score."""
        return counted[self.spec.score] if self.spec.score else counted["rows"]

    def n_groups(self, n_classes: int) -> int:
        """The groups the budget is split over."""
        return n_classes if self.spec.balance else 1

    def prepare(
        self, summary: dict[str, Any], n_ok: int, k: int, passes: Passes
    ) -> tuple[SelectionSpec, dict[str, Any]]:
        """The spec completed by what must be known before keys (`summary`: the scoring pass's),
        and the first keep-list parameters."""
        return self.spec, {}

    def quotas(self, counts: np.ndarray, k: int) -> tuple[SelectionSpec, np.ndarray, dict[str, Any]]:
        """Split the budget `k` over the groups of `counts` rows: the spec with empty groups
        excluded, the need per group, and the keep-list parameters that record the split."""
        if not self.spec.balance:
            return self.spec.replace(excluded=(0,) if k == 0 else ()), np.array([k]), {}
        needs = sampling.class_quotas(counts, k)
        params = {"class_counts": counts.tolist(), "class_quotas": needs.tolist()}
        return self._without_empty(needs), needs, params

    def filled(self, needs: np.ndarray, positive: np.ndarray) -> int:
        """Rows filled uniformly because too few had a positive weight."""
        return 0

    def weight(self, n_ok: int, k: int) -> float | None:
        """The weight of every kept sample (None: the list has no weights)."""
        return None

    def _without_empty(self, needs: np.ndarray) -> SelectionSpec:
        return self.spec.replace(excluded=tuple(int(g) for g in np.flatnonzero(needs == 0)))


SAMPLERS: dict[str, type[Sampler]] = {}
S = TypeVar("S", bound=type[Sampler])


def register_sampler(name: str) -> Callable[[S], S]:
    """Class decorator: register a `Sampler` subclass under `name` (refused if taken)."""

    def register(cls: S) -> S:
        if name in SAMPLERS and SAMPLERS[name] is not cls:
            raise ValueError(f"sampler {name!r} is already registered ({SAMPLERS[name].__qualname__})")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return register


def sampler_class(name: str) -> type[Sampler]:
    """The sampler registered as `name`; an unknown name is a `SettingsError` listing the known ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise SettingsError(f"unknown sampler {name!r}: known samplers are {sorted(SAMPLERS)}") from None


def make_sampler(spec: SelectionSpec) -> Sampler:
    """The sampler `spec.sampler` names, for `spec`."""
    return sampler_class(spec.sampler)(spec)


def block_keys(sc: dict[str, np.ndarray], r0: int, spec: SelectionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Selection words `(4, n)` and groups (`NO_GROUP`: not selectable) of the block of rows
    starting at `r0`, from its arrays `sc` (those `spec.arrays()` names)."""
    return make_sampler(spec).block_keys(sc, r0)


@register_sampler("topk")
class TopKSampler(Sampler):
    """Top-k: the `k` highest scores (lowest for AUM), per class with class balance."""


@register_sampler("random")
class RandomSampler(Sampler):
    """`k` rows uniformly without replacement: the `k` smallest uniforms. Kept samples carry the
    weight `N / k` (each stands for that many)."""

    weighted = True

    def keys(self, sc: dict[str, np.ndarray], valid: np.ndarray, u: np.ndarray) -> np.ndarray:
        return sampling.uniform_keys(u)

    def weight(self, n_ok: int, k: int) -> float | None:
        return n_ok / max(k, 1)


@register_sampler("beta")
class BetaSampler(Sampler):
    """DUAL + ratio-adaptive Beta: Efraimidis-Spirakis keys of the weights
    `BetaPDF(mean_p; alpha, beta) * dual`, zero weights filled uniformly last."""

    def scores(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*super().scores(), "dual"]))

    def arrays(self) -> set[str]:
        return super().arrays() | {"mean_p", "dual"}

    def valid(self, sc: dict[str, np.ndarray]) -> np.ndarray:
        valid: np.ndarray = super().valid(sc) & np.isfinite(sc["mean_p"])
        return valid

    def keys(self, sc: dict[str, np.ndarray], valid: np.ndarray, u: np.ndarray) -> np.ndarray:
        s = self.spec
        w = np.zeros(len(valid))
        w[valid] = sampling.beta_weights(
            sc["dual"][valid],
            sc["mean_p"][valid],
            s.ratio,
            c_d=s.c_d,
            C=s.C,
            alpha_plus_beta=s.alpha_plus_beta,
            anchor=s.anchor,
        )
        return sampling.weighted_keys(w, u)

    def positive(self, words: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
        # ES keys of positive weights are above the zero-weight base
        pos = (groups >= 0) & (words[0] > np.uint64(sampling.POSITIVE_WEIGHT_BITS))
        return np.bincount(groups[pos], minlength=n_groups)

    def selectable(self, counted: dict[str, int]) -> int:
        return min(counted["dual"], counted["mean_p"])

    def prepare(
        self, summary: dict[str, Any], n_ok: int, k: int, passes: Passes
    ) -> tuple[SelectionSpec, dict[str, Any]]:
        """The anchor: mean `mean_p` of the 10 highest-DUAL rows (0.5 when there are none)."""
        s = self.spec
        top = summary["top"]["mean_p"]
        spec = s.replace(anchor=float(np.mean(top)) if top else 0.5)
        alpha, beta = sampling.beta_params(s.ratio, spec.anchor, c_d=s.c_d, C=s.C, alpha_plus_beta=s.alpha_plus_beta)
        params: dict[str, Any] = dict(
            anchor=spec.anchor, alpha=alpha, beta=beta, c_d=s.c_d, C=s.C, alpha_plus_beta=s.alpha_plus_beta
        )
        return spec, params

    def filled(self, needs: np.ndarray, positive: np.ndarray) -> int:
        return int(np.maximum(0, needs - positive).sum())


@register_sampler("ccs")
class CCSSampler(Sampler):
    """Coverage-centric, stratified: drop the hardest `cut` fraction, split the remaining score
    range into `CCS_BINS` equal bins (the groups) and fill the budget from the sparsest bin up,
    uniformly inside a bin. Its first pass (`phase="cut"`) ranks by difficulty, as top-k does."""

    def _cutting(self) -> bool:
        return self.spec.phase == "cut"

    def keys(self, sc: dict[str, np.ndarray], valid: np.ndarray, u: np.ndarray) -> np.ndarray:
        return super().keys(sc, valid, u) if self._cutting() else sampling.uniform_keys(u)

    def groups(self, sc: dict[str, np.ndarray], valid: np.ndarray, r0: int) -> np.ndarray:
        if self._cutting():
            return super().groups(sc, valid, r0)
        s = self.spec
        harder = np.zeros(len(valid), dtype=bool)
        if s.cut_threshold is not None:
            hi, lo = sc["id_hi"], sc["id_lo"]
            difficulty = sampling.key_words(super().keys(sc, valid, np.empty(0)), hi, lo, np.arange(r0, r0 + len(hi)))
            harder = sampling.at_least(difficulty, np.asarray(s.cut_threshold, dtype=np.uint64))
        return np.where(valid & ~harder, sampling.ccs_bin(sc[cast(str, s.score)], s.lo, s.hi, CCS_BINS), NO_GROUP)

    def n_groups(self, n_classes: int) -> int:
        return CCS_BINS

    def prepare(
        self, summary: dict[str, Any], n_ok: int, k: int, passes: Passes
    ) -> tuple[SelectionSpec, dict[str, Any]]:
        """The cut threshold (the hardest `cut` fraction, fewer if the budget needs them) and the
        score range of the rows that remain."""
        s = self.spec
        n_cut = min(int(np.floor(s.cut * n_ok + 0.5)), n_ok - k)
        threshold = None
        if n_cut > 0:
            cut_spec = s.replace(phase="cut")
            passes.store_keys(cut_spec, 1)
            words = passes.thresholds(cut_spec, np.array([n_cut]), np.array([n_ok]))
            threshold = tuple(int(x) for x in words[:, 0])
        lo, hi = passes.score_range(s.replace(cut_threshold=threshold, lo=0.0, hi=1.0))
        return s.replace(cut_threshold=threshold, lo=lo, hi=hi), {"cut": s.cut}

    def quotas(self, counts: np.ndarray, k: int) -> tuple[SelectionSpec, np.ndarray, dict[str, Any]]:
        needs = sampling.ccs_quotas(counts, k)
        params = {"lo": self.spec.lo, "hi": self.spec.hi, "bins": CCS_BINS, "quotas": needs.tolist()}
        return self._without_empty(needs), needs, params
