"""Where Ray's own output goes: into a log file (`RUN/logs/ray.log` for `streamprune`'s commands)
instead of the terminal.

Ray prints its workers' and actors' output on the driver's terminal, its own error-level lines
among them on successful runs (a `core_worker.cc` line about Ray Train's `PreemptionWatcher`,
Ray Train's retries with their tracebacks). While `routed_to(path)` is active, that output and
the driver's `ray` logger go to `path` instead; streamprune's own messages stay on the terminal.
This module does not import Ray: `ensure_ray` calls `attach` once Ray runs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

_RAY_PRINTER = "ray_print_logs"  # the name of Ray's own handler of worker output (prints it)
_OURS = "streamprune_ray_log"


class _Route:
    """The file that Ray's output goes to, and what it replaced (put back by `close`)."""

    def __init__(self, path: str):
        self.path = path
        self.file: IO[str] | None = None
        self.printer: Any = None
        self.ray_handlers: list[logging.Handler] = []
        self.ray_propagate = True

    def write(self, data: dict) -> None:
        """One batch of a worker's lines (Ray's log record), each with the worker's name and pid."""
        if self.file is None:
            return
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status every few seconds: only its events, as Ray prints
            from ray._private.worker import filter_autoscaler_events

            lines = filter_autoscaler_events(lines)
        name, pid = data.get("actor_name") or data.get("task_name"), data.get("pid")
        prefix = f"({name} pid={pid})" if name else f"(pid={pid})"
        self.file.writelines(f"{prefix} {line}\n" for line in lines)

    def open(self) -> None:
        """Send Ray's output here from now on (once)."""
        if self.file is not None:
            return
        try:  # Ray's private hook (checked against Ray 2.60): without it, Ray prints as it always did
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (held until `close`)
        self.file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)} (pid {os.getpid()})\n")
        self.printer = dict(dispatcher.handlers).get(_RAY_PRINTER)
        dispatcher.remove_handler(_RAY_PRINTER)
        dispatcher.add_handler(_OURS, self.write)
        ray_logger = logging.getLogger("ray")
        self.ray_handlers, self.ray_propagate = list(ray_logger.handlers), ray_logger.propagate
        handler = logging.StreamHandler(self.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.handlers, ray_logger.propagate = [handler], False

    def close(self) -> None:
        """Put Ray's printing back as it was and close the file."""
        if self.file is None:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(_OURS)
        if self.printer is not None:
            dispatcher.add_handler(_RAY_PRINTER, self.printer)
        ray_logger = logging.getLogger("ray")
        ray_logger.handlers, ray_logger.propagate = self.ray_handlers, self.ray_propagate
        self.file.close()
        self.file = None


_route: _Route | None = None


@contextmanager
def routed_to(path: str) -> Iterator[None]:
    """While active, the output of Ray's workers and actors and the driver's `ray` logger go to
    the file `path` (appended; created, with its folder, only once Ray runs)."""
    global _route
    previous, route = _route, _Route(path)
    _route = route
    try:
        yield
    finally:
        route.close()
        _route = previous


def attach() -> None:
    """Route Ray's output to the active `routed_to` file, if any (Ray must be initialised)."""
    if _route is not None:
        _route.open()


def tail(path: str, lines: int = 20) -> list[str]:
    """The last `lines` lines of the file `path` (none when it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except FileNotFoundError:
        return []
