"""streamprune: prune web-scale WebDataset training sets while they stream.

`__all__` is the public API: README, docs, examples and benchmarks use only these names (and the
names of the public modules among them: `scores`, `sampling`, `errors`, `demo`); every other module
is internal and may move. Heavy parts (Ray, Zarr, torch) are imported only by the stages that need
them, so `import streamprune` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "scores": ("streamprune.scoring.scores", None),
    "sampling": ("streamprune.scoring.sampling", None),
    "errors": ("streamprune.errors", None),
    "index": ("streamprune.stages.index", "index"),
    "Index": ("streamprune.formats.index", "Index"),
    "StatsStore": ("streamprune.formats.stats_store", "StatsStore"),
    "record": ("streamprune.stages.record", "record"),
    "StatsLogger": ("streamprune.training.own_loop", "StatsLogger"),
    "IndexedShards": ("streamprune.training.own_loop", "IndexedShards"),
    "index_in_process": ("streamprune.training.own_loop", "index_in_process"),
    "sample_stats": ("streamprune.training.stats", "sample_stats"),
    "BadSample": ("streamprune.shards.labels", "BadSample"),
    "IndexSettings": ("streamprune.settings", "IndexSettings"),
    "RecordSettings": ("streamprune.settings", "RecordSettings"),
    "ReduceSettings": ("streamprune.settings", "ReduceSettings"),
    "EvaluateSettings": ("streamprune.settings", "EvaluateSettings"),
    "ReportSettings": ("streamprune.settings", "ReportSettings"),
    "StreamPruneError": ("streamprune.errors", "StreamPruneError"),
    "SettingsError": ("streamprune.errors", "SettingsError"),
    "InputError": ("streamprune.errors", "InputError"),
    "DamagedRunError": ("streamprune.errors", "DamagedRunError"),
    "ChangedShardError": ("streamprune.errors", "ChangedShardError"),
    "NewerFormatError": ("streamprune.errors", "NewerFormatError"),
    "RunDir": ("streamprune.formats.rundir", "RunDir"),
    "Classes": ("streamprune.formats.classes", "Classes"),
    "ToTensors": ("streamprune.training.decode", "ToTensors"),
    "reduce": ("streamprune.stages.reduce", "reduce"),
    "KeepList": ("streamprune.formats.keeplist", "KeepList"),
    "PrunedWebDataset": ("streamprune.loader", "PrunedWebDataset"),
    "keep_filter": ("streamprune.loader", "keep_filter"),
    "KeepPredicate": ("streamprune.loader", "KeepPredicate"),
    "reshard": ("streamprune.stages.reshard", "reshard"),
    "export": ("streamprune.stages.export", "export"),
    "expand_urls": ("streamprune.shards.urls", "expand_urls"),
    "shard_names": ("streamprune.shards.identity", "shard_names"),
    "json_field": ("streamprune.shards.identity", "json_field"),
    "SampleIdentity": ("streamprune.shards.identity", "SampleIdentity"),
    "LabelSpec": ("streamprune.shards.labels", "LabelSpec"),
    "scan_classes": ("streamprune.stages.label_scan", "scan_classes"),
    "small_cnn": ("streamprune.training.models", "small_cnn"),
    "sync_from_rank0": ("streamprune.training.recipe", "sync_from_rank0"),
    "train_subset": ("streamprune.stages.evaluate", "train_subset"),
    "ensure_ray": ("streamprune.stages.ray_cluster", "ensure_ray"),
    "load_config": ("streamprune.config", "load_config"),
    "run_pipeline": ("streamprune.stages.pipeline", "run_pipeline"),
    "build_report": ("streamprune.stages.report", "build_report"),
    "run_state": ("streamprune.inspection.run_state", "run_state"),
    "verify_run": ("streamprune.inspection.verify", "verify_run"),
    "demo": ("streamprune.demo", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        loaded = importlib.import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
