"""`PrunedWebDataset`: `webdataset.WebDataset` that drops pruned samples before reading them.

Shards with nothing kept are never opened; on local tars (and object stores that serve
ranges) the bytes of pruned samples are never read. Compressed shards (gzip, bz2, xz) and
`pipe:` streams cannot seek: they are read through up to their last kept sample. Imports
webdataset, NumPy and the keep-list only, no Ray and no stats store, so a training job
that applies a keep-list stays light.

Resumable inside an epoch, elastically (`state_dict`, `load_state_dict`, `merge_states`); the
state logic is in `streamprune.loader_state`.

The keep-list may be at an object-store URL (`s3://bucket/run/keep`): each process (DDP rank,
DataLoader worker) reads its manifest and shard table, then the keys and byte ranges of only the
shards it reads, by exact byte ranges; the list pickles to workers as its location.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from webdataset import autodecode, cache, filters, shardlists
from webdataset.handlers import reraise_exception
from webdataset.utils import pytorch_worker_info

from streamprune import loader_state
from streamprune.errors import InputError, SettingsError
from streamprune.formats.keeplist import KeepList
from streamprune.loader_state import Layout, Range
from streamprune.shards.identity import ShardMatcher
from streamprune.shards.reader import ReadCounts, read_keys, read_ranges
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


class _Tracker:
    """Where this slot (rank, worker) is in the current iteration, for `state_dict`; and a state
    `load_state_dict` gave, applied when the next iteration begins.

    The position is counted where samples leave the reader: plan item `item` (a shard, or a
    run of its kept samples), shard `shard`, next kept-sample index `index`. Samples a tracked
    shuffle buffer holds are `pending`: read, not yet yielded, so re-read on resume."""

    def __init__(self) -> None:
        self.resume: dict | None = None
        self.active = False
        self.resumed = False  # this pass continues a loaded state (items before it are skipped)
        self.iterations = 0
        self.layout: Layout | None = None
        self.epoch = self.pass_ = 0
        self.plan: list[Range] | None = None
        self.item, self.shard, self.index = 0, None, 0  # type: int, int | None, int
        self.done: np.ndarray | None = None
        self.samples = self.yielded = 0
        self.limit = -1
        self.finished = False
        self.reread: dict[tuple[int, int], int] = {}  # pending samples of a loaded state not read again yet
        self.last_ref: tuple[int, int] | None = None
        self.buffers: list[list] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "buffers": [], "last_ref": None}  # workers get no buffered samples

    def new_pass(self, n_shards: int, stream: bool) -> None:
        self.item, self.shard, self.index, self.plan = 0, None, 0, None
        self.done = np.zeros(n_shards, dtype=bool) if stream else None
        self.resumed, self.reread = False, {}

    def start_item(self, item: int, shard: int, index: int) -> None:
        """The reader moves on to plan item `item`: the one before is finished."""
        if self.done is not None and self.shard is not None:
            self.done[self.shard] = True
        self.item, self.shard, self.index = item, shard, index

    def handed(self, shard: int, index: int, advance: bool) -> None:
        """The reader hands out kept sample `index` of `shard` (a re-read pending one: not `advance`)."""
        self.last_ref = (shard, index)
        self.samples += 1
        if advance:
            self.index = index + 1
        elif self.reread.get((shard, index), 0) > 1:
            self.reread[shard, index] -= 1
        else:
            self.reread.pop((shard, index), None)

    def pending(self) -> list:
        """Samples read, not yet yielded: in shuffle buffers, or of a loaded state and not read again yet."""
        held: list = list(itertools.chain.from_iterable(self.buffers))  # (shard, index) pairs, any order
        if None in held:
            held = [ref for ref in held if ref is not None]
        return held + [[u, i] for (u, i), times in self.reread.items() for _ in range(times)]


class _KeptShards:
    """Pipeline stage: URL dicts of shards with something kept; the others are counted, never opened.

    An endless shard stream (`resampled=True`) in which nothing is kept would skip forever:
    after MAX_SKIPPED shards in a row without a kept one (and each URL seen skipped), it stops
    with an error instead.

    With a tracker (a resumable PrunedWebDataset) it also tells the tracker which plan item the
    reader is in, and on resume skips what was read before (without opening it): first the
    samples a shuffle buffer held, then the rest of the plan from the saved position."""

    MAX_SKIPPED = 10_000

    def __init__(self, selection: _Selection, read_counts: ReadCounts, plan: _Plan | None = None):
        self.selection, self.read_counts, self.plan = selection, read_counts, plan

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        items = src if self.plan is None else self.plan.items(src)
        skipped: set[str] = set()
        run = 0
        for item in items:
            name = self.selection.shard(item["url"])
            if name is not None and self.selection.keep.kept_count(name) == 0:
                self.read_counts.shards_skipped += 1
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


class _Plan:
    """What a resumable dataset's slot reads, item by item, and where it resumes (see `_Tracker`)."""

    def __init__(self, urls: list[str], counts: np.ndarray, mode: str, tracker: _Tracker):
        self.urls, self.counts, self.mode, self.tracker = urls, counts, mode, tracker
        self.index: dict[str, int] = {}
        for i, u in enumerate(urls):
            self.index.setdefault(u, i)

    def items(self, src: Iterable[dict]) -> Iterator[dict]:
        """Plan items, from `src` (the shard stage's URL dicts) or a loaded state's plan: first the
        samples a saved shuffle buffer held, then the plan from the saved position on."""
        t = self.tracker
        if not t.active:  # iterated without PrunedWebDataset.__iter__ (a copy inside another pipeline)
            yield from src
            return
        yield from self._rereads()
        resumed, t.resumed = t.resumed, False
        by_position = resumed and (t.plan is not None or self.mode == "even")  # a fixed plan: skip by item
        yield from self._walk(self._source(src, resumed and not by_position), resumed, by_position)

    def _rereads(self) -> Iterator[dict]:
        """Items reading again, by position, the pending samples of a loaded state."""
        by_shard: dict[int, list[int]] = {}
        for (u, i), times in self.tracker.reread.items():
            by_shard.setdefault(u, []).extend([i] * times)
        for u, picks in sorted(by_shard.items()):
            while picks:  # a sample held twice (with_epoch's passes) is read twice, in two rounds
                once = sorted(set(picks))
                for i in once:
                    picks.remove(i)
                yield {"url": self.urls[u], "__index__": u, "__picks__": once}

    def _source(self, src: Iterable[dict], rest_first: bool) -> Iterable[dict]:
        """What this pass walks: a loaded state's plan, or `src`, after the rest of the shard
        that was being read when the state was saved (`rest_first`)."""
        t = self.tracker
        if t.plan is not None:
            return ({"url": self.urls[u], "__index__": u, "__slice__": (a, b)} for u, a, b in t.plan)
        if not rest_first or t.shard is None:
            return src
        u0, first = int(t.shard), t.index
        t.shard = None  # not finished: moving on from it must not mark it done
        head = [{"url": self.urls[u0], "__index__": u0, "__slice__": (first, int(self.counts[u0]))}]
        if self.mode == "stream":  # each shard once per pass: not again when the shard list gets to it
            src = (d for d in src if self.index[d["url"]] != u0)
        return itertools.chain(head, src)

    def _walk(self, src: Iterable[dict], resumed: bool, by_position: bool) -> Iterator[dict]:
        """The items of `src` still to read, each told to the tracker; a resumed pass skips what
        was read before: by plan position, or (stream mode) the shards finished."""
        t = self.tracker
        for k, item in enumerate(src):
            u = int(item["__index__"]) if "__index__" in item else self.index[item["url"]]
            count = int(self.counts[u])
            first, stop = item.get("__slice__", (0, count))
            if by_position:
                if k < t.item:
                    continue
                if k == t.item:
                    first = max(first, t.index)
            elif resumed and t.done is not None and t.done[u]:
                continue
            t.start_item(k, u, first)
            if count > 0 and first >= stop:
                continue  # read before the state was saved: never opened
            yield _plan_item(item, u, count, first, stop)


def _plan_item(item: dict, u: int, count: int, first: int, stop: int) -> dict:
    """The dict `_ReadKept` reads for shard `u` from kept sample `first` to `stop`."""
    out = {**item, "__index__": u}
    if count < 0:  # a shard the keep-list does not know: skip by reading
        out["__skip__"] = first
    elif first > 0 or "__slice__" in item:
        out["__slice__"] = (first, stop)
    return out


class _ReadKept:
    """Pipeline stage: shard dicts in, kept samples out as webdataset sample dicts."""

    def __init__(
        self,
        keep: KeepList,
        read_counts: ReadCounts,
        handler: Callable,
        allow_mismatch: bool,
        weights: bool,
        select_files: Callable | None,
        rename_files: Callable | None,
        tracker: _Tracker | None = None,
    ):
        if weights and keep.weights is None:
            raise SettingsError(
                f"weights=True: this keep-list (method {keep.manifest.get('method')!r}) carries no importance weights"
            )
        self.keep, self.read_counts, self.handler = keep, read_counts, handler
        self.allow_mismatch, self.weights = allow_mismatch, weights
        self.select_files, self.rename_files = select_files, rename_files
        self.tracker = tracker

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
        picks = item.get("__picks__")
        if name is None:
            raws = read_keys(url, url, None, self.read_counts, source)
            weights = None
            skip = item.get("__skip__", 0)
            raws = itertools.islice(raws, skip, None)
            indices: Iterable[int] = itertools.count(skip)
            if picks is not None:  # pending samples of an unknown shard: by their position in it
                wanted = set(picks)
                raws = (r for i, r in enumerate(read_keys(url, url, None, self.read_counts, source)) if i in wanted)
                indices = iter(picks)
        else:
            all_keys = self.keep.shard_keys(name)
            if picks is not None:
                rows: Any = np.asarray(picks, dtype=np.int64)
                keys = [all_keys[i] for i in picks]
            else:
                first, stop = item.get("__slice__", (0, len(all_keys)))
                rows = slice(first, stop)
                keys = all_keys[first:stop]
            indices = iter(picks) if picks is not None else itertools.count(rows.start)
            weights = None
            if self.weights:
                shard_weights = self.keep.shard_weights(name)
                assert shard_weights is not None  # __init__ refuses weights=True without them
                weights = dict(zip(keys, np.asarray(shard_weights)[rows].tolist(), strict=True))
            ranges = self.keep.shard_ranges(name)
            if ranges is None or self.allow_mismatch:
                raws = read_keys(url, name, set(keys), self.read_counts, source)
            else:
                sizes = self.keep.shard_bytes
                size = None if sizes is None else int(sizes[self.keep.shard_index(name)])
                raws = read_ranges(url, name, np.asarray(ranges)[rows], keys, self.read_counts, size, source)
        shard = int(item.get("__index__", -1))
        track = self.tracker if shard >= 0 and self.tracker is not None and self.tracker.active else None
        for (key, data, names), index in zip(raws, indices, strict=False):  # indices may count on past the last read
            sample = _sample(url, local, key, data, names, self.select_files, self.rename_files)
            if track is not None:
                track.handed(shard, index, advance=picks is None)
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

    def __init__(self, urls: list[str], counts: np.ndarray, seed: int, shuffle: bool, tracker: _Tracker | None = None):
        self.urls, self.counts, self.seed, self.shuffle = urls, counts, seed, shuffle
        self.epoch, self.next_epoch = -1, 0
        self.node = pytorch_worker_info()[:2]
        self.tracker = tracker

    def layout(self) -> Layout:
        """This process's (rank, worker) as the DataLoader and the process group (or the env) see it."""
        rank, world, worker, workers = pytorch_worker_info()
        if world == 1:
            rank, world = self.node
        return Layout(world, rank, workers, worker)

    def plan(self, epoch: int, layout: Layout) -> list[Range]:
        """Slot `layout`'s `(shard, first, stop)` runs in epoch `epoch` (shard: index into the URLs)."""
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            if self.shuffle
            else np.arange(len(self.urls))
        )
        return [(int(order[s]), a, b) for s, a, b in even_slice(self.counts[order], layout.slots, layout.slot)]

    def __call__(self) -> Iterator[dict]:
        t = self.tracker
        if t is not None and t.active:
            self.epoch = t.epoch + t.pass_
            layout = t.layout or self.layout()
        else:
            self.epoch, layout = self.next_epoch, self.layout()
        self.next_epoch = self.epoch + 1
        for u, first, stop in self.plan(self.epoch, layout):
            yield {"url": self.urls[u], "__slice__": (first, stop), "__index__": u}


class _TrackedShuffle:
    """webdataset's sample shuffle (the same buffer and picks) that tells the tracker which
    samples it holds, so that a saved state re-reads them on resume instead of losing them.

    A sample's identity is the reader's last handed-out sample when the buffer takes it: right
    for stages that map or drop samples in between (decode, map, to_tuple, select), not for
    ones that batch before it."""

    def __init__(
        self,
        tracker: _Tracker,
        bufsize: int,
        initial: int = 100,
        seed: Any = None,
        rng: Any = None,
        handler: Any = None,  # accepted as webdataset's shuffle does, unused
    ):
        self.tracker, self.bufsize, self.initial, self.seed, self.rng = tracker, bufsize, initial, seed, rng

    def __call__(self, src: Iterable) -> Iterator:
        rng = self.rng
        if self.seed is not None:
            rng = random.Random(self.seed)
        elif rng is None:
            rng = random.Random(int((os.getpid() + time.time()) * 1e9))
        initial = min(self.initial, self.bufsize)
        buf: list[Any] = []
        refs: list[tuple[int, int] | None] = []  # buf[k] is kept sample refs[k] (shard, index)
        t = self.tracker
        t.buffers.append(refs)
        data = iter(src)

        def take(sample: Any) -> None:
            buf.append(sample)
            refs.append(t.last_ref)

        def pick() -> Any:
            k = rng.randint(0, len(buf) - 1)
            sample = buf[k]
            buf[k], refs[k] = buf[-1], refs[-1]
            buf.pop()
            refs.pop()
            return sample

        try:
            for sample in data:
                take(sample)
                if len(buf) < self.bufsize:
                    with contextlib.suppress(StopIteration):
                        take(next(data))
                if len(buf) >= initial:
                    yield pick()
            while buf:
                yield pick()
        finally:
            t.buffers[:] = [b for b in t.buffers if b is not refs]


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
    `ds.read_counts` counts shards opened and skipped, samples and bytes read in this process
    (compressed bytes for compressed shards), and shards read through because they cannot seek
    (`ds.stats`, its former name, is deprecated).

    Resumable inside an epoch (shard URLs given as a string or list): `state_dict()` /
    `load_state_dict()` as torchdata's `StatefulDataLoader` calls them in each worker; a resumed
    epoch yields exactly the samples the interrupted one had left, skipping the byte ranges of
    those it yielded without reading them. `load_state_dict(list_of_states)` merges the states
    of all ranks and workers (`merge_states`) to resume with another world size or worker count.
    `.shuffle(n)` samples held in the buffer are read again on resume (the order then differs,
    the set does not). See `streamprune.loader_state` for the state's fields.
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
        resampling = resampled or mode == "resampled"
        if even_epochs and resampling:
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
        self.read_counts = ReadCounts()
        selection = _Selection(self.keep, root, unknown_shards)
        if listed is not None:
            _check_listed(selection, listed, allow_mismatch)
        opener = self._opener()
        self.tracker = _Tracker()
        self._resume: dict[str, Any] | None = None  # what identifies the shard list in a state
        reader = _ReadKept(
            self.keep, self.read_counts, handler, allow_mismatch, weights, select_files, rename_files, self.tracker
        )
        head = self.pipeline[:opener]
        self.slots: _EvenSlots | None = None
        self.node = pytorch_worker_info()[:2]
        kind = "resampled" if resampling else "stream"  # how slots get shards
        if even_epochs:
            self.slots = self._even_slots(listed, selection, seed, shardshuffle)
            head, kind = [self.slots], "even"
        self._plan: _Plan | None = None if listed is None else self._resumable(listed, selection, kind)
        self.pipeline = self._kept_pipeline(head, _KeptShards(selection, self.read_counts, self._plan), reader, opener)

    @property
    def stats(self) -> ReadCounts:
        """Deprecated name of `read_counts` (in streamprune, "stats" are per-sample training statistics)."""
        _renamed("PrunedWebDataset")
        return self.read_counts

    def _opener(self) -> int:
        """Where webdataset's opener stage is: it and the two after it (tar expansion, grouping)
        are what `_ReadKept` replaces."""
        opener = next(
            (i for i, stage in enumerate(self.pipeline) if isinstance(stage, (cache.StreamingOpen, cache.FileCache))),
            None,
        )
        if opener is None or len(self.pipeline) < opener + 3:
            raise RuntimeError(f"unsupported webdataset {wds.__version__}: no opener stage to replace")
        return opener

    def _even_slots(self, listed: list[str] | None, selection: _Selection, seed: Any, shardshuffle: Any) -> _EvenSlots:
        """The source stage of `even_epochs=True`, which needs the kept count of every shard."""
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
        return _EvenSlots(listed, counts, 0 if seed is None else int(seed), bool(shardshuffle), self.tracker)

    def _resumable(self, listed: list[str], selection: _Selection, kind: str) -> _Plan:
        """The plan stage of a dataset that can save and load its state (shard URLs given as a
        string or list), and what identifies its keep-list and shard list in a state."""
        names = [selection.shard(u) for u in listed]
        counts = np.array([-1 if n is None else self.keep.kept_count(n) for n in names], dtype=np.int64)
        self._resume = {
            "mode": kind,
            "keep": loader_state.digest(self.keep.manifest, self.keep.names, np.asarray(self.keep.kept).tolist()),
            "shards": loader_state.digest([n if n is not None else u for n, u in zip(names, listed, strict=True)]),
            "n_shards": len(listed),
            "seed": self.slots.seed if self.slots is not None else _json_seed(self.seed),
        }
        return _Plan(listed, counts, kind, self.tracker)

    def _kept_pipeline(self, head: list, kept: _KeptShards, reader: _ReadKept, opener: int) -> list[Any]:
        """webdataset's stages with the opener, tar expansion and grouping replaced: shard source
        (`head`), shards with something kept, webdataset's file cache if any, the kept samples'
        reader, then the rest of webdataset's stages."""
        file_cache = [self.pipeline[opener]] if isinstance(self.pipeline[opener], cache.FileCache) else []
        return [*head, kept, *file_cache, reader, *self.pipeline[opener + 3 :]]

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
        """Set the epoch the next iteration starts with: the shard order under even_epochs, and in
        every mode the epoch a state records. A loaded state resumes its own epoch only: after
        `set_epoch` to another one, the next iteration starts that epoch afresh."""
        if self.slots is None and self._resume is None:
            raise SettingsError("set_epoch applies to even_epochs=True or shard URLs given as a string or list")
        if self.slots is not None:
            self.slots.next_epoch = int(epoch)
        self.tracker.iterations = int(epoch)

    def epoch_length(self, world_size: int = 1, num_workers: int = 0) -> int:
        """Samples each rank yields per epoch under even_epochs (DataLoader `num_workers`)."""
        if self.slots is None:
            raise SettingsError("epoch_length applies to even_epochs=True")
        workers = max(1, num_workers)
        return workers * (int(self.slots.counts.sum()) // (world_size * workers))

    def shuffle(self, size, **kw):
        """webdataset's sample shuffle buffer, whose contents a saved state remembers (by position:
        the samples it holds are read again on resume). Same arguments as webdataset's."""
        if size < 1:
            return self
        return self.compose(_TrackedShuffle(self.tracker, size, **kw))

    def __iter__(self):
        """One iteration (epoch) of the pipeline, as webdataset's; from a loaded state if one was given."""
        if self._resume is None:
            return super().__iter__()
        self._begin()
        return self._iterate()

    def _layout(self) -> Layout:
        rank, world, worker, workers = pytorch_worker_info()
        if world == 1:
            rank, world = self.node
        return Layout(world, rank, workers, worker)

    def _begin(self) -> None:
        """Start the tracker for a new iteration: fresh, or where a loaded state says."""
        assert self._resume is not None
        t = self.tracker
        state, t.resume = t.resume, None
        layout = self._layout()
        stream = self._resume["mode"] == "stream"
        n = int(self._resume["n_shards"])
        t.new_pass(n, stream)
        t.active, t.layout, t.samples, t.yielded, t.finished, t.buffers = True, layout, 0, 0, False, []
        t.limit = self.nsamples if self.repetitions != 1 and self.nsamples > 0 else -1
        t.pass_ = 0
        current = self.slots.next_epoch if self.slots is not None else t.iterations
        if state is not None and int(state["epoch"]) != current:
            state = None  # set_epoch moved on: the loaded state's epoch is over
        if state is None:
            t.epoch = current
        elif state["mode"] == "merged":
            t.epoch = int(state["epoch"])
            t.plan = loader_state.share([_range(r) for r in state["remaining"]], layout, equal=self.slots is not None)
        else:
            saved = Layout(**state["layout"])
            if saved != layout:
                raise SettingsError(
                    f"this loader state was saved by {saved}, this is {layout}: to resume with another "
                    "world size or number of workers, load the states of all ranks and workers at once "
                    "(ds.load_state_dict(list_of_states), see merge_states)"
                )
            if t.limit != int(state.get("limit", -1)):
                raise SettingsError(
                    f"this loader state was saved with with_epoch({state.get('limit')}), this dataset has "
                    f"with_epoch({t.limit}) (-1: none)"
                )
            pos = state["position"]
            t.epoch, t.pass_ = int(state["epoch"]), int(state["pass"])
            t.plan = None if state.get("plan") is None else [_range(r) for r in state["plan"]]
            t.item, t.shard, t.index = int(pos["item"]), pos["shard"], int(pos["index"])
            t.done = None if state.get("done") is None else loader_state.decode_bits(state["done"], n)
            for u, i in state.get("pending", []):
                t.reread[int(u), int(i)] = t.reread.get((int(u), int(i)), 0) + 1
            t.samples, t.yielded, t.finished = int(state["samples"]), int(state["yielded"]), bool(state["finished"])
            t.resumed = True
            if self._resume["mode"] == "stream" and state["seed"] is not None:
                self._reseed(state["seed"])
        t.iterations = t.epoch + 1
        if self.slots is not None:
            self.slots.next_epoch = t.epoch + 1

    def _reseed(self, seed: Any) -> None:
        """Give webdataset's shard shuffle the saved seed: the resumed shard order is the saved one."""
        for i, stage in enumerate(self.pipeline):
            if isinstance(stage, _KeptShards):
                break
            if isinstance(stage, filters.FilterFunction) and stage.f is filters._shuffle and "seed" in stage.kw:
                reseeded = filters.shuffle(*stage.args, **{**stage.kw, "seed": seed})
                self.pipeline = [*self.pipeline[:i], reseeded, *self.pipeline[i + 1 :]]
                self.seed = seed
                break

    def _iterate(self) -> Iterator:
        """webdataset's `iterator` (passes, `with_epoch`'s count), counting what it yields."""
        t = self.tracker
        assert self._resume is not None
        stream, n = self._resume["mode"] == "stream", int(self._resume["n_shards"])
        while not t.finished and t.pass_ < self.repetitions:
            resumed, count = t.resumed, 0
            source = self.iterator1()
            while True:
                if t.limit > 0 and t.yielded >= t.limit:
                    t.finished = True
                    return
                try:
                    sample = next(source)
                except StopIteration:
                    break
                t.yielded += 1
                count += 1
                yield sample
            if (count == 0 and not resumed) or t.pass_ + 1 >= self.repetitions:
                t.finished = True
                return
            t.new_pass(n, stream)
            t.pass_ += 1

    def state_dict(self) -> dict[str, Any]:
        """Where this dataset is in its epoch, as a small JSON-able dict (the `torchdata`
        `StatefulDataLoader` protocol; or save it yourself with `torch.save`/`json.dump`).

        In a DataLoader worker it is that worker's state; `load_state_dict` on a dataset in the
        same (rank, worker) place resumes it, with exactly the samples the epoch had left."""
        if self._resume is None:
            raise SettingsError("state_dict needs the shard URLs as a string or list (not a YAML spec or folder)")
        t = self.tracker
        if t.resume is not None:  # loaded and not started yet: give it back unchanged
            return copy.deepcopy(t.resume)
        layout = t.layout or self._layout()
        epoch = t.epoch if t.active else (self.slots.next_epoch if self.slots is not None else t.iterations)
        active = t.active
        return {
            "format": loader_state.FORMAT,
            "version": loader_state.VERSION,
            **self._resume,
            "epoch": epoch,
            "pass": t.pass_ if active else 0,
            "layout": layout.as_dict(),
            "limit": t.limit if active else (self.nsamples if self.repetitions != 1 and self.nsamples > 0 else -1),
            "plan": None if not active or t.plan is None else [list(r) for r in t.plan],
            "position": {
                "item": t.item if active else 0,
                "shard": t.shard if active else None,
                "index": t.index if active else 0,
            },
            "done": None if not active or t.done is None else loader_state.encode_bits(t.done),
            "pending": t.pending() if active else [],
            "samples": t.samples if active else 0,
            "yielded": t.yielded if active else 0,
            "finished": t.finished if active else False,
        }

    def load_state_dict(self, state: dict[str, Any] | list) -> None:
        """Resume from a `state_dict()` at the next iteration (or from a StatefulDataLoader's
        state, which holds its workers' ones). Pass a list of the states of all ranks and workers
        (or of their StatefulDataLoader states) to resume with another world size or number of
        workers: they are merged (`merge_states`) and shared out anew. A state resumes its own
        epoch: `set_epoch` to another one and the next iteration starts that one afresh."""
        if self._resume is None:
            raise SettingsError("load_state_dict needs the shard URLs as a string or list (not a YAML spec or folder)")
        if isinstance(state, dict) and state.get("format") != loader_state.FORMAT:
            found = loader_state.find_states(state)  # a StatefulDataLoader's state: its workers' states
            state = found[0] if len(found) == 1 else (found or state)
        if isinstance(state, (list, tuple)):
            state = self.merge_states(state)
        loader_state.check(state, self._resume["keep"], self._resume["shards"], self._resume["n_shards"])
        if state["mode"] not in ("merged", self._resume["mode"]):
            raise SettingsError(
                f"the loader state was saved in mode {state['mode']!r} (even_epochs / resampled / plain), "
                f"this dataset is {self._resume['mode']!r}"
            )
        self.tracker.resume = copy.deepcopy(state)
        self.tracker.iterations = int(state["epoch"])  # the next iteration is the saved epoch
        if self.slots is not None:
            self.slots.next_epoch = int(state["epoch"])

    def merge_states(self, states: Iterable[Any]) -> dict[str, Any]:
        """One state from the states of every rank and worker of one run (dataset states, or
        StatefulDataLoader states holding them): the samples none of them yielded yet, which
        `load_state_dict` shares out over any world size and number of workers (run lengths
        differing by at most one sample between slots; nothing repeated, nothing skipped)."""
        if self._resume is None:
            raise SettingsError("merge_states needs the shard URLs as a string or list")
        found = loader_state.find_states(list(states))
        for st in found:
            loader_state.check(st, self._resume["keep"], self._resume["shards"], self._resume["n_shards"])
        plans: dict[int, list[Range]] = {}
        if self.slots is not None:
            for st in found:
                if st["mode"] == "even" and st.get("plan") is None:
                    lay = Layout(**st["layout"])
                    plans[lay.slot] = self.slots.plan(int(st["epoch"]) + int(st["pass"]), lay)
        counts = None
        if self._plan is not None and (self._plan.counts >= 0).all():
            counts = self._plan.counts
        return loader_state.merge(found, plans, counts)


UNSAFE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth"})  # pickle, torch.load


def safe_basichandlers(key: str, data: bytes):
    """webdataset's basic decoders without the ones that unpickle (shard content is untrusted)."""
    if key.rsplit(".", 1)[-1].lower() in UNSAFE_EXTENSIONS:
        return None
    return autodecode.basichandlers(key, data)


def _check_listed(selection: _Selection, listed: list[str], allow_mismatch: bool) -> None:
    """Refuse shard URLs that are not the keep-list's dataset, or of which it keeps nothing."""
    selection.check(listed, allow_mismatch)
    names = [selection.shard(u) for u in listed]
    if listed and all(n is not None and selection.keep.kept_count(n) == 0 for n in names):
        raise InputError(f"the keep-list keeps no sample of these {len(listed)} shards (e.g. {listed[0]!r})")


def _renamed(owner: str) -> None:
    warnings.warn(
        f"{owner}.stats is now .read_counts (the loader's I/O counters: in streamprune, stats are "
        "per-sample training statistics); .stats will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )


def _range(r: Iterable[int]) -> Range:
    shard, first, stop = (int(v) for v in r)
    return shard, first, stop


def _json_seed(seed: Any) -> int | str | None:
    """webdataset's seed as JSON holds it (an int, or WDS_SEED's string)."""
    return seed if seed is None or isinstance(seed, (int, str)) else str(seed)


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
        self.read_counts = ReadCounts()
        self.selection = _Selection(self.keep, root, unknown_shards)
        self.shards = _KeptShards(self.selection, self.read_counts)
        self.reader = _ReadKept(self.keep, self.read_counts, handler, allow_mismatch, weights, None, None)

    @property
    def stats(self) -> ReadCounts:
        """Deprecated name of `read_counts` (in streamprune, "stats" are per-sample training statistics)."""
        _renamed("KeepFilter")
        return self.read_counts

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
