"""The output locks this process holds, per (lock, thread), and how many times: shared by the
local lock (`atomic.output_lock`) and the object-store one (`object_lock.output_lock`), so that a
re-entrant hold in the same thread goes on without locking again and other threads are refused."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

Key = tuple[str, int]  # (the lock's location, the holding thread)


class HeldLocks:
    """Hold counts of this process's locks."""

    def __init__(self) -> None:
        self._counts: dict[Key, int] = {}
        self._guard = threading.Lock()

    def reenter(self, key: Key, reentrant: bool) -> bool:
        """With `reentrant`, whether `key` is held already (then counted once more)."""
        with self._guard:
            if reentrant and self._counts.get(key):
                self._counts[key] += 1
                return True
        return False

    @contextlib.contextmanager
    def nested(self, key: Key) -> Iterator[None]:
        """A re-entered hold of `key` (after `reenter` said True), given back when the block ends."""
        try:
            yield
        finally:
            with self._guard:
                self._counts[key] -= 1

    def hold(self, key: Key) -> None:
        """`key` is now held (once)."""
        with self._guard:
            self._counts[key] = 1

    def drop(self, key: Key) -> None:
        """`key` is no longer held."""
        with self._guard:
            self._counts.pop(key, None)


HELD = HeldLocks()
