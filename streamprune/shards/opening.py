"""Opening a shard as bytes, whatever holds it: `open_shard(url)` for a local file, a `pipe:`
command, an `http(s)://` URL or another fsspec URL (`s3://`, `gs://`, ...), always an `OpenShard`.

A compressed shard (gzip, bz2, xz: told by its first bytes, as webdataset's tarfile does) is
opened as its decompressed tar, read forward. An `OpenShard` also gives what its storage allows
beyond reading forward: positioned reads (a local file), byte ranges with several requests in
flight and header scans by range requests (a remote shard; `shards.remote`).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from streamprune.shards.identity import has_scheme
from streamprune.shards.remote import HEADER_BLOCK, RangedReader, RemoteFile, TransferStats, fetch_in_order, open_remote
from streamprune.shards.tarscan import CountingReader, StreamDataError, iter_members
from streamprune.storage import local_path  # a local shard URL's path, as any local location's

MAGIC_BYTES = 10  # enough to tell every compression tarfile's "r|*" detects
STDERR_TAIL = 4096  # bytes of a `pipe:` command's stderr kept for its error message
RANGED_SCAN_MIN = 1 << 20  # remote shards: read headers by ranges when the first member is at least this big


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (seekable, size known)."""
    return url.startswith("file:") or not (url.startswith("pipe:") or has_scheme(url))


def compression_of(head: bytes) -> str | None:
    """The compression of a stream starting with `head`, by content as tarfile's `r|*` (webdataset's
    mode) decides it: "gzip", "bz2", "xz", or None for a plain tar (or anything else)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return "xz"
    return None


class _Decompressed:
    """A compressed shard's tar bytes (read forward only); bad or cut data raises `StreamDataError`.
    `counted` counts the compressed bytes read from storage."""

    def __init__(self, raw, kind: str):
        import bz2
        import gzip
        import lzma

        self.kind = kind
        self.counted = CountingReader(raw)
        buffered = io.BufferedReader(cast(io.RawIOBase, self.counted), 1 << 18)
        openers: dict[str, Callable[[IO[bytes]], io.BufferedIOBase]] = {
            "gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
            "bz2": bz2.BZ2File,
            "xz": lzma.LZMAFile,
        }
        self.file = openers[kind](buffered)

    def read(self, n: int = -1) -> bytes:
        import lzma
        import zlib

        try:
            return self.file.read(n)
        except EOFError:
            raise StreamDataError(f"truncated: {self.kind} stream ends early") from None
        except (zlib.error, lzma.LZMAError, OSError) as exc:
            if self.counted.failed:  # a storage error, not bad compressed data
                raise
            raise StreamDataError(f"corrupt {self.kind} stream ({exc})") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.file.close()


class _Prefixed:
    """A stream whose first bytes were already read (`head`), then the rest of `stream`."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data

    def close(self) -> None:
        self.stream.close()


class _StderrTail:
    """A `pipe:` command's stderr, read to its end by a daemon thread (so that a command writing
    a lot there never blocks on a full pipe), keeping only its last STDERR_TAIL bytes."""

    def __init__(self, stream: io.BufferedReader):
        self._tail = b""
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: io.BufferedReader) -> None:
        with stream:
            while chunk := stream.read1(1 << 16):
                self._tail = (self._tail + chunk)[-STDERR_TAIL:]

    def text(self, wait: float = 1.0) -> str:
        """The kept tail once stderr has ended, or after `wait` seconds (a process the command
        started in the background may hold stderr open)."""
        self._thread.join(wait)
        return self._tail.decode(errors="replace").strip()


class ShardStream(Protocol):
    """A shard's bytes as `OpenShard` holds them: a local file, a decompressor, a pipe or a remote stream."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class OpenShard:
    """An open shard: a binary stream, whether seeking is cheap, and its size when known.

    For a compressed shard `stream` yields the decompressed tar (forward only), `raw` is the
    storage stream under it, `size` the stored (compressed) size and `compression` its kind.
    """

    stream: ShardStream
    seekable: bool
    size: int | None
    process: subprocess.Popen | None = None
    compression: str | None = None
    raw: Any = None
    remote: RemoteFile | None = None  # when byte ranges can be fetched (a remote, uncompressed shard)
    transfer: TransferStats | None = None  # a remote shard's (requests, bytes received)
    stderr: _StderrTail | None = None  # a `pipe:` command's stderr

    @property
    def tar_size(self) -> int | None:
        """The tar stream's size when known (not for compressed shards: `size` is the stored size)."""
        return self.size if self.compression is None else None

    def stored_read(self, tar_bytes: int) -> int:
        """Bytes read from storage, given `tar_bytes` read from `stream`: the compressed count
        under a decompressor, otherwise `tar_bytes`."""
        return tar_bytes if self.compression is None else cast(_Decompressed, self.stream).counted.bytes_read

    def fetch_ranges(self, spans: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of each `(start, end)` span, in order, by range requests with several in flight
        (`remote.fetch_in_order`); only for a shard with `remote`."""
        assert self.remote is not None, "byte ranges are fetched from remote shards that take them"
        return fetch_in_order(self.remote, spans)

    def header_stream(self) -> tuple[Any, bool]:
        """The stream a scan that reads headers only should read, and whether it seeks: a remote
        shard whose first member is large is read by range requests (`remote.RangedReader`), any
        other shard as `stream`."""
        if self.remote is not None and _ranges_cheaper(self.remote):
            return RangedReader(self.remote), True
        return self.stream, self.seekable

    def close(self, url: str, drain: bool = True) -> None:
        """Close the stream; a failed `pipe:` command raises naming the URL.

        `drain`: read a `pipe:` command's output to its end first (a tar's trailing padding),
        so that it is not killed by a closed pipe; `False` when the reader stopped early on
        purpose: the command is then stopped and its status ignored.
        """
        raw = self.stream if self.raw is None else self.raw
        process, self.process = self.process, None  # ended here: a second close has no command to wait for
        if process is not None:
            if drain:
                while raw.read(1 << 20):
                    pass
            else:
                process.kill()
        self.release()
        if process is not None:
            rc = process.wait()
            if drain and rc != 0:
                err = self.stderr.text() if self.stderr is not None else ""
                raise OSError(f"shard {url!r}: pipe command exited with status {rc}: {err}")

    def release(self) -> None:
        """Close the stream (and the storage stream under a decompressor), ignoring errors."""
        for stream in (self.stream, self.raw):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


def _ranges_cheaper(remote: RemoteFile) -> bool:
    """Whether a remote shard's headers are cheaper to read by range requests (one per member)
    than the whole file through one stream: when its first member holds RANGED_SCAN_MIN bytes or
    more (its headers, pax ones included, are in the first HEADER_BLOCK bytes), a request saves
    more bytes than its latency costs."""
    try:
        head = remote.fetch(0, min(HEADER_BLOCK, cast(int, remote.size)))
        member, _ = next(iter_members(CountingReader(io.BytesIO(head), True, None, ""), require_end=False))
        return member.size >= RANGED_SCAN_MIN
    except (OSError, ValueError, StopIteration):  # ValueError: TarFormatError, ChangedShardError (a 416)
        return False  # the read-through scan meets the same problem and reports it


def from_stream(
    stream,
    seekable: bool = False,
    size: int | None = None,
    process: subprocess.Popen | None = None,
    head: bytes | None = None,
) -> OpenShard:
    """An `OpenShard` over `stream` (positioned at the shard's start), decompressing when its
    first bytes say it is compressed. `head`: those bytes when already peeked without moving."""
    if head is None:
        peek = getattr(stream, "peek", None)
        head = peek(MAGIC_BYTES)[:MAGIC_BYTES] if peek is not None else b""
        if len(head) < MAGIC_BYTES:  # not buffered (or a short first write to a pipe): read them
            head = stream.read(MAGIC_BYTES)
            stream = _Prefixed(head, stream)
    kind = compression_of(head)
    if kind is None:
        return OpenShard(stream, seekable, size, process)
    return OpenShard(_Decompressed(stream, kind), False, size, process, kind, stream)


def open_shard(url: str) -> OpenShard:
    """Open a shard for reading, as its URL says: a `pipe:` command, a local file (unbuffered, so
    that reads are counted exactly) or a remote one (`http(s)://`, other fsspec URLs).

    Compressed shards are opened as a forward-only stream of the decompressed tar. Remote shards
    get a resuming read-through stream and, when uncompressed and the server takes byte ranges,
    `remote` for fetching ranges without read-ahead.
    `pipe:` URLs are shell commands (they come only from the user's own arguments, never from a
    run directory: `shards.sources`); their stderr is read on a thread, its tail kept for errors.
    """
    if url.startswith("pipe:"):
        return _open_pipe(url[len("pipe:") :])
    if is_local(url):
        return _open_local(url)
    return _open_remote(url)


def _open_pipe(command: str) -> OpenShard:
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = _StderrTail(cast(io.BufferedReader, proc.stderr))  # before the first read of stdout
    opened = from_stream(proc.stdout, process=proc)
    opened.stderr = stderr
    return opened


def _open_local(url: str) -> OpenShard:
    path = local_path(url)
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (the returned OpenShard owns and closes it)
    except OSError as exc:
        raise FileNotFoundError(f"shard {url!r}: cannot open: {exc.strerror}") from None
    try:
        head = os.pread(f.fileno(), MAGIC_BYTES, 0)
        size = os.fstat(f.fileno()).st_size
    except OSError:
        f.close()
        raise
    return from_stream(f, True, size, head=head)


def _open_remote(url: str) -> OpenShard:
    remote = open_remote(url)  # FileNotFoundError / OSError naming the shard
    opened = from_stream(remote.stream(), False, remote.size, head=remote.head)
    opened.transfer = remote.stats
    if opened.compression is None and remote.ranges:
        opened.remote = remote
    return opened
