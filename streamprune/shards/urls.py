"""Shard lists (braces, globs, `::` lists, `pipe:` and fsspec URLs) and opening a shard as bytes
(the decompressed tar for gzip, bz2 and xz shards)."""

from __future__ import annotations

import glob
import io
import os
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

import braceexpand

from streamprune.shards.identity import has_scheme
from streamprune.shards.tarscan import StreamDataError
from streamprune.storage import local_path  # a local shard URL's path, as any local location's


def expand_urls(specs: str | Iterable[str]) -> list[str]:
    """Expand shard specs into a list of URLs, in order.

    Each spec may hold `::`-separated parts; each part is brace-expanded
    (`train-{000000..000999}.tar`), and local or fsspec globs (`*`, `?`, `[`) are
    expanded and sorted. `pipe:` commands are brace-expanded only.
    """
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            for url in braceexpand.braceexpand(part):
                urls.extend(_glob(url))
    return urls


def _glob(url: str) -> list[str]:
    """The shards a glob `url` matches, sorted (a URL without `*?[` or a `pipe:` as it is); none,
    or a store that cannot be listed (a missing bucket, refused credentials), is an error naming `url`."""
    if url.startswith("pipe:") or not any(c in url for c in "*?["):
        return [url]
    found = sorted(_glob_store(url) if url.startswith("file:") or has_scheme(url) else glob.glob(url))
    if not found:
        raise FileNotFoundError(f"no shard matches {url!r}")
    return found


def _glob_store(url: str) -> list[str]:
    """The files an fsspec glob (`s3://bucket/train-*.tar`, `-00000[0-2].tar`, `-?.tar`) matches,
    as URLs of the same protocol, from one listing (`detail=True`: no request per match to tell
    files from folders); the backend's errors (e.g. botocore's) become ones naming the pattern."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.glob(path, detail=True)
        paths = [p for p, info in found.items() if info.get("type") != "directory"]
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no shard matches {url!r}: {exc}") from None
    except PermissionError as exc:
        raise PermissionError(f"cannot list the shards {url!r}: access refused: {exc}") from None
    except Exception as exc:  # a missing backend, an unreachable endpoint, ...
        raise OSError(f"cannot list the shards {url!r}: {type(exc).__name__}: {exc}") from None
    protocol = url.split("://", 1)[0]
    return [p if "://" in p else f"{protocol}://{p}" for p in paths]


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (seekable, size known)."""
    return url.startswith("file:") or not (url.startswith("pipe:") or has_scheme(url))


def absolute(url: str) -> str:
    """`url` with a relative local path made absolute (Ray workers do not share the caller's cwd)."""
    return os.path.abspath(url) if is_local(url) and not url.startswith("file:") else url


MAGIC_BYTES = 10  # enough to tell every compression tarfile's "r|*" detects


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


class _Counted(io.RawIOBase):
    """The storage stream under a decompressor: counts the (compressed) bytes read from it."""

    def __init__(self, raw):
        self.raw, self.count, self.failed = raw, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self.raw.read(len(b))
        except BaseException:
            self.failed = True  # a storage error, not bad compressed data
            raise
        n = len(data)
        b[:n] = data
        self.count += n
        return n


class _Decompressed:
    """A compressed shard's tar bytes (read forward only); bad or cut data raises `StreamDataError`."""

    def __init__(self, raw, kind: str):
        import bz2
        import gzip
        import lzma

        self.kind = kind
        self.counted = _Counted(raw)
        buffered = io.BufferedReader(self.counted, 1 << 18)
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
            if self.counted.failed:
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


STDERR_TAIL = 4096  # bytes of a `pipe:` command's stderr kept for its error message


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
    remote: Any = None  # a remote.RemoteFile when byte ranges can be fetched (remote, uncompressed)
    transfer: Any = None  # a remote shard's remote.TransferStats (requests, bytes received)
    stderr: _StderrTail | None = None  # a `pipe:` command's stderr

    @property
    def tar_size(self) -> int | None:
        """The tar stream's size when known (not for compressed shards: `size` is the stored size)."""
        return self.size if self.compression is None else None

    def stored_read(self, tar_bytes: int) -> int:
        """Bytes read from storage, given `tar_bytes` read from `stream`: the compressed count
        under a decompressor, otherwise `tar_bytes`."""
        return tar_bytes if self.compression is None else cast(_Decompressed, self.stream).counted.count

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
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass


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
    """Open a shard for reading; local files unbuffered so that reads are counted exactly.

    Compressed shards (gzip, bz2, xz: told by their first bytes, as webdataset's tarfile does)
    are opened as a forward-only stream of the decompressed tar. Remote shards (`http(s)://`,
    other fsspec URLs) get a resuming read-through stream and, when uncompressed and the server
    takes byte ranges, `remote` for fetching ranges without read-ahead.
    `pipe:` URLs are shell commands (they come only from the user's own arguments, never from a
    run directory: `shards.sources`); their stderr is read on a thread, its tail kept for errors.
    """
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stderr = _StderrTail(cast(io.BufferedReader, proc.stderr))  # before the first read of stdout
        opened = from_stream(proc.stdout, process=proc)
        opened.stderr = stderr
        return opened
    if is_local(url):
        path = local_path(url)
        try:
            f = open(path, "rb", buffering=0)
        except OSError as exc:
            raise FileNotFoundError(f"shard {url!r}: cannot open: {exc.strerror}") from None
        try:
            head = os.pread(f.fileno(), MAGIC_BYTES, 0)
            size = os.fstat(f.fileno()).st_size
        except OSError:
            f.close()
            raise
        return from_stream(f, True, size, head=head)
    from streamprune.shards.remote import open_remote

    remote = open_remote(url)  # FileNotFoundError / OSError naming the shard
    opened = from_stream(remote.stream(), False, remote.size, head=remote.head)
    opened.transfer = remote.stats
    if opened.compression is None and remote.ranges:
        opened.remote = remote
    return opened
