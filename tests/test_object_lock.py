"""The writer lock of object-store outputs (streamprune/formats/object_lock.py) against a real S3
server (moto's server mode, the `s3_server` fixture): refusal naming the holder, release,
takeover of a killed writer's stale lease, a race for it, renewal, `lock_holder`, re-entrance,
the lease setting; and the local `fcntl` lock, which URL outputs must leave as it was."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from streamprune import storage
from streamprune.errors import SettingsError
from streamprune.formats import object_lock
from streamprune.formats.atomic import lock_holder, output_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """This module's own bucket on the session's S3 server."""
    return s3_server.make_bucket("object-lock-tests")


@pytest.fixture
def out(bucket, request) -> str:
    """An output URL of this test's own (`s3://bucket/<test>/stats.zarr`)."""
    return f"{bucket}/{request.node.name.replace('[', '-').replace(']', '')}/stats.zarr"


def folder_of(out: str) -> str:
    """The lock folder of `out`, spelled out as the design names it."""
    parent, _, name = out.rpartition("/")
    return f"{parent}/.{name}.lock"


def put_lease(out: str, number: int, owner: str, expires: float) -> None:
    """Write lease `number` by hand, as another writer (or a killed one) would have left it."""
    data = json.dumps({"owner": owner, "token": f"hand-{number}", "expires": expires}).encode()
    storage.write_bytes(f"{folder_of(out)}/{number:012d}", data, exclusive=True)


def me(writer: str) -> str:
    """Our owner string for `writer`."""
    return f"{writer}, pid {os.getpid()} on host {socket.gethostname()}"


def test_lock_folder_is_the_hidden_sibling_of_the_output():
    assert object_lock.lock_folder("s3://b/run/stats.zarr") == "s3://b/run/.stats.zarr.lock"
    assert object_lock.lock_folder("s3://b/run/keep/") == "s3://b/run/.keep.lock"
    with pytest.raises(SettingsError, match="a bucket and a name"):
        object_lock.lock_folder("s3://b")


def test_another_process_is_refused_naming_the_holder_then_acquires_after_release(out):
    code = (
        "from streamprune.formats.atomic import output_lock\n"
        f"with output_lock({out!r}, writer='reduce'):\n"
        "    print('acquired')\n"
    )

    def second() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)

    with output_lock(out, writer="record"):
        assert storage.names(folder_of(out)) == ["000000000000"]
        refused = second()
        assert refused.returncode != 0
        message = refused.stderr.strip().splitlines()[-1]
        assert "SettingsError" in message and f"another process is writing {out!r}" in message
        assert me("record") in message and folder_of(out) in message  # who holds it, and where
        assert "wait for it to finish, or for the lease to expire" in message
        assert "expires 20" in message  # when the lease expires (a UTC date)
    assert storage.names(folder_of(out)) == []  # released: every lease object gone
    acquired = second()
    assert acquired.returncode == 0, acquired.stderr[-2000:]
    assert acquired.stdout.strip() == "acquired"
    assert storage.names(folder_of(out)) == []


def test_a_stale_lease_of_a_killed_writer_is_taken_over(out):
    put_lease(out, 0, "record, pid 999 on host gone", time.time() - 5)
    assert lock_holder(out) is None  # expired: no one is writing
    with output_lock(out, writer="reduce"):
        assert storage.names(folder_of(out)) == ["000000000000", "000000000001"]
        assert lock_holder(out) == me("reduce")
    assert storage.names(folder_of(out)) == []  # ours and the stale one removed


def test_an_unreadable_lease_counts_as_stale(out):
    storage.write_bytes(f"{folder_of(out)}/000000000000", b"not json", exclusive=True)
    with output_lock(out, writer="index"):
        assert lock_holder(out) == me("index")
    assert storage.names(folder_of(out)) == []


@pytest.mark.parametrize("round_", range(4))
def test_two_writers_racing_for_a_stale_lease_exactly_one_wins(out, round_):
    put_lease(out, 3, "record, pid 999 on host gone", time.time() - 5)
    start = threading.Barrier(2)
    tried = threading.Barrier(2, timeout=60)  # the winner holds the lock until both have tried
    won: list[str] = []
    refused: dict[str, str] = {}

    def writer(name: str) -> None:
        start.wait()
        try:
            with output_lock(out, writer=name):
                won.append(name)
                tried.wait()
        except SettingsError as exc:
            refused[name] = str(exc)
            tried.wait()

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 1, (won, refused)
    ((loser, message),) = refused.items()
    assert loser != won[0]
    assert me(won[0]) in message  # the loser names the winner
    assert storage.names(folder_of(out)) == []


def test_a_live_lower_lease_makes_a_taker_back_off(out):
    put_lease(out, 0, "record, pid 12 on host alive", time.time() + 60)  # renewed late by a slow holder
    put_lease(out, 1, "record, pid 13 on host gone", time.time() - 5)
    with pytest.raises(SettingsError, match="record, pid 12 on host alive"), output_lock(out, writer="reduce"):
        pytest.fail("two writers held the lock")
    assert storage.names(folder_of(out)) == ["000000000000", "000000000001"]  # our lease 2 removed


@pytest.mark.slow  # seconds: processes, DataLoader workers or waits on the S3 server
def test_renewal_keeps_a_short_lease_alive_past_its_first_expiry(out, monkeypatch):
    monkeypatch.setenv(object_lock.LEASE_ENV, "2")
    with output_lock(out, writer="record"):
        first = object_lock.read_lease(folder_of(out), "000000000000")
        assert first is not None and first.expires - time.time() <= 2
        time.sleep(first.expires - time.time() + 1.5)  # well past the first expiry
        now = object_lock.read_lease(folder_of(out), "000000000000")
        assert now is not None and now.live() and now.expires > first.expires and now.token == first.token
        assert lock_holder(out) == me("record")
        with pytest.raises(SettingsError, match="another process is writing"):
            object_lock.acquire(out, writer="reduce")
    assert storage.names(folder_of(out)) == []


def test_a_writer_taken_over_stops_renewing_and_says_so_on_release(out, monkeypatch):
    monkeypatch.setenv(object_lock.LEASE_ENV, "2")
    holding = object_lock.acquire(out, writer="record")
    put_lease(out, 1, "reduce, pid 77 on host other", time.time() + 60)  # took over while we stalled
    deadline = time.time() + 10
    while holding.lost is None and time.time() < deadline:
        time.sleep(0.1)
    assert holding.lost is not None and "taken over by reduce, pid 77 on host other" in holding.lost
    assert holding.thread is not None
    holding.thread.join(5)
    assert not holding.thread.is_alive()  # renewal stopped
    why = object_lock.release(holding)
    assert why == holding.lost
    assert storage.names(folder_of(out)) == ["000000000001"]  # the new holder's lease is left alone
    assert lock_holder(out) == "reduce, pid 77 on host other"


def test_leaving_a_lock_that_was_taken_over_raises(out):
    with pytest.raises(SettingsError, match="lost the lock of .*taken over by reduce, pid 77"):
        with output_lock(out, writer="record"):
            put_lease(out, 1, "reduce, pid 77 on host other", time.time() + 60)
    with pytest.raises(RuntimeError, match="the body failed") as info, output_lock(f"{out}-2", writer="record"):
        put_lease(f"{out}-2", 1, "reduce, pid 78 on host other", time.time() + 60)
        raise RuntimeError("the body failed")
    assert any("lost the lock" in note for note in getattr(info.value, "__notes__", []))


def test_lock_holder_names_the_live_owner_only(out):
    assert lock_holder(out) is None
    with output_lock(out, writer="record"):
        assert lock_holder(out) == me("record")
    assert lock_holder(out) is None
    with output_lock(out):
        assert lock_holder(out) == me("")[2:]  # no writer: 'pid P on host H'


def test_reentrant_in_the_same_thread_only(out):
    with output_lock(out, writer="reduce"):
        with output_lock(out, reentrant=True), output_lock(out, reentrant=True):
            assert storage.names(folder_of(out)) == ["000000000000"]  # no second lease
        assert lock_holder(out) == me("reduce")  # still held after the nested ones left
        with pytest.raises(SettingsError, match="another process is writing"):
            with output_lock(out):  # not re-entrant: refused, as locally
                pass
        other: list[BaseException] = []

        def elsewhere() -> None:
            try:
                with output_lock(out, reentrant=True):
                    pass
            except SettingsError as exc:
                other.append(exc)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join(60)
        assert len(other) == 1 and me("reduce") in str(other[0])  # another thread is refused
    assert storage.names(folder_of(out)) == []


@pytest.mark.parametrize("value", ["abc", "0", "-5", "0.5", "nan", "inf"])
def test_a_bad_lease_setting_is_a_clear_error(out, monkeypatch, value):
    monkeypatch.setenv(object_lock.LEASE_ENV, value)
    with pytest.raises(SettingsError, match=f"STREAMPRUNE_LOCK_LEASE={value!r}: the lock lease must be a number"):
        with output_lock(out):
            pass
    assert storage.names(folder_of(out)) == []


def test_the_lease_setting(monkeypatch):
    monkeypatch.delenv(object_lock.LEASE_ENV, raising=False)
    assert object_lock.lease_seconds() == 120
    monkeypatch.setenv(object_lock.LEASE_ENV, " 30.5 ")
    assert object_lock.lease_seconds() == 30.5


def test_local_outputs_keep_the_fcntl_lock_file(tmp_path):
    out = tmp_path / "keep"
    with output_lock(out, writer="reduce"):
        lock = tmp_path / ".keep.lock"
        assert lock.read_text().strip() == me("reduce")  # the lock file, as before
        assert lock_holder(out) == me("reduce")
        with pytest.raises(SettingsError, match=f"another process is writing {str(out)!r}"), output_lock(out):
            pass
        with output_lock(out, reentrant=True):
            pass
    assert lock_holder(out) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.lock"]  # no lease folder locally
