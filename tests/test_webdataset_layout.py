"""The webdataset pipeline layout `PrunedWebDataset` splices into: if a webdataset release
changes it, this fails first (rather than the loader reading the wrong stages)."""

from __future__ import annotations

import webdataset as wds
from webdataset import cache

from streamprune.formats.keeplist import KeepList
from streamprune.loader import PrunedWebDataset, _KeptShards, _ReadKept


def _names(pipeline) -> list[str]:
    return [
        getattr(getattr(s, "f", None), "__name__", None) or getattr(s, "__name__", None) or type(s).__name__
        for s in pipeline
    ]


def test_webdataset_opens_shards_then_expands_tars_then_groups_members(uneven_shards, tmp_path):
    paths, _ = uneven_shards
    for kwargs in ({}, {"cache_dir": str(tmp_path)}):
        pipeline = wds.WebDataset(paths, shardshuffle=False, **kwargs).pipeline
        opener = next(i for i, s in enumerate(pipeline) if isinstance(s, (cache.StreamingOpen, cache.FileCache)))
        assert _names(pipeline)[opener + 1 : opener + 3] == ["tar_file_expander", "group_by_keys"], kwargs
        assert _names(pipeline)[:3] == ["SimpleShardList", "single_node_only", "split_by_worker"]


def test_pruned_webdataset_replaces_exactly_the_opener_expander_and_grouper(uneven_shards, tmp_path):
    from streamprune.training.own_loop import index_in_process  # no Ray needed

    paths, _ = uneven_shards
    idx = index_in_process(paths, tmp_path / "run")
    keep = KeepList.from_rows(idx, list(range(10)), tmp_path / "keep")
    base = _names(wds.WebDataset(paths, shardshuffle=False).pipeline)
    ours = PrunedWebDataset(paths, keep=keep, shardshuffle=False).pipeline
    kinds = [type(s) for s in ours]
    k = kinds.index(_KeptShards)
    assert kinds[k + 1] is _ReadKept
    opener = base.index("StreamingOpen")
    assert _names(ours[:k]) == base[:opener] and _names(ours[k + 2 :]) == base[opener + 3 :]
