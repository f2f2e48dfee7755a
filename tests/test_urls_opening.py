"""Opening shards (`shards.opening.open_shard`, also importable from `shards.urls`) and the one
byte-counting stream wrapper (`shards.tarscan.CountingReader`) that every reader of shard bytes uses."""

from __future__ import annotations

import ast
import gzip
import io
import tarfile
from pathlib import Path

import fsspec
import pytest

import streamprune.shards as shards_package
from streamprune.shards import opening, urls
from streamprune.shards.reader import ReadCounts, read_keys
from streamprune.shards.remote import HEADER_BLOCK, PROBE_BYTES
from streamprune.shards.scan import scan_shard
from streamprune.shards.tarscan import CountingReader, StreamDataError, TarFormatError, iter_samples


def _tar(n: int = 3, size: int = 700) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, data in (("cls", str(i).encode()), ("bin", bytes([i]) * size)):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Trickle:
    """A stream that hands out at most `step` bytes a read, and raises `error` past byte `fail_at`."""

    def __init__(self, data: bytes, step: int = 7, fail_at: int | None = None, error: Exception | None = None):
        self.data, self.step, self.pos, self.fail_at, self.error = data, step, 0, fail_at, error
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            assert self.error is not None
            raise self.error
        n = self.step if n is None or n < 0 else min(n, self.step)
        data = self.data[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.closed = True


def test_urls_keeps_the_opening_names_it_had():
    assert urls.open_shard is opening.open_shard
    assert urls.OpenShard is opening.OpenShard
    assert urls.from_stream is opening.from_stream
    assert urls.is_local is opening.is_local
    assert callable(urls.local_path) and callable(urls.absolute) and callable(urls.expand_urls)


def test_only_opening_reaches_remote_inside_shards():
    """Inside shards/, opening a shard goes one way: readers and scans -> opening -> remote -> tarscan."""
    folder = Path(shards_package.__file__).parent
    reach: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streamprune.shards."):
                found.add(node.module.rsplit(".", 1)[1])
        reach[path.stem] = found
    assert {m for m, deps in reach.items() if "remote" in deps} == {"opening"}
    assert reach["remote"] <= {"tarscan"} and reach["tarscan"] == set()
    assert "urls" not in set().union(*(deps for m, deps in reach.items() if m != "urls"))


def test_counting_reader_reads_exactly_and_counts_once_per_read():
    data = bytes(range(256)) * 20
    told: list[int] = []
    reader = CountingReader(_Trickle(data), counted=told.append)
    assert reader.read(1000) == data[:1000]
    assert (reader.pos, reader.bytes_read, told) == (1000, 1000, [1000])
    assert reader.read(-1) == data[1000:] and reader.read(10) == b""
    assert reader.bytes_read == len(data) and told == [1000, len(data) - 1000]
    buffered = io.BufferedReader(CountingReader(_Trickle(data)), 64)
    assert buffered.read(100) == data[:100] and buffered.read() == data[100:]


def test_counting_reader_skips_by_seeking_only_when_seekable():
    data = _tar()
    seeking = CountingReader(io.BytesIO(data), True, len(data), "a.tar")
    seeking.skip(512)
    assert (seeking.pos, seeking.bytes_read) == (512, 0)
    with pytest.raises(TarFormatError, match="truncated"):
        seeking.skip(len(data))
    through = CountingReader(_Trickle(data, 100), False, None, "a.tar")
    through.skip(1000)
    assert (through.pos, through.bytes_read) == (1000, 1000)
    with pytest.raises(TarFormatError, match=r"shard 'a.tar': truncated: data ends early at byte"):
        through.skip(len(data))


def test_counting_reader_names_the_shard_and_offset_of_bad_compressed_data():
    reader = CountingReader(_Trickle(b"x" * 100, 10, 30, StreamDataError("corrupt gzip stream")), shard="a.tar", pos=5)
    with pytest.raises(TarFormatError) as info:
        reader.read(50)
    assert (info.value.shard, info.value.offset) == ("a.tar", 35) and not reader.failed


def test_counting_reader_marks_and_maps_a_storage_error():
    plain = CountingReader(_Trickle(b"x" * 100, 10, 20, ConnectionResetError("reset")))
    with pytest.raises(ConnectionResetError):
        plain.read(50)
    assert plain.failed

    def named(exc: Exception, shard: str, offset: int) -> Exception:
        return OSError(f"shard {shard!r}: reading from byte {offset}: {exc}")

    mapped = CountingReader(_Trickle(b"x" * 100, 10, 20, KeyError("backend")), shard="s3://b/a.tar", stream_error=named)
    with pytest.raises(OSError, match=r"shard 's3://b/a.tar': reading from byte 20: 'backend'"):
        mapped.read(50)
    assert mapped.failed


def test_a_compressed_shard_counts_its_stored_bytes(tmp_path):
    tar = _tar(5)
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(tar))
    opened = opening.open_shard(str(path))
    stored = path.stat().st_size
    assert (opened.compression, opened.seekable, opened.size, opened.tar_size) == ("gzip", False, stored, None)
    reader = CountingReader(opened.stream, opened.seekable, opened.tar_size, "a")
    assert [s.key for s in iter_samples(reader)] == [f"s{i:03d}" for i in range(5)]
    while reader.read(1 << 20):
        pass
    assert reader.bytes_read == len(tar) and opened.stored_read(reader.bytes_read) == stored
    opened.close(str(path))


def test_a_storage_error_under_a_decompressor_is_not_called_bad_data():
    stored = gzip.compress(_tar(50, 3000), compresslevel=0)
    opened = opening.from_stream(_Trickle(stored, 4096, 20000, ConnectionResetError("connection reset")))
    assert opened.compression == "gzip"
    with pytest.raises(ConnectionResetError):
        while opened.stream.read(1 << 16):
            pass
    broken = gzip.compress(_tar(50, 3000))[:-5000] + bytes(100)
    opened = opening.from_stream(io.BytesIO(broken))
    reader = CountingReader(opened.stream, False, None, "b.tar.gz")
    with pytest.raises(TarFormatError, match=r"shard 'b.tar.gz': (corrupt|truncated)"):
        list(iter_samples(reader))


def test_object_store_shards_open_as_remote_files_and_count_what_they_receive():
    tar = _tar(4)
    url = "memory://streamprune-opening/a.tar"
    with fsspec.open(url, "wb") as f:
        f.write(tar)
    try:
        opened = opening.open_shard(url)
        assert (opened.seekable, opened.size, opened.remote is not None) == (False, len(tar), True)
        assert list(opened.fetch_ranges([(0, 512), (1024, 1536)])) == [tar[:512], tar[1024:1536]]
        assert opened.header_stream() == (opened.stream, False)  # small members: read through
        stats = ReadCounts()
        keys = [k for k, _, _ in read_keys(url, "a.tar", None, stats)]
        assert keys == [f"s{i:03d}" for i in range(4)]
        assert stats.bytes_received == stats.bytes_read + PROBE_BYTES  # the stream's bytes, counted once
        scan = scan_shard(url, "a.tar")
        assert (scan.status, scan.keys, scan.access) == ("ok", keys, "through")
        assert scan.bytes_read == stats.bytes_received + HEADER_BLOCK  # and the first member's headers, by range
    finally:
        fsspec.filesystem("memory").rm("/streamprune-opening", recursive=True)


def test_a_read_through_object_store_error_names_the_shard_and_byte():
    url = "memory://streamprune-opening/gone.tar"
    with fsspec.open(url, "wb") as f:
        f.write(_tar(2))
    try:
        remote = opening.open_shard(url).remote
        assert remote is not None
        stream = remote.stream()
        assert isinstance(stream, CountingReader)
        stream.stream = _Trickle(b"", 1, 0, RuntimeError("backend gone"))
        with pytest.raises(OSError, match=rf"shard '{url}': reading from byte 0: RuntimeError: backend gone"):
            stream.read(100)
    finally:
        fsspec.filesystem("memory").rm("/streamprune-opening", recursive=True)
