"""Progress output: a live bar on a terminal, plain lines at a bounded rate in logs (no carriage returns)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from streamprune.progress import progress_bar

STREAMPRUNE = str(Path(sys.executable).with_name("streamprune"))


def test_a_command_logging_to_a_file_writes_plain_lines_without_carriage_returns(tmp_path):
    done = subprocess.run(
        [STREAMPRUNE, "make-shards", "--out", str(tmp_path / "s"), "--limit", "1200", "--shards", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("write shards:")]
    assert 2 <= len(lines) <= 3  # the start, the end, no frame in between for a run this short
    assert "100%" in lines[-1] and "3/3" in lines[-1]


def test_a_bar_that_does_not_stay_still_logs_its_last_state(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        bar = progress_bar(desc="verify", unit="chunk", leave=False, stream=f)
        bar.update(50)
        bar.close()
    lines = log.read_text().splitlines()
    assert lines[0].startswith("verify:") and "0/?" in lines[0]
    assert lines[-1].startswith("verify:") and "50/?" in lines[-1] and len(lines) == 2


def test_a_terminal_gets_a_live_bar():
    master, replica = pty.openpty()
    try:
        with os.fdopen(replica, "w") as tty:
            bar = progress_bar(total=3, desc="index", unit="shard", stream=tty, mininterval=0)
            for _ in range(3):
                bar.update(1)
            bar.close()
        chunks = []
        while True:  # a pty hands its output over in pieces; EIO once all is read (the writer closed)
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = b"".join(chunks).decode()
    finally:
        os.close(master)
    assert "\r" in out and "index: 100%" in out  # redrawn in place
