"""The writer lock of an output in an object store (`s3://`, `gs://`, ...): leases, not `flock`.

Object stores have no locks and no rename, but they do have a conditional create
(`storage.write_bytes(exclusive=True)`: S3's `If-None-Match: *`), which exactly one of several
racing writers wins. The lock of output `OUT` is the folder `.NAME.lock/` beside it (for
`s3://b/run/stats.zarr`: `s3://b/run/.stats.zarr.lock/`, the local lock file's name). It holds
lease objects named by a zero-padded sequence number (`000000000000`, `000000000001`, ...),
each `{"owner": "record, pid 12 on host h", "token": ..., "expires": unix time}`, and the
holder is the one with the highest number:

- acquire: list the folder. None: create `000000000000`. The highest live: refused at once,
  naming its owner and when its lease expires. The highest expired (its writer was killed, or
  stalled past its lease): create the next number; only one racer's create can succeed, and
  the losers are refused naming the winner. After creating, list again: if another lease is
  higher, or any other lease is still live, ours is deleted and we are refused (so that two
  writers never both hold it, even one whose listing was stale; both may be refused instead).
- hold: a daemon thread rewrites our lease with a new `expires` every lease/3 seconds. If it
  finds a higher lease, or ours gone, we were taken over (we stalled past our lease): it
  stops renewing and records that, and leaving the lock raises `SettingsError` saying so
  (the output may have had two writers). It cannot stop the writing body in between.
- release: stop renewing, check once more that we still hold it, delete the older leases
  and then ours (an empty folder is no object at all).

Lease time: `STREAMPRUNE_LOCK_LEASE` seconds (default 120), the longest a killed writer
keeps others out. Leases are judged by the reader's clock: writers' clocks must agree to well
within a lease.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamprune import storage
from streamprune.errors import SettingsError
from streamprune.formats.held_locks import HELD

LEASE_ENV = "STREAMPRUNE_LOCK_LEASE"
DEFAULT_LEASE_S = 120.0
MIN_LEASE_S = 1.0  # renewal runs every lease/3: shorter leases would expire between two requests
_LEASE_NAME = re.compile(r"\d{12}")
_ATTEMPTS = 5  # list-and-read rounds before giving up when leases vanish under us (holders releasing)


def lock_folder(output: str) -> str:
    """The lock folder of URL output `output`: `.NAME.lock` beside it (the local lock's name)."""
    text = output.rstrip("/")
    parent, _, name = text.rpartition("/")
    if not name or "://" not in parent:
        raise SettingsError(f"{output!r}: an object-store output must be a URL with a bucket and a name")
    return f"{parent}/.{name}.lock"


def lease_seconds() -> float:
    """The lease time in seconds: `STREAMPRUNE_LOCK_LEASE`, or 120; a clear error for bad values."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < MIN_LEASE_S:
        raise SettingsError(
            f"{LEASE_ENV}={raw!r}: the lock lease must be a number of seconds, at least {MIN_LEASE_S:g} "
            f"(default {DEFAULT_LEASE_S:g})"
        )
    return value


def owner_text(writer: str | None) -> str:
    """Who we are, as the local lock file says it: 'record, pid 12 on host h'."""
    return ", ".join(filter(None, [writer, f"pid {os.getpid()} on host {socket.gethostname()}"]))


def lease_name(number: int) -> str:
    """The object name of lease `number` (zero-padded, so names sort as numbers)."""
    return f"{number:012d}"


@dataclass(frozen=True)
class Lease:
    """One lease object as read: its name, who wrote it, its token and when it expires."""

    name: str
    owner: str
    token: str
    expires: float

    def live(self, now: float | None = None) -> bool:
        """Whether the lease has not expired (by this machine's clock)."""
        return self.expires > (time.time() if now is None else now)

    def until(self) -> str:
        """When the lease expires, for messages ('2026-12-03 10:15:00 UTC, in 97 s')."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))
        left = self.expires - time.time()
        return f"{stamp}, in {left:.0f} s" if left > 0 else f"{stamp}, {-left:.0f} s ago"


def lease_bytes(owner: str, token: str, expires: float) -> bytes:
    """The JSON content of a lease object."""
    return json.dumps({"owner": owner, "token": token, "expires": expires}).encode()


def leases(folder: str) -> list[str]:
    """The lease names in lock folder `folder`, lowest first (other names are ignored)."""
    return [n for n in storage.names(folder) if _LEASE_NAME.fullmatch(n)]


def read_lease(folder: str, name: str) -> Lease | None:
    """Lease `name` of `folder` (None: it is gone, its holder released it).

    One that does not parse counts as expired: a writer puts a lease in one request, so such
    an object was not written by a live lock holder.
    """
    try:
        data = storage.read_bytes(storage.join(folder, name))
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
        return Lease(name, str(doc["owner"]), str(doc["token"]), float(doc["expires"]))
    except (ValueError, KeyError, TypeError):
        return Lease(name, f"an unreadable lease {name}", "", 0.0)


@dataclass
class Holding:
    """A lock this process holds: our lease, and the thread that renews it."""

    output: str
    folder: str
    name: str
    owner: str
    token: str
    lease_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lost: str | None = None  # why we no longer hold it (set by renewal or the release check)

    @property
    def location(self) -> str:
        """Our lease object's URL."""
        return storage.join(self.folder, self.name)


def _refusal(output: str, folder: str, holder: Lease) -> SettingsError:
    """The error for a lock held by someone else: who, where, and when the lease expires."""
    return SettingsError(
        f"another process is writing {output!r} ({holder.owner}; lock {folder!r}, lease "
        f"{holder.name} expires {holder.until()}); wait for it to finish, or for the lease to "
        "expire, or choose another output"
    )


def _highest(folder: str) -> tuple[list[str], Lease | None]:
    """The lease names of `folder` and the highest lease as read (None: no leases).

    Retries when the highest vanishes between listing and reading (its holder releasing).
    """
    for _ in range(_ATTEMPTS):
        names = leases(folder)
        if not names:
            return names, None
        top = read_lease(folder, names[-1])
        if top is not None:
            return names, top
    raise SettingsError(f"lock {folder!r}: its leases keep vanishing while being read; try again")


def _claim(output: str, folder: str, number: int, owner: str, lease_s: float) -> Holding:
    """Create lease `number` exclusively, then check that no other lease is higher or live.

    Refused (SettingsError naming the holder) if another writer created that number first,
    or holds the lock after all; our lease is deleted then.
    """
    token = uuid.uuid4().hex
    name = lease_name(number)
    location = storage.join(folder, name)
    try:
        storage.write_bytes(location, lease_bytes(owner, token, time.time() + lease_s), exclusive=True)
    except FileExistsError:
        winner = read_lease(folder, name)
        if winner is None:
            raise SettingsError(
                f"another process took the lock of {output!r} (lock {folder!r}) at the same time; try again"
            ) from None
        raise _refusal(output, folder, winner) from None
    now = time.time()
    for other in leases(folder):
        if other == name:
            continue
        lease = read_lease(folder, other)
        if lease is not None and (other > name or lease.live(now)):
            storage.remove(location)
            raise _refusal(output, folder, lease)
    return Holding(output, folder, name, owner, token, lease_s)


def acquire(output: str, writer: str | None = None) -> Holding:
    """Take the lock of URL output `output` and start renewing it; SettingsError if held."""
    lease_s = lease_seconds()
    folder = lock_folder(output)
    names, top = _highest(folder)
    if top is not None and top.live():
        raise _refusal(output, folder, top)
    number = int(names[-1]) + 1 if names else 0
    holding = _claim(output, folder, number, owner_text(writer), lease_s)
    holding.thread = threading.Thread(
        target=_renew_loop, args=(holding,), name=f"streamprune-lease {folder}", daemon=True
    )
    holding.thread.start()
    return holding


def _check(holding: Holding) -> str | None:
    """Why `holding` is no longer ours (a higher lease, or ours gone or rewritten), or None."""
    names = leases(holding.folder)
    if names and names[-1] > holding.name:
        top = read_lease(holding.folder, names[-1])
        who = top.owner if top is not None else f"lease {names[-1]}"
        return f"taken over by {who}"
    mine = read_lease(holding.folder, holding.name)
    if mine is None or mine.token != holding.token:
        return f"our lease {holding.name} was removed or replaced"
    return None


def renew(holding: Holding) -> bool:
    """Extend our lease by a full lease time, unless we were taken over (then record why).

    Returns whether we still hold the lock.
    """
    lost = _check(holding)
    if lost is not None:
        holding.lost = f"{lost} (this writer stalled past its {holding.lease_s:g} s lease)"
        return False
    expires = time.time() + holding.lease_s
    storage.write_bytes(holding.location, lease_bytes(holding.owner, holding.token, expires))
    return True


def _renew_loop(holding: Holding) -> None:
    """Renew `holding` every lease/3 seconds until released or taken over.

    A failed request (the store unreachable for a moment) is retried at the next tick; if
    requests keep failing, the lease lapses and the release check reports what happened.
    """
    while not holding.stop.wait(holding.lease_s / 3):
        try:
            if not renew(holding):
                return
        except Exception:  # noqa: BLE001 - a daemon thread: a failure must not end renewal for good
            continue


def release(holding: Holding) -> str | None:
    """Stop renewing, check we still hold the lock, delete the older leases and then ours.

    Returns why we had lost the lock (the caller reports it), or None.
    """
    holding.stop.set()
    if holding.thread is not None:
        holding.thread.join()
    if holding.lost is None:
        holding.lost = _check(holding)
        if holding.lost is not None:
            holding.lost += f" (this writer's {holding.lease_s:g} s lease lapsed)"
    for other in leases(holding.folder):
        if other < holding.name:
            storage.remove(storage.join(holding.folder, other))
    mine = read_lease(holding.folder, holding.name)
    if mine is not None and mine.token == holding.token:
        storage.remove(holding.location)
    return holding.lost


def _lost_error(holding: Holding, why: str) -> SettingsError:
    """The error raised on leaving a lock that was lost while held."""
    return SettingsError(
        f"lost the lock of {holding.output!r} while writing it ({why}; lock {holding.folder!r}): "
        "another writer may have written it at the same time; check it, or write it again"
    )


@contextlib.contextmanager
def output_lock(output: str, reentrant: bool = False, writer: str | None = None) -> Iterator[None]:
    """Hold the lease lock of URL output `output` while writing it (see the module docstring).

    As the local `atomic.output_lock`: a second writer (another thread of this process too) is
    refused at once naming the holder; `reentrant=True` goes on without locking again when this
    thread holds it already. Leaving raises SettingsError if the lock was taken over meanwhile
    (added as a note instead when the block raised).
    """
    folder = lock_folder(output)
    key = (folder, threading.get_ident())
    if HELD.reenter(key, reentrant):
        with HELD.nested(key):
            yield
        return
    holding = acquire(output, writer)
    HELD.hold(key)
    try:
        yield
    except BaseException as exc:
        try:
            why = _release_quietly(holding, key)
        except Exception as failed:  # noqa: BLE001 - keep the block's own error, say this one too
            exc.add_note(f"releasing the lock {holding.folder!r} failed too: {failed}")
            raise
        if why is not None:
            exc.add_note(str(_lost_error(holding, why)))
        raise
    why = _release_quietly(holding, key)
    if why is not None:
        raise _lost_error(holding, why)


def _release_quietly(holding: Holding, key: tuple[str, int]) -> str | None:
    """Forget `key` and release `holding`; why it was lost, or None."""
    HELD.drop(key)
    return release(holding)


def lock_holder(output: str) -> str | None:
    """Who is writing URL output `output` now ('record, pid 12 on host h'), or None: the owner
    of the highest lease while it is live."""
    _, top = _highest(lock_folder(output))
    return top.owner if top is not None and top.live() else None
