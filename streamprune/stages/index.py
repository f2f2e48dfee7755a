"""`streamprune index`: scan shards in parallel Ray tasks and write `RUN/index`.

Each finished shard is saved as a part under `RUN/.index-parts/` (one file or object, written
whole), so an interrupted index resumes where it stopped; a part is named after the shard's URL,
name, identity and (local shards) size and modification time, so a shard rewritten since is
scanned again, and broken shards are always scanned again. The final merge replaces the index
whole (`formats.commit`). An index with broken shards keeps the parts: indexing again (after
fixing them, or with `--allow-broken`) scans only those. Indexing the same local shards again
(same sizes and modification times) when their index is complete does nothing. RUN may be a
local folder or an object-store URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import ray

from streamprune import storage
from streamprune.errors import InputError
from streamprune.formats import commit
from streamprune.formats.atomic import output_lock
from streamprune.formats.index import Index, load_scan_meta, save_scan, write_index
from streamprune.formats.rundir import RunDir
from streamprune.progress import progress_bar
from streamprune.settings import IndexSettings
from streamprune.shards.identity import SampleIdentity, parse_identity, shard_names
from streamprune.shards.scan import scan_shard
from streamprune.shards.urls import absolute, expand_urls, is_local, local_path
from streamprune.stages.ray_cluster import bounded_map, ensure_ray


@ray.remote(num_cpus=1, max_retries=3)
def _scan_task(url: str, name: str, identity: SampleIdentity | None):
    return scan_shard(url, name, identity)


def _stamp(url: str) -> str:
    """A local shard's size and modification time: a part scanned from other bytes is not reused.
    Remote and `pipe:` shards: empty (their parts are reused while they exist)."""
    if not is_local(url):
        return ""
    try:
        st = os.stat(local_path(url))
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _tag(url: str, name: str, spec: str) -> str:
    """What a scan of shard `url` depends on, hashed: its URL, name, identity spec and stamp."""
    return hashlib.blake2b(f"{url}\0{name}\0{spec}\0{_stamp(url)}".encode(), digest_size=8).hexdigest()


_PART = re.compile(r"\d{8}-[0-9a-f]{16}\.npz")  # a finished part's name; anything else is a leftover


def part_path(parts_dir: str | os.PathLike, i: int, url: str, name: str, spec: str) -> str:
    """Where shard `i`'s finished scan is kept until the merge: named after its URL, name, identity
    spec and stamp, so that a resumed index reuses it only for the same bytes."""
    return storage.join(parts_dir, f"{i:08d}-{_tag(url, name, spec)}.npz")


def sources_digest(urls: list[str], names: list[str], root: str, spec: str) -> str | None:
    """A digest of what an index of `urls` scans (each part's tag, the root): equal digests, same
    index. None when a shard is remote or a `pipe:` (no stamp tells that its bytes are unchanged):
    such an index is never taken as up to date."""
    if not all(_stamp(u) for u in urls):
        return None
    tags = [_tag(u, n, spec) for u, n in zip(urls, names, strict=True)]
    return hashlib.blake2b(json.dumps([root, spec, tags]).encode(), digest_size=16).hexdigest()


def refuse_broken(idx: Index, settings: IndexSettings) -> None:
    """An InputError (exit status 2) when shards are broken or missing and `settings.allow_broken`
    is off: the index of the healthy ones is written, and a rerun scans only the broken ones."""
    broken = len(idx.manifest["broken"])
    if broken and not settings.allow_broken:
        raise InputError(
            f"{broken} shard{'s' if broken > 1 else ''} broken (listed above): exit status 2; pass --allow-broken "
            f"(index.allow_broken in a config) to index without them (the other {idx.n_shards - broken} are in "
            f"{idx.path}), or fix them and rerun"
        )


def index(
    shards: str | Iterable[str],
    out: str | Path,
    *,
    settings: IndexSettings | None = None,
    root: str | None = None,
    identity: str | SampleIdentity | Callable | None = None,
    address: str | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> Index:
    """Index `shards` into `out/index` (`out` is the run directory, a local folder or an
    object-store URL) and return the index.

    `root` is the dataset root that shard names are relative to (default: the shards'
    common directory). `identity`: None for `(shard name, __key__)`, `"json:FIELD"`,
    `"module:function"` or a callable on the sample dict. `settings`: an `IndexSettings` giving both.
    """
    if settings is not None:  # the `run` config's section (plain values; callables come as `identity`)
        root = settings.root if root is None else root
        identity = settings.identity if identity is None else identity
    urls = [absolute(u) for u in expand_urls(shards)]
    names, root_path = shard_names(urls, root)
    ident = parse_identity(identity)
    spec = "shard-key" if ident is None else ident.spec
    rd = RunDir(out)
    sources = sources_digest(urls, names, root_path, spec)
    with output_lock(rd.index, writer="index"):
        commit.clean_uncommitted(rd.index)  # what a killed `index` left of its merge
        done = None if sources is None else _complete_index(rd.index, sources)
        if done is not None:
            return done
        parts = _scan_parts(rd.index_parts, urls, names, ident, spec, address, max_in_flight, progress)
        metas = [load_scan_meta(p) for p in parts]
        if all(m["status"] == "broken" for m in metas):  # kept for a rerun, which scans them again
            shown = "; ".join(f"{m['name']}: {m['error']}" for m in metas[:3])
            raise InputError(
                f"every shard is broken ({len(metas)}), nothing was indexed: {shown}"
                + (" ..." if len(metas) > 3 else "")
            )
        idx = write_index(rd.index, parts, root_path, spec, sources)
        if not idx.manifest["broken"]:
            storage.remove(rd.index_parts)
        return idx


def _complete_index(location: str, sources: str) -> Index | None:
    """The index at `location` when it is complete (no broken shard), of these `sources` and sound
    (structure and byte ranges checked): there is nothing to do. None otherwise (none, another,
    damaged: it is written again)."""
    if not commit.is_committed(location):
        return None
    try:
        idx = Index(location)
    except (OSError, ValueError):  # damaged (DamagedRunError, NewerFormatError are ValueErrors): index again
        return None
    if idx.sources != sources or idx.manifest["broken"]:
        return None
    sound = all(idx.range_problem(s) is None for s in range(idx.n_shards))  # "damaged: index again" must work
    return idx if sound else None


def _scan_parts(
    parts_dir: str,
    urls: list[str],
    names: list[str],
    ident: SampleIdentity | None,
    spec: str,
    address: str | None,
    max_in_flight: int | None,
    progress: bool,
) -> list[str]:
    """Scan, in Ray tasks, the shards without a finished part (or with a broken one) and save their
    parts; return every shard's part. What else is in `parts_dir` (parts being written when an
    `index` was killed) is removed first."""
    parts = [part_path(parts_dir, i, urls[i], names[i], spec) for i in range(len(urls))]
    present = set()
    for entry in storage.names(parts_dir):
        if _PART.fullmatch(entry):
            present.add(entry)
        else:
            storage.remove(storage.join(parts_dir, entry))
    todo = [i for i, p in enumerate(parts) if storage.name(p) not in present or load_scan_meta(p)["status"] == "broken"]
    bar = progress_bar(total=len(urls), initial=len(urls) - len(todo), desc="index", unit="shard", disable=not progress)
    if todo:
        ensure_ray(address)
        limit = max_in_flight or max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))

        def save(j: int, scan) -> None:
            save_scan(scan, parts[todo[j]])
            bar.set_postfix_str(f"{scan.name}: {scan.status}", refresh=False)

        bounded_map(lambda i: _scan_task.remote(urls[i], names[i], ident), todo, limit, save, bar)
    bar.close()
    return parts
