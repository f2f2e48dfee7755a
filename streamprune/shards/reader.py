"""Reading the kept samples of one shard, seeking past pruned bytes where the storage allows.

Two ways in: by byte range (the keep-list carries each kept sample's `[start, end)` from
the index: coalesced positioned reads on local tars, read-through on streams), or by key
(a header scan that skips pruned members' data). Compressed shards are opened as their
decompressed tar and read forward (byte ranges are offsets in it). Both yield
`(key, {ext: bytes}, names)` grouped exactly as webdataset groups members.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np

from streamprune.errors import ChangedShardError, DamagedRunError
from streamprune.shards.opening import OpenShard, open_shard
from streamprune.shards.tarscan import CountingReader, Sample, TarFormatError, iter_samples, split_name

CHUNK_BYTES = 4 << 20  # largest single read of coalesced kept samples
GAP_BYTES = 4 << 10  # pruned gaps up to a page are read through: the kernel reads whole pages anyway


@dataclass
class ReadCounts:
    """What the loader read in this process (I/O counters, not per-sample training statistics):
    shards opened and skipped, samples, bytes.

    Bytes are those read from storage: for a compressed shard, the compressed bytes, which
    the decompressor reads from the start up to the last sample wanted (no skipping).
    """

    shards_opened: int = 0
    shards_skipped: int = 0
    samples: int = 0
    bytes_read: int = 0
    bytes_total: int = 0  # sizes of the opened shards, where known (compressed sizes for compressed shards)
    shards_read_through: int = 0  # opened shards that cannot seek (compressed, `pipe:`): read from the start
    requests: int = 0  # remote shards: HTTP / object-store requests made, retries included
    retries: int = 0
    bytes_requested: int = 0  # remote shards: bytes asked for by range requests
    bytes_received: int = 0  # remote shards: bytes that crossed the network (ranges and streams)

    def add_transfer(self, t) -> None:
        """Count a remote shard's transfer (`remote.TransferStats`)."""
        self.requests += t.requests
        self.retries += t.retries
        self.bytes_requested += t.bytes_requested
        self.bytes_received += t.bytes_received

    @property
    def fraction_read(self) -> float:
        return self.bytes_read / self.bytes_total if self.bytes_total else float("nan")


RawSample = tuple[str, dict[str, bytes], dict[str, str]]  # key, data by extension, member name by extension


def _raw(sample: Sample) -> RawSample:
    names: dict[str, str] = {}
    for m in sample.members:
        parts = split_name(m.name)
        assert parts is not None  # a sample holds only members webdataset names
        names[parts[1]] = m.name
    return sample.key, sample.data, names


def read_ranges(
    url: str,
    shard: str,
    ranges: np.ndarray,
    keys: list[str],
    counts: ReadCounts,
    expected_size: int | None = None,
    source: OpenShard | None = None,
) -> Iterator[RawSample]:
    """Kept samples by byte range, each checked to hold the key the keep-list expects."""
    for sample, _ in iter_ranges(url, shard, ranges, keys, counts, expected_size, source):
        yield _raw(sample)


def iter_ranges(
    url: str,
    shard: str,
    ranges: np.ndarray,
    keys: list[str],
    counts: ReadCounts,
    expected_size: int | None = None,
    source: OpenShard | None = None,
) -> Iterator[tuple[Sample, memoryview]]:
    """Each kept sample parsed (checked against its expected key) with its raw tar bytes."""
    opened = source or open_shard(url)
    counts.shards_opened += 1
    counts.bytes_total += opened.size or 0
    try:
        if (
            expected_size is not None
            and expected_size >= 0
            and opened.size is not None
            and opened.size != expected_size
        ):
            raise ChangedShardError(
                f"shard {url!r} has {opened.size} bytes, the keep-list was made from one of "
                f"{expected_size}: re-index and reduce again, or pass allow_mismatch=True "
                "to match samples by key"
            )
        end = int(ranges[:, 1].max()) if len(ranges) else 0
        if opened.tar_size is not None and end > opened.tar_size:  # read nothing (nor allocate) past the end
            raise ChangedShardError(
                f"shard {url!r} has {opened.tar_size} bytes, the keep-list's byte ranges reach {end}: "
                "the shard changed since indexing, or the keep-list was edited; re-index and reduce again"
            )
        runs = list(_coalesce(ranges))
        spans = [(int(ranges[first, 0]), int(ranges[stop - 1, 1])) for first, stop in runs]
        if opened.remote is not None:  # range requests without read-ahead, several in flight
            buffers = opened.fetch_ranges(spans)
        else:
            if opened.seekable:
                fetch = _pread(opened, shard, counts)
            else:
                fetch = _read_forward(opened, shard, counts)
                counts.shards_read_through += 1
            buffers = (fetch(start, end - start) for start, end in spans)
        for (first, stop), (base, _), data in zip(runs, spans, buffers, strict=True):
            buf = memoryview(data)
            for i in range(first, stop):
                a, b = int(ranges[i, 0]) - base, int(ranges[i, 1]) - base
                reader = CountingReader(io.BytesIO(buf[a:b]), True, base + b, shard, pos=base + a)
                got = list(iter_samples(reader, read_exts=None, require_end=False))
                if len(got) != 1 or got[0].key != keys[i]:
                    found = [s.key for s in got]
                    raise ChangedShardError(
                        f"shard {url!r}: bytes {base + a}..{base + b} hold {found}, the keep-list "
                        f"expects sample {keys[i]!r}: the shard changed since indexing"
                    )
                counts.samples += 1
                yield got[0], buf[a:b]
    finally:
        if opened.transfer is not None:
            if opened.remote is not None:
                counts.bytes_read += opened.transfer.bytes_received
            counts.add_transfer(opened.transfer)
        opened.close(url, drain=False)  # everything wanted was read (or reading failed)


def read_keys(
    url: str, shard: str, keys: set[str] | None, counts: ReadCounts, source: OpenShard | None = None
) -> Iterator[RawSample]:
    """Samples whose key is in `keys` (all when None) by a header scan; stops once all are found."""
    opened = source or open_shard(url)
    counts.shards_opened += 1
    counts.bytes_total += opened.size or 0
    reader = CountingReader(opened.stream, opened.seekable, opened.tar_size, shard)
    if not opened.seekable:
        counts.shards_read_through += 1
    to_the_end = False
    try:
        wanted = None if keys is None else keys.__contains__
        left = None if keys is None else len(keys)
        if left == 0:
            return
        for sample in iter_samples(reader, read_exts=None, keep=wanted):
            counts.samples += 1
            yield _raw(sample)
            if left is not None:
                left -= 1
                if left == 0:
                    return
        to_the_end = True
    finally:
        counts.bytes_read += opened.stored_read(reader.bytes_read)
        if opened.transfer is not None:
            counts.add_transfer(opened.transfer)
        opened.close(url, drain=to_the_end)


def _coalesce(ranges: np.ndarray) -> Iterator[tuple[int, int]]:
    """Runs `[first, stop)` of kept samples read with one request: gaps under GAP_BYTES, up to CHUNK_BYTES."""
    n = len(ranges)
    if not n:
        return
    starts, ends = ranges[:, 0], ranges[:, 1]
    if (starts[1:] < ends[:-1]).any() or (ends < starts).any():
        raise DamagedRunError("byte ranges of kept samples overlap or are out of order")
    first = 0
    for i in range(1, n + 1):
        if i == n or starts[i] - ends[i - 1] > GAP_BYTES or ends[i] - starts[first] > CHUNK_BYTES:
            yield first, i
            first = i


def _pread(opened: OpenShard, shard: str, counts: ReadCounts):
    fd = cast(io.FileIO, opened.stream).fileno()  # a seekable shard is a local file

    def fetch(offset: int, length: int) -> bytes:
        data = os.pread(fd, length, offset)
        while len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise TarFormatError(shard, offset + len(data), "truncated: data ends early")
            data += more
        counts.bytes_read += length
        return data

    return fetch


def _read_forward(opened: OpenShard, shard: str, counts: ReadCounts):
    """Streams (`pipe:`, compressed shards): read through to each range; bytes counted as stored."""
    reader = CountingReader(opened.stream, False, opened.tar_size, shard)

    def fetch(offset: int, length: int) -> bytes:
        before = opened.stored_read(reader.bytes_read)
        try:
            reader.skip(offset - reader.pos)
            data = reader.read(length)
        finally:
            counts.bytes_read += opened.stored_read(reader.bytes_read) - before
        if len(data) < length:
            raise TarFormatError(reader.shard, reader.pos, "truncated: data ends early")
        return data

    return fetch
