"""`formats.commit`: an output replaced whole, locally (renames) and on a real S3 server
(generations committed by one object): readers see the old content or the new, never a mix,
and a writer that fails leaves the old content readable."""

import pytest

from streamprune import storage
from streamprune.formats.commit import COMMIT, clean_uncommitted, committed, is_committed, replacing


def _roots(s3_server, tmp_path, name):
    return [str(tmp_path / name), s3_server.make_bucket("commit-tests") + "/" + name]


def _write(output, text):
    with replacing(output) as place:
        storage.write_bytes(storage.join(place, "a.txt"), text.encode())
        storage.write_bytes(storage.join(place, "b.txt"), text.encode())


def test_a_replaced_output_reads_whole_and_a_failed_writer_leaves_the_old_one(s3_server, tmp_path):
    for output in _roots(s3_server, tmp_path, "out"):
        assert not is_committed(output)
        with pytest.raises(FileNotFoundError, match="out"):
            if storage.is_url(output):
                committed(output)
            else:
                storage.read_bytes(storage.join(committed(output), "a.txt"))
        _write(output, "one")
        assert is_committed(output)
        assert storage.read_bytes(storage.join(committed(output), "a.txt")) == b"one"
        with pytest.raises(RuntimeError, match="killed"), replacing(output) as place:
            storage.write_bytes(storage.join(place, "a.txt"), b"half")
            raise RuntimeError("killed mid-write")
        assert storage.read_bytes(storage.join(committed(output), "a.txt")) == b"one"
        _write(output, "two")
        place = committed(output)
        assert [storage.read_bytes(storage.join(place, f)) for f in ("a.txt", "b.txt")] == [b"two", b"two"]
        if storage.is_url(output):
            assert sorted(storage.names(output)) == sorted([COMMIT, storage.name(place)])


def test_uncommitted_generations_of_a_killed_writer_are_invisible_and_cleaned(s3_server):
    output = s3_server.make_bucket("commit-tests") + "/killed"
    _write(output, "good")
    orphan = storage.join(output, "g-00000000000000000001-deadbeef")
    storage.write_bytes(storage.join(orphan, "a.txt"), b"half")  # what a kill -9 mid-write leaves
    assert storage.read_bytes(storage.join(committed(output), "a.txt")) == b"good"
    assert clean_uncommitted(output) == [orphan]
    assert storage.read_bytes(storage.join(committed(output), "a.txt")) == b"good"


def test_a_damaged_commit_object_is_named(s3_server):
    from streamprune.errors import DamagedRunError

    output = s3_server.make_bucket("commit-tests") + "/damaged"
    storage.write_bytes(storage.join(output, COMMIT), b'{"generation": "../../etc"}')
    with pytest.raises(DamagedRunError, match="damaged/COMMIT"):
        committed(output)
