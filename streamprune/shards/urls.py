"""Shard lists: braces, globs, `::` lists, `pipe:` commands and fsspec URLs expanded to shard URLs.

Opening a shard is `shards.opening.open_shard`; its names (`OpenShard`, `from_stream`, `open_shard`,
`is_local`) and `local_path` are also importable from here, where they were first.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

import braceexpand

from streamprune.shards.identity import has_scheme
from streamprune.shards.opening import OpenShard, from_stream, is_local, open_shard
from streamprune.storage import local_path  # a local shard URL's path, as any local location's

__all__ = ["OpenShard", "absolute", "expand_urls", "from_stream", "is_local", "local_path", "open_shard"]


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


def absolute(url: str) -> str:
    """`url` with a relative local path made absolute (Ray workers do not share the caller's cwd)."""
    return os.path.abspath(url) if is_local(url) and not url.startswith("file:") else url
