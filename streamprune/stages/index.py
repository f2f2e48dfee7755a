"""`streamprune index`: scan shards in parallel Ray tasks and write `RUN/index`.

Each finished shard is saved as a part under `RUN/.index-parts/`, so an interrupted
index resumes where it stopped; a part is named after the shard's URL, name, identity and
(local shards) size and modification time, so a shard rewritten since is scanned again, and
broken shards are always scanned again. The final merge is atomic. An index with broken shards
keeps the parts: indexing again (after fixing them, or with `--allow-broken`) scans only those.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import ray

from streamprune.errors import InputError
from streamprune.formats.atomic import clean_stale_temps, output_lock
from streamprune.formats.index import Index, load_scan_meta, save_scan, scan_shard, write_index
from streamprune.formats.rundir import RunDir
from streamprune.progress import progress_bar
from streamprune.settings import IndexSettings
from streamprune.shards.identity import SampleIdentity, parse_identity, shard_names
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


def part_path(parts_dir: Path, i: int, url: str, name: str, spec: str) -> Path:
    """Where shard `i`'s finished scan is kept until the merge: named after its URL, name, identity
    spec and stamp, so that a resumed index reuses it only for the same bytes."""
    tag = hashlib.blake2b(f"{url}\0{name}\0{spec}\0{_stamp(url)}".encode(), digest_size=8).hexdigest()
    return parts_dir / f"{i:08d}-{tag}.npz"


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
    """Index `shards` into `out/index` (`out` is the run directory) and return the index.

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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rd = RunDir(out)
    with output_lock(rd.index, writer="index"):
        clean_stale_temps(rd.index)  # an index swap-in of a killed `index`
        parts_dir = rd.index_parts
        parts_dir.mkdir(exist_ok=True)
        for stale in parts_dir.glob("*.tmp.npz"):  # a part being written when `index` was killed
            stale.unlink()
        parts = [part_path(parts_dir, i, urls[i], names[i], spec) for i in range(len(urls))]
        todo = [i for i, p in enumerate(parts) if not p.exists() or load_scan_meta(p)["status"] == "broken"]
        bar = progress_bar(
            total=len(urls), initial=len(urls) - len(todo), desc="index", unit="shard", disable=not progress
        )
        if todo:
            ensure_ray(address)
            limit = max_in_flight or max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))

            def save(j: int, scan) -> None:
                save_scan(scan, parts[todo[j]])
                bar.set_postfix_str(f"{scan.name}: {scan.status}", refresh=False)

            bounded_map(lambda i: _scan_task.remote(urls[i], names[i], ident), todo, limit, save, bar)
        bar.close()
        metas = [load_scan_meta(p) for p in parts]
        if all(m["status"] == "broken" for m in metas):  # kept for a rerun, which scans them again
            shown = "; ".join(f"{m['name']}: {m['error']}" for m in metas[:3])
            raise InputError(
                f"every shard is broken ({len(metas)}), nothing was indexed: {shown}"
                + (" ..." if len(metas) > 3 else "")
            )
        idx = write_index(rd.index, parts, root_path, spec)
        if not idx.manifest["broken"]:
            shutil.rmtree(parts_dir)
        return idx
