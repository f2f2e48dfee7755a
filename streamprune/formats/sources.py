"""Where a run's shards are read from: a run directory is data, never code.

The URL an index stores for each shard (`RUN/index/shards.jsonl`, field `url`) is only matched,
never opened as given: a `pipe:` URL is a shell command, and a run directory may come from
anyone. Shards are read from the URLs the user gives (mapped to the index's shard names), or
else from the local path the index's root and the shard's name make.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError
from streamprune.shards.identity import ShardMatcher, url_path
from streamprune.shards.urls import absolute, expand_urls, is_local

if TYPE_CHECKING:
    from streamprune.formats.index import Index


def shard_urls(index: Index, shards: str | Iterable[str] | None = None) -> list[str]:
    """The URL to open for each of the index's shards, in index order.

    `shards` (specs as `index` takes them: paths, braces, globs, `::` lists, `pipe:` and fsspec
    URLs): each URL is mapped to the index shard it names (its path under the index's root, or
    for data moved elsewhere the longest shard name its path ends with) and used; a URL naming
    no shard, two URLs naming one, or a shard named by none is an InputError. Without `shards`,
    every shard is read from `local_source`.
    """
    if shards is None:
        return [local_source(index, s) for s in range(index.n_shards)]
    under_root, moved = ShardMatcher(index.names, index.root), ShardMatcher(index.names)
    given: dict[str, str] = {}
    for url in (absolute(u) for u in expand_urls(shards)):
        name = under_root(url) or moved(url)
        if name is None:
            raise InputError(
                f"shard {url!r} is not a shard of the index {str(index.path)!r} (root {index.root!r}): "
                "give the shards you indexed"
            )
        if name in given:
            raise InputError(f"shards {given[name]!r} and {url!r} are both shard {name!r} of the index: give it once")
        given[name] = url
    missing = [n for n in index.names if n not in given]
    if missing:
        raise InputError(
            f"shard {missing[0]!r} of the index {str(index.path)!r} is not among the given shards "
            f"({len(missing)} missing): give every shard you indexed"
        )
    return [given[n] for n in index.names]


def local_source(index: Index, shard: int) -> str:
    """The local path shard `shard` is read from when no shard URLs are given: the index's root
    joined with the shard's name (both checked by `Index`), when the stored URL is that file.

    A stored `pipe:` command or remote URL is refused (InputError: the user must give it), a
    stored local URL of another file as damage (DamagedRunError); both name `shards.jsonl`.
    """
    info, name = index.shards[shard], index.names[shard]
    url, path = info["url"], posixpath.join(index.root, name)
    where = f"{storage.join(index.path, 'shards.jsonl')!r}: shard {name!r}"
    if not is_local(url):
        raise InputError(
            f"{where} was indexed from {url!r}; a command or remote URL in a run directory is never "
            "opened unless you give it: pass --shards (shards= in Python) with the URLs you indexed"
        )
    if url_path(url) != path:
        raise DamagedRunError(
            f"{where} has the stored URL {url!r}, not its path under the index root {index.root!r} "
            f"({path!r}): the index was edited; pass --shards with the URLs you indexed, or index again"
        )
    return path
