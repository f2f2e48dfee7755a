"""A real HTTP file server on 127.0.0.1 for tests and benchmarks of remote shard reading.

`serve(root)` runs aiohttp's static file server (HEAD, GET, single `Range: bytes=a-b` ->
206 with Content-Range, 404 for missing files) in a background thread with its own event
loop, on a free port, and counts what it sends. Failures are asked for by URL prefix:

- `/flaky/<path>`: `<path>`, but the first request for each distinct (method, path, Range
  header) answers 503; the retry is served.
- `/fail-after/<N>/<path>`: the file is readable only below byte N. A request whose range
  starts at or beyond N answers 500; one that starts below N and runs past it (a full GET,
  an open-ended or long range) gets the headers of the full answer (full Content-Length,
  Content-Range) and the body up to byte N, then the connection is closed mid-body.
- `/cut-once/<N>/<path>`: the first response per path whose span runs past byte N (a full
  GET, or `bytes=0-`) is cut after byte N the same way, once; later requests, including a
  Range request resuming from N, are served normally.

HEAD requests are never failed by `fail-after`/`cut-once`. No streamprune imports.

    with serve(tmp_dir, latency=0.02) as server:
        urllib.request.urlopen(f"{server.url}/a.tar")
        server.requests, server.bytes_sent, server.range_requests
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import hdrs, web

_STARTUP_TIMEOUT = 10.0
_JOIN_TIMEOUT = 5.0
_numbers = itertools.count()
# Response key: body bytes actually sent, set on cut responses.
_BODY = web.ResponseKey("http_server_body_bytes", int) if hasattr(web, "ResponseKey") else "http_server_body_bytes"


class Server:
    """A running server. Counters (`requests`, `range_requests`, `bytes_sent`) and `log`
    (method, path, Range header or None, status, body bytes) cover every request since the
    start or the last `reset()`. `bytes_sent` sums response body bytes (the Content-Length
    of each prepared response; HEAD counts 0; a cut response counts the bytes written
    before the cut), headers excluded. `latency` (seconds, settable at any time) delays
    every request server-side before it is answered."""

    def __init__(self, root: Path, latency: float = 0.0):
        self.root = root
        self.latency = float(latency)
        self.url = ""
        self.port = 0
        self.name = "http_server"
        self._lock = threading.Lock()
        self._seen_flaky: set[tuple[str, str, str | None]] = set()
        self._cut_done: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """Zero the counters, clear the log and forget which flaky/cut-once requests were seen
        (the next one fails again). `latency` is left as it is."""
        with self._lock:
            self.requests = 0
            self.range_requests = 0
            self.bytes_sent = 0
            self.log: list[tuple[str, str, str | None, int, int]] = []
            self._seen_flaky.clear()
            self._cut_done.clear()

    # -- inside the server's event loop ---------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        with self._lock:
            self.requests += 1
            self.range_requests += hdrs.RANGE in request.headers
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        return await handler(request)

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if _BODY in response:
            n = response[_BODY]
        elif request.method == "HEAD" or response.status in (204, 304):
            n = 0
        else:
            n = response.content_length or 0
        with self._lock:
            self.bytes_sent += n
            self.log.append((request.method, request.path, request.headers.get(hdrs.RANGE), response.status, n))

    def _file(self, tail: str) -> Path:
        path = (self.root / tail).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        path = self._file(tail)
        key = (request.method, tail, request.headers.get(hdrs.RANGE))
        with self._lock:
            first = key not in self._seen_flaky
            self._seen_flaky.add(key)
        if first:
            raise web.HTTPServiceUnavailable(text="flaky: first request fails, retry")
        return web.FileResponse(path)

    async def _fail_after(self, request: web.Request) -> web.StreamResponse:
        n, path = int(request.match_info["n"]), self._file(request.match_info["tail"])
        span = _span(request, path.stat().st_size)
        if request.method == "HEAD" or span is None:
            return web.FileResponse(path)
        start, stop = span
        if start >= n:
            raise web.HTTPInternalServerError(text=f"fail-after: byte {start} is at or beyond {n}")
        if stop > n:
            return await _cut(request, path, start, stop, n)
        return web.FileResponse(path)

    async def _cut_once(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        n, path = int(request.match_info["n"]), self._file(tail)
        span = _span(request, path.stat().st_size)
        if request.method == "HEAD" or span is None or not span[0] < n < span[1]:
            return web.FileResponse(path)
        with self._lock:
            first = tail not in self._cut_done
            self._cut_done.add(tail)
        if not first:
            return web.FileResponse(path)
        return await _cut(request, path, span[0], span[1], n)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.on_response_prepare.append(self._on_prepare)
        app.router.add_route("*", "/flaky/{tail:.+}", self._flaky)
        app.router.add_route("*", r"/fail-after/{n:\d+}/{tail:.+}", self._fail_after)
        app.router.add_route("*", r"/cut-once/{n:\d+}/{tail:.+}", self._cut_once)
        app.router.add_static("/", self.root)
        return app


def _span(request: web.Request, size: int) -> tuple[int, int] | None:
    """The byte span [start, stop) a GET asks for, or None where aiohttp should answer it
    itself (an invalid or unsatisfiable range, an empty file)."""
    if hdrs.RANGE not in request.headers:
        return (0, size) if size else None
    try:
        rng = request.http_range
    except ValueError:
        return None
    start, stop = rng.start, rng.stop
    if start is None:
        start = 0
    elif start < 0:  # suffix range: the last -start bytes
        start = max(0, size + start)
    stop = size if stop is None else min(stop, size)
    return (start, stop) if start < stop else None


async def _cut(request: web.Request, path: Path, start: int, stop: int, n: int) -> web.StreamResponse:
    """Answer [start, stop) with full headers but only the body below byte n, then close."""
    with open(path, "rb") as f:
        f.seek(start)
        body = f.read(n - start)
    size = path.stat().st_size
    ranged = hdrs.RANGE in request.headers
    resp = web.StreamResponse(status=206 if ranged else 200)
    resp.content_length = stop - start
    resp.content_type = "application/octet-stream"
    resp.headers[hdrs.ACCEPT_RANGES] = "bytes"
    if ranged:
        resp.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{stop - 1}/{size}"
    resp[_BODY] = len(body)
    await resp.prepare(request)
    await resp.write(body)
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then closes: a transfer cut mid-body
    raise asyncio.CancelledError  # nothing more may be written on this connection


async def _stop(runner: web.AppRunner, loop: asyncio.AbstractEventLoop) -> None:
    await runner.cleanup()  # closes the listening socket and the open connections
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()  # aiohttp opens and stats files in executor threads: join them


@contextlib.contextmanager
def serve(root: str | Path, *, latency: float = 0.0) -> Iterator[Server]:
    """Serve the files under `root` at `http://127.0.0.1:<free port>/` until the block exits."""
    server = Server(Path(root).resolve(), latency)
    server.name = f"http_server-{next(_numbers)}"  # its thread's name, and its executor threads' prefix
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(4, thread_name_prefix=f"{server.name}-io"))
    thread = threading.Thread(target=loop.run_forever, name=server.name, daemon=True)
    thread.start()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    try:
        server.port = asyncio.run_coroutine_threadsafe(start(), loop).result(_STARTUP_TIMEOUT)
        server.url = f"http://127.0.0.1:{server.port}"
        yield server
    finally:
        try:
            asyncio.run_coroutine_threadsafe(_stop(runner, loop), loop).result(_JOIN_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_JOIN_TIMEOUT)
            if not thread.is_alive():
                loop.close()


class ProcessServer:
    """A `Server` running in a child process (so that a benchmark's client does not share the
    server's interpreter lock): the same `url`, `root`, `latency`, counters and `reset()`,
    each a round trip over a pipe."""

    def __init__(self, conn, url: str, root: Path):
        self._conn, self.url, self.root = conn, url, root

    def _ask(self, *message):
        self._conn.send(message)
        return self._conn.recv()

    def reset(self) -> None:
        self._ask("reset")

    @property
    def latency(self) -> float:
        return self._ask("get", "latency")

    @latency.setter
    def latency(self, value: float) -> None:
        self._ask("latency", float(value))

    @property
    def requests(self) -> int:
        return self._ask("get", "requests")

    @property
    def range_requests(self) -> int:
        return self._ask("get", "range_requests")

    @property
    def bytes_sent(self) -> int:
        return self._ask("get", "bytes_sent")


def _child(root: str, latency: float, conn) -> None:
    with serve(root, latency=latency) as server:
        conn.send(server.url)
        while True:
            message = conn.recv()
            if message[0] == "stop":
                conn.send(None)
                return
            if message[0] == "reset":
                server.reset()
                conn.send(None)
            elif message[0] == "latency":
                server.latency = message[1]
                conn.send(None)
            else:
                conn.send(getattr(server, message[1]))


@contextlib.contextmanager
def serve_process(root: str | Path, *, latency: float = 0.0) -> Iterator[ProcessServer]:
    """`serve` in a child process; yields a ProcessServer."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(str(Path(root).resolve()), latency, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(_STARTUP_TIMEOUT * 3):
            raise RuntimeError("the HTTP server process did not start")
        yield ProcessServer(parent, parent.recv(), Path(root).resolve())
    finally:
        try:
            parent.send(("stop",))
            parent.poll(_JOIN_TIMEOUT)
        finally:
            proc.join(_JOIN_TIMEOUT)
            if proc.is_alive():
                proc.kill()
