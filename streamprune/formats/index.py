"""The shard index `RUN/index`: which samples exist, their identity, row and byte ranges.

Pure NumPy + JSON (no Ray, no Zarr) so that the loader can read it cheaply. Scanning a
shard is `shards.scan.scan_shard`; building the index in parallel lives in `stages.index`. RUN may be a
local folder or an object-store URL (`streamprune.storage`): the index is replaced whole through
`formats.commit` (locally a rename; on object stores a generation committed by one `COMMIT`
object written last), and read from the committed generation (arrays memory-mapped locally,
read whole from object stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats import commit
from streamprune.formats.headers import INDEX_FORMAT, check_format, header
from streamprune.formats.rundir import RunDir
from streamprune.shards.identity import find_duplicates
from streamprune.shards.scan import SCAN_ARRAYS, SCAN_DTYPES, ShardScan
from streamprune.shards.tarscan import BLOCK


def save_scan(scan: ShardScan, location: str | os.PathLike[str]) -> None:
    """Write a scan as an `.npz` part (no pickle) at `location`, whole in one write (a rename
    locally, one request on object stores), so that a part is complete or absent, never half.

    Keys are a UTF-8 blob `keys` and int64 offsets `key_offset` (n+1) into it, as in the index:
    no separator, so any key (newlines included) reads back as it was.
    """
    meta = np.frombuffer(json.dumps(scan.meta()).encode(), dtype=np.uint8)
    encoded = [key.encode() for key in scan.keys]
    key_offset = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=key_offset[1:])
    keys = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    arrays: dict[str, Any] = scan.arrays  # Any: mypy checks `**` values against savez's `allow_pickle: bool` too
    buffer = io.BytesIO()
    np.savez(buffer, meta=meta, keys=keys, key_offset=key_offset, **arrays)
    storage.write_bytes(location, buffer.getvalue())


def _read_part(location: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays `names` (None: all) of the part at `location`, read now; a damaged part is a
    DamagedRunError naming it."""
    data = storage.read_bytes(location)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if names is None else names)}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DamagedRunError(f"index part {os.fspath(location)!r} is unreadable ({exc}): delete it") from None


def load_scan_meta(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of the part at `location`."""
    meta: dict[str, Any] = json.loads(_read_part(location, ("meta",))["meta"].tobytes())
    return meta


def load_scan(location: str | os.PathLike[str]) -> ShardScan:
    """Read a part written by `save_scan`; a damaged one is refused (`ValueError` naming it)."""
    path = os.fspath(location)
    z = _read_part(path)
    meta = json.loads(z["meta"].tobytes())
    blob = z["keys"].tobytes()
    key_offset = z.get("key_offset")
    arrays = {k: z[k] for k in SCAN_ARRAYS}
    meta.pop("samples")
    n = len(arrays["id_hi"])
    if key_offset is None:  # a part of an older streamprune: keys joined by newlines
        keys = blob.decode().split("\n") if blob else []
        if len(keys) != n:
            raise DamagedRunError(
                f"index part {path!r} (of an older streamprune) holds a key with a newline, "
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
                f"index part {path!r} is damaged: its key offsets do not fit its {n} rows and {len(blob)} key bytes"
            )
        cuts = key_offset.tolist()
        try:
            keys = [blob[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        except UnicodeDecodeError:
            raise DamagedRunError(f"index part {path!r} is damaged: its keys are not UTF-8") from None
    return ShardScan(**meta, keys=keys, arrays=arrays)


def write_index(
    out: str | os.PathLike[str],
    scans: Iterable[ShardScan | str | os.PathLike[str]],
    root: str,
    identity_spec: str,
    sources: str | None = None,
) -> Index:
    """Merge per-shard scans (objects or part locations), in shard order, into the index `out`
    (a local folder or an object-store URL), replacing it whole (`commit.replacing`: a rename
    locally; data objects first and one `COMMIT` object last on object stores). Hold
    `output_lock(out)` around it. `sources`: a digest of what was scanned, kept in the manifest so
    that indexing the same shards again can tell it has nothing to do (`Index.sources`)."""
    with commit.replacing(out) as place, _staging(place) as folder:
        _write_files(folder, scans, root, identity_spec, sources)
    return Index(out)


@contextlib.contextmanager
def _staging(place: str) -> Iterator[str]:
    """A local folder to build the index files in: `place` itself when local; for an object-store
    `place` a temporary folder (the arrays are merged from parts through local files, one array in
    memory at a time), uploaded into `place` on success, `manifest.json` last."""
    if not storage.is_url(place):
        yield place
        return
    with tempfile.TemporaryDirectory(prefix="streamprune-index-") as folder:
        yield folder
        files = sorted(os.listdir(folder), key=lambda f: (f == "manifest.json", f))
        for file in files:
            with open(os.path.join(folder, file), "rb") as f:
                storage.write_bytes(storage.join(place, file), f.read())


def _write_files(
    folder: str, scans: Iterable[ShardScan | str | os.PathLike[str]], root: str, identity_spec: str, sources: str | None
) -> None:
    """Write the index files into the local folder `folder`: the arrays, keys, shards.jsonl and
    manifest.json (each part is read once)."""
    tmp = Path(folder)
    files = {k: open(tmp / f"{k}.raw", "wb") for k in SCAN_ARRAYS}  # noqa: SIM115 (one per array, closed below)
    fp = hashlib.blake2b(digest_size=16)
    metas: list[dict[str, Any]] = []
    key_lengths: list[int] = []
    n_members = 0
    with open(tmp / "keys.bin", "wb") as keys_out:
        for item in scans:
            scan = item if isinstance(item, ShardScan) else load_scan(item)
            metas.append(scan.meta())
            fp.update(json.dumps([scan.name, scan.n]).encode())
            fp.update(scan.arrays["id_hi"].tobytes() + scan.arrays["id_lo"].tobytes())
            for k in SCAN_ARRAYS:
                files[k].write(scan.arrays[k].tobytes())
            n_members += len(scan.arrays["member_offset"])
            encoded = [key.encode() for key in scan.keys]
            key_lengths.extend(len(e) for e in encoded)
            keys_out.write(b"".join(encoded))
    for k, f in files.items():
        f.close()
        raw = tmp / f"{k}.raw"
        np.save(tmp / f"{k}.npy", np.fromfile(raw, dtype=SCAN_DTYPES[k]))
        raw.unlink()
    counts = np.array([m["samples"] for m in metas], dtype=np.int64)
    shard_offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    np.save(tmp / "shard_offset.npy", shard_offset)
    key_offset = np.concatenate([[0], np.cumsum(key_lengths, dtype=np.int64)]).astype(np.int64)
    np.save(tmp / "key_offset.npy", key_offset)
    with open(tmp / "shards.jsonl", "w") as shards_out:
        for meta, start in zip(metas, shard_offset[:-1], strict=True):
            shards_out.write(json.dumps({**meta, "rows": [int(start), int(start) + meta["samples"]]}) + "\n")
    dup_rows = find_duplicates(np.load(tmp / "id_hi.npy"), np.load(tmp / "id_lo.npy"))
    shard_of = np.searchsorted(shard_offset, dup_rows, side="right") - 1
    with open(tmp / "keys.bin", "rb") as keys_in:
        blob = keys_in.read() if len(dup_rows) else b""
    examples = [
        {"shard": metas[s]["name"], "key": blob[key_offset[r] : key_offset[r + 1]].decode(), "row": int(r)}
        for r, s in zip(dup_rows[:100], shard_of[:100], strict=True)
    ]
    manifest = {
        **header(INDEX_FORMAT),
        "root": root,
        "identity": identity_spec,
        "n_shards": len(metas),
        "n_samples": int(shard_offset[-1]),
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
        **({} if sources is None else {"sources": sources}),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _first(bad: np.ndarray) -> int | None:
    """The position of the first True of `bad`, or None."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None


def _row_problem(name: str, a: int, row: int, what: str) -> str:
    """Problem `what` of row `row` of the shard `name` whose rows start at `a`."""
    return f"shard {name!r}, row {a + row}: {what}"


class Index:
    """Read access to `RUN/index` (a local folder: memory-mapped arrays; an object-store URL: its
    committed generation, arrays read whole). `path` is the index's location, `files` where its
    files are read (the same locally), `file(name)` one of them.

    Opening it checks what is cheap to check (headers, the shard list, array types and shapes,
    offsets against counts); `range_problem` checks a shard's byte ranges, which `byte_ranges`
    does before handing any out. Damage is a DamagedRunError naming the file, or with
    `strict=False` (`inspect --verify`) is listed in `problems` as `(file, problem)` pairs.
    """

    # the `SCAN_ARRAYS`, memory-mapped by `__init__`
    id_hi: np.ndarray
    id_lo: np.ndarray
    sample_start: np.ndarray
    sample_end: np.ndarray
    member_count: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray

    def __init__(self, path: str | os.PathLike[str], strict: bool = True):
        self.path, self.files, raw = _find_manifest(os.fspath(path))
        manifest_path = self.file("manifest.json")
        try:
            doc = json.loads(raw.decode())
        except ValueError as exc:  # UnicodeDecodeError included
            raise DamagedRunError(f"{manifest_path!r} is damaged: {exc}") from None
        self.manifest = check_format(doc, INDEX_FORMAT, repr(manifest_path))
        self.shards = self._read_shards(self.file("shards.jsonl"))
        self.names = cast("list[str]", [s.get("name") for s in self.shards])  # strings in a sound index (checked)
        self._by_name = {n: i for i, n in enumerate(self.names) if isinstance(n, str)}
        self.shard_offset = np.asarray(self._load("shard_offset"))
        self.key_offset = self._load("key_offset")
        for k in SCAN_ARRAYS:
            setattr(self, k, self._load(k))
        self._shard_members: np.ndarray | None = None
        self._ranges_checked: set[int] = set()
        self.problems = self._structure_problems()
        if strict and self.problems:
            raise self.damaged(*self.problems[0])

    def file(self, name: str) -> str:
        """Where the index file `name` is read from (in the committed generation on object stores)."""
        return storage.join(self.files, name)

    @property
    def sources(self) -> str | None:
        """The digest of what was scanned, as `write_index` was given it (None: not recorded)."""
        value = self.manifest.get("sources")
        return value if isinstance(value, str) else None

    def damaged(self, file: str, problem: str) -> DamagedRunError:
        """The error for `problem` of the index file `file`."""
        return DamagedRunError(
            f"index file {self.file(file)!r} is damaged: {problem} (edited or damaged: index the shards again)"
        )

    def _read_shards(self, location: str) -> list[dict[str, Any]]:
        try:
            text = storage.read_bytes(location).decode()
        except FileNotFoundError:
            raise DamagedRunError(f"{location!r} is missing: index the shards again") from None
        except UnicodeDecodeError as exc:
            raise DamagedRunError(f"{location!r} is damaged: {exc}") from None
        shards: list[dict[str, Any]] = []
        for i, line in enumerate(io.StringIO(text, newline=None)):  # lines as a text-mode file reads them
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise DamagedRunError(f"{location!r} is damaged: line {i + 1}: {exc}") from None
            if not isinstance(entry, dict):
                raise DamagedRunError(f"{location!r} is damaged: line {i + 1} is not a JSON object")
            shards.append(entry)
        return shards

    def _load(self, name: str) -> np.ndarray:
        """Array `name`: memory-mapped locally; read whole on object stores."""
        location = self.file(f"{name}.npy")
        try:
            if not storage.is_url(location):
                array: np.ndarray = np.load(location, mmap_mode="r", allow_pickle=False)
            else:
                array = np.load(io.BytesIO(storage.read_bytes(location)), allow_pickle=False)
            return array
        except FileNotFoundError:
            raise DamagedRunError(f"{location!r} is missing: index the shards again") from None
        except (ValueError, OSError, EOFError) as exc:
            raise DamagedRunError(f"{location!r} is unreadable ({exc}): index the shards again") from None

    def _keys_size(self) -> int | None:
        """The size of keys.bin (None: missing)."""
        try:
            return storage.size(self.file("keys.bin"))
        except FileNotFoundError:
            return None

    def key_bytes(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of keys.bin (the keys of rows r..s are [key_offset[r], key_offset[s]))."""
        return storage.read_bytes(self.file("keys.bin"), start, end) if end > start else b""

    def _structure_problems(self) -> list[tuple[str, str]]:
        """What disagrees in the index's headers, shard list, array types and shapes (cheap: no
        per-sample data is read)."""
        m, out = self.manifest, []
        root = m.get("root")
        if not (
            isinstance(root, str) and root.startswith("/") and posixpath.normpath(root) == root and "\0" not in root
        ):
            out.append(("manifest.json", f"root {root!r} is not an absolute, normalised path"))
        for key in ("fingerprint", "identity"):
            if not isinstance(m.get(key), str):
                out.append(("manifest.json", f"{key} {m.get(key)!r} is not a string"))
        s, n = len(self.shards), m.get("n_samples")
        if m.get("n_shards") != s:
            out.append(("shards.jsonl", f"{s} shards listed, manifest.json says n_shards={m.get('n_shards')!r}"))
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return [*out, ("manifest.json", f"n_samples {n!r} is not a count")]
        off = self.shard_offset
        if off.dtype != np.int64 or off.shape != (s + 1,) or off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != n:
            shown = f"{off.dtype} {off.shape}"
            return [
                *out,
                (
                    "shard_offset.npy",
                    f"{shown}: expected int64 ({s + 1},) running 0..{n} (n_samples) without decreasing",
                ),
            ]
        for i, sh in enumerate(self.shards):
            out += [("shards.jsonl", f"line {i + 1}: {p}") for p in _shard_problems(sh, int(off[i]), int(off[i + 1]))]
        if len(self._by_name) != sum(isinstance(n, str) for n in self.names):
            out.append(("shards.jsonl", "a shard name is listed twice"))
        members = m.get("n_members", len(self.member_offset))
        keys_size = self._keys_size()
        ko = self.key_offset
        expected = {
            **{k: (n,) for k in ("id_hi", "id_lo", "sample_start", "sample_end", "member_count")},
            "member_offset": (members,),
            "member_size": (members,),
        }
        for k, shape in expected.items():
            a = getattr(self, k)
            if a.dtype != SCAN_DTYPES[k] or a.shape != shape:
                out.append((f"{k}.npy", f"{a.dtype} {a.shape}, expected {np.dtype(SCAN_DTYPES[k])} {shape}"))
        if ko.dtype != np.int64 or ko.shape != (n + 1,) or ko[0] != 0 or ko[-1] != keys_size:
            out.append(
                (
                    "key_offset.npy",
                    f"{ko.dtype} {ko.shape}, expected int64 ({n + 1},) running 0..{keys_size} (keys.bin)",
                )
            )
        return out

    @property
    def shard_members(self) -> np.ndarray:
        """Position of each shard's first member in the member arrays, then their total: (S+1,)
        int64, summed once in blocks of rows (memory bounded by the shard count)."""
        if self._shard_members is None:
            off, n, total = self.shard_offset, self.n_samples, 0
            out = np.zeros(len(off), dtype=np.int64)
            for c0 in range(0, n, _BLOCK):
                c1 = min(n, c0 + _BLOCK)
                run = total + np.concatenate([[0], np.cumsum(self.member_count[c0:c1], dtype=np.int64)])
                lo, hi = np.searchsorted(off, [c0, c1])
                out[lo:hi] = run[off[lo:hi] - c0]
                total = int(run[-1])
            out[np.searchsorted(off, n) :] = total
            self._shard_members = out
        return self._shard_members

    def range_problem(self, shard: int) -> tuple[str, str] | None:
        """The first inconsistency in shard `shard`'s byte ranges as `(file, problem naming the
        shard and row)`, or None. Samples: block-aligned, `0 <= start < end`, in order without
        overlap, within the stored size (plain tars); members: at least one per sample, the
        first at the sample's start, each one's header and padded data before the next member's
        header and within its sample."""
        a, b = int(self.shard_offset[shard]), int(self.shard_offset[shard + 1])
        if a == b:
            return None
        total, m = int(self.shard_members[-1]), len(self.member_offset)
        if total != m:
            return "member_count.npy", f"the member counts add up to {total}, member_offset.npy holds {m}"
        return self._sample_problem(shard, a, b) or self._member_problem(shard, a, b)

    def _sample_problem(self, shard: int, a: int, b: int) -> tuple[str, str] | None:
        """`range_problem`'s checks of the samples (rows `[a, b)`) of shard `shard`."""
        at = partial(_row_problem, self.names[shard], a)
        start, end = np.asarray(self.sample_start[a:b]), np.asarray(self.sample_end[a:b])
        count = np.asarray(self.member_count[a:b], dtype=np.int64)
        if (i := _first(count < 1)) is not None:
            return "member_count.npy", at(i, f"{count[i]} members (a sample has at least one)")
        if (i := _first((start < 0) | (start > _MAX_OFFSET) | (start % BLOCK != 0))) is not None:
            return "sample_start.npy", at(i, f"start {start[i]} is not the offset of a tar header")
        if (i := _first((end <= start) | (end > _MAX_OFFSET) | (end % BLOCK != 0))) is not None:
            return "sample_end.npy", at(i, f"byte range [{start[i]}, {end[i]}) is not one of tar blocks")
        if (i := _first(start[1:] < end[:-1])) is not None:
            return "sample_start.npy", at(
                i + 1, f"starts at {start[i + 1]}, before the previous sample's end {end[i]} (sample_end.npy)"
            )
        info = self.shards[shard]
        size = info.get("size")
        if info.get("compression") is None and size is not None and (i := _first(end > size)) is not None:
            return "sample_end.npy", at(i, f"ends at {end[i]}, past the shard's {size} bytes (shards.jsonl)")
        return None

    def _member_problem(self, shard: int, a: int, b: int) -> tuple[str, str] | None:
        """`range_problem`'s checks of the members of shard `shard` (rows `[a, b)`, samples sound)."""
        at = partial(_row_problem, self.names[shard], a)
        start, end = np.asarray(self.sample_start[a:b]), np.asarray(self.sample_end[a:b])
        count = np.asarray(self.member_count[a:b], dtype=np.int64)
        m, m0, m1 = len(self.member_offset), int(self.shard_members[shard]), int(self.shard_members[shard + 1])
        if not 0 <= m0 <= m1 <= m:
            return "member_count.npy", at(0, f"its members [{m0}, {m1}) are outside the {m} of member_offset.npy")
        off, msize = np.asarray(self.member_offset[m0:m1]), np.asarray(self.member_size[m0:m1])
        row = np.repeat(np.arange(b - a), count)
        if (j := _first((msize < 0) | (msize > _MAX_OFFSET))) is not None:
            return "member_size.npy", at(int(row[j]), f"member {m0 + j} has size {msize[j]}")
        if (j := _first((off < 0) | (off > _MAX_OFFSET) | (off % BLOCK != 0))) is not None:
            return "member_offset.npy", at(
                int(row[j]), f"member {m0 + j} at {off[j]} is not the offset of a tar header"
            )
        heads = np.concatenate([[0], np.cumsum(count)[:-1]])
        if (i := _first(off[heads] != start)) is not None:
            return "member_offset.npy", at(
                i, f"its first member's header is at {off[heads[i]]}, its sample_start.npy says {start[i]}"
            )
        stops = off + BLOCK + (msize + BLOCK - 1) // BLOCK * BLOCK  # after each member's header and padded data
        last = np.zeros(len(off), dtype=bool)
        last[np.cumsum(count) - 1] = True
        limit = np.where(last, end[row], np.concatenate([off[1:], [0]]))
        if (j := _first(stops > limit)) is None:
            return None
        if last[j]:
            return "sample_end.npy", at(
                int(row[j]),
                f"its last member (member_offset.npy, member_size.npy) ends at {stops[j]}, after its end {limit[j]}",
            )
        return "member_offset.npy", at(
            int(row[j]),
            f"member {m0 + j} (member_size.npy: {msize[j]} bytes) ends at {stops[j]}, after the next "
            f"member's header at {limit[j]}",
        )

    def byte_ranges(self, rows: np.ndarray) -> np.ndarray:
        """`[start, end)` of each of `rows` in its tar, (k, 2) int64. Each shard they touch is
        checked first (`range_problem`, once per shard): an edited index is refused naming its
        file, shard and row, instead of reading wrong bytes and blaming the shard."""
        rows = np.asarray(rows, dtype=np.int64)
        for s in np.unique(self.shard_of(rows)).tolist():
            if s not in self._ranges_checked:
                problem = self.range_problem(s)
                if problem is not None:
                    raise self.damaged(*problem)
                self._ranges_checked.add(s)
        return np.stack([self.sample_start[rows], self.sample_end[rows]], axis=1)

    @property
    def n_samples(self) -> int:
        return int(self.shard_offset[-1])

    @property
    def n_shards(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        fingerprint: str = self.manifest["fingerprint"]  # a string in a sound index (checked)
        return fingerprint

    @property
    def root(self) -> str:
        root: str = self.manifest["root"]  # a string in a sound index (checked)
        return root

    def shard(self, name: str) -> int:
        """Position of shard `name`; KeyError naming it when unknown."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"shard {name!r} is not in the index at {self.path!r}") from None

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
        blob = self.key_bytes(lo, hi)
        cuts = np.asarray(self.key_offset[r.start : r.stop + 1]) - lo
        return [blob[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def members(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Header offsets and data sizes of the members of sample `row`, in its tar."""
        s = int(self.shard_of(np.array([row]))[0])
        a = int(self.shard_members[s]) + int(np.asarray(self.member_count[self.shard_offset[s] : row], np.int64).sum())
        b = a + int(self.member_count[row])
        return np.asarray(self.member_offset[a:b]), np.asarray(self.member_size[a:b])


_BLOCK = 1 << 20  # rows summed per step
_MAX_OFFSET = 1 << 60  # larger offsets and sizes are impossible (and would overflow int64 sums)
_COMPRESSIONS = (None, "gzip", "bz2", "xz")


def _find_manifest(path: str) -> tuple[str, str, bytes]:
    """The index at `path` (itself, or `path/index` when `path` is a run directory): its location,
    where its files are (its committed generation on object stores) and its manifest's bytes.
    Read, not looked up (object-store listings may be cached); FileNotFoundError saying to run
    `streamprune index` when neither holds one."""
    for location in (path, RunDir(path).index):
        try:
            files = commit.committed(location)
            return location, files, storage.read_bytes(storage.join(files, "manifest.json"))
        except (FileNotFoundError, NotADirectoryError):  # nothing committed, or `location` is a file
            continue
    raise FileNotFoundError(f"no shard index at {path!r} (run `streamprune index` first)")


def _shard_problems(entry: dict[str, Any], a: int, b: int) -> list[str]:
    """What is wrong with one line of shards.jsonl whose shard owns rows `[a, b)`."""
    name, status, size = entry.get("name"), entry.get("status"), entry.get("size")
    out = []
    if not _is_shard_name(name):
        out.append(f"name {name!r} is not a path inside the dataset root")
    if not isinstance(entry.get("url"), str):
        out.append(f"shard {name!r}: url {entry.get('url')!r} is not a string")
    if status not in ("ok", "empty", "broken") or (status == "ok") != (b > a):
        out.append(f"shard {name!r}: status {status!r} with {b - a} rows")
    if entry.get("rows", [a, b]) != [a, b] or entry.get("samples", b - a) != b - a:
        out.append(
            f"shard {name!r}: rows {entry.get('rows')!r}, samples {entry.get('samples')!r}; "
            f"shard_offset.npy says [{a}, {b}]"
        )
    if "size" not in entry or size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        out.append(f"shard {name!r}: size {entry.get('size', '(none)')!r} is not a byte count (or null: unknown)")
    if entry.get("compression") not in _COMPRESSIONS:
        out.append(f"shard {name!r}: compression {entry.get('compression')!r} is not one of {_COMPRESSIONS}")
    return out


def _is_shard_name(name: object) -> bool:
    """Whether `name` is a shard name: a normalised relative POSIX path inside its root."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(("/", "../"))
        and posixpath.normpath(name) == name
        and "\0" not in name
    )
