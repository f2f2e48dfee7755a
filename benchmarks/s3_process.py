"""A real S3 server for the benchmarks: tests/s3_server.py's moto server in a child process (so
that the client does not share its interpreter lock), with AWS_ENDPOINT_URL and test credentials
set in this process's environment while it runs (boto3, s3fs, `pipe:` commands and Ray workers
started after that read them). Shared by bench_loader.py and bench_reduce.py."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"


class S3Process:
    """The server in its child process: `url`, `pid`, `reset()` and its counters (`bytes_sent`,
    `gets`), each a round trip."""

    def __init__(self, conn: Any, url: str, pid: int | None = None):
        self._conn, self.url, self.pid = conn, url, pid

    def _ask(self, *message: Any) -> Any:
        self._conn.send(message)
        return self._conn.recv()

    def reset(self) -> None:
        """Zero the counters."""
        self._ask("reset")

    @property
    def bytes_sent(self) -> int:
        """GET body bytes sent since the last reset."""
        return self._ask("get", "bytes_sent")

    @property
    def gets(self) -> int:
        """GET requests answered since the last reset."""
        return self._ask("get", "gets")

    @property
    def requests(self) -> int:
        """Requests answered since the last reset."""
        return self._ask("get", "requests")


def _s3_child(tests: str, conn: Any) -> None:
    """The child: serve S3 and answer the parent's messages until `stop`."""
    sys.path.insert(0, tests)
    from s3_server import serve

    with serve() as server:
        conn.send(server.url)
        while (message := conn.recv())[0] != "stop":
            if message[0] == "reset":
                server.reset()
                conn.send(None)
            else:
                conn.send(getattr(server, message[1]))
        conn.send(None)


@contextlib.contextmanager
def serve_s3_process() -> Iterator[S3Process]:
    """A real S3 server (moto) in a child process, with AWS_ENDPOINT_URL and test credentials set
    in this process's environment (boto3, s3fs and `pipe:` commands read them) while it runs."""
    import multiprocessing

    sys.path.insert(0, str(TESTS))
    from s3_server import environment

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_s3_child, args=(str(TESTS), child), daemon=True)
    proc.start()
    saved = dict(os.environ)
    try:
        began = time.monotonic()
        while not parent.poll(0.2):  # its url, once it listens; a child that died will send none
            if not proc.is_alive() or time.monotonic() - began > 60:
                raise RuntimeError(f"the S3 server process did not start (exit code {proc.exitcode})")
        url = parent.recv()
        os.environ.update(environment(url))
        yield S3Process(parent, url, proc.pid)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        with contextlib.suppress(OSError, EOFError):
            parent.send(("stop",))
            parent.poll(5)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
