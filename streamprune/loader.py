"""`PrunedWebDataset`: `webdataset.WebDataset` that drops pruned samples before reading them.

Shards with nothing kept are never opened; on local tars (and object stores that serve
ranges) the bytes of pruned samples are never read. Compressed shards (gzip, bz2, xz) and
`pipe:` streams cannot seek: they are read through up to their last kept sample. Imports
webdataset, NumPy and the keep-list only, no Ray and no stats store, so a training job
that applies a keep-list stays light.

The keep-list may be at an object-store URL (`s3://bucket/run/keep`): each process (DDP rank,
DataLoader worker) reads its manifest and shard table, then the keys and byte ranges of only the
shards it reads, by exact byte ranges; the list pickles to workers as its location.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from webdataset import autodecode, cache, shardlists
from webdataset.handlers import reraise_exception
from webdataset.utils import pytorch_worker_info

from streamprune.errors import InputError, SettingsError
from streamprune.formats.keeplist import KeepList
from streamprune.shards.identity import ShardMatcher
from streamprune.shards.reader import ReadStats, read_keys, read_ranges
from streamprune.shards.tarscan import split_name
from streamprune.shards.urls import OpenShard, expand_urls, from_stream, open_shard

UNKNOWN = ("error", "keep")


def as_keep_list(keep: KeepList | str | os.PathLike) -> KeepList:
    """A `KeepList` as given, or loaded from its folder or object-store URL (`KeepList.load`: on
    object stores the per-sample arrays are read per shard, when the shard is read)."""
    return keep if isinstance(keep, KeepList) else KeepList.load(keep)


class _Selection:
    """Which shards and samples a keep-list keeps, for URLs wherever the dataset now lives."""

    def __init__(self, keep: KeepList, root: str | None, unknown_shards: str):
        if unknown_shards not in UNKNOWN:
            raise SettingsError(f"unknown_shards={unknown_shards!r}: choose 'error' or 'keep'")
        self.keep, self.unknown = keep, unknown_shards
        self.match = ShardMatcher(keep.names, root)

    def shard(self, url: str) -> str | None:
        """The keep-list's name for `url`; None for an unknown shard kept whole; error otherwise."""
        name = self.match(url)
        if name is None and self.unknown == "error":
            raise InputError(
                f"shard {url!r} is not in the keep-list (it knows {len(self.keep.names)} shards, "
                f"e.g. {self.keep.names[:3]}): pass unknown_shards='keep' to read it whole"
            )
        return name

    def check(self, urls: list[str], allow_mismatch: bool) -> None:
        """Refuse a URL list that is not the keep-list's dataset, before anything is read."""
        names = [self.match(u) for u in urls]
        if urls and all(n is None for n in names) and not allow_mismatch:
            raise InputError(
                f"the keep-list was made for another dataset: none of the {len(urls)} shards "
                f"(e.g. {urls[0]!r}) is among its {len(self.keep.names)} shards "
                f"(e.g. {self.keep.names[:3]}); pass root= if the names differ only by a prefix, "
                "or allow_mismatch=True to apply it anyway"
            )
        for url in urls:
            self.shard(url)

    def is_kept(self, url: str, key: str) -> bool:
        name = self.shard(url)
        return True if name is None else (name, key) in self.keep


class _KeptShards:
    """Pipeline stage: URL dicts of shards with something kept; the others are counted, never opened.

    An endless shard stream (`resampled=True`) in which nothing is kept would skip forever:
    after MAX_SKIPPED shards in a row without a kept one (and each URL seen skipped), it stops
    with an error instead."""

    MAX_SKIPPED = 10_000

    def __init__(self, selection: _Selection, stats: ReadStats):
        self.selection, self.stats = selection, stats

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        skipped: set[str] = set()
        run = 0
        for item in src:
            name = self.selection.shard(item["url"])
            if name is not None and self.selection.keep.kept_count(name) == 0:
                self.stats.shards_skipped += 1
                skipped.add(item["url"])
                run += 1
                if run >= max(self.MAX_SKIPPED, 10 * len(skipped)):
                    raise InputError(
                        f"nothing is kept in any of the {len(skipped)} shards this stream repeats "
                        f"(e.g. {next(iter(skipped))!r}): {run} shards in a row skipped"
                    )
                continue
            run = 0
            skipped.clear()
            yield {**item, "__shard__": name}


class _ReadKept:
    """Pipeline stage: shard dicts in, kept samples out as webdataset sample dicts."""

    def __init__(
        self,
        keep: KeepList,
        stats: ReadStats,
        handler: Callable,
        allow_mismatch: bool,
        weights: bool,
        select_files: Callable | None,
        rename_files: Callable | None,
    ):
        if weights and keep.weights is None:
            raise SettingsError(
                f"weights=True: this keep-list (method {keep.manifest.get('method')!r}) carries no importance weights"
            )
        self.keep, self.stats, self.handler = keep, stats, handler
        self.allow_mismatch, self.weights = allow_mismatch, weights
        self.select_files, self.rename_files = select_files, rename_files

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            try:
                yield from self._shard(item, url)
            except Exception as exn:
                if url not in str(exn):
                    exn.args = exn.args + (url,)
                if not self.handler(exn):
                    break

    def _shard(self, item: dict, url: str) -> Iterator[dict]:
        name, source, local = item.get("__shard__"), _cached(item), _local_path(item)
        if name is None:
            raws = read_keys(url, url, None, self.stats, source)
            weights = None
        else:
            keys = self.keep.shard_keys(name)
            first, stop = item.get("__slice__", (0, len(keys)))
            keys = keys[first:stop]
            weights = None
            if self.weights:
                shard_weights = self.keep.shard_weights(name)
                assert shard_weights is not None  # __init__ refuses weights=True without them
                weights = dict(zip(keys, shard_weights[first:stop].tolist()))
            ranges = self.keep.shard_ranges(name)
            if ranges is None or self.allow_mismatch:
                raws = read_keys(url, name, set(keys), self.stats, source)
            else:
                sizes = self.keep.shard_bytes
                size = None if sizes is None else int(sizes[self.keep.shard_index(name)])
                raws = read_ranges(url, name, ranges[first:stop], keys, self.stats, size, source)
        for key, data, names in raws:
            sample = _sample(url, local, key, data, names, self.select_files, self.rename_files)
            if sample is not None:
                if weights is not None:
                    sample["__weight__"] = weights[key]
                yield sample


def _cached(item: dict) -> OpenShard | None:
    """The shard as webdataset's file cache opened it (a local copy is reopened seekable)."""
    if "stream" not in item:
        return None
    if item.get("local_path"):
        item["stream"].close()
        return open_shard(item["local_path"])
    return from_stream(item["stream"])


def _local_path(item: dict) -> str | None:
    """`__local_path__` as webdataset sets it: the path of a local or cached shard."""
    if item.get("local_path"):
        return item["local_path"]
    parsed = urlparse(item["url"])
    return parsed.path if parsed.scheme in ("", "file") else None


def _sample(
    url: str,
    local: str | None,
    key: str,
    data: dict[str, bytes],
    names: dict[str, str],
    select_files: Callable | None,
    rename_files: Callable | None,
) -> dict | None:
    """A webdataset sample dict; `rename_files`/`select_files` act on member names as in webdataset."""
    head = {"__url__": url} if local is None else {"__url__": url, "__local_path__": local}
    if select_files is None and rename_files is None:
        return {"__key__": key, **head, **data}
    out: dict[str, Any] = dict(head)
    for ext, value in data.items():
        name = rename_files(names[ext]) if rename_files else names[ext]
        parts = split_name(name)
        if parts is None or (select_files is not None and not select_files(name)):
            continue
        out.setdefault("__key__", parts[0])
        out[parts[1]] = value
    return {"__key__": out.pop("__key__"), **out} if "__key__" in out else None


def even_slice(counts: np.ndarray, n_slots: int, slot: int) -> list[tuple[int, int, int]]:
    """Slot `slot`'s share of the kept samples of shards with `counts` (in order):
    `(shard, first, stop)` runs totalling exactly `sum(counts) // n_slots` samples."""
    counts = np.asarray(counts, dtype=np.int64)
    per = int(counts.sum()) // n_slots
    lo, hi = slot * per, (slot + 1) * per
    ends = np.cumsum(counts)
    starts = ends - counts
    return [
        (int(s), int(max(lo, starts[s]) - starts[s]), int(min(hi, ends[s]) - starts[s]))
        for s in np.nonzero((ends > lo) & (starts < hi))[0]
    ]


class _EvenSlots:
    """Source stage for even epochs: this (rank, worker)'s exact share of the kept samples.

    Every rank computes the same shard order from `(seed, epoch)`, so shares never overlap.
    The rank is taken where the dataset is made: DataLoader worker processes may not see
    the process group.
    """

    def __init__(self, urls: list[str], counts: np.ndarray, seed: int, shuffle: bool):
        self.urls, self.counts, self.seed, self.shuffle = urls, counts, seed, shuffle
        self.epoch, self.next_epoch = -1, 0
        self.node = pytorch_worker_info()[:2]

    def __call__(self) -> Iterator[dict]:
        self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        rank, world, worker, workers = pytorch_worker_info()
        if world == 1:
            rank, world = self.node
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
            if self.shuffle
            else np.arange(len(self.urls))
        )
        for s, first, stop in even_slice(self.counts[order], world * workers, rank * workers + worker):
            yield {"url": self.urls[order[s]], "__slice__": (first, stop)}


class PrunedWebDataset(wds.WebDataset):
    """`webdataset.WebDataset` over the kept samples of a keep-list.

    Takes every argument of `webdataset.WebDataset`, yields the same sample dicts in the
    same order minus the pruned ones, and its fluid methods return PrunedWebDatasets.
    `keep`: a keep-list folder, object-store URL (`s3://bucket/run/keep`) or `KeepList`.
    `root`: the dataset root when shard names are not trailing parts of the URLs.
    `unknown_shards`: 'error' or 'keep' (read whole) for URLs the keep-list does not know.
    `allow_mismatch`: apply a keep-list whose shards differ from these (none known, or
    rewritten since indexing), matching samples by key only.
    `weights`: add `__weight__` (keep-lists that carry weights).
    `even_epochs`: give every DDP rank and DataLoader worker exactly the same number of
    samples per epoch (replaces `nodesplitter`/`workersplitter`; call `set_epoch` per epoch).
    `ds.stats` counts shards opened and skipped, samples and bytes read in this process (compressed
    bytes for compressed shards), and shards read through because they cannot seek.
    """

    pipeline: list[Any]  # webdataset's stages (untyped there)

    def __init__(
        self,
        urls,
        handler=reraise_exception,
        mode=None,
        resampled=False,
        repeat=False,
        shardshuffle=None,
        cache_size=-1,
        cache_dir=None,
        url_to_name=cache.pipe_cleaner,
        detshuffle=False,
        nodesplitter=shardlists.single_node_only,
        workersplitter=shardlists.split_by_worker,
        select_files=None,
        rename_files=None,
        empty_check=True,
        verbose=False,
        seed=None,
        *,
        keep: KeepList | str | os.PathLike,
        root: str | None = None,
        unknown_shards: str = "error",
        allow_mismatch: bool = False,
        weights: bool = False,
        even_epochs: bool = False,
    ):
        if even_epochs and (resampled or mode == "resampled"):
            raise SettingsError("even_epochs=True needs a fixed shard list, not resampled=True")
        listed = _url_list(urls)  # our expansion also takes globs and fsspec globs
        super().__init__(
            urls if listed is None else listed,
            handler=handler,
            mode=mode,
            resampled=resampled,
            repeat=repeat,
            shardshuffle=shardshuffle,
            cache_size=cache_size,
            cache_dir=cache_dir,
            url_to_name=url_to_name,
            detshuffle=detshuffle,
            nodesplitter=nodesplitter,
            workersplitter=workersplitter,
            empty_check=empty_check,
            verbose=verbose,
            seed=seed,
        )
        self.keep = as_keep_list(keep)
        self.stats = ReadStats()
        selection = _Selection(self.keep, root, unknown_shards)
        if listed is not None:
            selection.check(listed, allow_mismatch)
            names = [selection.shard(u) for u in listed]
            if listed and all(n is not None and self.keep.kept_count(n) == 0 for n in names):
                raise InputError(f"the keep-list keeps no sample of these {len(listed)} shards (e.g. {listed[0]!r})")
        opener = next(
            (i for i, stage in enumerate(self.pipeline) if isinstance(stage, (cache.StreamingOpen, cache.FileCache))),
            None,
        )
        if opener is None or len(self.pipeline) < opener + 3:
            raise RuntimeError(f"unsupported webdataset {wds.__version__}: no opener stage to replace")
        reader = _ReadKept(self.keep, self.stats, handler, allow_mismatch, weights, select_files, rename_files)
        file_cache = [self.pipeline[opener]] if isinstance(self.pipeline[opener], cache.FileCache) else []
        head = self.pipeline[:opener]
        self.slots = None
        if even_epochs:
            if listed is None:
                raise SettingsError("even_epochs=True needs the shard URLs as a string or list")
            names = [selection.shard(u) for u in listed]
            if None in names:
                raise SettingsError(
                    f"even_epochs=True needs kept counts for every shard; "
                    f"{listed[names.index(None)]!r} is not in the keep-list"
                )
            known = cast(list[str], names)  # no None: refused above
            counts = np.array([self.keep.kept_count(n) for n in known], dtype=np.int64)
            self.slots = _EvenSlots(listed, counts, 0 if seed is None else int(seed), bool(shardshuffle))
            head = [self.slots]
        self.pipeline = [*head, _KeptShards(selection, self.stats), *file_cache, reader, *self.pipeline[opener + 3 :]]

    def decode(self, *args, pre=None, post=None, only=None, partial=False, handler=reraise_exception):
        """webdataset's `decode`, except that by default nothing is unpickled: pickle members
        (`.pyd`, `.pkl`, `.pickle`, `.pth`) stay bytes. Pass `post=[webdataset.autodecode.basichandlers]`
        to unpickle data you trust."""
        return super().decode(
            *args,
            pre=pre,
            post=[safe_basichandlers] if post is None else post,
            only=only,
            partial=partial,
            handler=handler,
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration starts with (the shard order under even_epochs)."""
        if self.slots is None:
            raise SettingsError("set_epoch applies to even_epochs=True")
        self.slots.next_epoch = int(epoch)

    def epoch_length(self, world_size: int = 1, num_workers: int = 0) -> int:
        """Samples each rank yields per epoch under even_epochs (DataLoader `num_workers`)."""
        if self.slots is None:
            raise SettingsError("epoch_length applies to even_epochs=True")
        workers = max(1, num_workers)
        return workers * (int(self.slots.counts.sum()) // (world_size * workers))


UNSAFE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth"})  # pickle, torch.load


def safe_basichandlers(key: str, data: bytes):
    """webdataset's basic decoders without the ones that unpickle (shard content is untrusted)."""
    if key.rsplit(".", 1)[-1].lower() in UNSAFE_EXTENSIONS:
        return None
    return autodecode.basichandlers(key, data)


def _url_list(urls) -> list[str] | None:
    """The shard URLs when given as a string or list (not a YAML spec or a directory)."""
    if isinstance(urls, str):
        if urls.endswith((".yaml", ".yml", ".json", "/")):
            return None
        return expand_urls(urls)
    if isinstance(urls, (list, tuple)) and all(isinstance(u, str) for u in urls):
        return expand_urls(list(urls))
    return None


class KeepFilter:
    """A `webdataset.DataPipeline` stage applying a keep-list.

    In place of `wds.tarfile_to_samples()` (URL dicts in) it reads only kept samples, as
    `PrunedWebDataset` does; after it (sample dicts in) it drops pruned samples by
    `(__url__, __key__)`, before any decoder runs.
    """

    def __init__(
        self,
        keep: KeepList | str | os.PathLike,
        root: str | None = None,
        unknown_shards: str = "error",
        allow_mismatch: bool = False,
        weights: bool = False,
        handler: Callable = reraise_exception,
    ):
        self.keep = as_keep_list(keep)
        self.stats = ReadStats()
        self.selection = _Selection(self.keep, root, unknown_shards)
        self.shards = _KeptShards(self.selection, self.stats)
        self.reader = _ReadKept(self.keep, self.stats, handler, allow_mismatch, weights, None, None)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        src = iter(src)
        first = next(src, None)
        if first is None:
            return
        items = itertools.chain([first], src)
        if "__key__" in first:
            yield from (s for s in items if self.selection.is_kept(s["__url__"], s["__key__"]))
        else:
            yield from self.reader(self.shards(items))


def keep_filter(keep: KeepList | str | os.PathLike, **options) -> KeepFilter:
    """A pipeline stage for custom `webdataset.DataPipeline`s (see `KeepFilter`)."""
    return KeepFilter(keep, **options)


class KeepPredicate:
    """`row -> bool` over rows with `__url__` and `__key__`, e.g. `ray.data.read_webdataset(...).filter(...)`."""

    def __init__(self, keep: KeepList | str | os.PathLike, root: str | None = None, unknown_shards: str = "error"):
        self.selection = _Selection(as_keep_list(keep), root, unknown_shards)

    def __call__(self, row: dict) -> bool:
        return self.selection.is_kept(str(row["__url__"]), str(row["__key__"]))
