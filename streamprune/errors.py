"""streamprune's own errors: one base class, and a few kinds that say what went wrong.

Each is also a ValueError (except where noted), so `except ValueError` written before they
existed keeps working. The command line reports any of them in one line, exit status 2.
"""

from __future__ import annotations


class StreamPruneError(Exception):
    """Base of every error streamprune raises on purpose (bad settings, bad data, a damaged run)."""


class SettingsError(StreamPruneError, ValueError):
    """Settings or arguments that cannot work; names each field."""


class InputError(StreamPruneError, ValueError):
    """Input data that cannot be used: a shard, a sample, a user's file; names it."""


class DamagedRunError(StreamPruneError, ValueError):
    """A run directory's files are missing, damaged or disagree with each other; names the file."""


class NewerFormatError(DamagedRunError):
    """A file written by a newer streamprune (its format version is higher than this one reads)."""


def check_format(doc: dict, fmt: str, version: int, where: str) -> dict:
    """A format document's header checked: `format` must be `fmt` and `version` at most `version`."""
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise DamagedRunError(f"{where} is not a {fmt} file")
    found = doc.get("version", 0)
    if not isinstance(found, int) or found > version:
        raise NewerFormatError(
            f"{where} was written by a newer streamprune (format {fmt} version {found}; this "
            f"one reads up to {version}): upgrade streamprune"
        )
    return doc
