"""A hostile HTTP server on 127.0.0.1 for tests of remote shard reading: plain sockets, one
thread per connection, serving files held in memory either correctly or with the misbehaviour
named by the URL's first path segment (`/<mode>/<name>`):

- `ok`: correct (GET and HEAD, `Range: bytes=a-b` and `bytes=a-` -> 206, keep-alive).
- `drip-head` / `drip-body`: the status line and headers / the body one byte per `server.drip` s.
- `continue`: `100 Continue` interim responses without end.
- `header-line`: a header line that never ends (one byte per `server.drip` s).
- `many-headers`: header lines without end, at full speed.
- `nolength-endless`: no Content-Length; the bytes asked for, then junk without end.
- `probe-then-200`: 206 to the 10-byte probe (`bytes=0-9`), 200 and the whole file to other ranges.
- `redirect-<n>`: n hops of 301, 302, 307, 308 (in turn), then `/ok/`; `redirect-host`: to
  `localhost` (another host name); `redirect-loop`: to itself; `to-file`, `to-pipe`: to a
  `file:` URL and a `pipe:` command.
- `no-content-range`: 206 without Content-Range.
- `reset-<n>`: every body cut by a TCP reset after n bytes; `reset-once-<n>`: only the first
  answer to each distinct request (method, path, Range).
- `long-length` / `short-length`: Content-Length 100 more / less than the body sent.
- `wrong-total`: Content-Range of ranges other than the probe gives another total size.
- `fuzz-<seed>`: `fuzz_profile(seed)`: one seeded misbehaviour for the requests it targets.

`server.log` holds (method, path, Range, status, body bytes sent) per answer; `bytes_sent`
sums body bytes actually written. No streamprune imports.

    with serve({"a.tar": data}) as server:
        urllib.request.urlopen(f"{server.url}/drip-body/a.tar")
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NoReturn

PROBE = "bytes=0-9"  # streamprune's first request for a shard
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_REDIRECTS = (301, 302, 307, 308)
_REASONS = {
    200: "OK",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    403: "Forbidden",
    404: "Not Found",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Answer:
    """How to answer one request; the defaults answer it correctly."""

    status: int | None = None  # None: 206 to a satisfiable range, 200 without one
    length: int | None = 0  # Content-Length minus the body's true length; None: no Content-Length
    content_range: str = "ok"  # ok | none | garbage | shifted (one byte later) | total (a wrong total size)
    endless: bool = False  # after the body, junk without end
    cut: int | None = None  # body bytes sent before the connection is closed
    reset: bool = False  # close by a TCP reset (RST) rather than FIN
    drip: str = "none"  # none | head | body: sent one byte per `server.drip` seconds
    interim: bool = False  # endless `100 Continue` responses first
    header_line: bool = False  # a header line without end (dripped)
    many_headers: bool = False  # header lines without end
    location: str | None = None  # a redirect's target


def fuzz_profile(seed: int) -> tuple[str, Answer]:
    """A seeded misbehaviour: (target, answer). Targets: `all` requests, the `probe`, other
    bounded `ranges`, `stream` requests (no Range, or `bytes=a-`), the `first` of each."""
    rng = random.Random(seed)
    target = rng.choice(["all", "probe", "ranges", "stream", "first"])
    kinds = rng.sample(["status", "length", "range", "cut", "endless", "drip", "head"], rng.choice([1, 1, 2]))
    answer = Answer()
    for kind in kinds:
        if kind == "status":
            status = rng.choice([200, 301, 403, 404, 416, 500, 503])
            answer = replace(answer, status=status, location="/ok/" if status == 301 else None)
        elif kind == "length":
            answer = replace(answer, length=rng.choice([None, rng.randint(1, 3000), -rng.randint(1, 3000)]))
        elif kind == "range":
            answer = replace(answer, content_range=rng.choice(["none", "garbage", "shifted", "total"]))
        elif kind == "cut":
            answer = replace(answer, cut=rng.randint(0, 5000), reset=rng.random() < 0.5)
        elif kind == "endless":
            answer = replace(answer, endless=True, length=None)
        elif kind == "drip":
            answer = replace(answer, drip=rng.choice(["head", "body"]))
        else:
            answer = replace(answer, **{rng.choice(["interim", "header_line", "many_headers"]): True})
    return target, answer


def _targets(target: str, range_header: str | None, seen: int) -> bool:
    bounded = range_header is not None and not range_header.endswith("-")
    return {
        "all": True,
        "probe": range_header == PROBE,
        "ranges": bounded and range_header != PROBE,
        "stream": not bounded,
        "first": seen == 0,
    }[target]


class HostileServer:
    """The running server: `url`, `files` (name -> bytes), `drip` (seconds per dripped byte,
    settable), `log`, `bytes_sent`, `reset()`."""

    def __init__(self, files: dict[str, bytes], drip: float = 0.05):
        self.files, self.drip = files, drip
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._tcp = _TCPServer(("127.0.0.1", 0), _Handler)
        self._tcp.owner = self
        self.port = self._tcp.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.reset()

    def reset(self) -> None:
        """Forget the log, the byte count and which requests were seen."""
        with self._lock:
            self.log: list[tuple[str, str, str | None, int, int]] = []
            self.bytes_sent = 0
            self._seen: Counter = Counter()

    def stop(self) -> None:
        self.stopping.set()
        self._tcp.shutdown()
        self._tcp.server_close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # -- per connection ----------------------------------------------------------------

    def serve_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        try:
            with sock.makefile("rb") as rfile:
                ending = "keep"
                while ending == "keep" and not self.stopping.is_set():
                    request = _read_request(rfile)
                    if request is None:
                        return
                    ending = self._answer(sock, *request)
            if ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, not the FIN socketserver's shutdown would send first
        except OSError:
            return  # the client hung up
        finally:
            with self._lock:
                self._sockets.discard(sock)

    def _answer(self, sock: socket.socket, method: str, path: str, headers: dict[str, str]) -> str:
        """Answer one request; how the connection goes on: keep (serves another), close or reset."""
        _, mode, name = (path.split("/", 2) + ["", ""])[:3]
        range_header = headers.get("range")
        with self._lock:
            seen = self._seen[(method, path, range_header)]
            self._seen[(method, path, range_header)] += 1
        data = self.files.get(name)
        if data is None:
            return self._send(sock, method, path, range_header, Answer(status=404), b"", None, 0)
        span = _span(range_header, len(data))
        answer = self._plan(mode, name, range_header, seen)
        if span == "unsatisfiable" and answer.status is None:
            answer = replace(answer, status=416)
        return self._send(sock, method, path, range_header, answer, data, span, len(data))

    def _plan(self, mode: str, name: str, range_header: str | None, seen: int) -> Answer:
        simple = {
            "ok": Answer(),
            "drip-head": Answer(drip="head"),
            "drip-body": Answer(drip="body"),
            "continue": Answer(interim=True),
            "header-line": Answer(header_line=True),
            "many-headers": Answer(many_headers=True),
            "nolength-endless": Answer(length=None, endless=True),
            "no-content-range": Answer(content_range="none"),
            "long-length": Answer(length=100),
            "short-length": Answer(length=-100),
            "redirect-host": Answer(status=302, location=f"http://localhost:{self.port}/ok/{name}"),
            "redirect-loop": Answer(status=302, location=f"/redirect-loop/{name}"),
            "to-file": Answer(status=302, location=f"file:///tmp/{name}"),
            "to-pipe": Answer(status=302, location=f"pipe:cat /tmp/{name}"),
        }
        if mode in simple:
            return simple[mode]
        if mode in ("probe-then-200", "wrong-total"):
            wrong = Answer(status=200) if mode == "probe-then-200" else Answer(content_range="total")
            return wrong if range_header not in (None, PROBE) else Answer()
        number = mode.rpartition("-")[2]
        if mode.startswith("redirect-") and number.isdigit():
            hops = int(number)
            to = f"/redirect-{hops - 1}/{name}" if hops > 1 else f"/ok/{name}"
            return Answer(status=_REDIRECTS[hops % 4], location=to)
        if mode.startswith("reset-once-") and number.isdigit():
            return Answer(cut=int(number), reset=True) if seen == 0 else Answer()
        if mode.startswith("reset-") and number.isdigit():
            return Answer(cut=int(number), reset=True)
        if mode.startswith("fuzz-") and number.isdigit():
            target, answer = fuzz_profile(int(number))
            if answer.location is not None:
                answer = replace(answer, location=answer.location + name)
            return answer if _targets(target, range_header, seen) else Answer()
        return Answer(status=404)

    def _send(
        self,
        sock: socket.socket,
        method: str,
        path: str,
        range_header: str | None,
        answer: Answer,
        data: bytes,
        span: tuple[int, int] | str | None,
        size: int,
    ) -> str:
        ranged = isinstance(span, tuple)
        status = answer.status or (206 if ranged else 200)
        if status == 206 and isinstance(span, tuple):
            start, stop = span
        else:
            start, stop = 0, size
        body = data[start:stop] if status in (200, 206) else b""
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/octet-stream"]
        if answer.length is not None:
            head.append(f"Content-Length: {len(body) + answer.length}")
        if status == 206:
            cr = {
                "ok": f"bytes {start}-{stop - 1}/{size}",
                "shifted": f"bytes {start + 1}-{stop}/{size}",
                "total": f"bytes {start}-{stop - 1}/{size + 1000}",
                "garbage": "bytes=whatever",
            }.get(answer.content_range)
            if cr is not None:
                head.append(f"Content-Range: {cr}")
        if status == 416:
            head.append(f"Content-Range: bytes */{size}")
        if answer.location is not None:
            head.append(f"Location: {answer.location}")
        keep = answer == Answer() and status in (200, 206)
        ending = "keep" if keep else "close"
        head.append("Accept-Ranges: bytes")
        head.append("Connection: " + ("keep-alive" if keep else "close"))
        sent = 0
        try:
            if answer.interim:
                self._endless(sock, b"HTTP/1.1 100 Continue\r\n\r\n" * 64, 0.0)
            if answer.header_line or answer.many_headers:
                sock.sendall((head[0] + "\r\n").encode())
                if answer.many_headers:
                    self._endless(sock, b"".join(b"X-Many-%d: yes\r\n" % i for i in range(64)), 0.0)
                sock.sendall(b"X-Endless: ")
                self._endless(sock, b"a", self.drip)
            self._write(sock, ("\r\n".join(head) + "\r\n\r\n").encode(), answer.drip == "head")
            if method == "HEAD":
                return ending
            part = body if answer.cut is None else body[: answer.cut]
            sent = self._write(sock, part, answer.drip == "body")
            if answer.cut is not None and answer.cut < len(body):
                return "reset" if answer.reset else "close"
            if answer.endless:
                self._endless(sock, bytes(range(256)) * 256, 0.0)
            return ending
        finally:
            with self._lock:
                self.log.append((method, path, range_header, status, sent))

    def _write(self, sock: socket.socket, data: bytes, drip: bool) -> int:
        """Send `data` (one byte per `drip` seconds when dripping); the bytes sent."""
        if not drip:
            sock.sendall(data)
            self._count(len(data))
            return len(data)
        for i in range(len(data)):
            if self.stopping.is_set():
                raise ConnectionAbortedError("server stopping")
            sock.sendall(data[i : i + 1])
            self._count(1)
            time.sleep(self.drip)
        return len(data)

    def _endless(self, sock: socket.socket, chunk: bytes, pause: float) -> NoReturn:
        """Send `chunk` again and again until the client hangs up or the server stops (raises)."""
        while not self.stopping.is_set():
            sock.sendall(chunk)
            self._count(len(chunk))
            time.sleep(pause)
        raise ConnectionAbortedError("server stopping")

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128  # 32 requests in flight connect at once
    owner: HostileServer


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.owner.serve_connection(self.request)  # type: ignore[attr-defined]


def _read_request(rfile) -> tuple[str, str, dict[str, str]] | None:
    """(method, path, lower-cased headers) of the next request; None at the end of the connection."""
    line = rfile.readline(65537)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for _ in range(100):
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        key, _, value = raw.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def _span(range_header: str | None, size: int) -> tuple[int, int] | str | None:
    """[start, stop) of a `bytes=a-b` / `bytes=a-` Range; None without one; "unsatisfiable"."""
    if range_header is None:
        return None
    m = _RANGE.match(range_header)
    if m is None:
        return None
    start = int(m[1])
    stop = min(size, int(m[2]) + 1) if m[2] else size
    return (start, stop) if start < stop else "unsatisfiable"


@contextlib.contextmanager
def serve(files: dict[str, bytes], drip: float = 0.05) -> Iterator[HostileServer]:
    """A HostileServer for `files` on a free port of 127.0.0.1 until the block exits."""
    server = HostileServer(files, drip)
    # poll_interval: how long shutdown() may wait for the loop to notice (socketserver's default: 0.5 s)
    thread = threading.Thread(
        target=server._tcp.serve_forever, kwargs={"poll_interval": 0.05}, name="hostile-http", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
