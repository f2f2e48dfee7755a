"""How an output directory (the index, a keep-list, a scores or stats store) is replaced whole,
so that readers see the old one or the new one, never a mix.

- Local paths: the new directory is built beside the output and swapped in by renames
  (`atomic.swap_in`).
- Object stores have no rename: the new content is written data-first under a new
  generation, `OUTPUT/g-<time>-<token>/`, then committed by one small object,
  `OUTPUT/COMMIT` (`{"generation": ...}`), written in one request. Readers go through
  `committed(OUTPUT)` and so see only committed generations; an uncommitted one (of a killed
  writer) is invisible and removed by the next writer (`clean_uncommitted`, under the
  output's lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats.atomic import clean_stale_temps, swap_in, temp_sibling

COMMIT = "COMMIT"
_GENERATION = "g-"


def commit_object(output: str | os.PathLike[str]) -> str:
    """The object that commits `output` on an object store."""
    return storage.join(output, COMMIT)


def committed(output: str | os.PathLike[str]) -> str:
    """Where the committed content of `output` is: `output` itself locally, its committed
    generation on an object store. FileNotFoundError (naming `output`) when nothing is committed."""
    if not storage.is_url(output):
        return storage.local_path(output)
    marker = commit_object(output)
    try:
        raw = storage.read_bytes(marker)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(output)}: not written (no {COMMIT} object)") from None
    try:
        generation = json.loads(raw)["generation"]
        if not (isinstance(generation, str) and generation.startswith(_GENERATION) and "/" not in generation):
            raise ValueError(generation)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedRunError(f'{marker}: not a commit object (expected {{"generation": "g-..."}})') from None
    return storage.join(output, generation)


def is_committed(output: str | os.PathLike[str]) -> bool:
    """Whether `output` has committed content (locally: whether it exists)."""
    if not storage.is_url(output):
        return os.path.exists(storage.local_path(output))
    return storage.exists(commit_object(output))


@contextlib.contextmanager
def replacing(output: str | os.PathLike[str]) -> Iterator[str]:
    """Write a new `output` whole: yields the (empty) place to write it; on success it replaces
    `output` at once, on an error it is removed and `output` is left as it was. Hold the output's
    lock around it."""
    if not storage.is_url(output):
        path = Path(storage.local_path(output))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        tmp.mkdir()
        try:
            yield str(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_in(tmp, path)
        return
    generation = f"{_GENERATION}{time.time_ns():020d}-{secrets.token_hex(4)}"
    place = storage.join(output, generation)
    try:
        yield place
    except BaseException:
        storage.remove(place)
        raise
    storage.write_bytes(commit_object(output), json.dumps({"generation": generation}).encode())
    clean_uncommitted(output)


def clean_uncommitted(output: str | os.PathLike[str]) -> list[str]:
    """Remove what killed writers of `output` left (temporaries locally, uncommitted and superseded
    generations on an object store); return what was removed. Call it holding the output's lock."""
    if not storage.is_url(output):
        return [str(p) for p in clean_stale_temps(storage.local_path(output))]
    try:
        keep = storage.name(committed(output))
    except FileNotFoundError:
        keep = None
    removed = []
    for entry in storage.names(output):
        if entry.startswith(_GENERATION) and entry != keep:
            storage.remove(storage.join(output, entry))
            removed.append(storage.join(output, entry))
    return removed


def remove_output(output: str | os.PathLike[str]) -> None:
    """Remove `output` so that readers see it whole or not at all: its COMMIT object first on an
    object store; locally it is renamed aside, then removed. Hold the output's lock."""
    if storage.is_url(output):
        storage.remove(commit_object(output))
        storage.remove(output)
        return
    path = Path(storage.local_path(output))
    if path.exists():
        aside = temp_sibling(path, "old")
        path.rename(aside)
        shutil.rmtree(aside)
