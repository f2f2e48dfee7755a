"""A real S3 server on 127.0.0.1 for tests and benchmarks: moto's server mode (the server s3fs's
own tests use), with the bytes it sends counted server-side.

`serve(port)` runs moto's WSGI application under werkzeug's threaded server (what moto's
`ThreadedMotoServer` runs) behind a small counting middleware, and yields an `S3Server`. Its
counters cover every request since the start or the last `reset()`: `requests`, `gets`,
`bytes_sent` (response body bytes of GET requests) and `log` (method, path, Range header,
status, body bytes). Clients find it through the standard environment: `environment(url)` gives
`AWS_ENDPOINT_URL` and test credentials, which boto3, s3fs and Ray workers started after they
are set all read. No streamprune imports.

    with serve() as server:
        server.make_bucket("shards")
        ... read s3://shards/... with AWS_ENDPOINT_URL=server.url ...
        server.bytes_sent
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "streamprune-test",
    "AWS_SECRET_ACCESS_KEY": "streamprune-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
    """The environment that points AWS clients (boto3, s3fs, their Ray workers) at `url`."""
    return {"AWS_ENDPOINT_URL": url, **_CREDENTIALS}


class S3Server:
    """A running server at `url`; counters since the start or the last `reset()`."""

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.gets = 0
            self.bytes_sent = 0
            self.log: list[tuple[str, str, str | None, str, int]] = []

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (a no-op if it exists); return `s3://name`."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, **_client_credentials())
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def _count(self, method: str, path: str, range_header: str | None, status: str, body: int) -> None:
        with self._lock:
            self.requests += 1
            if method == "GET":
                self.gets += 1
                self.bytes_sent += body
            self.log.append((method, path, range_header, status, body))

    def app(self, inner):
        """`inner` (a WSGI application) with every answer counted."""

        def counted(environ, start_response):
            status_seen: list[str] = []

            def start(status, headers, exc_info=None):
                status_seen.append(status)
                return start_response(status, headers, exc_info)

            body = 0
            try:
                for chunk in inner(environ, start):
                    body += len(chunk)
                    yield chunk
            finally:
                self._count(
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("HTTP_RANGE"),
                    status_seen[0] if status_seen else "",
                    body,
                )

        return counted


def _client_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": _CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": _CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": _CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@contextlib.contextmanager
def serve(port: int = 0) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1:`port` (0: a free one) until the block exits."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # a line per request would drown test output
            pass

    port = port or free_port()
    server = S3Server(f"http://127.0.0.1:{port}")
    wsgi = make_server(
        "127.0.0.1",
        port,
        server.app(DomainDispatcherApplication(create_backend_app)),
        threaded=True,
        request_handler=Quiet,
    )
    # poll_interval: how long shutdown() may wait for the loop to notice (the default: 0.5 s)
    thread = threading.Thread(
        target=wsgi.serve_forever, kwargs={"poll_interval": 0.05}, name=f"s3_server-{port}", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        wsgi.shutdown()
        thread.join(5)
