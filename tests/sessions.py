"""Ending a command started with `start_new_session=True`, with everything it started.

A command that starts its own local Ray instance leaves processes outside its process group:
Ray puts each worker in a group of its own, and an orphaned worker goes on training (and
writing to the run) until it notices that its raylet is gone. `kill_session` kills every
process of the command's session, as closing its terminal would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def session_processes(sid: int) -> list[int]:
    """The ids of the live processes in session `sid` (Linux: read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            pids.append(int(entry))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (started with `start_new_session=True`) and every process of its session."""
    for pid in session_processes(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
