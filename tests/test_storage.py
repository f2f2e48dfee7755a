import pytest
from streamprune import storage
def test_storage(s3_server, tmp_path):
    b = s3_server.make_bucket("storage-smoke")
    for root in (b + "/run", str(tmp_path / "run"), "file://" + str(tmp_path / "run2")):
        f = storage.join(root, "x", "a.bin")
        storage.write_bytes(f, b"hello", exclusive=True)
        with pytest.raises(FileExistsError, match="a.bin"):
            storage.write_bytes(f, b"again", exclusive=True)
        assert storage.read_bytes(f, 1, 3) == b"el"
        assert storage.names(storage.join(root, "x")) == ["a.bin"]
        assert storage.exists(f) and storage.size(f) == 5
        storage.remove(storage.join(root, "x"))
        assert not storage.exists(f)
        with pytest.raises(FileNotFoundError, match="a.bin"):
            storage.read_bytes(f)
