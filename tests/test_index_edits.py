"""An index edited by hand or damaged: inconsistent byte ranges are named by `inspect --verify`
and refused (naming the index file, shard and row) before the loader could blame a shard; a
seeded fuzz of edits to the index's arrays and JSON lines ends each case with such an error
or the right samples. Real tiny shards written with webdataset, real indexes, no Ray."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import KeepList, PrunedWebDataset
from streamprune.errors import ChangedShardError, DamagedRunError, StreamPruneError
from streamprune.formats.index import Index
from streamprune.formats.sources import shard_urls
from streamprune.inspection.verify import verify_run

ARRAYS = (
    "shard_offset",
    "id_hi",
    "id_lo",
    "sample_start",
    "sample_end",
    "member_count",
    "member_offset",
    "member_size",
)
INDEX_FILES = ("manifest.json", "shards.jsonl", "keys.bin", "key_offset.npy", *(f"{a}.npy" for a in ARRAYS))


@pytest.fixture(scope="module")
def tiny(make_index, tmp_path_factory):
    """Three shards of 15 samples with 1 to 3 members of 1 to 1,500 bytes (so that padding
    matters), indexed; webdataset's samples of them. Integer times: no pax header per member, so
    the index bounds each member's end exactly (with extended headers it holds a lower bound)."""
    work = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    paths = []
    for s in range(3):
        paths.append(str(work / "data" / f"part-{s}.tar"))
        Path(paths[-1]).parent.mkdir(exist_ok=True)
        with wds.TarWriter(paths[-1], encoder=False, mtime=0) as sink:  # plain headers, as make-shards writes
            for i in range(15):
                sample = {"__key__": f"{s}-{i:03d}", "cls": str(i % 4).encode()}
                if i % 2:
                    sample["bin"] = rng.bytes(int(rng.integers(1, 1500)))
                if i % 3:
                    sample["dat"] = rng.bytes(int(rng.integers(1, 700)))
                sink.write(sample)
    make_index(paths, work / "run")
    return {"paths": paths, "run": work / "run", "ref": list(wds.WebDataset(paths, shardshuffle=False))}


def _case_run(tiny, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(tiny["run"] / "index", run / "index")
    return run


def _edit_array(run: Path, name: str, fn) -> None:
    path = run / "index" / f"{name}.npy"
    a = np.load(path)
    np.save(path, fn(a.copy()))


def _two_member_row(idx: Index, shard: int) -> int:
    return next(r for r in idx.rows(shard) if idx.member_count[r] >= 2 and r > idx.rows(shard).start)


def _set(a: np.ndarray, i: int, v: int) -> np.ndarray:
    a[i] = v
    return a


def _swap(a: np.ndarray, i: int) -> np.ndarray:
    a[[i, i + 1]] = a[[i + 1, i]]
    return a


def _edits(idx: Index, size: int) -> dict:
    """Edits of shard 1's byte ranges: (array edits, file named, row named)."""
    r = _two_member_row(idx, 1)
    last = idx.rows(1).stop - 1
    m = int(np.asarray(idx.member_count[:r], dtype=np.int64).sum())  # row r's first member
    swap = next(q for q in idx.rows(1)[:-1] if idx.member_count[q] != idx.member_count[q + 1])
    return {
        "start moved forward": ([("sample_start", lambda a: _set(a, r, a[r] + 1024))], "member_offset", r),
        "end before its last member's end": ([("sample_end", lambda a: _set(a, r, a[r] - 512))], "sample_end", r),
        "end past the shard": ([("sample_end", lambda a: _set(a, last, size + 512))], "sample_end", last),
        "end into the next sample": ([("sample_end", lambda a: _set(a, r, a[r] + 512))], "sample_start", r + 1),
        "rows out of order": (
            [("sample_start", lambda a: _swap(a, r)), ("sample_end", lambda a: _swap(a, r))],
            "sample_start",
            r + 1,
        ),
        "member size past the next member": ([("member_size", lambda a: _set(a, m, a[m] + 2048))], "member_offset", r),
        "member counts swapped": ([("member_count", lambda a: _swap(a, swap))], "member_offset", swap + 1),
        "negative start": (
            [("sample_start", lambda a: _set(a, idx.rows(1).start, -512))],
            "sample_start",
            idx.rows(1).start,
        ),
    }


EDITS = [
    "start moved forward",
    "end before its last member's end",
    "end past the shard",
    "end into the next sample",
    "rows out of order",
    "member size past the next member",
    "member counts swapped",
    "negative start",
]


@pytest.mark.parametrize("edit", EDITS)
def test_inconsistent_byte_ranges_are_named_by_verify_and_refused_before_reading(tiny, tmp_path, edit):
    run = _case_run(tiny, tmp_path)
    idx = Index(run)
    assert verify_run(run, progress=False)["damaged"] is False
    changes, file, row = _edits(idx, idx.shards[1]["size"])[edit]
    for name, fn in changes:
        _edit_array(run, name, fn)
    report = verify_run(run, progress=False)
    named = [p for p in report["problems"] if p["file"] == f"index/{file}.npy"]
    assert report["damaged"] and named, report["problems"]
    assert "shard 'part-1.tar'" in named[0]["problem"] and f"row {row}:" in named[0]["problem"], named
    idx = Index(run)  # cheap checks pass: the ranges are checked where they are used
    with pytest.raises(DamagedRunError, match=rf"{file}\.npy.*shard 'part-1.tar', row {row}:"):
        KeepList.from_rows(idx, np.arange(idx.n_samples), tmp_path / "keep")
    assert not (tmp_path / "keep").exists()


# -- the fuzz ---------------------------------------------------------------------------------------

CASES = 240
POOL = [None, -1, 0, 1, 2**62, 1.5, True, "", "x", "../../evil.tar", "/etc/passwd", [], {}, [0, 1]]
SHARD_FIELDS = ("name", "url", "status", "size", "compression", "rows", "samples", "error", "access", "bytes_read")
MANIFEST_FIELDS = ("format", "version", "root", "identity", "n_shards", "n_samples", "n_members", "fingerprint")


def _value(rng: np.random.Generator, marker: Path):
    pool = [*POOL, f"pipe:touch {marker}", "http://127.0.0.1:9/part-0.tar", "s3://bucket/part-0.tar"]
    return pool[int(rng.integers(len(pool)))]


def _fuzz_array(rng: np.random.Generator, a: np.ndarray):
    """One edit of an index array: a value, a swap, a length, a dtype, a shape, or bytes."""
    op = int(rng.integers(7))
    i = int(rng.integers(len(a)))
    if op == 0:
        v = int(a[i])
        choice = [-1, 0, v + 1, v - 1, v + 512, v - 512, 2 * v, 2**40, int(a[int(rng.integers(len(a)))])]
        v = choice[int(rng.integers(len(choice)))]
        a[i] = np.asarray(v % 2**64 if a.dtype.kind == "u" else v).astype(a.dtype)
        return a
    if op == 1 and len(a) > 1:
        j = int(rng.integers(len(a)))
        a[[i, j]] = a[[j, i]]
        return a
    if op == 2:
        return a[:-1]
    if op == 3:
        return np.append(a, a[-1:])
    if op == 4:
        return a.astype([np.float64, np.int32, np.uint8, np.int64][int(rng.integers(4))])
    if op == 5:
        return a.reshape(-1, 1)
    return None  # garbage bytes


def _edit(rng: np.random.Generator, run: Path, marker: Path) -> str:
    """One seeded edit of `run/index`; returns what it did."""
    where = run / "index"
    kind = int(rng.integers(4))
    if kind <= 1:  # an array (twice as often: most of the index is arrays)
        name = ARRAYS[int(rng.integers(len(ARRAYS)))]
        path = where / f"{name}.npy"
        if rng.random() < 0.05:
            path.unlink()
            return f"{name}.npy deleted"
        edited = _fuzz_array(rng, np.load(path))
        if edited is None:
            path.write_bytes(rng.bytes(int(rng.integers(1, 300))))
            return f"{name}.npy garbage"
        np.save(path, edited)
        return f"{name}.npy edited"
    if kind == 2:  # a line of shards.jsonl
        path = where / "shards.jsonl"
        lines = path.read_text().splitlines()
        i = int(rng.integers(len(lines)))
        op = int(rng.integers(6))
        if op <= 2:
            entry = json.loads(lines[i])
            field = SHARD_FIELDS[int(rng.integers(len(SHARD_FIELDS)))]
            if op == 2:
                entry.pop(field, None)
            else:
                entry[field] = _value(rng, marker)
            lines[i] = json.dumps(entry)
            what = f"shards.jsonl line {i + 1}: {field} " + ("deleted" if op == 2 else f"= {entry[field]!r}")
        elif op == 3:
            lines[i] = ["{not json", "", "[1, 2]", "null", "7"][int(rng.integers(5))]
            what = f"shards.jsonl line {i + 1} = {lines[i]!r}"
        elif op == 4:
            del lines[i]
            what = f"shards.jsonl line {i + 1} deleted"
        else:
            lines.insert(i, lines[i])
            what = f"shards.jsonl line {i + 1} repeated"
        path.write_text("\n".join(lines) + "\n")
        return what
    path = where / "manifest.json"
    manifest = json.loads(path.read_text())
    field = MANIFEST_FIELDS[int(rng.integers(len(MANIFEST_FIELDS)))]
    if rng.random() < 0.2:
        manifest.pop(field)
    else:
        manifest[field] = _value(rng, marker)
    path.write_text(json.dumps(manifest))
    return f"manifest.json: {field} = {manifest.get(field, '(deleted)')!r}"


@pytest.mark.timeout(300)
def test_fuzzed_index_edits_end_in_an_error_naming_the_file_or_the_right_samples(tiny, tmp_path, sample_content):
    rows = np.sort(np.random.default_rng(1).choice(45, 20, replace=False))
    want = sample_content([tiny["ref"][r] for r in rows])
    marker = tmp_path / "ran"
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        rng = np.random.default_rng([22, case])
        run = _case_run(tiny, tmp_path / f"case-{case}")
        what = _edit(rng, run, marker)
        t0 = time.monotonic()
        try:
            idx = Index(run)
            keep = KeepList.from_rows(idx, rows, run / "keep")
            got = list(PrunedWebDataset(shard_urls(idx), keep=keep, shardshuffle=False))
            assert sample_content(got) == want, what
            outcome = "right samples"
        except ChangedShardError as exc:  # a stored size is all the index knows of a shard's bytes
            assert what.startswith("shards.jsonl") and ": size =" in what and "bytes" in str(exc), (what, exc)
            outcome = "changed shard"
        except StreamPruneError as exc:
            assert any(f in str(exc) for f in INDEX_FILES), (what, exc)
            outcome = "refused"
        assert time.monotonic() - t0 < 2, what
        report = verify_run(run, progress=False)
        assert report["damaged"] or outcome != "refused", (what, report)
        assert not marker.exists(), what
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > CASES / 3 and outcomes.get("right samples", 0) > 10, outcomes
