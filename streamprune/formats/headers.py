"""Format headers of every versioned file streamprune writes and their check on read: defined
once so that writers and readers agree (the stores' no-value markers are in `scoring.columns`).

Standard library only: the loader imports it (through the keep-list) without Ray or Zarr.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from streamprune.errors import DamagedRunError, NewerFormatError


@dataclass(frozen=True)
class Format:
    """A file format: the `format` name it writes and the highest `version` this streamprune reads.

    `headerless`: files written before the format named itself (no `format` key) are read too.
    """

    name: str
    version: int | None  # None: unversioned (only the name is written)
    headerless: bool = False


INDEX_FORMAT = Format("streamprune-index", 1)  # RUN/index/manifest.json
STATS_FORMAT = Format("streamprune-stats", 1)  # RUN/stats.zarr group attributes
KEEP_FORMAT = Format("streamprune-keep", 1)  # keep-list manifest.json
CLASSES_FORMAT = Format("streamprune-classes", 1)  # RUN/classes.json
SCORES_FORMAT = Format("streamprune-scores", 1, headerless=True)  # RUN/scores.zarr attributes (0.1.0 wrote none)
RESHARD_FORMAT = Format("streamprune-reshard", None)  # reshard output's reshard.json


def header(fmt: Format, *, stamp: bool = True) -> dict[str, Any]:
    """The header fields a file of `fmt` starts with; `stamp` adds the writing streamprune's
    version and the time (UTC)."""
    out: dict[str, Any] = {"format": fmt.name}
    if fmt.version is not None:
        out["version"] = fmt.version
    if stamp:
        from streamprune import __version__

        out["streamprune_version"] = __version__
        out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def check_format(doc: object, fmt: Format, where: str) -> dict[str, Any]:
    """`doc` when its header is one of `fmt` this streamprune reads. A newer version is a
    `NewerFormatError`, any other header a `DamagedRunError`; both name `where` (the file)."""
    if not isinstance(doc, dict):
        raise DamagedRunError(f"{where} is not a {fmt.name} file (its content is not a JSON object)")
    if fmt.headerless and "format" not in doc:
        return doc
    if doc.get("format") != fmt.name:
        raise DamagedRunError(f"{where} is not a {fmt.name} file (format {doc.get('format')!r})")
    if fmt.version is None:
        return doc
    found = doc.get("version")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise DamagedRunError(f"{where} has no valid format version ({found!r}): its header is damaged")
    if found > fmt.version:
        raise NewerFormatError(
            f"{where} was written by a newer streamprune (format {fmt.name} version {found}; this "
            f"one reads up to {fmt.version}): upgrade streamprune"
        )
    return doc
