"""The class list of a run from every sample's label: Ray tasks read only the label members of
each shard and count the labels; the driver merges the counts into `RUN/classes.json`."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

import ray

from streamprune.errors import InputError
from streamprune.formats.classes import Classes
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.sources import shard_urls
from streamprune.progress import progress_bar
from streamprune.shards.labels import LabelSpec, scan_labels
from streamprune.stages.ray_cluster import bounded_map, ensure_ray
from streamprune.training.decode import SampleDecoder
from streamprune.training.samples import healthy_shards


@ray.remote(num_cpus=1, max_retries=3)
def _count_task(url: str, name: str, decoder: SampleDecoder):
    return scan_labels(url, name, decoder.raw_label, decoder.label_members)


def build_classes(
    run: str | os.PathLike,
    label: str = "cls",
    *,
    decode: str | None = None,
    address: str | None = None,
    progress: bool = True,
    shards: str | Iterable[str] | None = None,
) -> Classes:
    """Count the labels (`label` spec, or those a `decode` function returns) of every indexed sample
    of `run` (a local folder or an object-store URL), write `RUN/classes.json` and return it:
    sorted class names, or 0..max for integers. `shards`: the URLs of the indexed shards to read
    (`shard_urls`)."""
    run = os.fspath(run)
    idx = Index(RunDir(run).index)
    urls = shard_urls(idx, shards)
    healthy = healthy_shards(idx).tolist()
    decoder = SampleDecoder(None, "cls" if decode else label, None, decode)
    ensure_ray(address)
    bar = progress_bar(total=len(healthy), desc="labels", unit="shard", disable=not progress)
    parts: list = []
    limit = max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))
    bounded_map(
        lambda s: _count_task.remote(urls[s], idx.names[s], decoder),
        healthy,
        limit,
        lambda _, part: parts.append(part),
        bar,
    )
    bar.close()
    classes = count_classes(parts, decode or label, repr(run))
    classes.save(run)
    return classes


def count_classes(parts: Iterable[tuple[Counter, int, list[str]]], label: str, where: str) -> Classes:
    """The class list from per-shard `scan_labels` results (any order); an error when no label was usable."""
    counts: Counter = Counter()
    reasons: list[str] = []
    for part, _, why in parts:
        counts.update(part)
        reasons.extend(why[: 3 - len(reasons)])
    if not counts:
        raise InputError(f"no sample of {where} has a usable label ({label})" + (f": {reasons[0]}" if reasons else ""))
    return Classes.from_labels(counts, label)


def scan_classes(run: str | os.PathLike, label: str = "cls", *, shards: str | Iterable[str] | None = None) -> Classes:
    """`RUN/classes.json` from every indexed sample's label, counted here in one process (no Ray;
    `labelscan.build_classes` spreads the same over Ray tasks), saved and returned. `shards`: the
    URLs of the indexed shards to read (`shards.sources.shard_urls`)."""
    spec = LabelSpec(label)
    idx = Index(RunDir(run).index)
    urls = shard_urls(idx, shards)
    parts = (
        scan_labels(urls[s], idx.names[s], spec, spec.members)
        for s, info in enumerate(idx.shards)
        if info["status"] == "ok"
    )
    classes = count_classes(parts, label, repr(os.fspath(run)))
    classes.save(run)
    return classes
