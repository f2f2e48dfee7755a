"""Atomic replacement of output directories: readers see the old one or the new one, never a mix."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden sibling of `path` to build the new directory in."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{time.monotonic_ns()}")


def swap_in(tmp: Path, path: Path) -> None:
    """Replace directory `path` with the complete directory `tmp` by renames only."""
    if path.exists():
        old = temp_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on output `path` (a sibling `.NAME.lock` file) while writing it.

    A second writer of the same output is refused at once, naming it, instead of racing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is writing {str(path)!r} (lock {str(lock)!r}); wait for it to "
                             "finish or choose another output") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
