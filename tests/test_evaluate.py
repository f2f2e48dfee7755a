"""The evaluation protocol's budget rule (pure: no Ray, no training)."""

from __future__ import annotations

import numpy as np
import pytest

from streamprune.formats.keeplist import KeepList
from streamprune.stages.evaluate import subset_epochs


def _keep(kept: list[int], samples: list[int] | None) -> KeepList:
    """A keep-list of `sum(kept)` keys over shards holding `samples` samples each."""
    pairs = [(f"s{i}.tar", f"{j:04d}") for i, n in enumerate(kept) for j in range(n)]
    base = KeepList.from_keys(pairs)
    return KeepList(
        base.manifest,
        base.names,
        base.kept,
        base.key_blob,
        base.key_offset,
        base.id_pairs,
        samples=None if samples is None else np.array(samples),
    )


def test_steps_budget_gives_every_subset_the_full_runs_steps():
    keep = _keep([300, 200], [1000, 1000])  # 500 of 2,000 kept
    assert subset_epochs(10, keep, "steps") == 40  # 10 epochs x 2,000 = 40 epochs x 500 samples
    assert subset_epochs(10, keep, "epochs") == 10
    assert subset_epochs(10, None, "steps") == 10  # all samples: the full run itself
    assert subset_epochs(3, _keep([700], [1000]), "steps") == 4  # round(3 / 0.7) = round(4.29)
    assert subset_epochs(1, _keep([1000], [1000]), "steps") == 1


def test_budget_rule_refuses_what_it_cannot_size():
    with pytest.raises(ValueError, match="budget must be one of"):
        subset_epochs(10, None, "time")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        subset_epochs(0, None)
    with pytest.raises(ValueError, match="cannot size a steps budget"):
        subset_epochs(10, _keep([5], None))  # no shard sizes, no row count: the total is unknown
