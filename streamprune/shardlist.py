"""Shard lists (braces, globs, `::` lists, `pipe:` and fsspec URLs) and opening a shard as bytes."""

from __future__ import annotations

import glob
import io
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

import braceexpand

from .identity import has_scheme


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
    if url.startswith("pipe:") or not any(c in url for c in "*?["):
        return [url]
    if url.startswith("file:") or has_scheme(url):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(url)
        protocol = url.split("://", 1)[0]
        found = sorted(p if "://" in p else f"{protocol}://{p}" for p in paths)
    else:
        found = sorted(glob.glob(url))
    if not found:
        raise FileNotFoundError(f"no shard matches {url!r}")
    return found


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (seekable, size known)."""
    return url.startswith("file:") or not (url.startswith("pipe:") or has_scheme(url))


def absolute(url: str) -> str:
    """`url` with a relative local path made absolute (Ray workers do not share the caller's cwd)."""
    return os.path.abspath(url) if is_local(url) and not url.startswith("file:") else url


def local_path(url: str) -> str:
    """The filesystem path of a local shard URL."""
    if url.startswith("file:"):
        from urllib.parse import urlparse

        return urlparse(url).path
    return url


@dataclass
class OpenShard:
    """An open shard: a binary stream, whether seeking is cheap, and its size when known."""

    stream: io.RawIOBase | io.BufferedIOBase
    seekable: bool
    size: int | None
    process: subprocess.Popen | None = None

    def close(self, url: str, drain: bool = True) -> None:
        """Close the stream; a failed `pipe:` command raises naming the URL.

        `drain`: read a `pipe:` command's output to its end first (a tar's trailing padding),
        so that it is not killed by a closed pipe; `False` when the reader stopped early on
        purpose: the command is then stopped and its status ignored.
        """
        if self.process is not None:
            if drain:
                while self.stream.read(1 << 20):
                    pass
            else:
                self.process.kill()
        self.stream.close()
        if self.process is not None:
            rc = self.process.wait()
            if drain and rc != 0:
                err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
                raise OSError(f"shard {url!r}: pipe command exited with status {rc}: {err}")


def open_shard(url: str) -> OpenShard:
    """Open a shard for reading; local files unbuffered so that reads are counted exactly.

    `pipe:` URLs are shell commands (they come only from the user's own arguments).
    """
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return OpenShard(proc.stdout, False, None, proc)
    if is_local(url):
        path = local_path(url)
        try:
            f = open(path, "rb", buffering=0)
        except OSError as exc:
            raise FileNotFoundError(f"shard {url!r}: cannot open: {exc.strerror}") from None
        return OpenShard(f, True, os.fstat(f.fileno()).st_size)
    import fsspec

    try:
        f = fsspec.open(url, "rb").open()
    except Exception as exc:
        raise FileNotFoundError(f"shard {url!r}: cannot open: {exc}") from None
    return OpenShard(f, False, getattr(f, "size", None))
