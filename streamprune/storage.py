"""Where run files live: a local path or an object-store URL (`s3://`, `gs://`, `az://`, ...).

One small layer over fsspec, so that formats name locations as strings and never build a
`Path` for them. Object stores have no rename and no locks: what is written there commits by
its last object (a manifest or marker, written after the data; see `write_bytes(exclusive=)`
for a conditional create). `file://` URLs are local paths.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlparse

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
    """The local path of a local `location` (of a `file:` URL, its path)."""
    text = os.fspath(location)
    if is_url(text):
        raise ValueError(f"{text}: not a local path")
    return urlparse(text).path if text.startswith(tuple(f"{s}:" for s in _LOCAL if s)) else text


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` with `parts` appended ('/'-separated in URLs, os.path.join locally)."""
    text = os.fspath(location)
    if is_url(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(local_path(text), *parts)


def parent(location: str | os.PathLike) -> str:
    """The folder that holds `location`."""
    text = os.fspath(location).rstrip("/")
    return posixpath.dirname(text) if is_url(text) else os.path.dirname(os.path.abspath(local_path(text)))


def absolute(location: str | os.PathLike) -> str:
    """`location` as an absolute local path, or the URL as given (without a trailing '/')."""
    text = os.fspath(location)
    return text.rstrip("/") if is_url(text) else os.path.abspath(local_path(text))


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
    # no cached listings: another process or node writes the same folders (chunks, COMMIT, leases)
    fs, path = fsspec.core.url_to_fs(text, use_listings_cache=False)
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
    old object or the new one; locally by a rename). `exclusive`: only if nothing is there (S3/GCS/Azure's conditional
    create, `If-None-Match: *`; a hard link locally), else FileExistsError naming it."""
    fs, path = filesystem(location)
    if not is_url(location):
        _write_local(path, data, exclusive)
        return
    try:
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
    except FileExistsError:
        raise FileExistsError(f"{os.fspath(location)}: already exists") from None


def _write_local(path: str, data: bytes, exclusive: bool) -> None:
    """Write a local file whole, as object stores do (`_built_beside`)."""
    with _built_beside(path, exclusive, sync=False) as f:
        f.write(data)


@contextlib.contextmanager
def _built_beside(path: str, exclusive: bool, sync: bool) -> Iterator[IO[bytes]]:
    """A file to write local `path` whole: built under a hidden name beside it (its folder created),
    `sync`ed if asked, then renamed over it, or (`exclusive`) hard-linked, which fails with
    FileExistsError naming `path` if the name is taken; nothing appears when the block raises."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path}: already exists") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def writing(location: str | os.PathLike, replace: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write `location` front to back; it appears whole when the block ends and
    not at all when the block raises. Locally it is built beside `location`, synced and renamed
    into place; on an object store it is uploaded (in parts when large) and completed at the end,
    an upload under way aborted on error. `replace=False`: FileExistsError naming `location` when
    something is there (checked before writing on object stores, at the rename locally)."""
    if not is_url(location):
        path = os.path.abspath(local_path(os.fspath(location)))
        if not replace and os.path.lexists(path):
            raise FileExistsError(f"{path}: already exists")
        with _built_beside(path, exclusive=not replace, sync=True) as f:
            yield f
        return
    fs, path = filesystem(location)
    if not replace and fs.exists(path):
        raise FileExistsError(f"{os.fspath(location)}: already exists")
    upload = fs.open(path, "wb")
    try:
        yield upload
    except BaseException:
        _abort_upload(upload)
        raise
    upload.close()


def _abort_upload(upload: Any) -> None:
    """Stop an object-store upload without completing it: the object never appears."""
    with contextlib.suppress(Exception):
        discard = getattr(upload, "discard", None)
        if discard is not None:
            discard()  # aborts a multipart upload under way
        upload.closed = True  # fsspec files: close() would upload what is buffered


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or a folder (an object prefix) is at `location`."""
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def names(location: str | os.PathLike, folders: bool = False) -> list[str]:
    """The names directly under folder `location`, sorted ([] if there is none); `folders`: only
    those of folders (object prefixes)."""
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = {posixpath.basename(e["name"].rstrip("/")) for e in entries if not folders or e.get("type") == "directory"}
    return sorted(found - {""})


def files(location: str | os.PathLike) -> list[str]:
    """The files at any depth under folder `location`, as '/'-separated paths relative to it, sorted
    ([] if there is none). One recursive listing (on object stores, a request per 1,000 objects,
    not one per folder; locally a walk that stats nothing, ~20x faster than fsspec's), so that a
    store's chunks are listed alike locally and remotely."""
    fs, path = filesystem(location)
    if not is_url(location):
        found = [os.path.join(top, f) for top, _, leaves in os.walk(path) for f in leaves]
    else:
        try:
            found = fs.find(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
    prefix = path.rstrip("/") + "/"
    return sorted(f[len(prefix) :].replace(os.sep, "/") for f in found if f.startswith(prefix))


def size(location: str | os.PathLike) -> int:
    """The size of file `location` in bytes."""
    fs, path = filesystem(location)
    return int(fs.size(path))


def total_size(location: str | os.PathLike) -> int:
    """The bytes of file `location`, or of every file under folder `location` (0 if nothing is there)."""
    fs, path = filesystem(location)
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def remove(location: str | os.PathLike) -> None:
    """Remove the file or folder at `location` with everything under it (nothing there: no-op)."""
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def sizes(location: str | os.PathLike) -> dict[str, int]:
    """The files directly under folder `location` with their sizes in bytes ({} if there is none):
    one listing (one request on object stores, where `size` per file would be one request each)."""
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e.get("type") == "file"}
