"""streamprune: prune web-scale WebDataset training sets while they stream.

Heavy parts (Ray, Zarr, torch) are imported only by the stages that need them, so
`import streamprune` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "index": ("streamprune.indexer", "index"),
    "Index": ("streamprune.shardindex", "Index"),
    "StatsStore": ("streamprune.store", "StatsStore"),
    "record": ("streamprune.recorder", "record"),
    "StatsLogger": ("streamprune.ownloop", "StatsLogger"),
    "IndexedShards": ("streamprune.ownloop", "IndexedShards"),
    "index_in_process": ("streamprune.ownloop", "index_in_process"),
    "sample_stats": ("streamprune.stats", "sample_stats"),
    "BadSample": ("streamprune.labels", "BadSample"),
    "StreamPruneError": ("streamprune.errors", "StreamPruneError"),
    "SettingsError": ("streamprune.errors", "SettingsError"),
    "InputError": ("streamprune.errors", "InputError"),
    "DamagedRunError": ("streamprune.errors", "DamagedRunError"),
    "Classes": ("streamprune.labels", "Classes"),
    "ToTensors": ("streamprune.decode", "ToTensors"),
    "reduce": ("streamprune.reducer", "reduce"),
    "KeepList": ("streamprune.keeplist", "KeepList"),
    "PrunedWebDataset": ("streamprune.loader", "PrunedWebDataset"),
    "keep_filter": ("streamprune.loader", "keep_filter"),
    "KeepPredicate": ("streamprune.loader", "KeepPredicate"),
    "reshard": ("streamprune.resharder", "reshard"),
    "expand_urls": ("streamprune.shardlist", "expand_urls"),
    "shard_names": ("streamprune.identity", "shard_names"),
    "json_field": ("streamprune.identity", "json_field"),
    "SampleIdentity": ("streamprune.identity", "SampleIdentity"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
