"""`streamprune.storage`: the same answers for a local path, a `file://` URL and an `s3://` URL on
a real S3 server (moto's, on 127.0.0.1)."""

import pytest

from streamprune import storage


def test_local_paths_file_urls_and_s3_read_write_list_and_remove_alike(s3_server, tmp_path):
    bucket = s3_server.make_bucket("storage-basics")
    for root in (bucket + "/run", str(tmp_path / "run"), "file://" + str(tmp_path / "run2")):
        f = storage.join(root, "x", "a.bin")
        storage.write_bytes(f, b"hello", exclusive=True)
        with pytest.raises(FileExistsError, match="a.bin"):
            storage.write_bytes(f, b"again", exclusive=True)
        assert storage.read_bytes(f) == b"hello"
        assert storage.read_bytes(f, 1, 3) == b"el"
        assert storage.names(storage.join(root, "x")) == ["a.bin"]
        assert storage.exists(f) and storage.size(f) == 5
        storage.write_bytes(f, b"replaced")
        assert storage.read_bytes(f) == b"replaced"
        storage.remove(storage.join(root, "x"))
        assert not storage.exists(f)
        assert storage.names(storage.join(root, "x")) == []
        with pytest.raises(FileNotFoundError, match="a.bin"):
            storage.read_bytes(f)


def test_schemes():
    assert storage.scheme("s3://b/run") == "s3" and storage.is_url("gs://b/x")
    assert not storage.is_url("/tmp/run") and not storage.is_url("file:///tmp/run")
    assert not storage.is_url("run/a://b")
    assert storage.local_path("file:///tmp/run") == "/tmp/run"
    assert storage.join("s3://b/run/", "keep", "m.json") == "s3://b/run/keep/m.json"
    assert storage.name("s3://b/run/keep/") == "keep"
