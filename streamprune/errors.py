"""streamprune's own errors: one base class, and a few kinds that say what went wrong.

Each is also a ValueError (except where noted), so `except ValueError` written before they
existed keeps working. The command line reports any of them in one line, exit status 2.
"""

from __future__ import annotations


class StreamPruneError(Exception):
    """Base of every error streamprune raises on purpose (bad settings, bad data, a damaged run)."""


class SettingsError(StreamPruneError, ValueError):
    """Settings or arguments that cannot work; names each field (`problems`: one line per field)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class InputError(StreamPruneError, ValueError):
    """Input data that cannot be used: a shard, a sample, a user's file; names it."""


class ChangedShardError(InputError):
    """A shard differs from the one that was indexed (its size, or the sample at a recorded
    position): index it again. Names the shard."""


class DamagedRunError(StreamPruneError, ValueError):
    """A run directory's files are missing, damaged or disagree with each other; names the file."""


class NewerFormatError(DamagedRunError):
    """A file written by a newer streamprune (its format version is higher than this one reads)."""
