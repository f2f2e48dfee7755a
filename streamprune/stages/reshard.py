"""`streamprune reshard`: write the kept samples as new shards, in parallel Ray tasks.

Output shard `j` holds kept samples `[j * shard_size, (j + 1) * shard_size)` in keep-list
order (the order `PrunedWebDataset` reads them without shuffling). Each sample's tar bytes
are copied verbatim (headers included), after checking its key, so members keep their
names and metadata; member paths never reach the filesystem. Each shard is written to a
temporary name and renamed when complete, so a rerun finishes only what is missing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import ray

from streamprune.errors import DamagedRunError, InputError, SettingsError
from streamprune.formats.atomic import output_lock
from streamprune.formats.headers import RESHARD_FORMAT
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.sources import shard_urls
from streamprune.progress import progress_bar
from streamprune.shards.reader import ReadCounts, iter_ranges
from streamprune.stages.ray_cluster import bounded_map, ensure_ray

END_OF_ARCHIVE = bytes(1024)
PLAN = "reshard.json"


@ray.remote(num_cpus=1, max_retries=3)
def _write_shard(path: str, parts: list[tuple[str, str, np.ndarray, list[str], int]]) -> dict:
    """Copy the given kept samples into the tar at `path` (via a temporary file and a rename)."""
    counts = ReadCounts()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for url, name, ranges, keys, size in parts:
                for _, raw in iter_ranges(url, name, ranges, keys, counts, size):
                    out.write(raw)
            out.write(END_OF_ARCHIVE)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"samples": counts.samples, "bytes_read": counts.bytes_read, "bytes": os.path.getsize(path)}


def reshard(
    run: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int | None = None,
    *,
    keep: KeepList | str | os.PathLike | None = None,
    prefix: str = "pruned",
    address: str | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
    shards: str | Iterable[str] | None = None,
) -> list[Path]:
    """Write `keep` (default `RUN/keep`) as shards `OUT/PREFIX-NNNNNN.tar` of `shard_size` samples
    (default: the input's mean shard size); returns their paths. Resumes an interrupted run.
    `shards`: the URLs of the indexed shards to read (`shard_urls`; default: the index's root
    plus each shard's name)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise SettingsError(f"prefix {prefix!r}: use letters, digits, '.', '_' and '-' only (a file name, not a path)")
    if shard_size is not None and shard_size < 1:  # refused before any work
        raise SettingsError(f"shard_size must be >= 1, got {shard_size}")
    run, out = Path(run), Path(out)
    index = Index(RunDir(run).index)
    keep = KeepList.load(RunDir(run).keep if keep is None else keep) if not isinstance(keep, KeepList) else keep
    if keep.ranges is None:
        raise InputError("reshard needs a keep-list with byte ranges (one written by `streamprune reduce`)")
    if keep.fingerprint != index.fingerprint:
        raise DamagedRunError(
            f"the keep-list was made for another index (fingerprint {keep.fingerprint}, "
            f"{str(index.path)!r} has {index.fingerprint})"
        )
    urls = shard_urls(index, shards)
    shard_size = shard_size or max(1, round(index.n_samples / max(1, index.n_shards)))
    n_out = -(-len(keep) // shard_size)
    plan = {
        "format": RESHARD_FORMAT.name,
        "fingerprint": index.fingerprint,
        "keep_created": keep.manifest.get("created"),
        "method": keep.manifest.get("method"),
        "ratio": keep.manifest.get("ratio"),
        "k": len(keep),
        "shard_size": shard_size,
        "prefix": prefix,
        "shards": n_out,
    }
    with output_lock(out, writer="reshard"):
        out.mkdir(parents=True, exist_ok=True)
        plan_path = out / PLAN
        if plan_path.exists():
            found = json.loads(plan_path.read_text())
            if {k: found.get(k) for k in plan} != plan:
                raise SettingsError(
                    f"{str(out)!r} holds shards of another reshard ({found.get('method')}, "
                    f"k={found.get('k')}, shard size {found.get('shard_size')}): "
                    "choose an empty output directory"
                )
        else:
            plan_path.write_text(json.dumps(plan, indent=1))
        for leftover in out.glob(f"{prefix}-*.tar.tmp-*"):  # from a killed run
            leftover.unlink()
        paths = [out / f"{prefix}-{j:06d}.tar" for j in range(n_out)]
        todo = [j for j in range(n_out) if not paths[j].exists()]
        bar = progress_bar(total=n_out, initial=n_out - len(todo), desc="reshard", unit="shard", disable=not progress)
        if todo:
            ensure_ray(address)
            limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
            bounded_map(
                lambda j: _write_shard.remote(str(paths[j]), _parts(index, urls, keep, j, shard_size)),
                todo,
                limit,
                lambda i, result: None,
                bar,
            )
        bar.close()
        return paths


def _parts(
    index: Index, urls: list[str], keep: KeepList, j: int, shard_size: int
) -> list[tuple[str, str, np.ndarray, list[str], int]]:
    """The input pieces of output shard `j`: (url, name, byte ranges, keys, expected size) per input
    shard; `urls`: each index shard's URL."""
    lo, hi = j * shard_size, min(len(keep), (j + 1) * shard_size)
    s0 = int(np.searchsorted(keep.offsets, lo, side="right")) - 1
    parts = []
    for s in range(s0, len(keep.names)):
        a, b = max(lo, int(keep.offsets[s])), min(hi, int(keep.offsets[s + 1]))
        if a >= hi:
            break
        if a < b:
            name = keep.names[s]
            first = a - int(keep.offsets[s])
            i = index.shard(name)
            shard = index.shards[i]
            ranges = keep.shard_ranges(name)
            assert ranges is not None  # reshard() refuses a keep-list without ranges
            parts.append(
                (
                    urls[i],
                    name,
                    ranges[first : first + b - a],
                    keep.shard_keys(name)[first : first + b - a],
                    -1 if shard["size"] is None else shard["size"],
                )
            )
    return parts
