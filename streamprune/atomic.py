"""Atomic replacement of output directories: readers see the old one or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import time
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
