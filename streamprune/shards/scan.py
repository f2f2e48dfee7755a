"""Scanning one shard: its samples' keys, identities and byte ranges, and each member's offset and size.

What a scan finds is stored by `formats.index` (`save_scan`, `write_index`); scanning every shard in
parallel is `stages.index`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from streamprune.shards.identity import SampleIdentity, id128
from streamprune.shards.opening import open_shard
from streamprune.shards.tarscan import CountingReader, TarFormatError, iter_samples

SCAN_ARRAYS = ("id_hi", "id_lo", "sample_start", "sample_end", "member_count", "member_offset", "member_size")
SCAN_DTYPES = {
    k: np.uint64 if k.startswith("id_") else np.int32 if k == "member_count" else np.int64 for k in SCAN_ARRAYS
}


@dataclass
class ShardScan:
    """What one shard holds: per sample its key, identity and byte range; per member offset and size."""

    name: str
    url: str
    status: str = "ok"  # ok | empty | broken
    error: str | None = None
    error_offset: int | None = None
    access: str | None = None  # headers (seeking past data) | through (every byte read)
    size: int | None = None  # stored size: the compressed file's for compressed shards
    bytes_read: int = 0  # read from storage (compressed bytes for compressed shards)
    compression: str | None = None  # "gzip", "bz2", "xz"; None: a plain tar
    keys: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.keys)

    def meta(self) -> dict:
        """The JSON-able part (everything but keys and arrays)."""
        d = asdict(self)
        del d["keys"], d["arrays"]
        if d["compression"] is None:  # plain tars: shard metadata as before compression was supported
            del d["compression"]
        d["samples"] = self.n
        return d


def scan_shard(url: str, name: str, identity: SampleIdentity | None = None) -> ShardScan:
    """Scan one shard. Corruption is recorded (status `broken`, no rows), never raised.

    With the default identity only tar headers are read; a custom identity reads the
    members it names. Compressed shards are read through, to the end of the compressed stream
    (its checksum is checked there); offsets are in the decompressed tar.
    """
    scan = ShardScan(name=name, url=url, arrays={k: np.zeros(0, SCAN_DTYPES[k]) for k in SCAN_ARRAYS})
    try:
        opened = open_shard(url)
    except OSError as exc:
        scan.status, scan.error = "broken", str(exc)
        return scan
    scan.size, scan.compression = opened.size, opened.compression
    stream, seekable = opened.header_stream() if identity is None else (opened.stream, opened.seekable)
    scan.access = "headers" if seekable else "through"
    reader = CountingReader(stream, seekable, opened.tar_size, name)
    read_exts = () if identity is None else identity.members
    cols: dict[str, list] = {k: [] for k in SCAN_ARRAYS}
    try:
        for sample in iter_samples(reader, read_exts):
            if identity is None:
                hi, lo = id128(name, sample.key)
            else:
                hi, lo = identity({"__key__": sample.key, "__shard__": name, **sample.data})
            scan.keys.append(sample.key)
            cols["id_hi"].append(hi)
            cols["id_lo"].append(lo)
            cols["sample_start"].append(sample.start)
            cols["sample_end"].append(sample.end)
            cols["member_count"].append(len(sample.members))
            cols["member_offset"].extend(m.header_offset for m in sample.members)
            cols["member_size"].extend(m.size for m in sample.members)
        if opened.compression is not None:  # the rest (padding) too: the stream's checksum is at its end
            while reader.read(1 << 20):
                pass
        opened.close(url)
    except (TarFormatError, ValueError, OSError) as exc:
        error: Exception = exc
        if opened.process is not None:  # a failed pipe command explains a broken stream best
            try:
                opened.close(url)
            except OSError as pipe_exc:
                error = pipe_exc
        scan.status, scan.error = "broken", str(error)
        scan.error_offset = getattr(error, "offset", None)
        scan.keys = []
    finally:
        scan.bytes_read = (
            opened.transfer.bytes_received if opened.transfer is not None else opened.stored_read(reader.bytes_read)
        )
        opened.release()
    if scan.status == "ok":
        scan.arrays = {k: np.array(v, dtype=SCAN_DTYPES[k]) for k, v in cols.items()}
        scan.status = "ok" if scan.keys else "empty"
    return scan
