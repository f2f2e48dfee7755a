"""The shard index `RUN/index`: which samples exist, their identity, row and byte ranges.

Pure NumPy + JSON (no Ray, no Zarr) so that the loader can read it cheaply. Scanning a
shard is `scan_shard`; building the index in parallel lives in `indexer`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.errors import DamagedRunError
from streamprune.formats.atomic import swap_in, temp_sibling
from streamprune.formats.headers import INDEX_FORMAT, check_format, header
from streamprune.formats.rundir import RunDir
from streamprune.shards.identity import SampleIdentity, find_duplicates, id128
from streamprune.shards.remote import HEADER_BLOCK, RangedReader
from streamprune.shards.tarscan import CountingReader, TarFormatError, iter_members, iter_samples
from streamprune.shards.urls import open_shard

_ARRAYS = ("id_hi", "id_lo", "sample_start", "sample_end", "member_count", "member_offset", "member_size")
_DTYPES = {k: np.uint64 if k.startswith("id_") else np.int32 if k == "member_count" else np.int64 for k in _ARRAYS}


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
    scan = ShardScan(name=name, url=url, arrays={k: np.zeros(0, _DTYPES[k]) for k in _ARRAYS})
    try:
        opened = open_shard(url)
    except OSError as exc:
        scan.status, scan.error = "broken", str(exc)
        return scan
    scan.size, scan.compression = opened.size, opened.compression
    stream, seekable = opened.stream, opened.seekable
    if opened.remote is not None and identity is None and _ranges_cheaper(opened.remote):
        stream, seekable = RangedReader(opened.remote), True
    scan.access = "headers" if seekable else "through"
    reader = CountingReader(stream, seekable, opened.tar_size, name)
    read_exts = () if identity is None else identity.members
    cols: dict[str, list] = {k: [] for k in _ARRAYS}
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
        scan.arrays = {k: np.array(v, dtype=_DTYPES[k]) for k, v in cols.items()}
        scan.status = "ok" if scan.keys else "empty"
    return scan


RANGED_SCAN_MIN = 1 << 20  # remote shards: read headers by ranges when the first member is at least this big


def _ranges_cheaper(remote) -> bool:
    """Whether a remote shard's headers are cheaper to read by range requests (one per member)
    than the whole file through one stream: when its first member holds RANGED_SCAN_MIN bytes or
    more (its headers, pax ones included, are in the first HEADER_BLOCK bytes), a request saves
    more bytes than its latency costs."""
    try:
        head = remote.fetch(0, min(HEADER_BLOCK, remote.size))
        member, _ = next(iter_members(CountingReader(io.BytesIO(head), True, None, ""), require_end=False))
        return member.size >= RANGED_SCAN_MIN
    except (OSError, TarFormatError, StopIteration):
        return False  # the read-through scan meets the same problem and reports it


def save_scan(scan: ShardScan, path: Path) -> None:
    """Write a scan as an `.npz` part (no pickle), atomically.

    Keys are a UTF-8 blob `keys` and int64 offsets `key_offset` (n+1) into it, as in the index:
    no separator, so any key (newlines included) reads back as it was.
    """
    meta = np.frombuffer(json.dumps(scan.meta()).encode(), dtype=np.uint8)
    encoded = [key.encode() for key in scan.keys]
    key_offset = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=key_offset[1:])
    keys = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = scan.arrays  # Any: mypy checks `**` values against savez's `allow_pickle: bool` too
    np.savez(tmp, meta=meta, keys=keys, key_offset=key_offset, **arrays)
    os.replace(tmp, path)


def load_scan_meta(path: Path) -> dict:
    """The JSON part of a saved scan, without reading its arrays."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z["meta"].tobytes())


def load_scan(path: Path) -> ShardScan:
    """Read a part written by `save_scan`; a damaged one is refused (`ValueError` naming it)."""
    meta = load_scan_meta(path)
    with np.load(path, allow_pickle=False) as z:
        blob = z["keys"].tobytes()
        key_offset = z["key_offset"] if "key_offset" in z.files else None
        arrays = {k: z[k] for k in _ARRAYS}
    meta.pop("samples")
    n = len(arrays["id_hi"])
    if key_offset is None:  # a part of an older streamprune: keys joined by newlines
        keys = blob.decode().split("\n") if blob else []
        if len(keys) != n:
            raise DamagedRunError(
                f"index part {str(path)!r} (of an older streamprune) holds a key with a newline, "
                "which its format cannot tell apart: delete it and index again"
            )
    else:
        key_offset = key_offset.astype(np.int64, copy=False)
        if (
            key_offset.shape != (n + 1,)
            or key_offset[0] != 0
            or key_offset[-1] != len(blob)
            or (np.diff(key_offset) < 0).any()
        ):
            raise DamagedRunError(
                f"index part {str(path)!r} is damaged: its key offsets do not fit its {n} rows "
                f"and {len(blob)} key bytes"
            )
        cuts = key_offset.tolist()
        try:
            keys = [blob[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:])]
        except UnicodeDecodeError:
            raise DamagedRunError(f"index part {str(path)!r} is damaged: its keys are not UTF-8") from None
    return ShardScan(**meta, keys=keys, arrays=arrays)


def write_index(out: Path, scans: list[ShardScan] | list[Path], root: str, identity_spec: str) -> "Index":
    """Merge per-shard scans (objects or part files), in shard order, into `out` atomically."""
    out = Path(out)
    metas = [load_scan_meta(s) if isinstance(s, Path) else s.meta() for s in scans]
    counts = np.array([m["samples"] for m in metas], dtype=np.int64)
    shard_offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(shard_offset[-1])
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    np.save(tmp / "shard_offset.npy", shard_offset)
    n_members = 0
    files = {}
    for k in _ARRAYS:
        files[k] = open(tmp / f"{k}.raw", "wb")
    fp = hashlib.blake2b(digest_size=16)
    key_lengths: list[int] = []
    with open(tmp / "keys.bin", "wb") as keys_out:
        for item in scans:
            scan = load_scan(item) if isinstance(item, Path) else item
            fp.update(json.dumps([scan.name, scan.n]).encode())
            fp.update(scan.arrays["id_hi"].tobytes() + scan.arrays["id_lo"].tobytes())
            for k in _ARRAYS:
                files[k].write(scan.arrays[k].tobytes())
            n_members += len(scan.arrays["member_offset"])
            encoded = [key.encode() for key in scan.keys]
            key_lengths.extend(len(e) for e in encoded)
            keys_out.write(b"".join(encoded))
    for k, f in files.items():
        f.close()
        raw = tmp / f"{k}.raw"
        arr = np.fromfile(raw, dtype=_DTYPES[k])
        np.save(tmp / f"{k}.npy", arr)
        raw.unlink()
    np.save(tmp / "key_offset.npy", np.concatenate([[0], np.cumsum(key_lengths, dtype=np.int64)]).astype(np.int64))
    with open(tmp / "shards.jsonl", "w") as shards_out:
        for meta, start in zip(metas, shard_offset[:-1]):
            shards_out.write(json.dumps({**meta, "rows": [int(start), int(start) + meta["samples"]]}) + "\n")
    dup_rows = find_duplicates(np.load(tmp / "id_hi.npy"), np.load(tmp / "id_lo.npy"))
    shard_of = np.searchsorted(shard_offset, dup_rows, side="right") - 1
    key_offset = np.load(tmp / "key_offset.npy")
    with open(tmp / "keys.bin", "rb") as keys_in:
        blob = keys_in.read() if len(dup_rows) else b""
    examples = [
        {"shard": metas[s]["name"], "key": blob[key_offset[r] : key_offset[r + 1]].decode(), "row": int(r)}
        for r, s in zip(dup_rows[:100], shard_of[:100])
    ]
    manifest = {
        **header(INDEX_FORMAT),
        "root": root,
        "identity": identity_spec,
        "n_shards": len(metas),
        "n_samples": n,
        "n_members": n_members,
        "fingerprint": fp.hexdigest(),
        "bytes_total": int(sum(m["size"] or 0 for m in metas)),
        "bytes_read": int(sum(m["bytes_read"] for m in metas)),
        "broken": [
            {"shard": m["name"], "error": m["error"], "offset": m["error_offset"]}
            for m in metas
            if m["status"] == "broken"
        ],
        "empty": [m["name"] for m in metas if m["status"] == "empty"],
        "duplicates": {"rows": int(len(dup_rows)), "examples": examples},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    swap_in(tmp, out)
    return Index(out)


class Index:
    """Read access to `RUN/index` (memory-mapped arrays)."""

    # the `_ARRAYS`, memory-mapped by `__init__`
    id_hi: np.ndarray
    id_lo: np.ndarray
    sample_start: np.ndarray
    sample_end: np.ndarray
    member_count: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if RunDir(path).index.is_dir() and not (path / "manifest.json").exists():
            path = RunDir(path).index
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"no shard index at {str(path)!r} (run `streamprune index` first)")
        self.path = path
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise DamagedRunError(f"{str(manifest_path)!r} is damaged: {exc}") from None
        check_format(self.manifest, INDEX_FORMAT, repr(str(manifest_path)))
        with open(path / "shards.jsonl") as f:
            self.shards = [json.loads(line) for line in f]
        self.names = [s["name"] for s in self.shards]
        self._by_name = {n: i for i, n in enumerate(self.names)}
        self.shard_offset = np.load(path / "shard_offset.npy")
        self.key_offset = np.load(path / "key_offset.npy", mmap_mode="r")
        for k in _ARRAYS:
            setattr(self, k, np.load(path / f"{k}.npy", mmap_mode="r"))
        self._member_start: np.ndarray | None = None

    @property
    def member_start(self) -> np.ndarray:
        """Index of each sample's first member in the member arrays (N+1,), computed on first use."""
        if self._member_start is None:
            self._member_start = np.concatenate([[0], np.cumsum(self.member_count, dtype=np.int64)])
        return self._member_start

    @property
    def n_samples(self) -> int:
        return int(self.shard_offset[-1])

    @property
    def n_shards(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def root(self) -> str:
        return self.manifest["root"]

    def shard(self, name: str) -> int:
        """Position of shard `name`; KeyError naming it when unknown."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"shard {name!r} is not in the index at {str(self.path)!r}") from None

    def rows(self, shard: int) -> range:
        return range(int(self.shard_offset[shard]), int(self.shard_offset[shard + 1]))

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_offset, rows, side="right") - 1

    def keys(self, shard: int) -> list[str]:
        """The keys of a shard, in tar order."""
        r = self.rows(shard)
        if not len(r):
            return []
        lo, hi = int(self.key_offset[r.start]), int(self.key_offset[r.stop])
        with open(self.path / "keys.bin", "rb") as f:
            f.seek(lo)
            blob = f.read(hi - lo)
        cuts = np.asarray(self.key_offset[r.start : r.stop + 1]) - lo
        return [blob[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:])]

    def members(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Header offsets and data sizes of the members of sample `row`, in its tar."""
        a, b = self.member_start[row], self.member_start[row + 1]
        return np.asarray(self.member_offset[a:b]), np.asarray(self.member_size[a:b])
