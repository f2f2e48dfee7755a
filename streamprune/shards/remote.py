"""Shards on HTTP(S) and object storage: byte ranges without read-ahead, streams that resume.

HTTP(S) goes through the standard library (`http.client`, one keep-alive connection per
thread), so it works after a plain install; other fsspec URLs (`s3://`, `gs://`, `hf://`, ...)
go through their fsspec backend's `cat_file`, which fetches exactly the range asked for.
Transient failures (connection errors, timeouts, HTTP 408/425/429/5xx, a body cut short) are
retried with exponential backoff; a permanent one (404, another 4xx, retries exhausted) is an
`OSError` naming the shard and the byte range. `fetch_in_order` keeps several range requests
in flight per shard so that latency does not serialize, with bounded memory.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from streamprune.errors import ChangedShardError, SettingsError

RETRIES = 5  # tries per request, the first included
BACKOFF = 0.1  # seconds before the second try, doubled for each further one (with jitter)
TIMEOUT = 60.0  # seconds without progress on a connection
IN_FLIGHT = 32  # range requests in flight per shard, at most ...
IN_FLIGHT_BYTES = 16 << 20  # ... and at most this many bytes asked for and not yet consumed
PROBE_BYTES = 10  # a remote shard's first bytes, fetched when it is opened (they tell compression)
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class TransientError(OSError):
    """A failure worth retrying (connection, timeout, 5xx, a body cut short)."""


@dataclass
class TransferStats:
    """What crossed the network for one remote file: requests, retries, bytes asked for and received."""

    requests: int = 0
    retries: int = 0
    bytes_requested: int = 0
    bytes_received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int = 0, retries: int = 0, requested: int = 0, received: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.retries += retries
            self.bytes_requested += requested
            self.bytes_received += received


def _retrying(what: str, attempt):
    """`attempt()` until it succeeds, retrying TransientErrors with backoff; `what` names the request."""
    for n in range(RETRIES):
        try:
            return attempt(n)
        except TransientError as exc:
            if n == RETRIES - 1:
                raise OSError(f"{what}: {exc} (gave up after {RETRIES} tries)") from None
            time.sleep(BACKOFF * 2**n * (0.5 + random.random()))


class RemoteFile:
    """A remote shard: `size`, `ranges` (True when byte ranges can be fetched), `head` (its first
    PROBE_BYTES when known), `fetch(start, end)` for exactly those bytes, `stream()` to read it
    through, and `stats`."""

    url: str
    size: int | None
    ranges: bool
    head: bytes | None = None
    stats: TransferStats

    def fetch(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def stream(self):
        raise NotImplementedError


class HTTPFile(RemoteFile):
    """An HTTP(S) URL read with `http.client`: HEAD for the size, `Range` GETs, resuming streams."""

    def __init__(self, url: str, timeout: float = TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"not an http(s) URL: {url!r}")
        self.url, self.timeout = url, timeout
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._local = threading.local()
        self.stats = TransferStats()
        self._probe()

    def _probe(self) -> None:
        """One request for the first PROBE_BYTES: the size (from `Content-Range`), whether the server
        takes ranges (206), and the first bytes (`head`), which tell a compressed shard."""

        def attempt(n: int):
            if n:
                self.stats.add(retries=1)
            resp = self._open("GET", {"Range": f"bytes=0-{PROBE_BYTES - 1}"})
            try:
                body = resp.read() if resp.status != 200 else b""
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise TransientError(f"{type(exc).__name__} reading the body: {exc}") from None
            if resp.status == 200:  # no ranges: the whole file is coming; hang up, read it through later
                self._drop_connection()
            self.stats.add(received=len(body))
            if resp.status in _TRANSIENT_STATUS:
                raise TransientError(f"HTTP {resp.status} {resp.reason}")
            return resp, body

        resp, body = _retrying(f"shard {self.url!r}", attempt)
        total = (resp.getheader("content-range") or "").rpartition("/")[2]
        if resp.status == 206 and total.isdigit():
            self.size, self.ranges, self.head = int(total), True, body
        elif resp.status == 416 and total == "0":
            self.size, self.ranges, self.head = 0, True, b""
        elif resp.status == 200:
            length = resp.getheader("content-length") or ""
            self.size, self.ranges, self.head = (int(length) if length.isdigit() else None), False, None
        elif resp.status == 404:
            raise FileNotFoundError(f"shard {self.url!r}: 404 Not Found")
        else:
            raise OSError(f"shard {self.url!r}: HTTP {resp.status} {resp.reason}")

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _open(self, method: str, headers: dict) -> http.client.HTTPResponse:
        """One request on this thread's connection; transport failures become TransientErrors."""
        self.stats.add(requests=1)
        try:
            conn = self._connection()
            conn.request(method, self._target, headers={"Accept-Encoding": "identity", **headers})
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise TransientError(f"{type(exc).__name__}: {exc}") from None

    def _request(self, method: str, headers: dict, what: str, expect: int | None = None):
        """A whole request with retries: `(status, headers, body)`; permanent HTTP errors are returned."""

        def attempt(n: int):
            if n:
                self.stats.add(retries=1)
            resp = self._open(method, headers)
            try:
                body = resp.read() if method != "HEAD" else b""
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise TransientError(f"{type(exc).__name__} reading the body: {exc}") from None
            self.stats.add(received=len(body))
            if resp.status in _TRANSIENT_STATUS:
                raise TransientError(f"HTTP {resp.status} {resp.reason}")
            if expect is not None and resp.status < 300 and len(body) != expect:
                self._drop_connection()
                raise TransientError(f"body of {len(body)} bytes, expected {expect}")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

        return _retrying(what, attempt)

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes `[start, end)`, exactly, with one `Range` request (retried when transient)."""
        what = f"shard {self.url!r}: bytes {start}..{end}"
        self.stats.add(requested=end - start)
        status, headers, body = self._request("GET", {"Range": f"bytes={start}-{end - 1}"}, what, end - start)
        if status == 206 and headers.get("content-range", "").startswith(f"bytes {start}-{end - 1}/"):
            return body
        if status == 404:
            raise FileNotFoundError(f"{what}: 404 Not Found")
        if status == 416:
            raise ChangedShardError(
                f"{what}: HTTP 416 (the file is shorter than the index says: it changed since indexing)"
            )
        if status < 300:
            raise OSError(f"{what}: the server ignored the Range request (HTTP {status})")
        raise OSError(f"{what}: HTTP {status}")

    def stream(self) -> "_HTTPStream":
        return _HTTPStream(self)


class _HTTPStream:
    """The file read through from its start; opened at the first read; a transfer cut short is
    resumed with a `Range` request from where it stopped (when the server takes ranges)."""

    resp: http.client.HTTPResponse | None

    def __init__(self, f: HTTPFile):
        self.f, self.pos, self.resp, self.closed = f, 0, None, False

    def _reopen(self, n: int) -> None:
        if n:
            self.f.stats.add(retries=1)
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = self.f._open("GET", headers)
        if resp.status in _TRANSIENT_STATUS:
            resp.read()
            raise TransientError(f"HTTP {resp.status} {resp.reason}")
        if resp.status == 404:
            raise FileNotFoundError(f"shard {self.f.url!r}: 404 Not Found")
        if resp.status != (206 if self.pos else 200):
            raise OSError(f"shard {self.f.url!r}: HTTP {resp.status} reading from byte {self.pos}")
        self.resp = resp

    def read(self, n: int = -1) -> bytes:
        size = self.f.size
        if n is None or n < 0:
            n = (size - self.pos) if size is not None else 1 << 62
        chunks, got = [], 0

        def attempt(tries: int) -> None:
            nonlocal got
            if self.resp is None:
                self._reopen(tries)
            assert self.resp is not None  # _reopen opened it or raised
            while got < n:
                try:
                    data = self.resp.read(min(n - got, 1 << 20))
                except (OSError, http.client.HTTPException) as exc:
                    self._lost()
                    raise TransientError(f"{type(exc).__name__}: {exc}") from None
                if not data:
                    if size is not None and self.pos < size:  # the connection closed early
                        self._lost()
                        raise TransientError(f"transfer cut at byte {self.pos} of {size}")
                    return
                chunks.append(data)
                got += len(data)
                self.pos += len(data)
                self.f.stats.add(received=len(data))

        if self.pos < (size if size is not None else 1 << 62):
            _retrying(f"shard {self.f.url!r}: reading from byte {self.pos}", attempt)
        return b"".join(chunks)

    def _lost(self) -> None:
        if not self.f.ranges:  # cannot resume: the retry would have to start over
            raise OSError(
                f"shard {self.f.url!r}: transfer cut at byte {self.pos}, and the server does not "
                "take Range requests to resume"
            )
        self.resp = None
        self.f._drop_connection()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        if self.resp is not None:
            self.resp.close()
            self.resp = None
        self.f._drop_connection()


class FsspecFile(RemoteFile):
    """Another fsspec URL (`s3://`, `gs://`, `hf://`, ...): `cat_file` ranges, which read no further."""

    def __init__(self, url: str):
        import fsspec

        self.url, self.stats = url, TransferStats()
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url)
            self.size = int(self.fs.size(self.path))
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {url!r}: not found") from None
        except Exception as exc:  # a missing backend, credentials, ...
            raise FileNotFoundError(f"shard {url!r}: cannot open: {exc}") from None
        self.ranges = True
        self.head = self.fetch(0, min(PROBE_BYTES, self.size)) if self.size else b""

    def fetch(self, start: int, end: int) -> bytes:
        what = f"shard {self.url!r}: bytes {start}..{end}"
        self.stats.add(requested=end - start)

        def attempt(n: int) -> bytes:
            self.stats.add(requests=1, retries=1 if n else 0)
            try:
                data = self.fs.cat_file(self.path, start=start, end=end)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            self.stats.add(received=len(data))
            if len(data) != end - start:
                raise TransientError(f"got {len(data)} bytes")
            return data

        return _retrying(what, attempt)

    def stream(self):
        self.stats.add(requests=1)
        return _Counting(self.fs.open(self.path, "rb"), self.stats)


class _Counting:
    """A read-through stream that adds what it reads to `stats.bytes_received`."""

    def __init__(self, f, stats: TransferStats):
        self.f, self.stats = f, stats

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.stats.add(received=len(data))
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.f.close()


def open_remote(url: str) -> RemoteFile:
    """The remote file of an `http(s)://` or other fsspec URL."""
    if url.startswith(("http://", "https://")):
        return HTTPFile(url)
    return FsspecFile(url)


def fetch_in_order(
    f: RemoteFile, spans: Iterable[tuple[int, int]], in_flight: int = IN_FLIGHT, in_flight_bytes: int = IN_FLIGHT_BYTES
) -> Iterator[bytes]:
    """The bytes of each `(start, end)` span, in order, with requests running ahead: up to
    `in_flight` of them and `in_flight_bytes` not yet consumed (at least one), so that latency
    does not serialize small ranges and memory stays bounded for large ones."""
    spans = iter(spans)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="streamprune-fetch") as pool:
        pending: list = []  # (future, length)
        ahead = 0
        nxt = next(spans, None)
        try:
            while True:
                while nxt is not None and len(pending) < in_flight and (not pending or ahead < in_flight_bytes):
                    pending.append((pool.submit(f.fetch, *nxt), nxt[1] - nxt[0]))
                    ahead += nxt[1] - nxt[0]
                    nxt = next(spans, None)
                if not pending:
                    return
                future, length = pending.pop(0)
                data = future.result()
                ahead -= length
                yield data
        finally:
            for future, _ in pending:
                future.cancel()


HEADER_BLOCK = 4096  # bytes fetched per header read when scanning by ranges


class RangedReader:
    """A remote file as a seekable stream for header scans: `read(n)` fetches at least
    HEADER_BLOCK bytes at the position with one range request (later reads inside them cost
    nothing), `seek(n, SEEK_CUR)` skips member data without a request."""

    def __init__(self, f: RemoteFile, block: int = HEADER_BLOCK):
        assert f.size is not None  # a file that takes byte ranges has a known size
        self.f, self.block, self.pos, self.size = f, block, 0, f.size
        self.buf, self.buf_start = b"", 0

    def read(self, n: int = -1) -> bytes:
        size = self.size
        if n is None or n < 0:
            n = size - self.pos
        end = min(self.pos + n, size)
        if not (self.buf_start <= self.pos and end <= self.buf_start + len(self.buf)):
            if self.pos >= size:
                return b""
            self.buf_start, self.buf = self.pos, self.f.fetch(self.pos, min(size, self.pos + max(n, self.block)))
        data = self.buf[self.pos - self.buf_start : end - self.buf_start]
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.buf = b""
