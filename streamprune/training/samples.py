"""An indexed run's samples as training streams them, without Ray: shards cut across ranks,
each shard's samples checked against the index and paired with their rows, a shuffle buffer,
and the run's list of samples skipped as undecodable (`RUN/bad-samples.jsonl`).

The parts of `indexed_shards.IndexedShards`, the dataset that `record`'s Ray Train workers and
your own training loop (`own_loop`) both read; `record`'s driver and `own_loop` use some directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from streamprune import storage
from streamprune.errors import ChangedShardError, InputError
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.shards.reader import ReadCounts, read_keys


def assign_shards(counts: np.ndarray, shard_ids: np.ndarray, n_workers: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffle shards with `(seed, epoch)` and cut them into `n_workers` contiguous runs of
    about equal sample counts (each run within one shard of the mean)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_ids))
    ids, c = shard_ids[order], counts[order]
    ends = np.cumsum(c)
    total = ends[-1] if len(ends) else 0
    cuts = np.searchsorted(ends - c / 2, np.arange(1, n_workers) * total / n_workers)
    return np.split(ids, cuts)


def healthy_shards(idx: Index) -> np.ndarray:
    """The index's shards with samples, as an int64 array; a ValueError when there are none."""
    healthy = np.array([s for s, info in enumerate(idx.shards) if info["status"] == "ok"], dtype=np.int64)
    if not len(healthy):
        raise InputError(f"the index at {str(idx.path)!r} has no readable, non-empty shard")
    return healthy


def indexed_samples(idx: Index, shard: int, url: str) -> Iterator[tuple[dict, int]]:
    """Shard `shard`'s samples, read from `url` (`shards.sources.shard_urls`), in tar order as
    `(webdataset-style dict, row)`, each key checked against the index, so that a shard changed
    since indexing is an error, not wrong rows."""
    name, keys, first = idx.names[shard], idx.keys(shard), idx.rows(shard).start
    pos = -1
    for pos, (key, data, _) in enumerate(read_keys(url, name, None, ReadCounts())):
        if pos >= len(keys) or key != keys[pos]:
            raise ChangedShardError(
                f"shard {name!r} changed since it was indexed: sample {pos} is {key!r}, the index "
                f"has {keys[pos] if pos < len(keys) else None!r}; index it again"
            )
        yield {"__key__": key, "__url__": url, **data}, first + pos
    if pos + 1 != len(keys):
        raise ChangedShardError(f"shard {name!r} has {pos + 1} samples, the index {len(keys)}; index it again")


def shuffled(items: Iterable[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """`items` through a shuffle buffer of `buffer` items (the rest shuffled at the end)."""
    buf: list = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.integers(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def log_bad_sample(run: str | os.PathLike, shard: str, key: str, row: int, epoch: int, reason: str) -> None:
    """Note a skipped sample: a line appended to `RUN/bad-samples.jsonl` locally (one short write);
    on an object store, which cannot append, one object `RUN/bad-samples/eEEEE-rROW.json`."""
    line = json.dumps({"shard": shard, "key": key, "row": row, "epoch": epoch, "reason": reason})
    rd = RunDir(run)
    if storage.is_url(rd.root):
        storage.write_bytes(storage.join(rd.bad_sample_objects, f"e{epoch:04d}-r{row}.json"), line.encode())
        return
    with open(rd.bad_samples, "a") as f:
        f.write(line + "\n")


def bad_samples(run: str | os.PathLike) -> dict[int, dict]:
    """Samples skipped as undecodable in any epoch of `run`, by row."""
    rd = RunDir(run)
    if storage.is_url(rd.root):
        folder = rd.bad_sample_objects
        lines = [storage.read_bytes(storage.join(folder, n)).decode() for n in storage.names(folder)]
    elif os.path.exists(rd.bad_samples):
        with open(rd.bad_samples) as f:
            lines = f.read().splitlines()
    else:
        return {}
    return {entry["row"]: entry for entry in map(json.loads, filter(None, lines))}
