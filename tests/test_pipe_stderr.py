"""`pipe:` commands that write to stderr: a real shell command writing megabytes there does not
stall `index` or the loader, and a failing command's error ends with its last words."""

from __future__ import annotations

import os
import time

import pytest
import webdataset as wds

from streamprune import KeepList, PrunedWebDataset
from streamprune.shards.scan import scan_shard


@pytest.mark.timeout(30)
def test_megabytes_on_stderr_then_a_shard_on_stdout(uneven_shards):
    paths, _ = uneven_shards
    name = os.path.basename(paths[0])
    url = f"pipe:head -c 2000000 /dev/zero >&2; cat {paths[0]}"  # 2 MB: far past a pipe's 64 KiB buffer
    ref = [s["__key__"] for s in wds.WebDataset(paths[0], shardshuffle=False)]
    t0 = time.monotonic()
    scan = scan_shard(url, name)
    assert scan.status == "ok" and scan.keys == ref, scan.error
    keep = KeepList.from_keys([(name, k) for k in ref[::3]])
    got = list(PrunedWebDataset(url, keep=keep, shardshuffle=False))
    assert [s["__key__"] for s in got] == ref[::3]
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
def test_a_failing_command_is_named_with_the_tail_of_its_stderr(uneven_shards):
    paths, _ = uneven_shards
    noise = "head -c 20000 /dev/zero | tr '\\0' x >&2"  # under the pipe's buffer, over the kept tail
    url = f"pipe:echo first-words >&2; {noise}; echo last-words >&2; cat {paths[0]}; exit 3"
    scan = scan_shard(url, "train-000000.tar")
    assert scan.status == "broken"
    said = scan.error.split("exited with status 3: ", 1)[1]  # after the URL, which holds the command
    assert said.endswith("last-words") and "first-words" not in said and len(said) <= 4096, scan.error
