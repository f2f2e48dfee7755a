"""`streamprune record`: train a proxy model on Ray Train (DDP) and record per-sample statistics.

Each epoch the healthy shards are shuffled with `(seed, epoch)` and cut into contiguous
runs of about equal sample counts, one per worker; each worker streams its shards through
webdataset in a multi-process DataLoader, trains, and sends every sample's statistics to
the writer actor that owns its chunk. Uneven inputs are joined (`torch.distributed`
`Join`), so no worker hangs and no sample is dropped. After each epoch the driver-side
rank 0 flushes the writers, saves a checkpoint, then marks the epoch's shards complete;
a rerun (or a Ray Train restart after a worker dies) resumes at the first incomplete epoch.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from streamprune import storage
from streamprune.errors import InputError, SettingsError, StreamPruneError
from streamprune.formats.atomic import output_lock
from streamprune.formats.classes import Classes
from streamprune.formats.commit import clean_uncommitted
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.sources import shard_urls
from streamprune.formats.stats_store import (
    LABEL,
    LABEL_MISSING,
    STATS,
    StatsStore,
    clear_statistics,
    missing_stats,
    store_exists,
)
from streamprune.settings import RecordSettings
from streamprune.shards.labels import BadSample, LabelSpec, class_count, sample_name
from streamprune.stages.ray_cluster import ensure_ray, placeable
from streamprune.stages.record_writers import StoreWriters
from streamprune.training.decode import (
    CPU_SIZE,
    DEFAULT_SIZE,
    IMAGE_EXTS,
    PROBE_SAMPLES,
    Probe,
    SampleDecoder,
    View,
    probe_images,
)
from streamprune.training.models import CPU_MODEL, build_model, model_name
from streamprune.training.recipe import make_sgd, set_cosine_lr, sync_from_rank0, train_step
from streamprune.training.samples import (
    assign_shards,
    bad_samples,
    healthy_shards,
    indexed_samples,
    log_bad_sample,
    shuffled,
)
from streamprune.training.stats import sample_stats

log = logging.getLogger(__name__)
_TRAINING_KEYS = (
    "epochs",
    "schedule_epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "seed",
    "model",
    "num_classes",
    "augment",
    "label",
    "decode",
    "view",
    "classes",
)
# RecordSettings fields the store's recipe keeps as given (the others are resolved, or only say how to run)
_STORED_AS_GIVEN = ("epochs", "schedule_epochs", "batch_size", "lr", "seed", "model", "label", "decode", "image_size")


def changed_settings(recipe: dict, settings: RecordSettings) -> list[str]:
    """The settings whose value differs from a store's recorded recipe (`StatsStore.config`)."""
    unset = {k: getattr(settings, k) or recipe.get(k) for k in ("label", "model")}  # unset: the run's own
    given = {**settings.to_dict(), **unset}
    return [k for k in _STORED_AS_GIVEN if k in recipe and recipe[k] != given[k]]


@dataclass
class RecordConfig:
    """The run's training recipe; stored in the stats store so that a resume uses the same one."""

    epochs: int
    schedule_epochs: int
    batch_size: int
    lr: float
    seed: int
    model: str | None
    num_classes: int
    augment: bool
    workers: int
    gpus_per_worker: float
    loader_workers: int
    record: bool
    on_bad_sample: str
    label: str
    decode: str | None
    image_size: int | None  # as asked; `view` is what the run uses
    view: list | None  # [channels, height, width, resized]; None with a decode function
    input_shape: list  # one example's shape as the model sees it
    classes: str | None  # digest of RUN/classes.json, when the labels are names or were scanned
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    shuffle_buffer: int = 1000


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


class ShardStream(torch.utils.data.IterableDataset):
    """Streams the samples of some shards as `(example, label, row)`, split across DataLoader workers.

    The row of a sample is its shard's first row plus its position in the tar, checked
    against the index's key so that a shard changed since indexing is caught.
    """

    def __init__(
        self,
        index_path: str,
        shards: list[int],
        sources: dict[int, str],
        epoch: int,
        seed: int,
        do_augment: bool,
        shuffle_buffer: int,
        decoder: SampleDecoder,
        shape: tuple[int, ...],
        on_bad_sample: str = "error",
    ):
        self.index_path, self.shards, self.sources, self.epoch, self.seed = index_path, shards, sources, epoch, seed
        self.do_augment, self.shuffle_buffer, self.decoder = do_augment, shuffle_buffer, decoder
        self.shape, self.on_bad_sample = tuple(shape), on_bad_sample

    def _bad(self, idx: Index, shard: int, key: str, row: int, reason: str):
        """A sample that cannot be decoded: an error, or (skip) logged and yielded with label -1."""
        if self.on_bad_sample == "error":
            raise BadSample(f"{reason} (on_bad_sample='skip' skips such samples)")
        log_bad_sample(storage.parent(self.index_path), idx.names[shard], key, row, self.epoch, reason)
        return torch.zeros(self.shape), -1, row

    def _samples(self, idx: Index, shard: int):
        rng = np.random.default_rng([self.seed, self.epoch, shard]) if self.do_augment else None
        for sample, row in indexed_samples(idx, shard, self.sources[shard]):
            try:
                x, label = self.decoder(sample, rng)
            except BadSample as exc:
                yield self._bad(idx, shard, sample["__key__"], row, str(exc))
                continue
            if tuple(x.shape) != self.shape:
                yield self._bad(
                    idx,
                    shard,
                    sample["__key__"],
                    row,
                    f"sample {sample['__key__']!r} of shard "
                    f"{idx.names[shard]!r}: decoded to shape {tuple(x.shape)}, the run's inputs are "
                    f"{self.shape}",
                )
                continue
            yield x, label, row

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        idx = Index(self.index_path)
        wid = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, self.epoch, 1 << 20, *mine[:1], wid])
        yield from shuffled((item for shard in mine for item in self._samples(idx, shard)), self.shuffle_buffer, rng)


@ray.remote(num_cpus=0)
class Progress:
    """Collects per-rank counts so that the driver can draw a progress bar and a summary."""

    def __init__(self):
        self.state: dict = {}
        self.epochs: dict = {}

    def update(self, rank: int, epoch: int, n: int, loss: float, correct: int) -> None:
        first = {"n": 0, "loss": 0.0, "correct": 0, "t0": time.time(), "n0": n}  # n0: counted before t0
        s = self.state.setdefault((epoch, rank), first)
        s["n"] += n
        s["loss"] += loss
        s["correct"] += correct
        s["t1"] = time.time()

    def reset(self, rank: int, epoch: int) -> None:
        """Forget a rank's counts for an epoch it (re)starts, e.g. after a worker failure."""
        self.state.pop((epoch, rank), None)

    def epoch_done(self, epoch: int, seconds: float) -> None:
        self.epochs[epoch] = seconds

    def get(self) -> tuple[dict, dict]:
        return self.state, self.epochs


def _train_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel

    rc = RecordConfig(**cfg["config"])
    run = cfg["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg["threads"]))
    distributed = dist.is_available() and dist.is_initialized()
    barrier = dist.barrier if distributed else (lambda: None)
    idx = Index(RunDir(run).index)
    start = StatsStore.open(RunDir(run).stats, mode="r").complete_epochs() if rc.record else cfg["start"]
    torch.manual_seed(rc.seed)
    net = build_model(rc.model, tuple(rc.input_shape), rc.num_classes)
    decoder = SampleDecoder(None if rc.view is None else View(*rc.view), rc.label, cfg["classes"], rc.decode)
    opt_state = None
    if start > 0:
        ckpt = torch.load(
            io.BytesIO(storage.read_bytes(RunDir(run).checkpoint(start))), map_location="cpu", weights_only=True
        )
        net.load_state_dict(ckpt["model"])
        opt_state = ckpt["optimizer"]
    model = ray.train.torch.prepare_model(net)
    device = ray.train.torch.get_device()
    opt = make_sgd(model, rc.lr, rc.momentum, rc.weight_decay, rc.nesterov)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    writers: StoreWriters = cfg["writers"]
    progress = cfg["progress"]
    healthy = np.array(cfg["healthy"], dtype=np.int64)
    counts = np.diff(idx.shard_offset)[healthy]
    per_worker_batch = max(1, rc.batch_size // world)
    for epoch in range(start, rc.epochs):
        t0 = time.time()
        progress.reset.remote(rank, epoch)
        set_cosine_lr(opt, rc.lr, epoch, rc.schedule_epochs)
        if rank == 0 and rc.record:
            writers.begin(epoch)
        barrier()
        mine = assign_shards(counts, healthy, world, rc.seed, epoch)[rank].tolist()
        loader = torch.utils.data.DataLoader(
            ShardStream(
                str(RunDir(run).index),
                mine,
                {s: cfg["urls"][s] for s in mine},  # the shards' URLs, resolved by the driver
                epoch,
                rc.seed,
                rc.augment,
                rc.shuffle_buffer,
                decoder,
                tuple(rc.input_shape),
                rc.on_bad_sample,
            ),
            batch_size=per_worker_batch,
            num_workers=min(rc.loader_workers, len(mine)),
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        model.train()
        pending, rows_buf, stats_buf, seen, reported = [], [], [], [0, 0.0, 0], time.monotonic()
        join = Join([model]) if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
        with join:
            for step, (x, y, rows) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits, loss = train_step(model, opt, x, y)
                mask = y >= 0  # label -1: a skipped sample
                good = mask.cpu().numpy()
                n_good = int(good.sum())
                seen[0] += n_good
                seen[1] += float(loss.detach()) * n_good
                seen[2] += int((logits.argmax(1) == y).sum())
                if rc.record:
                    rows_buf.append(rows.numpy()[good])
                    stats_buf.append({**sample_stats(logits[mask], y[mask]), LABEL: y[mask].cpu().numpy()})
                    if n_good < len(good):  # skipped samples: given, with missing statistics
                        rows_buf.append(rows.numpy()[~good])
                        stats_buf.append(
                            {**missing_stats(len(good) - n_good), LABEL: np.full(len(good) - n_good, LABEL_MISSING)}
                        )
                    if sum(len(r) for r in rows_buf) >= 4096:
                        pending += _send(writers, rows_buf, stats_buf)
                        rows_buf, stats_buf = [], []
                        if len(pending) > 64:
                            ray.get(pending[:-32])
                            pending = pending[-32:]
                if step == 1 or time.monotonic() - reported >= 1.0:  # after two batches: the driver's rate starts
                    progress.update.remote(rank, epoch, *seen)
                    seen, reported = [0, 0.0, 0], time.monotonic()
        if rows_buf:
            pending += _send(writers, rows_buf, stats_buf)
        ray.get(pending)
        progress.update.remote(rank, epoch, *seen)
        if distributed:
            sync_from_rank0(model, opt)
        barrier()
        if rank == 0:
            missing = writers.flush() if rc.record else None
            state = {
                "model": (model.module if isinstance(model, DistributedDataParallel) else model).state_dict(),
                "optimizer": opt.state_dict(),
                "epochs_done": epoch + 1,
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            storage.write_bytes(RunDir(run).checkpoint(epoch + 1), buffer.getvalue())
            if missing is not None:
                writers.mark_done(epoch, missing)
            storage.remove(RunDir(run).checkpoint(epoch - 1))
            ray.get(progress.epoch_done.remote(epoch, time.time() - t0))
        barrier()


def _ray_storage(location: str) -> dict:
    """Ray Train's storage arguments for `location`: a local folder as is; an object-store URL
    through the same fsspec filesystem as the rest of the run (credentials and endpoint from the
    standard environment), so that a cluster with no shared filesystem needs nothing more."""
    if not storage.is_url(location):
        return {"storage_path": location}
    import pyarrow.fs

    fs, path = storage.filesystem(location)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def _send(writers: StoreWriters, rows_buf: list, stats_buf: list) -> list:
    rows = np.concatenate(rows_buf)
    stats = {n: np.concatenate([s[n] for s in stats_buf]) for n in (*STATS, LABEL)}
    return writers.add(rows, stats)


def _first_samples(idx: Index, healthy: list[int], urls: list[str], limit: int = 2000):
    """Raw sample dicts of the first `limit` samples of the first shards (at most 4), read from `urls`."""
    seen = 0
    for shard in healthy[:4]:
        for sample, _ in indexed_samples(idx, shard, urls[shard]):
            yield sample
            seen += 1
            if seen >= limit:
                return


def _inputs(
    run: str,
    idx: Index,
    healthy: list[int],
    urls: list[str],
    shards: str | Iterable[str] | None,
    label: str,
    decode: str | None,
    classes: Classes | str | os.PathLike | None,
    num_classes: int | None,
    address: str | None,
    progress: bool,
) -> tuple[Probe | None, tuple[int, ...] | None, Classes, bool]:
    """What the run trains on, from its first samples: the images' sizes (None with a decode function),
    the decode function's example shape (None for images) and the classes; True when the classes
    are a list of names.

    Class names (string labels) come from `classes` (a list file or Classes), else `RUN/classes.json`
    made for the same label, else a scan of every label (saved there). Integer labels need no list:
    their count is `num_classes`, else the largest label among the first 2,000 samples plus one
    (up to MAX_INFERRED_CLASSES); a label of those samples outside the count is refused here."""
    spec = LabelSpec(label)
    key = decode or spec.spec
    samples = _first_samples(idx, healthy, urls)
    head = list(itertools.islice(samples, PROBE_SAMPLES))  # the rest is streamed: memory stays small
    probe = None if decode else probe_images(head)
    decoder = SampleDecoder(None, spec, None, decode)
    raw: list[tuple[int | str, str]] = []  # (label, sample)
    shape: tuple[int, ...] | None = None
    seen, reason = 0, ""
    for sample in itertools.chain(head, samples):
        seen += 1
        try:
            if decode:
                x, lab = decoder.user_decode(sample)
                shape = shape or tuple(torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).shape)
            else:
                lab = decoder.raw_label(sample)
        except BadSample as exc:
            reason = reason or str(exc)
            continue
        raw.append((lab, sample_name(sample)))
    if not raw:
        raise _no_label(run, key, decode, seen, reason, head)
    if isinstance(classes, (str, os.PathLike)):
        classes = Classes.from_file(classes, key)
    named = any(isinstance(r, str) for r, _ in raw)
    if classes is None:
        stored = Classes.load(run)
        if stored is not None and stored.label == key:
            classes = stored
        elif named:
            from streamprune.stages.label_scan import build_classes

            classes = build_classes(run, label, decode=decode, address=address, progress=progress, shards=shards)
    if classes is not None and classes.names is not None:
        if num_classes is not None and num_classes != classes.num_classes:
            raise SettingsError(
                f"num_classes {num_classes} differs from the {classes.num_classes} class names of the run's "
                "class list; leave --num-classes out"
            )
        return probe, shape, classes, True
    largest = max(((r, where) for r, where in raw if isinstance(r, int)), default=None)
    count = num_classes or (classes.num_classes if classes is not None else None)
    if count is None:
        assert largest is not None  # every label is an int: names made a class list above
        return probe, shape, Classes(class_count(*largest), label=key), False
    given = Classes(count, label=key)
    if largest is not None:
        given.index_of(*largest)  # a label outside the given count: refused before any work
    return probe, shape, given, False


def _no_label(run: str, key: str, decode: str | None, seen: int, reason: str, head: list[dict]) -> InputError:
    """The error when none of the first `seen` samples gave a label: the first reason, the members
    the samples have, and what to pass."""
    where = f"none of the first {seen:,} samples of {run!r}"
    if decode:
        return InputError(f"{where} could be decoded by {decode} ({reason}); fix the decode function")
    members = sorted({k for sample in head for k in sample if not k.startswith("__")})
    return InputError(
        f"{where} has a label {key} ({reason}); the shards' members are: {', '.join(members) or 'none'}; "
        f"pass --label SPEC (e.g. {_label_example(head, members)})"
    )


def _label_example(head: list[dict], members: list[str]) -> str:
    """A label spec these samples may have: a JSON field named like a label, another member, or json:label."""
    doc: object = None
    if "json" in members:
        with contextlib.suppress(ValueError):  # UnicodeDecodeError included
            doc = json.loads(next(s["json"] for s in head if "json" in s))
    fields = [str(f) for f in doc] if isinstance(doc, dict) else []
    named = [f for f in fields if "label" in f.lower() or "class" in f.lower()]
    others = [m for m in members if m not in IMAGE_EXTS and m != "json"]
    return f"json:{named[0]}" if named else others[0] if others else f"json:{fields[0] if fields else 'label'}"


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
    """`record`, holding the run's writer lock."""
    epochs, decode, image_size = s.epochs, s.decode, s.image_size
    gpus_per_worker, workers, model = s.gpus_per_worker, s.workers, s.model
    label = _label(run, s.label, decode, s.classes)
    healthy = healthy_shards(idx).tolist()
    probe, decoded, run_classes, named = _inputs(
        run, idx, healthy, urls, shards, label, decode, s.classes, s.num_classes, address, progress
    )
    ensure_ray(address)
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if workers is None:
        workers = (  # one at least: a cluster without room for it is refused below, naming what it has
            max(1, int(resources.get("GPU", 0) // gpus_per_worker))
            if gpus_per_worker
            else max(1, min(4, int(resources.get("CPU", 1)) // 2))
        )
    _refuse_unplaceable(workers, gpus_per_worker, resources)
    store_path = RunDir(run).stats
    view, note = None, None
    if probe is not None:
        size, default_model = _unset_size_model(store_path, gpus_per_worker)
        view = probe.view(image_size, size)
        if image_size is None and not probe.native:
            model = model or default_model
            note = _size_note(probe, view, model, gpus_per_worker)
    shape = view.shape if view is not None else decoded
    assert shape is not None  # a decode function gave an example, else _inputs refused
    cfg = RecordConfig(
        epochs=epochs,
        schedule_epochs=s.schedule_epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        model=model if isinstance(model, str) or model is None else f"{model.__module__}:{model.__qualname__}",
        num_classes=run_classes.num_classes,
        augment=augment_images,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        loader_workers=s.loader_workers,
        on_bad_sample=s.on_bad_sample,
        record=record_stats,
        label=label,
        decode=decode,
        image_size=image_size,
        view=None if view is None else [*view.shape, view.resized],
        input_shape=list(shape),
        classes=run_classes.digest if named else None,
    )
    kwargs = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    start = 0
    if record_stats:
        store = StatsStore.create(store_path, idx, epochs, config=asdict(cfg), same=_TRAINING_KEYS, **kwargs)
        start = store.complete_epochs()
        if start == epochs:
            return RecordSummary(str(run), epochs)
        writers = StoreWriters(store_path, n_writers=workers)
    else:
        writers = None
    if note is not None:  # said when training starts, not on a finished run
        log.info(note)
    tracker = Progress.remote()  # type: ignore[attr-defined]
    summary = _fit(
        run,
        cfg,
        writers,
        tracker,
        healthy,
        run_classes,
        start,
        s.max_failures,
        progress,
        int(np.diff(idx.shard_offset)[healthy].sum()),
        urls,
    )
    for actor in ([] if writers is None else writers.actors) + [tracker]:
        ray.kill(actor)
    summary.bad_samples = len(bad_samples(run))
    summary.inputs = _describe(view, shape, decode, run_classes, named)
    return summary


def _label(run: str, label: str | None, decode: str | None, classes: str | None) -> str:
    """The label spec to record with: `label`, else the one `RUN/classes.json` was counted with
    (`index --label`), else cls. Without a class list file (`classes`), a `label` other than the
    run's class list's is refused, naming both."""
    stored = None if decode else Classes.load(run)
    if stored is None or label in (None, stored.label):
        return label or (stored.label if stored is not None else "cls")
    if classes is not None:
        return label
    path = RunDir(run).classes
    raise SettingsError(
        f"record --label {label}: the run's class list {path!r} was counted with the label {stored.label} "
        f"(by `index --label {stored.label}` or an earlier record); leave --label out to record with "
        f"{stored.label}, or remove {path!r} to count the labels of {label}"
    )


def _unset_size_model(store_path: str, gpus_per_worker: float) -> tuple[int, str | None]:
    """The square size, and the model when none is given, of images not kept at their own size: the
    run's own when it was recorded (a resume on other hardware trains the same), else DEFAULT_SIZE
    and the model by size (None) on GPUs, CPU_SIZE and CPU_MODEL on CPUs."""
    recipe = StatsStore.open(store_path, mode="r").config if store_exists(store_path) else {}
    view = recipe.get("view")
    if view and view[3]:  # [channels, height, width, resized]
        return int(view[1]), recipe.get("model")
    return (DEFAULT_SIZE, None) if gpus_per_worker else (CPU_SIZE, CPU_MODEL)


def _size_note(probe: Probe, view: View, model: Any, gpus_per_worker: float) -> str:
    """The line saying which size and model images not kept at their own size are trained at."""
    where = "GPUs" if gpus_per_worker else "CPU"
    return (
        f"record: {probe.describe()} on {where}: training a {model_name(model, view.height)} at "
        f"{view.width}x{view.height} px; set --image-size / --model to choose"
    )


def _per_worker(gpus_per_worker: float) -> dict[str, float]:
    """What each training worker reserves: 1 CPU, and its GPUs."""
    return {"CPU": 1.0, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}


def _refuse_unplaceable(workers: int, gpus_per_worker: float, resources: dict[str, float]) -> None:
    """Refuse `workers` training workers that the Ray cluster's nodes cannot hold at once (Ray Train
    would wait for them forever), naming what it has. The nodes up now count, with all their
    resources (work holding some only delays the start); nodes an autoscaler may add do not."""
    room = placeable(_per_worker(gpus_per_worker))
    if workers <= room:
        return
    gpus = resources.get("GPU", 0.0)
    each = "1 CPU" + (f" + {_count(gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
    need = _count(workers, "CPU") + (f" and {_count(workers * gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
    if room:
        fix = f"use --workers {room} or fewer"
    elif gpus_per_worker and not gpus:
        fix = "use --gpus-per-worker 0 (train on CPUs)"
    else:
        fix = f"use a smaller --gpus-per-worker or add nodes with {'GPUs' if gpus_per_worker else 'CPUs'}"
    split = workers <= resources.get("CPU", 0.0) and workers * gpus_per_worker <= gpus  # enough, not on a node
    raise SettingsError(
        f"record: {_count(workers, 'worker')} x {each} need{'s' if workers == 1 else ''} {need}, the Ray cluster "
        f"has {_cpus_gpus(resources)}"
        + (", but a worker's resources must be on one node" if split else "")
        + f"; {fix}"
    )


def _start_timed_out(exc: BaseException, max_failures: int) -> SettingsError | None:
    """What to report when Ray Train gave up starting the workers (`max_failures` + 1 start timeouts:
    the cluster has room for them, but other work holds it); None for any other failure."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    failure = getattr(exc, "controller_failure", None)
    if not isinstance(failure, WorkerGroupStartupTimeoutError):
        return None
    what = str(failure).split(". ")[0]  # "The worker group startup timed out after 60.0 seconds waiting for 2 workers"
    return SettingsError(
        f"record: {what[:1].lower()}{what[1:]}, {_count(max_failures + 1, 'time')} (--max-failures {max_failures}); "
        f"other work holds the Ray cluster's {_cpus_gpus(ray.cluster_resources())} (free now: "
        f"{_cpus_gpus(ray.available_resources())}); wait for it, use fewer --workers, or a larger --max-failures"
    )


def _count(n: float, what: str) -> str:
    """`n` things: '1 CPU', '6 CPUs', '0.5 GPUs'."""
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def _cpus_gpus(resources: dict[str, float]) -> str:
    """'2 CPUs (0 GPUs)'."""
    return f"{_count(resources.get('CPU', 0.0), 'CPU')} ({_count(resources.get('GPU', 0.0), 'GPU')})"


def _describe(view: View | None, shape: tuple[int, ...], decode: str | None, classes: Classes, named: bool) -> str:
    """One line on what the proxy trained on, for the summary."""
    what = view.describe() if view is not None else f"{decode} -> {tuple(shape)}"
    return f"{what}; {classes.num_classes} classes" + (f" ({classes.label}, names in classes.json)" if named else "")


def _estimate(state: dict, cfg: RecordConfig, n_samples: int) -> str | None:
    """'record: epoch 0: ~46 s per epoch at 130 samples/s (ETA for all epochs: 8 min)', from the first
    epoch in the tracker's `state` whose ranks have reported twice (samples since a rank's first
    report over the time since), extrapolated to all workers; None before."""
    for epoch in sorted({e for e, _ in state}):
        rows = [r for (e, _), r in state.items() if e == epoch and r["t1"] > r["t0"] and r["n"] > r["n0"]]
        if rows:
            rate = sum((r["n"] - r["n0"]) / (r["t1"] - r["t0"]) for r in rows) / len(rows) * cfg.workers
            seconds = n_samples / rate
            return (
                f"record: epoch {epoch}: ~{_duration(seconds)} per epoch at {rate:,.0f} samples/s "
                f"(ETA for all epochs: {_duration(seconds * (cfg.epochs - epoch))})"
            )
    return None


def _duration(seconds: float) -> str:
    """'46 s', '8 min', '2.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _user_error(exc: BaseException) -> BaseException:
    """The `StreamPruneError` (bad input or settings: a user's error) a Ray Train failure wraps, so
    that it is reported as such (exit 2); the failure itself when it wraps none."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StreamPruneError):
            return e
        stack += [
            e.__cause__,
            e.__context__,
            getattr(e, "cause", None),
            getattr(e, "controller_failure", None),
            *getattr(e, "worker_failures", {}).values(),
        ]
    return exc


def _fit(
    run: str,
    cfg: RecordConfig,
    writers,
    tracker,
    healthy,
    classes: Classes,
    start,
    max_failures,
    progress,
    n_samples,
    urls: list[str],
) -> RecordSummary:
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig  # Ray Train v2: its default
    from ray.train.v2.torch.torch_trainer import TorchTrainer
    from tqdm import tqdm

    from streamprune.progress import progress_bar

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "config": asdict(cfg),
            "run": str(run),
            "writers": writers,
            "progress": tracker,
            "healthy": healthy,
            "urls": urls,
            "classes": classes,
            "threads": 1,
            "start": start,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=bool(cfg.gpus_per_worker),
            resources_per_worker=_per_worker(cfg.gpus_per_worker),
        ),
        run_config=RunConfig(
            name="record",
            **_ray_storage(RunDir(run).ray_train),
            # a worker group that cannot start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) is a
            # controller failure, which Ray Train retries forever unless limited
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
        ),
    )
    error: list = []

    def fit():
        try:
            trainer.fit()
        except Exception as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    bars: dict[int, tqdm] = {}
    state, epochs = {}, {}
    estimated = False
    while thread.is_alive():
        thread.join(0.5)
        state, epochs = ray.get(tracker.get.remote())
        estimate = None if estimated else _estimate(state, cfg, n_samples)
        if estimate is not None:
            with tqdm.external_write_mode(file=sys.stderr):  # a bar drawn on the terminal is redrawn below it
                log.info(estimate)
            estimated = True
        if not progress:
            continue
        for epoch in sorted({e for e, _ in state}):
            rows = [v for (e, _), v in state.items() if e == epoch]
            n = sum(r["n"] for r in rows)
            bar = bars.get(epoch) or bars.setdefault(
                epoch, progress_bar(total=n_samples, desc=f"epoch {epoch}", unit="sample", leave=True)
            )
            bar.update(n - bar.n)
            bar.set_postfix(
                loss=f"{sum(r['loss'] for r in rows) / max(n, 1):.3f}",
                acc=f"{sum(r['correct'] for r in rows) / max(n, 1):.3f}",
                refresh=False,
            )
            if epoch in epochs:
                bar.close()
    for bar in bars.values():
        bar.close()
    if error:
        raise (_start_timed_out(error[0], max_failures) or _user_error(error[0])) from None
    summary = RecordSummary(
        str(run), max(epochs, default=start - 1) + 1, sorted(epochs), [epochs[e] for e in sorted(epochs)]
    )
    for epoch, sec in zip(summary.epochs_run, summary.epoch_seconds):
        counts = [state[(epoch, rank)]["n"] for rank in range(cfg.workers) if (epoch, rank) in state]
        rates = [n / max(sec, 1e-9) for n in counts]
        summary.samples_per_s_per_worker += rates
        summary.samples += sum(counts)
        log.info("epoch %d: %.1f s, samples/s per worker: %s", epoch, sec, ", ".join(f"{r:,.0f}" for r in rates))
    return summary
