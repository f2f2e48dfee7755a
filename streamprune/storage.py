"""Where run files live: a local path or an object-store URL (`s3://`, `gs://`, `az://`, ...).

One small layer over fsspec, so that formats name locations as strings and never build a
`Path` for them. Object stores have no rename and no locks: what is written there commits by
its last object (a manifest or marker, written after the data; see `write_bytes(exclusive=)`
for a conditional create). `file://` URLs are local paths.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

_LOCAL = ("", "file", "local")


def scheme(location: str | os.PathLike) -> str:
    """The URL scheme of `location` ("" for a local path, `file://` included)."""
    text = os.fspath(location)
    head, sep, _ = text.partition("://")
    if not sep or "/" in head:
        return ""
    return "" if head in _LOCAL else head


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is in an object store (not a local path or a `file://` URL)."""
    return scheme(location) != ""


def local_path(location: str | os.PathLike) -> str:
    """The local path of a local `location` (`file://` stripped)."""
    text = os.fspath(location)
    if is_url(text):
        raise ValueError(f"{text}: not a local path")
    return text.split("://", 1)[1] if "://" in text else text


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` with `parts` appended ('/'-separated in URLs, os.path.join locally)."""
    text = os.fspath(location)
    if is_url(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(local_path(text), *parts)


def name(location: str | os.PathLike) -> str:
    """The last part of `location`."""
    return posixpath.basename(os.fspath(location).rstrip("/")) if is_url(location) else os.path.basename(location)


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem of `location` and the path in it (credentials and endpoint from the
    standard environment: `AWS_ENDPOINT_URL`, profiles, instance roles for `s3://`)."""
    import fsspec

    text = os.fspath(location)
    if not is_url(text):
        return fsspec.filesystem("file"), os.path.abspath(local_path(text))
    fs, path = fsspec.core.url_to_fs(text)
    return fs, path


def read_bytes(location: str | os.PathLike, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of `location` (or of its range [start, end)); FileNotFoundError names it."""
    fs, path = filesystem(location)
    try:
        return fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(location)}: no such file") from None


def write_bytes(location: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write `data` as the whole of `location`, in one request on object stores (so readers see the
    old object or the new one). `exclusive`: only if nothing is there (S3/GCS/Azure's conditional
    create, `If-None-Match: *`; O_EXCL locally), else FileExistsError naming it."""
    fs, path = filesystem(location)
    if not is_url(location):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "xb" if exclusive else "wb") as f:
                f.write(data)
        except FileExistsError:
            raise FileExistsError(f"{os.fspath(location)}: already exists") from None
        return
    try:
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
    except FileExistsError:
        raise FileExistsError(f"{os.fspath(location)}: already exists") from None


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or a folder (an object prefix) is at `location`."""
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def names(location: str | os.PathLike) -> list[str]:
    """The names directly under folder `location`, sorted ([] if there is none)."""
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if is_url(location) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def size(location: str | os.PathLike) -> int:
    """The size of file `location` in bytes."""
    fs, path = filesystem(location)
    return int(fs.size(path))


def remove(location: str | os.PathLike) -> None:
    """Remove the file or folder at `location` with everything under it (nothing there: no-op)."""
    fs, path = filesystem(location)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
