"""Shards on HTTP(S) and object storage: byte ranges without read-ahead, streams that resume.

HTTP(S) goes through the standard library (`http.client`, one keep-alive connection per
thread), so it works after a plain install; other fsspec URLs (`s3://`, `gs://`, `hf://`, ...)
go through their fsspec backend's `cat_file`, which fetches exactly the range asked for.
Transient failures (connection errors, timeouts, HTTP 408/425/429/5xx, a body cut short) are
retried with exponential backoff; a permanent one (404, another 4xx, retries exhausted) is an
`OSError` naming the shard and the byte range. `fetch_in_order` keeps several range requests
in flight per shard so that latency does not serialize, with bounded memory.

Every HTTP request is bounded by `HTTPLimits`, read from the environment when a shard is opened:
it ends, its retries included, within `STREAMPRUNE_HTTP_TIMEOUT` seconds (a read-through stream:
up to its headers; its body must then arrive at `STREAMPRUNE_HTTP_MIN_RATE` bytes/s over every
`STREAMPRUNE_HTTP_RATE_WINDOW` seconds spent waiting for it); status and header lines are
bounded, and no body is read past the bytes asked for (or the size the shard was opened with).
Redirects are followed when a shard is opened (up to MAX_REDIRECTS, to http(s) URLs only).
"""

from __future__ import annotations

import http.client
import io
import itertools
import math
import os
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from streamprune.errors import ChangedShardError, SettingsError
from streamprune.shards.tarscan import CountingReader

RETRIES = 5  # tries per request, the first included
BACKOFF = 0.1  # seconds before the second try, doubled for each further one (with jitter)
TIMEOUT = 30.0  # seconds one HTTP request may take, its retries included (a stream: up to its headers)
MIN_RATE = 1024.0  # bytes/s an HTTP body must arrive at, on average over ...
RATE_WINDOW = 10.0  # ... every this many seconds spent waiting for it
HEAD_BYTES = 256 << 10  # status and header lines of one HTTP answer (interim `1xx` ones included), at most
MAX_REDIRECTS = 5  # redirects followed when an HTTP shard is opened
IN_FLIGHT = 32  # range requests in flight per shard, at most ...
IN_FLIGHT_BYTES = 16 << 20  # ... and at most this many bytes asked for and not yet consumed
PROBE_BYTES = 10  # a remote shard's first bytes, fetched when it is opened (they tell compression)
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_ENV_LIMITS = {  # HTTPLimits field: (variable, what it sets)
    "timeout": ("STREAMPRUNE_HTTP_TIMEOUT", "the seconds one HTTP request may take, its retries included"),
    "min_rate": ("STREAMPRUNE_HTTP_MIN_RATE", "the bytes/s an HTTP body must arrive at"),
    "window": ("STREAMPRUNE_HTTP_RATE_WINDOW", "the seconds of waiting the minimum rate is averaged over"),
}

T = TypeVar("T")


class TransientError(OSError):
    """A failure worth retrying (connection, timeout, 5xx, a body cut short)."""


class BrokenServerError(OSError):
    """An answer no retry would mend (endless status and header lines)."""


class RangesRefused(OSError):
    """The server answered a range request with the whole file (HTTP 200): read the file through."""


@dataclass(frozen=True)
class HTTPLimits:
    """What an HTTP request may take: `timeout` seconds in all, its retries included (a read-through
    stream: up to its headers), and a body arriving at `min_rate` bytes/s or more on average over
    every `window` seconds spent waiting for it."""

    timeout: float = TIMEOUT
    min_rate: float = MIN_RATE
    window: float = RATE_WINDOW

    @classmethod
    def from_env(cls) -> HTTPLimits:
        """The limits set by STREAMPRUNE_HTTP_TIMEOUT, _MIN_RATE and _RATE_WINDOW (defaults where
        unset); a value that is not a finite number > 0 is a SettingsError naming the variable."""
        values, problems = {}, []
        for name, (var, meaning) in _ENV_LIMITS.items():
            raw = os.environ.get(var)
            if raw is None:
                continue
            try:
                values[name] = float(raw)
            except ValueError:
                values[name] = math.nan
            if not (math.isfinite(values[name]) and values[name] > 0):
                default = getattr(cls, name)
                problems.append(f"{var}={raw!r}: must be a number > 0 ({meaning}; default {default:g})")
        if problems:
            raise SettingsError("; ".join(problems) + ": fix or unset it", problems)
        return cls(**values)


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


def _retrying(what: str, attempt: Callable[[int], T], deadline: float) -> T:
    """`attempt(n)` until it succeeds, retrying TransientErrors with backoff while tries are left
    and the next would start before `deadline`; `what` names the request in the final error."""
    began, n = time.monotonic(), 0
    while True:
        try:
            return attempt(n)
        except TransientError as exc:
            _pause_or_give_up(what, exc, n, deadline, began)
        n += 1


def _pause_or_give_up(
    what: str, exc: TransientError, n: int, deadline: float, began: float, backoff: bool = True
) -> None:
    """After failed try `n` (from 0): wait the backoff (if `backoff`), or raise the final OSError
    when no try or no time (the next try would start after `deadline`) is left."""
    wait = BACKOFF * 2**n * (0.5 + random.random()) if backoff else 0.0
    now = time.monotonic()
    if n == RETRIES - 1 or now + wait >= deadline:
        tries = f"{n + 1} tries" if n else "1 try"
        raise OSError(f"{what}: {exc} (gave up after {tries} in {now - began:.1f} s)") from None
    time.sleep(wait)


class _Pace:
    """One HTTP request's limits as its socket operations meet them: a deadline (for a stream's
    body: none), at most HEAD_BYTES before the body, then the minimum rate over every window."""

    deadline: float | None

    def __init__(self, limits: HTTPLimits, deadline: float):
        self.limits, self.deadline = limits, deadline
        self.in_body, self.head_bytes, self.waited, self.got = False, 0, 0.0, 0

    def body(self, deadline: float | None) -> None:
        """The headers are in: from now on `deadline`, and the minimum rate."""
        self.in_body, self.deadline = True, deadline

    def timeout(self) -> float:
        """The longest the next socket operation may wait; raises past the deadline."""
        limit = self.limits.window - self.waited if self.in_body else math.inf  # a deadline before the body
        if self.deadline is not None:
            limit = min(limit, self.deadline - time.monotonic())
            if limit <= 0:
                raise self.expired()
        return max(limit, 1e-3)

    def expired(self) -> TransientError:
        """The error of a request still unanswered at its deadline."""
        return TransientError(
            f"no complete answer within {self.limits.timeout:g} s (STREAMPRUNE_HTTP_TIMEOUT): the server "
            "is too slow or never finishes (for a slow link, raise STREAMPRUNE_HTTP_TIMEOUT)"
        )

    def spent(self, n: int, seconds: float) -> None:
        """Count `n` bytes received after waiting `seconds`: raises past HEAD_BYTES of status and
        header lines, or at the end of a window that brought less than the minimum rate."""
        if not self.in_body:
            self.head_bytes += n
            if self.head_bytes > HEAD_BYTES:
                raise BrokenServerError(
                    f"more than {HEAD_BYTES} bytes of status and header lines (endless interim "
                    "responses or headers): the server is broken"
                )
            return
        self.waited, self.got = self.waited + seconds, self.got + n
        if self.waited >= self.limits.window:
            if self.got < self.limits.min_rate * self.waited:
                raise TransientError(
                    f"the server sent {self.got} bytes in {self.waited:.1f} s, under the minimum rate of "
                    f"{self.limits.min_rate:g} bytes/s (STREAMPRUNE_HTTP_MIN_RATE; for a slow link, lower it)"
                )
            self.waited, self.got = 0.0, 0


class _PacedReader(io.RawIOBase):
    """An HTTP answer's socket as http.client reads it: each wait bounded by the request's `_Pace`."""

    def __init__(self, sock: socket.socket, held: io.BufferedReader, pace: _Pace):
        self.sock, self.held, self.pace = sock, held, pace

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            self.sock.settimeout(self.pace.timeout())
            began = time.monotonic()
            try:
                n = self.sock.recv_into(buffer)
            except TimeoutError:
                n = -1
            self.pace.spent(max(n, 0), time.monotonic() - began)
            if n >= 0:
                return n

    def close(self) -> None:
        self.held.close()  # the socket's own reader: closing it lets the socket close
        super().close()


_requests = threading.local()  # `pace`: the _Pace of the request this thread is making


class _PacedResponse(http.client.HTTPResponse):
    """An HTTP answer read under the `_Pace` of the request this thread is making."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_PacedReader(sock, self.fp, _requests.pace))


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


def _http_parts(url: str) -> tuple[bool, str, int | None, str] | None:
    """(https, host, port, request target) of an http(s) URL; None for another or a broken one."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme == "https", parts.hostname, port, target


class HTTPFile(RemoteFile):
    """An HTTP(S) URL read with `http.client` under `limits` (by default, those of the environment):
    a probe for the size (redirects followed), `Range` GETs, resuming streams."""

    def __init__(self, url: str, limits: HTTPLimits | None = None):
        parts = _http_parts(url)
        if parts is None:
            raise SettingsError(f"not an http(s) URL: {url!r}")
        self.url, self.limits = url, limits or HTTPLimits.from_env()
        self.final = url  # where redirects led
        self._https, self._host, self._port, self._target = parts
        self._local = threading.local()
        self.stats = TransferStats()
        self._probe()

    @property
    def where(self) -> str:
        """The shard, for messages: its URL, and where it was redirected to."""
        moved = f" (redirected to {self.final!r})" if self.final != self.url else ""
        return f"shard {self.url!r}{moved}"

    def _probe(self) -> None:
        """One request for the first PROBE_BYTES (after the redirects, all within the time limit):
        the size (from `Content-Range`), whether the server takes ranges (206), and the first bytes
        (`head`), which tell a compressed shard."""
        deadline = time.monotonic() + self.limits.timeout
        seen = {self.url}

        def attempt(n: int) -> tuple[http.client.HTTPResponse, bytes]:
            if n:
                self.stats.add(retries=1)
            resp = self._open({"Range": f"bytes=0-{PROBE_BYTES - 1}"}, deadline)
            if resp.status != 206:
                self._discard(resp)
                if resp.status in _TRANSIENT_STATUS:
                    raise TransientError(f"HTTP {resp.status} {resp.reason}")
                return resp, b""
            first, last, total = self._content_range(resp, self.where)
            want = min(PROBE_BYTES, total)
            if (first, last) != (0, want - 1) or resp.length not in (None, want):
                self._discard(resp)
                raise OSError(
                    f"{self.where}: HTTP 206 with bytes {first}..{last + 1} of {total} "
                    f"(Content-Length {resp.length}) to a request for bytes 0..{want}: the server is broken"
                )
            return resp, self._body(resp, want)

        resp, body = _retrying(self.where, attempt, deadline)
        while resp.status in _REDIRECT_STATUS:
            self._redirect(resp, seen)
            resp, body = _retrying(self.where, attempt, deadline)
        if resp.status == 206:
            self.size, self.ranges, self.head = self._content_range(resp, self.where)[2], True, body
        elif resp.status == 416 and resp.getheader("content-range") == "bytes */0":
            self.size, self.ranges, self.head = 0, True, b""
        elif resp.status == 200:
            length = resp.getheader("content-length") or ""
            self.size, self.ranges, self.head = (int(length) if length.isdigit() else None), False, None
        elif resp.status == 404:
            raise FileNotFoundError(f"{self.where}: 404 Not Found")
        else:
            raise OSError(f"{self.where}: HTTP {resp.status} {resp.reason}")

    def _redirect(self, resp: http.client.HTTPResponse, seen: set[str]) -> None:
        """Aim at where the 3xx answer `resp` points; refused: no Location, a loop, more than
        MAX_REDIRECTS, a URL that is not http(s), https to http."""
        location = resp.getheader("location")
        if not location:
            raise OSError(f"{self.where}: HTTP {resp.status} redirect without a Location header")
        target = urljoin(self.final, location.strip())
        parts = _http_parts(target)
        if parts is None or (self._https and not parts[0]):
            raise OSError(
                f"{self.where}: redirected to {target!r}, which is not followed (only http(s) URLs "
                "are, never from https to http): use the final URL of the shard"
            )
        if target in seen:
            raise OSError(f"{self.where}: redirect loop: redirected to {target!r} again")
        if len(seen) > MAX_REDIRECTS:
            raise OSError(f"{self.where}: more than {MAX_REDIRECTS} redirects (the next to {target!r})")
        seen.add(target)
        self._drop_connection()
        self.final, (self._https, self._host, self._port, self._target) = target, parts

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port)
            conn.response_class = _PacedResponse
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _open(self, headers: dict, deadline: float, stream: bool = False) -> http.client.HTTPResponse:
        """One GET on this thread's connection, its answer's headers read before `deadline`; its body
        is then read before `deadline` too (a `stream`'s: at the minimum rate only). Transport
        failures and limits met become TransientErrors."""
        self.stats.add(requests=1)
        pace = _requests.pace = _Pace(self.limits, deadline)
        conn = self._connection()
        try:
            conn.timeout = pace.timeout()  # for connecting
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)  # for sending on a kept-alive connection
            conn.request("GET", self._target, headers={"Accept-Encoding": "identity", **headers})
            resp = conn.getresponse()
        except TransientError:
            self._drop_connection()
            raise
        except BrokenServerError as exc:
            self._drop_connection()
            raise BrokenServerError(f"{self.where}: {exc}") from None
        except TimeoutError:  # connecting or sending, for longer than the time left
            self._drop_connection()
            raise pace.expired() from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        pace.body(None if stream else deadline)
        return resp

    def _body(self, resp: http.client.HTTPResponse, n: int) -> bytes:
        """The first `n` bytes of an answer's body, never more (the connection is dropped when more
        may follow); failing to read them all is a TransientError."""
        try:
            body = resp.read(n)
        except TransientError:
            self._drop_connection()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise TransientError(f"{type(exc).__name__} reading the body: {exc}") from None
        self.stats.add(received=len(body))
        if not resp.isclosed():
            self._discard(resp)
        if len(body) != n:
            raise TransientError(f"IncompleteRead: the body was cut at {len(body)} of {n} bytes")
        return body

    def _discard(self, resp: http.client.HTTPResponse) -> None:
        """Hang up on an answer without reading (the rest of) its body."""
        resp.close()
        self._drop_connection()

    def _content_range(self, resp: http.client.HTTPResponse, what: str) -> tuple[int, int, int]:
        """A 206 answer's `Content-Range`: (first byte, last byte, total size); a missing or
        unusable one is an OSError."""
        raw = resp.getheader("content-range")
        m = _CONTENT_RANGE.fullmatch((raw or "").strip())
        if m is None or not int(m[1]) <= int(m[2]) < int(m[3]):
            self._discard(resp)
            raise OSError(
                f"{what}: HTTP 206 without a usable Content-Range header ({raw!r}): the server does not "
                "say which bytes it sent; serve the shard from a server that answers Range requests correctly"
            )
        return int(m[1]), int(m[2]), int(m[3])

    def _changed(self, resp: http.client.HTTPResponse, size: int, what: str) -> ChangedShardError:
        """Hang up on an answer for a file of another `size` than the one opened; the error saying so."""
        self._discard(resp)
        return ChangedShardError(
            f"{what}: the server now says the file has {size} bytes, it had {self.size} when opened: "
            "it changed while being read; index it again"
        )

    def _check_span(self, resp: http.client.HTTPResponse, start: int, end: int, what: str) -> None:
        """Refuse a 206 answer that is not for bytes `[start, end)` of a file of the size opened."""
        first, last, total = self._content_range(resp, what)
        if total != self.size:
            raise self._changed(resp, total, what)
        if (first, last + 1) != (start, end) or resp.length not in (None, end - start):
            self._discard(resp)
            raise OSError(
                f"{what}: the server sent bytes {first}..{last + 1} (Content-Length {resp.length}) for "
                f"bytes {start}..{end}: it cannot be read by ranges"
            )

    def _refused(self, what: str) -> RangesRefused:
        """Note that the server stopped taking ranges; the error saying so."""
        self.ranges = False
        return RangesRefused(f"{what}: the server answered a Range request with the whole file (HTTP 200)")

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes `[start, end)`, exactly, with one `Range` request (retried when transient) within the
        limits. RangesRefused when the server answers with the whole file (whose body is not read)."""
        what = f"{self.where}: bytes {start}..{end}"
        if not self.ranges:
            raise self._refused(what)
        self.stats.add(requested=end - start)
        deadline = time.monotonic() + self.limits.timeout

        def attempt(n: int) -> bytes:
            if n:
                self.stats.add(retries=1)
            resp = self._open({"Range": f"bytes={start}-{end - 1}"}, deadline)
            if resp.status == 206:
                self._check_span(resp, start, end, what)
                return self._body(resp, end - start)
            self._discard(resp)
            if resp.status in _TRANSIENT_STATUS:
                raise TransientError(f"HTTP {resp.status} {resp.reason}")
            if resp.status == 200:
                raise self._refused(what)
            if resp.status == 404:
                raise FileNotFoundError(f"{what}: 404 Not Found")
            if resp.status == 416:
                raise ChangedShardError(
                    f"{what}: HTTP 416 (the file is shorter than the index says: it changed since indexing)"
                )
            raise OSError(f"{what}: HTTP {resp.status} {resp.reason}")

        return _retrying(what, attempt, deadline)

    def stream(self) -> _HTTPStream:
        return _HTTPStream(self)


class _HTTPStream:
    """The file read through from its start, never past the size it was opened with; opened at the
    first read; a transfer cut short is resumed with a `Range` request from where it stopped (when
    the server takes ranges). The tries of one read end STREAMPRUNE_HTTP_TIMEOUT after its first failure."""

    resp: http.client.HTTPResponse | None

    def __init__(self, f: HTTPFile):
        self.f, self.pos, self.resp, self.closed = f, 0, None, False

    def _reopen(self, deadline: float) -> None:
        f, what = self.f, f"{self.f.where}: reading from byte {self.pos}"
        resp = f._open({"Range": f"bytes={self.pos}-"} if self.pos else {}, deadline, stream=True)
        if resp.status == (206 if self.pos else 200):
            if self.pos:
                assert f.size is not None  # resuming needs ranges, which a known size comes with
                f._check_span(resp, self.pos, f.size, what)
            elif f.size is not None and resp.length is not None and resp.length != f.size:
                raise f._changed(resp, resp.length, what)
            self.resp = resp
            return
        f._discard(resp)
        if resp.status in _TRANSIENT_STATUS:
            raise TransientError(f"HTTP {resp.status} {resp.reason}")
        if resp.status == 404:
            raise FileNotFoundError(f"{what}: 404 Not Found")
        again = " (the whole file again: the server cannot resume the transfer)" if resp.status == 200 else ""
        raise OSError(f"{what}: HTTP {resp.status} {resp.reason}{again}")

    def _next(self, n: int) -> bytes:
        """Up to `n` bytes of the open answer; failing, or ending before the file does, is a TransientError."""
        assert self.resp is not None  # opened by _reopen
        try:
            data = self.resp.read(n)
        except TransientError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        if not data and self.f.size is not None and self.pos < self.f.size:
            raise TransientError(f"transfer cut at byte {self.pos} of {self.f.size}")
        return data

    def read(self, n: int = -1) -> bytes:
        left = None if self.f.size is None else self.f.size - self.pos
        if n is None or n < 0:
            n = left if left is not None else 1 << 62
        elif left is not None:
            n = min(n, left)
        chunks, got, tries, mark = [], 0, 0, self.pos  # mark: where the current try started
        began, failed = time.monotonic(), None  # failed: when the first try failed
        timeout = self.f.limits.timeout
        while got < n:
            try:
                if self.resp is None:
                    if tries:
                        self.f.stats.add(retries=1)
                    self._reopen((time.monotonic() if failed is None else failed) + timeout)
                data = self._next(min(n - got, 1 << 20))
            except TransientError as exc:
                self._lost(exc)
                failed = time.monotonic() if failed is None else failed
                what = f"{self.f.where}: reading from byte {self.pos}"
                _pause_or_give_up(what, exc, tries, failed + timeout, began, backoff=self.pos == mark)
                tries, mark = tries + 1, self.pos  # a try that brought bytes is resumed at once
                continue
            if not data:
                break
            chunks.append(data)
            got += len(data)
            self.pos += len(data)
            self.f.stats.add(received=len(data))
        return b"".join(chunks)

    def _lost(self, exc: TransientError) -> None:
        """Hang up after a failure; the next try resumes from `pos`, which needs ranges."""
        if self.resp is not None:
            self.resp.close()
            self.resp = None
        self.f._drop_connection()
        if self.pos and not self.f.ranges:
            raise OSError(
                f"{self.f.where}: transfer cut at byte {self.pos} ({exc}), and the server does not take "
                "Range requests to resume"
            ) from None

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


def _not_found(what: str, exc: FileNotFoundError) -> FileNotFoundError:
    """A backend's FileNotFoundError (whose message is often a bare path or the store's own words,
    "The specified bucket does not exist") as one naming `what`, the shard and range, and why."""
    detail = str(exc.args[0]) if exc.args else ""
    why = f": {detail}" if detail and detail not in what else ""
    return FileNotFoundError(f"{what}: not found{why}")


class FsspecFile(RemoteFile):
    """Another fsspec URL (`s3://`, `gs://`, `hf://`, ...): `cat_file` ranges, which read no further.

    Errors name the URL: a missing object or bucket is a FileNotFoundError (also when it goes
    away after opening), a refusal a PermissionError, anything else an OSError; none is the
    backend's own exception (e.g. botocore's), which would not say which shard failed."""

    def __init__(self, url: str):
        import fsspec

        self.url, self.stats = url, TransferStats()
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url)
            self.size = int(self.fs.size(self.path))
        except FileNotFoundError as exc:
            raise _not_found(f"shard {url!r}", exc) from None
        except Exception as exc:  # a missing backend, credentials, an unreachable endpoint, ...
            raise FileNotFoundError(f"shard {url!r}: cannot open: {type(exc).__name__}: {exc}") from None
        self.ranges = True
        self.head = self.fetch(0, min(PROBE_BYTES, self.size)) if self.size else b""

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes `[start, end)`, exactly, with one `cat_file` (retried when it fails otherwise than
        not found or refused): the backend reads that range and no further."""
        what = f"shard {self.url!r}: bytes {start}..{end}"
        self.stats.add(requested=end - start)

        def attempt(n: int) -> bytes:
            self.stats.add(requests=1, retries=1 if n else 0)
            try:
                data = self.fs.cat_file(self.path, start=start, end=end)
            except FileNotFoundError as exc:
                raise _not_found(what, exc) from None
            except PermissionError as exc:
                raise PermissionError(f"{what}: access refused: {exc}") from None
            except Exception as exc:
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            self.stats.add(received=len(data))
            if len(data) != end - start:
                raise TransientError(f"got {len(data)} bytes")
            return data

        return _retrying(what, attempt, math.inf)  # the backend's own timeouts bound each try

    def stream(self) -> CountingReader:
        """The file read through from its start (the backend's buffered reader), its bytes counted as
        received; a backend error while reading is one naming the shard and the byte it failed at."""
        self.stats.add(requests=1)
        where = f"shard {self.url!r}"
        try:
            f = self.fs.open(self.path, "rb")
        except FileNotFoundError as exc:
            raise _not_found(where, exc) from None
        except PermissionError as exc:
            raise PermissionError(f"{where}: access refused: {exc}") from None
        received = lambda n: self.stats.add(received=n)
        return CountingReader(f, shard=self.url, counted=received, stream_error=_read_error)


def _read_error(exc: Exception, shard: str, offset: int) -> Exception:
    """A backend's exception (botocore's, aiohttp's, ...) reading shard `shard` from byte `offset`
    as one naming them (a FileNotFoundError stays one; an OSError naming the shard stays as it is)."""
    where = f"shard {shard!r}"
    if isinstance(exc, FileNotFoundError):
        return _not_found(f"{where}: reading from byte {offset}", exc)
    if isinstance(exc, OSError) and where in str(exc):
        return exc
    return OSError(f"{where}: reading from byte {offset}: {type(exc).__name__}: {exc}")


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
    does not serialize small ranges and memory stays bounded for large ones. Once the server
    answers a range request with the whole file, the requests in flight are dropped unread and
    the other spans are read by one stream from the file's start."""
    spans = iter(spans)
    pending: deque[tuple[Future[bytes], tuple[int, int]]] = deque()
    nxt = next(spans, None)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="streamprune-fetch") as pool:
        ahead = 0
        try:
            while True:
                while nxt is not None and len(pending) < in_flight and (not pending or ahead < in_flight_bytes):
                    pending.append((pool.submit(f.fetch, *nxt), nxt))
                    ahead += nxt[1] - nxt[0]
                    nxt = next(spans, None)
                if not pending:
                    return
                try:
                    data = pending[0][0].result()
                except RangesRefused:
                    break
                start, end = pending.popleft()[1]
                ahead -= end - start
                yield data
        finally:
            for future, _ in pending:
                future.cancel()
    unread = [span for _, span in pending] + ([nxt] if nxt is not None else [])
    yield from _read_through(f, itertools.chain(unread, spans))


def _read_through(f: RemoteFile, spans: Iterable[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of each span (in order, not overlapping), read forward by one stream of `f`."""
    stream, pos = f.stream(), 0
    try:
        for start, end in spans:
            while pos < start and (skipped := stream.read(min(start - pos, 1 << 20))):
                pos += len(skipped)
            data = stream.read(end - start)
            pos += len(data)
            yield data
    finally:
        stream.close()


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
