"""The local HTTP server the remote-reading tests and benchmarks use (tests/http_server.py),
checked with the standard library's client only."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_server import serve

DATA = bytes(range(256)) * 40  # 10,240 bytes


def _get(url: str, rng: str | None = None, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Range": rng} if rng else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def _status(url: str, rng: str | None = None) -> int:
    try:
        return _get(url, rng)[0]
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


@pytest.fixture
def server(http_server):
    (http_server.root / "d").mkdir(exist_ok=True)
    (http_server.root / "d" / "a.bin").write_bytes(DATA)
    http_server.reset()
    http_server.latency = 0.0
    yield http_server
    http_server.latency = 0.0


def test_range_head_full_and_missing(server):
    url = f"{server.url}/d/a.bin"
    status, headers, body = _get(url, "bytes=100-299")
    assert status == 206 and body == DATA[100:300]
    assert headers["Content-Range"] == f"bytes 100-299/{len(DATA)}"
    status, headers, body = _get(url, method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) == len(DATA) and body == b""
    assert _get(url)[2] == DATA
    assert _get(url, "bytes=10000-")[2] == DATA[10000:] and _get(url, "bytes=-40")[2] == DATA[-40:]
    assert _status(f"{server.url}/d/missing.bin") == 404
    assert server.requests == 6 and server.range_requests == 3
    assert server.bytes_sent >= 200 + len(DATA) + 240 + 40  # plus the 404 page's body
    server.reset()
    assert (server.requests, server.range_requests, server.bytes_sent, server.log) == (0, 0, 0, [])
    _get(url, "bytes=0-9")
    _get(url, method="HEAD")
    assert server.bytes_sent == 10 and [e[3] for e in server.log] == [206, 200]


def test_flaky_fails_first_request_per_path_and_range(server):
    url = f"{server.url}/flaky/d/a.bin"
    assert _status(url, "bytes=0-9") == 503
    assert _get(url, "bytes=0-9") == (206, _get(url, "bytes=0-9")[1], DATA[:10])
    assert _status(url, "bytes=10-19") == 503 and _status(url, "bytes=10-19") == 206
    assert _status(url) == 503 and _get(url)[2] == DATA
    server.reset()  # forgets what it has seen
    assert _status(url, "bytes=0-9") == 503
    assert _status(f"{server.url}/flaky/d/missing.bin") == 404


def test_fail_after(server):
    url = f"{server.url}/fail-after/1000/d/a.bin"
    assert _get(url, "bytes=0-999")[2] == DATA[:1000]
    assert _status(url, "bytes=1000-1099") == 500 and _status(url, "bytes=5000-") == 500
    with pytest.raises(http.client.IncompleteRead) as e:
        _get(url)
    assert e.value.partial == DATA[:1000] and e.value.expected == len(DATA) - 1000
    with pytest.raises(http.client.IncompleteRead) as e:  # a range running past N is cut at N
        _get(url, "bytes=900-1099")
    assert e.value.partial == DATA[900:1000]
    assert _get(url, method="HEAD")[0] == 200
    assert server.bytes_sent >= 1000 + 1000 + 100


def test_cut_once_then_resume_with_range(server):
    url = f"{server.url}/cut-once/4096/d/a.bin"
    with pytest.raises(http.client.IncompleteRead) as e:
        _get(url)
    assert e.value.partial == DATA[:4096]
    status, headers, rest = _get(url, "bytes=4096-")
    assert status == 206 and e.value.partial + rest == DATA
    assert _get(url)[2] == DATA  # cut once only
    assert [(e[0], e[2], e[3], e[4]) for e in server.log] == [
        ("GET", None, 200, 4096),
        ("GET", "bytes=4096-", 206, len(DATA) - 4096),
        ("GET", None, 200, len(DATA)),
    ]


def test_latency_is_hidden_by_concurrent_requests(server):
    server.latency = 0.2
    url = f"{server.url}/d/a.bin"
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: _get(url, f"bytes={i * 10}-{i * 10 + 9}")[2], range(8)))
    took = time.perf_counter() - t
    assert bodies == [DATA[i * 10 : i * 10 + 10] for i in range(8)]
    assert 0.2 <= took < 1.0  # eight 0.2 s requests overlapped, not 1.6 s in series


def test_serve_stops_cleanly(tmp_path):
    (tmp_path / "x").write_bytes(b"hello")
    with serve(tmp_path) as s:
        assert _get(f"{s.url}/x")[2] == b"hello"
        assert any(t.name.startswith(f"{s.name}-io") for t in threading.enumerate())
    assert not [t for t in threading.enumerate() if t.name == s.name or t.name.startswith(f"{s.name}-")]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{s.url}/x", timeout=2)
