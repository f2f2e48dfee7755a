"""`streamprune record`: train a proxy model on Ray Train (DDP) and record per-sample statistics.

Each epoch the healthy shards are shuffled with `(seed, epoch)` and cut into contiguous
runs of about equal sample counts, one per worker; each worker streams its shards through
webdataset in a multi-process DataLoader, trains, and sends every sample's statistics to
the writer actor that owns its chunk. Uneven inputs are joined (`torch.distributed`
`Join`), so no worker hangs and no sample is dropped. After each epoch the driver-side
rank 0 flushes the writers, saves a checkpoint, then marks the epoch's shards complete;
a rerun (or a Ray Train restart after a worker dies) resumes at the first incomplete epoch.

This module is the driver (`record`); the rest of `record` is by role in `record_resolved`
(the settings resolved and stored with the run), `record_inputs` (what the run trains on), `record_cluster`
(workers on the Ray cluster, Ray Train's failures), `record_worker` (each Ray Train worker's
loop), `record_progress` (bars and the estimate) and `record_writers` (the chunk owners).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray

from streamprune import storage
from streamprune.formats.atomic import output_lock
from streamprune.formats.classes import Classes
from streamprune.formats.commit import clean_uncommitted
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.sources import shard_urls
from streamprune.formats.stats_store import StatsStore, clear_statistics
from streamprune.settings import RecordSettings
from streamprune.stages.ray_cluster import ensure_ray
from streamprune.stages.record_cluster import fit_error, per_worker, placement
from streamprune.stages.record_inputs import describe, inputs, record_label, training_view
from streamprune.stages.record_progress import Bars, Progress, estimate
from streamprune.stages.record_resolved import TRAINING_KEYS, ResolvedSettings, resolve_settings
from streamprune.stages.record_worker import train_loop
from streamprune.stages.record_writers import StoreWriters
from streamprune.training.samples import bad_samples, healthy_shards

log = logging.getLogger(__name__)


@dataclass
class RecordSummary:
    """What `record` did: epochs run now, seconds per epoch, samples/s per worker."""

    run: str
    epochs_done: int
    epochs_run: list[int] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    samples_per_s_per_worker: list[float] = field(default_factory=list)
    samples: int = 0
    bad_samples: int = 0  # skipped as undecodable (listed in RUN/bad-samples.jsonl)
    inputs: str = ""  # what the model saw, e.g. "64x64 RGB, random resized crop"


def record(
    run: str | os.PathLike,
    epochs: int | None = None,
    *,
    settings: RecordSettings | None = None,
    address: str | None = None,
    progress: bool = True,
    augment_images: bool = True,
    chunk_rows: int | None = None,
    record_stats: bool = True,
    shards: str | Iterable[str] | None = None,
    restart: bool = False,
    **options: Any,
) -> RecordSummary:
    """Train the proxy for the first `epochs` epochs of a `schedule_epochs` cosine schedule and
    write every sample's statistics per epoch to `run/stats.zarr`; resumes an interrupted run.

    The settings are `settings` (a `RecordSettings`, whose fields say what each does) with
    `epochs` and any of its fields given as keyword `options` on top; bad values are refused
    before any work. `record_stats=False` trains without recording (the benchmark's baseline)
    and writes nothing to the store; `augment_images` and `chunk_rows` are for tests and benchmarks.
    `shards`: the URLs of the indexed shards to read (`shards.sources.shard_urls`; default: the
    index's root plus each shard's name). `restart`: first clear what an earlier `record` of the run
    wrote (`clear_statistics`), so that it records from epoch 0 with these settings.
    """
    if epochs is not None:
        options["epochs"] = epochs
    if isinstance(options.get("classes"), os.PathLike):
        options["classes"] = os.fspath(options["classes"])
    s = (settings or RecordSettings()).replace(**options)
    run = storage.absolute(run)
    idx = Index(RunDir(run).index)
    urls = shard_urls(idx, shards)  # a stored URL that may not be opened is refused before any work
    with output_lock(RunDir(run).stats, writer="record"):  # a second `record` of the run is refused, naming this one
        if restart:
            clear_statistics(run)
        clean_uncommitted(RunDir(run).stats)  # what a killed store creation left; we hold the lock
        return _record(run, idx, s, address, progress, augment_images, chunk_rows, record_stats, urls, shards)


def _record(
    run: str,
    idx: Index,
    s: RecordSettings,
    address: str | None,
    progress: bool,
    augment_images: bool,
    chunk_rows: int | None,
    record_stats: bool,
    urls: list[str],
    shards: str | Iterable[str] | None,
) -> RecordSummary:
    """`record`, holding the run's writer lock: what the run trains on, the workers, the resolved settings,
    the store (a finished run stops here), then training."""
    label = record_label(run, s.label, s.decode, s.classes)
    healthy = healthy_shards(idx).tolist()
    probe, decoded, classes, named = inputs(
        run, idx, healthy, urls, shards, label, s.decode, s.classes, s.num_classes, address, progress
    )
    ensure_ray(address)
    workers, gpus_per_worker = placement(s.workers, s.gpus_per_worker, ray.cluster_resources())
    store_path = RunDir(run).stats
    view, shape, model, note = training_view(probe, decoded, s.image_size, s.model, store_path, gpus_per_worker)
    cfg = resolve_settings(
        s,
        model=model,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        label=label,
        classes=classes,
        named=named,
        view=view,
        shape=shape,
        augment=augment_images,
        record_stats=record_stats,
    )
    start, writers = 0, None
    if record_stats:
        kwargs = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
        store = StatsStore.create(store_path, idx, s.epochs, config=asdict(cfg), same=TRAINING_KEYS, **kwargs)
        start = store.complete_epochs()
        if start == s.epochs:
            return RecordSummary(str(run), s.epochs)
        writers = StoreWriters(store_path, n_writers=workers)
    if note is not None:  # said when training starts, not on a finished run
        log.info(note)
    tracker = Progress.remote()  # type: ignore[attr-defined]
    n_samples = int(np.diff(idx.shard_offset)[healthy].sum())
    summary = _fit(run, cfg, writers, tracker, classes, start, s.max_failures, progress, n_samples, urls)
    for actor in ([] if writers is None else writers.actors) + [tracker]:
        ray.kill(actor)
    summary.bad_samples = len(bad_samples(run))
    summary.inputs = describe(view, shape, s.decode, classes, named)
    return summary


def _fit(
    run: str,
    cfg: ResolvedSettings,
    writers: StoreWriters | None,
    tracker: Any,
    classes: Classes,
    start: int,
    max_failures: int,
    progress: bool,
    n_samples: int,
    urls: list[str],
) -> RecordSummary:
    """Train on Ray Train from epoch `start`, drawing progress from `tracker` (a `Progress` actor)
    while it runs; a failure is raised as the user's error it wraps, when it wraps one."""
    trainer = _trainer(run, cfg, writers, tracker, classes, start, max_failures, urls)
    error: list = []

    def fit():
        try:
            trainer.fit()
        except Exception as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    state, epochs = _watch(thread, tracker, cfg, n_samples, progress)
    if error:
        raise fit_error(error[0], max_failures) from None
    return _summary(run, cfg, state, epochs, start)


def _trainer(
    run: str,
    cfg: ResolvedSettings,
    writers: StoreWriters | None,
    tracker: Any,
    classes: Classes,
    start: int,
    max_failures: int,
    urls: list[str],
) -> Any:
    """Ray Train's TorchTrainer running `record_worker.train_loop` on `cfg.workers` workers."""
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig  # Ray Train v2: its default
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": asdict(cfg),
            "run": str(run),
            "writers": writers,
            "progress": tracker,
            "urls": urls,
            "classes": classes,
            "threads": 1,
            "start": start,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=bool(cfg.gpus_per_worker),
            resources_per_worker=per_worker(cfg.gpus_per_worker),
        ),
        run_config=RunConfig(
            name="record",
            **_ray_storage(RunDir(run).ray_train),
            # a worker group that cannot start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) is a
            # controller failure, which Ray Train retries forever unless limited
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
        ),
    )


def _watch(
    thread: threading.Thread, tracker: Any, cfg: ResolvedSettings, n_samples: int, progress: bool
) -> tuple[dict, dict]:
    """Until `thread` (training) ends: the estimate once rates are measured, and the bars when
    `progress`; the tracker's last `(state, epochs)`."""
    from tqdm import tqdm

    bars = Bars(n_samples)
    state: dict = {}
    epochs: dict = {}
    estimated = False
    while thread.is_alive():
        thread.join(0.5)
        state, epochs = ray.get(tracker.get.remote())
        line = None if estimated else estimate(state, cfg, n_samples)
        if line is not None:
            with tqdm.external_write_mode(file=sys.stderr):  # a bar drawn on the terminal is redrawn below it
                log.info(line)
            estimated = True
        if progress:
            bars.update(state, epochs)
    bars.close()
    return state, epochs


def _summary(run: str, cfg: ResolvedSettings, state: dict, epochs: dict, start: int) -> RecordSummary:
    """The summary of the epochs trained now, from the tracker's last state; a line logged per epoch."""
    summary = RecordSummary(
        str(run), max(epochs, default=start - 1) + 1, sorted(epochs), [epochs[e] for e in sorted(epochs)]
    )
    for epoch, sec in zip(summary.epochs_run, summary.epoch_seconds, strict=True):
        counts = [state[(epoch, rank)]["n"] for rank in range(cfg.workers) if (epoch, rank) in state]
        rates = [n / max(sec, 1e-9) for n in counts]
        summary.samples_per_s_per_worker += rates
        summary.samples += sum(counts)
        log.info("epoch %d: %.1f s, samples/s per worker: %s", epoch, sec, ", ".join(f"{r:,.0f}" for r in rates))
    return summary


def _ray_storage(location: str) -> dict:
    """Ray Train's storage arguments for `location`: a local folder as is; an object-store URL
    through the same fsspec filesystem as the rest of the run (credentials and endpoint from the
    standard environment), so that a cluster with no shared filesystem needs nothing more."""
    if not storage.is_url(location):
        return {"storage_path": location}
    import pyarrow.fs

    fs, path = storage.filesystem(location)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}
