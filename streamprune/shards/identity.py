"""Sample identity: `(shard name, __key__)` or a user-supplied identity, hashed to 128 bits.

A shard's *name* is its path relative to the dataset root with any `pipe:` command,
URL scheme and host stripped, so an identity survives moving the dataset between
local disk, `file://`, `pipe:curl ...` and object storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from streamprune.errors import InputError, SettingsError
from streamprune.plugins import import_function

_HEX128 = re.compile(r"^[0-9a-fA-F]{32}$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PERSON = b"streamprune-id"


def has_scheme(url: str) -> bool:
    """True when `url` starts with `scheme://`."""
    return _SCHEME.match(url) is not None


def url_path(url: str) -> str:
    """The storage-independent path of a shard URL: absolute, POSIX, no scheme or host.

    `pipe:` commands are reduced to the path or URL they read, e.g.
    `pipe:curl -s -L https://host/data/a.tar` -> `/data/a.tar`.
    """
    if url.startswith("pipe:"):
        return url_path(_pipe_target(url))
    if url.startswith("file:"):
        parsed = urlparse(url)
        return posixpath.normpath(parsed.path or "/")
    if has_scheme(url):
        parsed = urlparse(url)
        return posixpath.normpath("/" + parsed.path.lstrip("/"))
    return posixpath.normpath(os.path.abspath(url).replace(os.sep, "/"))


def _pipe_target(url: str) -> str:
    """The last argument of a `pipe:` command that looks like a path or URL."""
    try:
        tokens = shlex.split(url[len("pipe:") :])
    except ValueError as exc:
        raise InputError(f"cannot parse pipe: URL {url!r}: {exc}") from None
    candidates = [t for t in tokens[1:] if not t.startswith("-") and ("/" in t or has_scheme(t))]
    if not candidates:
        raise InputError(f"pipe: URL {url!r} names no path or URL to take the shard name from")
    return candidates[-1]


def shard_names(urls: list[str], root: str | None = None) -> tuple[list[str], str]:
    """Names of `urls` relative to `root` (default: their common directory), and that root.

    The root is returned in `url_path` form so that it can be recorded and reused.
    """
    if not urls:
        raise SettingsError("no shards given")
    paths = [url_path(u) for u in urls]
    root_path = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if root is None else url_path(root)
    names = []
    prefix = root_path.rstrip("/") + "/"
    for url, path in zip(urls, paths, strict=True):
        if not path.startswith(prefix):
            raise InputError(f"shard {url!r} is not under the dataset root {root_path!r}")
        names.append(path[len(prefix) :])
    return names, root_path


class ShardMatcher:
    """Finds which known shard name a URL refers to, wherever the dataset now lives.

    With `root`, the name is the URL's path relative to it; otherwise the longest known
    name that is a trailing part of the URL's path (so `s3://bucket/data/a.tar` and
    `/mnt/data/a.tar` both match `a.tar` or `data/a.tar`).
    """

    def __init__(self, names: list[str], root: str | None = None):
        self.known = set(names)
        self.root = None if root is None else url_path(root).rstrip("/") + "/"
        self._cache: dict[str, str | None] = {}

    def __call__(self, url: str) -> str | None:
        if url not in self._cache:
            path = url_path(url)
            if self.root is not None:
                name = path[len(self.root) :] if path.startswith(self.root) else None
                self._cache[url] = name if name in self.known else None
            else:
                parts = path.strip("/").split("/")
                self._cache[url] = next(
                    ("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in self.known), None
                )
        return self._cache[url]


def id128(name: str, key: str) -> tuple[int, int]:
    """The default identity of sample `key` in shard `name`, as (hi, lo) uint64 values."""
    return _digest128((name + "\0" + key).encode("utf-8"))


def _digest128(data: bytes) -> tuple[int, int]:
    d = hashlib.blake2b(data, digest_size=16, person=_PERSON).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def value_to_id128(value: Any) -> tuple[int, int]:
    """Map a user identity value to 128 bits.

    A 32-digit hex string (DataComp's `uid`) or an int below 2**128 is taken as the
    identity itself, so exports match DataComp subsets; other strings and bytes are hashed.
    """
    if isinstance(value, (bool, float)) or value is None:
        raise InputError(f"identity value {value!r} is not a string, bytes or integer")
    if isinstance(value, int):
        if not 0 <= value < 2**128:
            raise InputError(f"integer identity {value} is outside [0, 2**128)")
        return value >> 64, value & 0xFFFFFFFFFFFFFFFF
    if isinstance(value, str) and _HEX128.match(value):
        return int(value[:16], 16), int(value[16:], 16)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return _digest128(bytes(value))
    raise InputError(f"identity value {value!r} is not a string, bytes or integer")


@dataclass(frozen=True)
class SampleIdentity:
    """A user-supplied identity: `fn(sample) -> str | bytes | int`.

    `sample` is a dict like webdataset's (`__key__`, `__shard__`, and each member's bytes
    by extension); only the extensions in `members` are read (all when `members` is None).
    `spec` is a string that rebuilds it (recorded in the index manifest).
    """

    fn: Callable[[dict], Any]
    members: tuple[str, ...] | None = None
    spec: str = field(default="custom")

    def __call__(self, sample: dict) -> tuple[int, int]:
        try:
            return value_to_id128(self.fn(sample))
        except Exception as exc:
            raise InputError(
                f"identity {self.spec!r} failed on sample {sample.get('__key__')!r} "
                f"of shard {sample.get('__shard__')!r}: {exc}"
            ) from None


class _JsonField:
    def __init__(self, name: str, member: str):
        self.name, self.member = name, member

    def __call__(self, sample: dict) -> Any:
        if self.member not in sample:
            raise KeyError(f"no .{self.member} member")
        doc = json.loads(sample[self.member])
        if self.name not in doc:
            raise KeyError(f"no field {self.name!r} in .{self.member}")
        return doc[self.name]


def json_field(name: str, member: str = "json") -> SampleIdentity:
    """Identity from a field of the sample's JSON member (DataComp: `json_field("uid")`)."""
    return SampleIdentity(_JsonField(name, member), members=(member,), spec=f"json:{name}")


def parse_identity(spec: str | SampleIdentity | Callable | None) -> SampleIdentity | None:
    """`None`/`"shard-key"` (default), `"json:FIELD"`, `"package.module:function"`, or a callable."""
    if spec is None or spec == "shard-key":
        return None
    if isinstance(spec, SampleIdentity):
        return spec
    if callable(spec):
        return SampleIdentity(spec, None, getattr(spec, "__qualname__", "custom"))
    if spec.startswith("json:"):
        return json_field(spec[len("json:") :])
    if ":" not in spec:
        raise SettingsError(f"identity {spec!r}: expected 'shard-key', 'json:FIELD' or 'module:function'")
    return SampleIdentity(import_function(spec, "identity"), None, spec)


def ids_array(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Split (hi, lo) pairs into two uint64 arrays."""
    arr = np.array(pairs, dtype=np.uint64).reshape(-1, 2)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def find_duplicates(id_hi: np.ndarray, id_lo: np.ndarray) -> np.ndarray:
    """Rows whose 128-bit identity occurs more than once, sorted by identity then row."""
    order = np.lexsort((id_lo, id_hi))
    hi, lo = id_hi[order], id_lo[order]
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    return order[dup]


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: Any) -> Any:
    """SplitMix64's finaliser of a uint64 scalar or array, vectorised (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, id_hi: np.ndarray, id_lo: np.ndarray) -> np.ndarray:
    """A uniform in (0, 1) per identity, a pure function of `(seed, identity)` (counter-based).

    Every random choice of the samplers comes from these, so results do not depend on how
    many workers ran, in which order, or how rows were blocked.
    """
    with np.errstate(over="ignore"):
        s = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(1))
        h = _mix64(np.asarray(id_hi, dtype=np.uint64) ^ s)
        h = _mix64(h ^ np.asarray(id_lo, dtype=np.uint64) ^ (s * _GOLDEN))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
