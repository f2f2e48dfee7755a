"""Progress of long work: a live tqdm bar on a terminal; in logs (CI, Ray job logs, a file) one
plain line at the start, then at most one every LOG_INTERVAL seconds, and one at the end,
never the carriage-return frames a bar draws."""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines when the output is not a terminal


class _Lines:
    """A stream under a line-mode bar: drops tqdm's bare `\\r` and newline writes."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LineBar(tqdm):
    """A bar that prints each refresh as one complete line."""

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        self.fp.write(msg or str(self))  # "" (clear a bar that does not stay): its last state, in a log
        self.fp.flush()


def progress_bar(iterable: Any = None, *, disable: bool = False, stream: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) on `stream` (default stderr): live on a terminal, plain lines
    at a bounded rate otherwise, nothing when `disable`."""
    stream = sys.stderr if stream is None else stream
    if disable or _is_terminal(stream):
        return tqdm(iterable, disable=disable, file=stream, **kwargs)
    kwargs.setdefault("bar_format", "{l_bar}{r_bar}")
    return _LineBar(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, **kwargs)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
