"""Atomic replacement of output directories: readers see the old one or the new one, never a mix."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from streamprune import storage
from streamprune.errors import SettingsError
from streamprune.formats import object_lock
from streamprune.formats.held_locks import HELD

TEMP_TAGS = ("tmp", "old")  # `temp_sibling` tags: a new output being built, an old one being removed


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden sibling of `path` to build the new directory in."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{time.monotonic_ns()}")


def temp_pid(temp: Path, path: Path) -> int | None:
    """The pid in the name of a `temp_sibling` of `path` (None: not one of its temporaries)."""
    tags = "|".join(TEMP_TAGS)
    m = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:{tags})-(\d+)-\d+", temp.name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries (`temp_sibling`s) of output `path` left by killed writers; return them.

    Call it while holding `output_lock(path)`: every writer of `path` holds that lock, so the
    temporaries of any other process are stale (its process is dead, or gave the lock up).
    This process's own (being written) are kept. Should `path` itself be missing (a writer
    killed between the two renames of a swap without `renameat2`), the newest `.old-` sibling
    (the last complete output) is renamed back first: nothing complete is ever removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    temps = [(t, pid) for t in path.parent.iterdir() if (pid := temp_pid(t, path)) is not None]
    if not os.path.lexists(path):
        olds = [t for t, _ in temps if t.name.startswith(f".{path.name}.old-")]
        if olds:
            newest = max(olds, key=lambda t: int(t.name.rsplit("-", 1)[1]))
            os.rename(newest, path)
            temps = [(t, pid) for t, pid in temps if t != newest]
    removed = []
    for temp, pid in temps:
        if pid == os.getpid():
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        removed.append(temp)
    return removed


def named_os_error(exc: OSError, file: str | os.PathLike[str]) -> OSError:
    """`exc` naming `file` when it names none (writes into open files report no name)."""
    if exc.filename is not None:
        return exc
    new = OSError(exc.errno, exc.strerror or os.strerror(exc.errno or errno.EIO), str(file))
    new.__cause__ = exc
    return new


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _renameat2() -> Callable[..., int] | None:
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_exchange_fn = _renameat2() if os.name == "posix" else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`);
    False where the system or file system cannot."""
    if _exchange_fn is None:
        return False
    import ctypes

    if _exchange_fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, path: Path) -> None:
    """Replace directory `path` with the complete directory `tmp` by renames only.

    Where the system can, the two are exchanged in one step, so `path` never goes missing
    (the old contents land under `tmp`'s name and are removed); else `path` is renamed to an
    `.old-` sibling first, and `clean_stale_temps` renames it back if a kill came in between.
    """
    if path.exists():
        if _exchange(tmp, path):
            shutil.rmtree(tmp)
            return
        old = temp_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def _lock_file(path: Path) -> Path:
    """The lock file of output `path`: `.NAME.lock` beside it."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str], reentrant: bool = False, writer: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on output `path` (a sibling `.NAME.lock` file) while writing it.

    A second writer of the same output is refused at once, naming the holder (`writer`, its pid
    and host, which the lock file holds while locked) instead of racing (a second holder in this
    process too). `reentrant=True`: already held by this thread (e.g. `reduce` around its
    `KeepListWriter`), go on without locking again. An object-store URL output is locked by
    leases in the sibling folder `.NAME.lock/` instead (`object_lock.output_lock`).
    """
    if storage.is_url(path):
        with object_lock.output_lock(os.fspath(path), reentrant=reentrant, writer=writer):
            yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_file(path)
    key = (os.path.realpath(lock), threading.get_ident())  # re-entrant per thread: other threads are refused
    if HELD.reenter(key, reentrant):
        with HELD.nested(key):
            yield
        return
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            raise SettingsError(
                f"another process is writing {str(path)!r} ({holder + '; ' if holder else ''}lock "
                f"{str(lock)!r}); wait for it to finish or choose another output"
            ) from None
        f.truncate(0)  # appends now write from the start
        f.write(", ".join(filter(None, [writer, f"pid {os.getpid()} on host {socket.gethostname()}"])) + "\n")
        f.flush()
        HELD.hold(key)
        try:
            yield
        finally:
            HELD.drop(key)
            f.truncate(0)  # no holder to name
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f: IO[str]) -> str:
    """Who holds the lock file `f` as its holder wrote it ('record, pid 12 on host h'; '' if not yet)."""
    f.seek(0)
    return f.read().strip()


def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who is writing output `path` now, under `output_lock` ('record, pid 12 on host h'; '' when it
    has not said yet), or None when no one is. For an object-store URL: the owner of its live lease."""
    if storage.is_url(path):
        return object_lock.lock_holder(os.fspath(path))
    try:
        f = open(_lock_file(Path(path)))  # noqa: SIM115 (closed by the `with f` below, once it is known to exist)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(f)
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
