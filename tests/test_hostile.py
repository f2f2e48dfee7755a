"""Hostile shards: every parser loop makes progress on any bytes, and reading a shard ends with
exactly webdataset's samples or a clear error naming the shard and a byte offset: never a hang,
a signal, another exception type or a silently wrong answer. The shards are written here,
byte by byte, and the fuzz test mutates real ones at random (seeded)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import KeepList, PrunedWebDataset
from streamprune.demo.datasets import encode_png, write_shards
from streamprune.formats.index import Index, load_scan, save_scan, write_index
from streamprune.shards.reader import ReadCounts, read_keys
from streamprune.shards.scan import scan_shard
from streamprune.shards.tarscan import CountingReader, TarFormatError, iter_samples
from streamprune.shards.urls import open_shard

BLOCK = 512
END = bytes(2 * BLOCK)


# ---- tars byte by byte ------------------------------------------------------------------------


def _fix_checksum(h: bytearray, signed: bool = False) -> bytearray:
    h[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in h)
    h[148:156] = b"%06o\0 " % total
    return h


def _header(
    name: bytes,
    size: int,
    kind: bytes = b"0",
    *,
    size_field: bytes | None = None,
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    mode: bytes = b"0000644\0",
    signed: bool = False,
) -> bytes:
    h = bytearray(BLOCK)
    h[: len(name)] = name
    h[100:108] = mode
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size if size_field is None else size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257 : 257 + len(magic)] = magic
    h[345 : 345 + len(prefix)] = prefix
    return bytes(_fix_checksum(h, signed))


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def _member(name: bytes, data: bytes = b"1", kind: bytes = b"0", **kw) -> bytes:
    return _header(name, len(data), kind, **kw) + _pad(data)


def _record(keyword: str, value: bytes) -> bytes:
    """A pax record `LENGTH KEYWORD=VALUE\\n` with its exact length."""
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _pax(records: bytes, kind: bytes = b"x") -> bytes:
    return _member(b"././@PaxHeader", records, kind)


def _long(name: bytes, kind: bytes = b"L") -> bytes:
    return _member(b"././@LongLink", name, kind)


HEAD = _member(b"k0.cls", b"1") + _member(b"k0.txt", b"a")  # one clean sample: 2048 bytes
AT = len(HEAD)  # where the hostile part starts


def _shard(tmp_path, blob: bytes, name: str = "hostile.tar") -> str:
    path = tmp_path / name
    path.write_bytes(blob)
    return str(path)


def _stream_keys(path: str, name: str) -> list[str]:
    """iter_samples over the shard as a stream: no seeking, size unknown (a `pipe:` or an object store)."""
    opened = open_shard(path)
    try:
        return [s.key for s in iter_samples(CountingReader(opened.stream, False, None, name), read_exts=None)]
    finally:
        opened.release()


def _wds_keys(path: str) -> list[str]:
    """webdataset's keys (a tar without samples is no error here: its empty check is about shard lists)."""
    return [s["__key__"] for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)]


# ---- 1. pax records that made the scan loop forever or fail without shard and offset -----------

_GOOD = _record("path", b"k1.cls")
MALFORMED_PAX = {
    "length zero": b"0" + _GOOD[2:],
    "negative length": b"-" + _GOOD,
    "length past the header's end": b"99" + _GOOD[2:],
    "length shorter than the record": b"5" + _GOOD[2:],
    "length one too short": b"%d" % (len(_GOOD) - 1) + _GOOD[2:],
    "no space": _GOOD.replace(b" ", b"", 1) + b"\n",
    "non-digit length": b"1x" + _GOOD[2:],
    "huge length": b"9" * 30 + _GOOD[2:],
    "no equals sign": _GOOD.replace(b"=", b"_"),
    "no newline at the end": _GOOD[:-1] + b"X",
    "empty keyword": _record("", b"k1.cls"),
    "garbage after a good record": _GOOD + b"garbage",
    "only garbage": b"\xff\xfe garbage without structure",
    "bad size value": _record("size", b"12x"),
    "GNU sparse keys": _record("GNU.sparse.major", b"1") + _record("GNU.sparse.minor", b"0"),
}


@pytest.mark.timeout(10)  # the length-zero record used to spin forever
@pytest.mark.parametrize("case", list(MALFORMED_PAX))
def test_a_malformed_pax_record_is_an_error_naming_shard_and_pax_header_offset(tmp_path, case):
    path = _shard(tmp_path, HEAD + _pax(MALFORMED_PAX[case]) + _member(b"k1.cls") + END)
    scan = scan_shard(path, "hostile.tar")
    assert scan.status == "broken" and scan.keys == []
    assert "'hostile.tar'" in scan.error and "pax" in scan.error and scan.error_offset == AT, scan.error
    with pytest.raises(TarFormatError, match="'hostile.tar'.*pax.* at byte 2048") as err:
        list(read_keys(path, "hostile.tar", None, ReadCounts()))
    assert (err.value.shard, err.value.offset) == ("hostile.tar", AT)
    with pytest.raises(TarFormatError, match="'hostile.tar'.*pax"):
        _stream_keys(path, "hostile.tar")


@pytest.mark.timeout(10)
def test_records_in_the_padding_of_a_pax_header_are_an_error(tmp_path):
    # tarfile parses the padded blocks: a record hidden past the header's size would rename the member
    pax = bytearray(_pax(_GOOD))
    hidden = _record("path", b"k9.cls")
    pax[BLOCK + len(_GOOD) : BLOCK + len(_GOOD) + len(hidden)] = hidden
    path = _shard(tmp_path, HEAD + bytes(pax) + _member(b"zz.cls") + END)
    scan = scan_shard(path, "hostile.tar")
    assert scan.status == "broken" and "pax" in scan.error and scan.error_offset == AT


# ---- header fields: numbers, sizes, names, extended headers --------------------------------------

_MINUS_16 = b"\xff" * 11 + b"\xf0"
HOSTILE_HEADERS = {  # case: (bytes after HEAD, what the error says, offset relative to AT)
    "negative base-256 size": (_header(b"k1.cls", 0, size_field=_MINUS_16) + END, "negative size", 0),
    "huge base-256 size": (
        _header(b"k1.cls", 0, size_field=b"\x80" + (1 << 80).to_bytes(11, "big")) + END,
        "truncated",
        0,
    ),
    "huge octal size": (_header(b"k1.cls", 0, size_field=b"77777777777\0") + END, "truncated", 0),
    "size past the end of the file": (_header(b"k1.cls", 10**6) + END, "truncated", 0),
    "base-256 marker that tarfile refuses": (
        _header(b"k1.cls", 0, size_field=b"\x81" + bytes(11)) + END,
        "bad number",
        0,
    ),
    "bad number in the mode field": (_member(b"k1.cls", mode=b"rw-r--r-") + END, "bad number", 0),
    "checksum that is not a number": (
        bytes(_header(b"k1.cls", 1)[:148]) + b"zzzzzz\0 " + _header(b"k1.cls", 1)[156:] + _pad(b"1") + END,
        "bad number",
        0,
    ),
    "name that is not UTF-8": (_member(b"k1\xff.cls") + END, "not UTF-8", 0),
    "GNU long name that is not UTF-8": (_long(b"k1\xff.cls\0") + _member(b"k1.cls") + END, "not UTF-8", BLOCK * 2),
    "pax path that is not UTF-8": (
        _pax(_record("path", b"k1\xff.cls")) + _member(b"zz.cls") + END,
        "not UTF-8",
        BLOCK * 2,
    ),
    "huge GNU long name": (_header(b"././@LongLink", 1 << 40, b"L") + END, "truncated", 0),
    "GNU long name larger than the limit": (
        _header(b"././@LongLink", 2 << 20, b"L") + bytes(2 << 20) + END,
        "extended header",
        0,
    ),
    "extended header followed by the end-of-archive marker": (_pax(_GOOD) + END, "no member after", 0),
    "global header followed by the end-of-archive marker": (
        _pax(_record("comment", b"x"), b"g") + END,
        "no member after",
        0,
    ),
    "GNU sparse member": (_member(b"k1.cls", kind=b"S") + END, "sparse", 0),
    "global pax header that sets path": (
        _pax(_record("path", b"k9.cls"), b"g") + _member(b"k1.cls") + END,
        "global pax header",
        0,
    ),
    "pax size past the end of the file": (
        _pax(_record("size", b"9" * 15)) + _member(b"k1.cls") + END,
        "truncated",
        BLOCK * 2,
    ),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_fields_are_errors_naming_shard_and_offset(tmp_path, case):
    tail, says, at = HOSTILE_HEADERS[case]
    path = _shard(tmp_path, HEAD + tail)
    scan = scan_shard(path, "hostile.tar")
    assert scan.status == "broken" and "'hostile.tar'" in scan.error and says in scan.error, scan.error
    assert scan.error_offset == AT + at, scan.error
    with pytest.raises(TarFormatError, match=says) as err:
        list(read_keys(path, "hostile.tar", None, ReadCounts()))
    assert err.value.offset == AT + at
    with pytest.raises(TarFormatError, match="'hostile.tar'") as err:  # as a stream, size unknown
        _stream_keys(path, "hostile.tar")
    assert 0 <= err.value.offset <= len(HEAD + tail)


@pytest.mark.timeout(10)
def test_a_sample_of_thousands_of_members_is_read_in_linear_time(tmp_path):
    # the repeated-extension check used to compare each member with every earlier one of its sample
    n = 8000
    path = _shard(tmp_path, b"".join(_header(b"k.e%d" % i, 0) for i in range(n)) + END)
    start = time.monotonic()
    scan = scan_shard(path, "many.tar")
    assert scan.status == "ok" and scan.keys == ["k"] and scan.arrays["member_count"].tolist() == [n]
    assert time.monotonic() - start < 3


# ---- members named as tarfile (so webdataset) names them ----------------------------------------

AGREE = {  # case: (bytes after HEAD, the keys after k0)
    "GNU long name with a NUL inside": (_long(b"k1.cls\0junk.txt\0") + _member(b"zz.bin") + END, ["k1"]),
    "GNU long name without its NUL, padding not zero": (  # tarfile reads the name up to a NUL in the blocks
        _header(b"././@LongLink", 2, b"L") + b"k1" + b"2.cls" + bytes(BLOCK - 7) + _member(b"zz.bin") + END,
        ["k12"],
    ),
    "empty GNU long name": (_long(b"") + _member(b"k1.cls") + END, []),
    "GNU long name, then pax path: the first wins": (
        _long(b"k1.cls\0") + _pax(_record("path", b"k2.cls")) + _member(b"k3.cls") + END,
        ["k1"],
    ),
    "pax path, then GNU long name: the first wins": (
        _pax(_record("path", b"k2.cls")) + _long(b"k1.cls\0") + _member(b"k3.cls") + END,
        ["k2"],
    ),
    "two pax headers: the first wins": (
        _pax(_record("path", b"k2.cls")) + _pax(_record("path", b"k1.cls")) + _member(b"k3.cls") + END,
        ["k2"],
    ),
    "two pax sizes: the first wins": (
        _pax(_record("size", b"600"))
        + _pax(_record("size", b"1"))
        + _header(b"k1.cls", 1)
        + _pad(b"y" * 600)
        + _member(b"k1.txt")
        + END,
        ["k1"],
    ),
    "empty pax path": (_pax(_record("path", b"")) + _member(b"k1.cls") + END, []),
    "GNU long link between long name and member": (
        _long(b"k1.cls\0") + _long(b"target\0", b"K") + _member(b"zz.cls") + END,
        ["k1"],
    ),
    "pax path with a trailing slash": (_pax(_record("path", b"k1.cls/")) + _member(b"zz.cls") + END, ["k1"]),
    "Solaris extended header": (_pax(_record("path", b"k1.cls"), b"X") + _member(b"zz.cls") + END, ["k1"]),
    "global pax header with a comment": (_pax(_record("comment", b"hi"), b"g") + _member(b"k1.cls") + END, ["k1"]),
    "old-style directory with a size: no data follows": (
        _header(b"d/", 1024, b"\0") + _member(b"k1.cls") + END,
        ["k1"],
    ),
    "symlink with a size: no data follows": (_header(b"k1.lnk", 512, b"2") + _member(b"k1.cls") + END, ["k1"]),
    "unknown type: data skipped": (_member(b"k1.zz", b"data", b"Z") + _member(b"k1.cls") + END, ["k1"]),
    "contiguous file": (_member(b"k1.cls", kind=b"7") + END, ["k1"]),
    "signed checksum": (_member("k1é.cls".encode(), signed=True) + END, ["k1é"]),
    "prefix without ustar magic": (_member(b"k1.cls", prefix=b"dir", magic=b"") + END, ["dir/k1"]),
    "size with a sign and spaces": (_member(b"k1.cls", size_field=b" +1        \0") + END, ["k1"]),
    "key with a newline": (_member(b"k1\nx.cls") + _member(b"k1\nx.txt") + _member(b"k2.cls") + END, ["k1\nx", "k2"]),
    "garbage after the end-of-archive marker": (_member(b"k1.cls") + END + b"\x13garbage" * 100, ["k1"]),
    "no second zero block": (_member(b"k1.cls") + bytes(BLOCK), ["k1"]),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", list(AGREE))
def test_members_are_named_and_found_as_webdataset_finds_them(tmp_path, case):
    tail, keys = AGREE[case]
    path = _shard(tmp_path, HEAD + tail)
    expected = ["k0", *keys]
    assert _wds_keys(path) == expected
    scan = scan_shard(path, "hostile.tar")
    assert scan.status == "ok" and scan.keys == expected, scan.error
    assert [k for k, _, _ in read_keys(path, "hostile.tar", None, ReadCounts())] == expected
    assert _stream_keys(path, "hostile.tar") == expected


# ---- 2. a key with a newline no longer shifts the keys after it ---------------------------------


def _newline_shard(tmp_path, fmnist) -> str:
    images, labels = fmnist
    path = tmp_path / "nl.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(24):
            key = f"k{i:03d}" + ("\nx" if i in (10, 17) else "")
            for ext, data in (("cls", str(int(labels[i])).encode()), ("png", encode_png(images[i]))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_keys_with_newlines_index_to_webdatasets_keys_and_select_the_right_samples(tmp_path, fmnist):
    path = _newline_shard(tmp_path, fmnist)
    reference = list(wds.WebDataset(path, shardshuffle=False))
    keys = [s["__key__"] for s in reference]
    assert "k010\nx" in keys and len(keys) == 24
    # the indexer's path: a scan saved as a part, the parts merged into the index
    part = tmp_path / "part.npz"
    save_scan(scan_shard(path, "nl.tar"), part)
    assert load_scan(part).keys == keys
    idx = write_index(tmp_path / "index", [part], str(tmp_path), "shard-key")
    idx = Index(tmp_path / "index")
    assert idx.keys(0) == keys and idx.n_samples == 24
    rows = [3, 9, 10, 11, 17, 18, 23]
    keep = KeepList.from_rows(idx, rows, tmp_path / "keep")
    got = list(PrunedWebDataset(path, keep=keep, shardshuffle=False))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
    assert [strip(s) for s in got] == [strip(reference[r]) for r in rows]


def test_index_parts_of_older_versions_are_read_or_refused(tmp_path, fmnist):
    """Parts written before keys had offsets (keys joined by newlines): read when unambiguous."""
    path = _newline_shard(tmp_path, fmnist)
    scan = scan_shard(path, "nl.tar")
    meta = np.frombuffer(json.dumps(scan.meta()).encode(), dtype=np.uint8)
    old = tmp_path / "old.npz"
    np.savez(old, meta=meta, keys=np.frombuffer("\n".join(scan.keys).encode(), dtype=np.uint8), **scan.arrays)
    with pytest.raises(ValueError, match="newline"):
        load_scan(old)
    clean = scan_shard(_shard(tmp_path, HEAD + _member(b"k1.cls") + END), "clean.tar")
    meta = np.frombuffer(json.dumps(clean.meta()).encode(), dtype=np.uint8)
    np.savez(old, meta=meta, keys=np.frombuffer("\n".join(clean.keys).encode(), dtype=np.uint8), **clean.arrays)
    assert load_scan(old).keys == ["k0", "k1"]


# ---- 3. error types: picklable, a tarfile.ReadError, through DataLoader workers -----------------


def test_tar_format_error_pickles_and_is_a_read_error_and_a_value_error():
    err = TarFormatError("a.tar", 1024, "corrupt tar header (checksum mismatch)")
    back = pickle.loads(pickle.dumps(err))
    assert (
        type(back) is TarFormatError
        and str(back) == str(err) == "shard 'a.tar': corrupt tar header (checksum mismatch) at byte 1024"
    )
    assert (back.shard, back.offset) == ("a.tar", 1024)
    assert isinstance(err, tarfile.ReadError) and isinstance(err, ValueError)
    # torch's DataLoader re-raises a worker's error as its type built from one message
    again = TarFormatError(
        f"Caught TarFormatError in DataLoader worker process 0.\nOriginal Traceback:\n"
        f"streamprune.shards.tarscan.TarFormatError: {(str(err), '/data/a.tar')}"
    )
    assert (again.shard, again.offset) == ("a.tar", 1024) and "at byte 1024" in str(again)
    assert str(pickle.loads(pickle.dumps(again))) == str(again)
    assert (TarFormatError("shard '\\N': odd at byte 5").shard, TarFormatError("no shard named").offset) == (None, None)


@pytest.mark.timeout(120)
def test_a_dataloader_worker_raises_tar_format_error_naming_shard_and_offset(tmp_path):
    import torch

    bad = bytearray(HEAD + _member(b"k1.cls") + END)
    bad[AT + 3] ^= 0x01  # a name byte of the second sample's header: its checksum breaks
    path = _shard(tmp_path, bytes(bad), "bad.tar")
    keep = KeepList.from_keys([("bad.tar", "k0"), ("bad.tar", "k1")])
    loader = torch.utils.data.DataLoader(
        PrunedWebDataset(path, keep=keep, shardshuffle=False), batch_size=None, num_workers=1
    )
    with pytest.raises(
        TarFormatError, match=r"shard 'bad.tar': corrupt tar header \(checksum mismatch\) at byte 2048"
    ) as err:
        list(loader)
    assert (err.value.shard, err.value.offset) == ("bad.tar", AT)


def test_a_truncated_shard_raises_tarfile_read_error_as_webdataset_does(tmp_path, bases):
    raw = bases["plain"].raw
    member = next(m for m in bases["plain"].members if m[2] > 200 and m[0] > 2 * BLOCK)
    path = _shard(tmp_path, raw[: member[0] + BLOCK + 100], "cut.tar")  # inside a member's data
    with pytest.raises(tarfile.ReadError):
        _wds_keys(path)
    keep = KeepList.from_keys([("cut.tar", k) for k in bases["plain"].keys])
    with pytest.raises(tarfile.ReadError, match="'cut.tar': truncated") as err:
        list(PrunedWebDataset(path, keep=keep, shardshuffle=False))
    assert isinstance(err.value, ValueError) and err.value.offset == member[0]


# ---- 4. fuzz: real shards mutated at random --------------------------------------------------------


class _Base:
    def __init__(self, path: str):
        self.path = path
        self.raw = Path(path).read_bytes()
        self.keys = _wds_keys(path)
        self.members = []  # (offset, type, size) of every header block, extended headers included
        pos = 0
        while self.raw[pos : pos + BLOCK] != bytes(BLOCK):
            h = self.raw[pos : pos + BLOCK]
            size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
            self.members.append((pos, h[156:157], size))
            pos += BLOCK + _padded(size)
        self.end = pos


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fmnist):
    """Three real shards: webdataset's (write_shards), TarWriter's with pax headers (long, non-ASCII
    keys), tarfile's GNU format with long names."""
    images, labels = fmnist
    out = tmp_path_factory.mktemp("hostile-bases")
    plain = write_shards(images[:8], labels[:8], out / "plain", samples_per_shard=8)[0]
    pax = out / "pax.tar"
    with wds.TarWriter(str(pax), mtime=0) as sink:
        for i in range(8, 14):
            key = f"{i:03d}" if i % 3 == 0 else f"ü{i:03d}-" + "p" * 110
            sink.write({"__key__": key, "cls": int(labels[i]), "png": encode_png(images[i])})
    gnu = out / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(14, 20):
            key = f"{i:03d}" if i % 3 == 0 else "d" * 60 + f"/{i:03d}-" + "n" * 60
            for ext, data in (("cls", str(int(labels[i])).encode()), ("png", encode_png(images[i]))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    found = {"plain": _Base(plain), "pax": _Base(str(pax)), "gnu": _Base(str(gnu))}
    assert {t for _, t, _ in found["pax"].members} == {b"x", b"0"}
    assert {t for _, t, _ in found["gnu"].members} == {b"L", b"0"}
    return found


_TYPES = [b"0", b"\0", b"1", b"2", b"5", b"7", b"L", b"K", b"S", b"x", b"X", b"g", b"D", b"Z"]
_NUMBERS = [(100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345)]


def _field_value(rng: random.Random, width: int, old: int) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return b"%0*o\0" % (width - 1, max(0, old + rng.randint(-700, 700)))
    if choice == 1:
        return b"%0*o\0" % (width - 1, max(0, old + BLOCK * rng.randint(-3, 3)))
    if choice == 2:
        return b"\x80" + rng.getrandbits(8 * (width - 1)).to_bytes(width - 1, "big")
    if choice == 3:
        return b"\xff" + rng.getrandbits(8 * (width - 1)).to_bytes(width - 1, "big")
    if choice == 4:
        return b"7" * (width - 1) + b"\0"
    if choice == 5:
        return bytes(rng.choice(b"0123456789 +-_xo\0\xff") for _ in range(width))
    if choice == 6:
        return b" " * width
    if choice == 7:
        return b"0" * width  # no terminator
    return bytes(rng.randrange(256) for _ in range(width))


def _mutate(base: _Base, rng: random.Random) -> tuple[str, bytes]:  # noqa: C901 (a table of mutations, one branch each)
    """One random mutation of a clean shard; header mutations get a correct checksum most of the time."""
    b = bytearray(base.raw)
    pos, _, size = rng.choice(base.members)
    op = rng.choice(
        [
            "flip",
            "name",
            "size",
            "type",
            "checksum",
            "number",
            "prefix",
            "extended",
            "truncate",
            "append",
            "data",
            "splice",
        ]
    )
    fix = rng.random() < 0.75
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            b[pos + rng.randrange(BLOCK)] ^= 1 << rng.randrange(8)
    elif op == "name":
        old = bytes(b[pos : pos + 100]).split(b"\0")[0]
        new = rng.choice(
            [
                old[: rng.randrange(len(old) + 1)],
                old + rng.choice([b"/", b".x", b"\n.y", b"\xff"]),
                old.replace(b".", rng.choice([b"", b"..", b"/", b"\0"]), 1),
                bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 99))),
                b"__meta__",
                b"k\n" + old,
                b"a.cls",
                b"a.CLS",
                b".cls",
            ]
        )
        b[pos : pos + 100] = new[:100].ljust(100, b"\0")
    elif op == "size":
        b[pos + 124 : pos + 136] = _field_value(rng, 12, size)
    elif op == "type":
        b[pos + 156] = rng.choice(_TYPES + [bytes([rng.randrange(256)])])[0]
    elif op == "checksum":
        b[pos + 148 : pos + 156] = rng.choice([_field_value(rng, 8, 0), b"%06o\0 " % (sum(b[pos : pos + 148]) + 1)])
        fix = False
    elif op == "number":
        a, z = rng.choice(_NUMBERS)
        b[pos + a : pos + z] = _field_value(rng, z - a, 0)
    elif op == "prefix":
        if rng.random() < 0.5:
            b[pos + 345 : pos + 345 + 20] = bytes(rng.choice(b"abc/.\0\xff") for _ in range(20))
        else:
            b[pos + 257 : pos + 265] = bytes(8)
    elif op == "extended":
        ext = [m for m in base.members if m[1] in (b"x", b"L")]
        pos, _, size = rng.choice(ext or base.members)
        fix = False
        data = pos + BLOCK
        end = data + size
        edit = rng.randrange(7)
        if edit == 0:  # the first record's length (or the long name's first bytes)
            b[data : data + 3] = rng.choice([b"0 p", b"-5 ", b"999", b"ab ", b"   ", b"1\n2"])
        elif edit == 1:
            b[end - 1] = rng.choice(b"X\0=\n ")
        elif edit == 2:
            i = bytes(b[data:end]).find(b"=")
            b[data + max(i, 0)] = rng.choice(b" _\0\xff")
        elif edit == 3:
            b[data + rng.randrange(size)] = rng.randrange(256)
        elif edit == 4:  # shift the rest of the shard by a few bytes
            at = data + rng.randrange(size)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))) if rng.random() < 0.5 else b""
            if rng.random() < 0.5:
                del b[at : at + rng.randint(1, 3)]
        elif edit == 5:  # the extended header's size
            b[pos + 124 : pos + 136] = b"%011o\0" % max(0, size + rng.randint(-20, 20))
            fix = True
        else:
            b[end : data + _padded(size)] = bytes(rng.choice(b"19 path=x.cls\n") for _ in range(_padded(size) - size))
    elif op == "truncate":
        fix = False
        cut = rng.randrange(len(b)) if rng.random() < 0.6 else BLOCK * rng.randrange(len(b) // BLOCK)
        del b[cut:]
    elif op == "append":
        at = base.end if rng.random() < 0.5 else rng.randrange(base.end, len(b))
        tail = rng.choice(
            [
                bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))),
                bytes(base.raw[base.members[0][0] : base.members[0][0] + BLOCK]),
                bytes(BLOCK) + bytes(rng.randrange(256) for _ in range(700)),
            ]
        )
        b[at:] = tail
        fix = False
    elif op == "data":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        fix = False
    else:  # splice: drop, repeat or insert whole blocks
        first = BLOCK * rng.randrange(len(b) // BLOCK)
        n = BLOCK * rng.randint(1, 3)
        what = rng.randrange(3)
        if what == 0:
            del b[first : first + n]
        elif what == 1:
            b[first:first] = b[first : first + n]
        else:
            b[first:first] = bytes(rng.randrange(256) for _ in range(n))
        fix = False
    if fix and pos + BLOCK <= len(b):
        b[pos : pos + BLOCK] = _fix_checksum(bytearray(b[pos : pos + BLOCK]))
    return op, bytes(b)


class _Slow(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
    """Interrupt the main thread after `seconds` (a hang in a Python loop becomes a failure)."""

    def alarm(signum, frame):
        raise _Slow(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's timer, restored after
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001), interval)


def _outcome(read, name: str, size: int) -> tuple[str, list[str] | None]:
    """Keys read, or None after a clear error (a TarFormatError naming the shard and an offset in the file)."""
    try:
        return "ok", read()
    except TarFormatError as exc:
        assert exc.shard == name and f"shard {name!r}" in str(exc) and isinstance(exc.offset, int), repr(exc)
        assert 0 <= exc.offset <= size, repr(exc)
        return "error", None


CASES = 300


@pytest.mark.timeout(300)
def test_fuzz_mutated_shards_give_webdatasets_samples_or_a_clear_error(tmp_path, bases):
    start = time.monotonic()
    tally: Counter = Counter()
    for case in range(CASES):
        rng = random.Random(case)
        kind = ("plain", "pax", "gnu")[case % 3]
        op, blob = _mutate(bases[kind], rng)
        name = f"fuzz-{case}-{kind}-{op}.tar"
        path = _shard(tmp_path, blob, name)
        label = f"case {case} ({kind}, {op})"
        with _time_limit(2.0, label):
            scan = scan_shard(path, name)
            if scan.status == "broken":
                assert f"shard {name!r}" in scan.error and isinstance(scan.error_offset, int), (label, scan.error)
                assert 0 <= scan.error_offset <= len(blob), (label, scan.error)
                results = [("error", None)]
            else:
                results = [("ok", scan.keys)]
            results.append(
                _outcome(lambda p=path, n=name: [k for k, _, _ in read_keys(p, n, None, ReadCounts())], name, len(blob))
            )
            results.append(_outcome(lambda p=path, n=name: _stream_keys(p, n), name, len(blob)))
            reference = None
            if any(status == "ok" for status, _ in results):
                try:
                    reference = _wds_keys(path)
                except Exception as exc:  # webdataset's own error: then streamprune must have failed too
                    raise AssertionError(f"{label}: streamprune read {results}, webdataset failed: {exc!r}") from exc
        for status, keys in results:
            assert status == "error" or keys == reference, (label, keys, reference)
        tally[(op, results[0][0])] += 1
        os.remove(path)
    elapsed = time.monotonic() - start
    ok = sum(n for (_, status), n in tally.items() if status == "ok")
    print(f"fuzz: {CASES} cases in {elapsed:.1f} s, {ok} read like webdataset, {CASES - ok} clear errors; {tally}")
    assert ok >= 30 and CASES - ok >= 60  # both outcomes are exercised
    assert len({op for op, _ in tally}) == 12


# ---- 5. fuzz: real keep-lists edited at random ----------------------------------------------------

_JSON_VALUES = [None, True, -1, 0, 1, 1.5, 2**63, 10**30, -(10**30), "abc", "", [], {}, [1], float("nan")]
_ARRAY_VALUES = [-1, 0, 1, 2**31, 2**62, 2**63 - 1, -(2**63)]


@pytest.fixture(scope="module")
def keep_bases(tmp_path_factory, fmnist, make_index):
    """Three real shards (half the keys non-ASCII) and two real keep-lists of them: `reduced`,
    written as `reduce` writes one (positions, byte ranges, weights; a shard with nothing kept),
    and `user`, from `KeepList.from_keys` (keys and identities only)."""
    from types import SimpleNamespace

    from streamprune.formats.keeplist import KeepListWriter, new_manifest

    images, labels = fmnist
    out = tmp_path_factory.mktemp("keep-bases")
    (out / "shards").mkdir()
    paths = [str(out / "shards" / f"part-{s}.tar") for s in range(3)]
    for s, path in enumerate(paths):
        with wds.TarWriter(path, mtime=0) as sink:
            for i in range(8):
                key = f"ü{s}-{i:02d}" if i % 2 else f"s{s}-{i:02d}"
                sink.write({"__key__": key, "cls": int(labels[8 * s + i]), "png": encode_png(images[8 * s + i])})
    index = make_index(paths, out / "run")
    rows = np.array([r for r in range(index.n_samples) if r % 3 != 1 and not 8 <= r < 16])
    manifest = new_manifest(
        method="random",
        balance="none",
        ratio=0.5,
        seed=0,
        k=len(rows),
        N=index.n_samples,
        n_rows=index.n_samples,
        fingerprint=index.fingerprint,
        index_root=index.root,
        weights=True,
        params={},
    )
    with KeepListWriter.for_index(out / "reduced", index, manifest, len(rows), with_weights=True) as writer:
        writer.add_rows(index, rows, index.n_samples / len(rows))
    pairs = [(index.names[s], key) for s in range(3) for key in index.keys(s)[s::2]]
    KeepList.from_keys(pairs, fingerprint=index.fingerprint).save(out / "user")
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    return SimpleNamespace(paths=paths, lists=[out / "reduced", out / "user"], samples=samples)


def _keep_content(keep: KeepList) -> dict:
    """What a keep-list holds, as plain values, each part checked against the format (README
    "Keep-list directory"): what loads must be a list the writer could have written."""
    m = keep.manifest
    assert m["k"] == len(keep) and isinstance(m.get("fingerprint"), (str, type(None))), m
    names = list(keep.names)
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names), names
    shards = []
    for i, name in enumerate(names):
        keys, cut = keep.shard_keys(name), keep.shard_slice(name)
        assert len(keys) == keep.kept_count(name) == cut.stop - cut.start >= 0, name
        assert all(isinstance(k, str) for k in keys)
        samples = None if keep.samples is None else int(keep.samples[i])
        size = None if keep.shard_bytes is None else int(keep.shard_bytes[i])
        assert (samples is None or samples >= len(keys)) and (size is None or size >= -1), (samples, size)
        positions = keep.shard_positions(name)
        if positions is not None:
            positions = positions.tolist()
            assert positions == sorted(set(positions)) and all(0 <= p < (samples or 2**63) for p in positions)
        ranges = keep.shard_ranges(name)
        if ranges is not None:
            ranges = ranges.tolist()
            flat = [x for r in ranges for x in r]
            assert all(a < b for a, b in ranges) and flat == sorted(flat) and all(x >= 0 for x in flat[:1]), ranges
        weights = keep.shard_weights(name)
        if weights is not None:
            weights = weights.tolist()
            assert all(np.isfinite(w) and w > 0 for w in weights), weights
        shards.append([name, keys, samples, size, positions, ranges, weights])
    ids = keep.ids()
    assert ids.dtype == np.dtype("u8,u8") and len(ids) == len(keep)
    return {"manifest": m, "shards": shards, "ids": ids.tolist()}


def _edit_npy(path: Path, rng: random.Random) -> str:
    a = np.load(path, allow_pickle=False)
    what = rng.randrange(6)
    if what == 0:
        dtype = rng.choice(["<i4", ">i8", "<u8", "<f8", "u1", "<i8"])
        np.save(path, np.zeros(a.shape, dtype) if a.dtype.names else a.astype(dtype))
        return f"dtype {dtype}"
    if what == 1:
        shapes = [a[:-1], np.concatenate([a, a[-1:]]), a.reshape(len(a), -1, 1), a.reshape(-1)[:1].reshape(()), a[:0]]
        np.save(path, rng.choice(shapes))
        return "shape"
    if what == 2:  # a header declaring GBs: refused without reading (or allocating) them
        raw = path.read_bytes()
        old = str(a.shape).encode()
        new = rng.choice([b"(1099511627776,", b"(4611686018427387904,", b"(-5,", b"(99999999999999999999,"])
        new += b"2)" if a.ndim == 2 else b")"
        head = raw[:128].replace(b"'shape': " + old, b"'shape': " + new)
        head = head.replace(b" " * max(0, len(new) - len(old)) + b"\n", b"\n", 1)
        path.write_bytes(head + raw[128:])
        return f"header shape {new.decode()}"
    if what == 5 and a.dtype.names is None:  # object arrays need pickle: never loaded
        np.save(path, a.astype(object), allow_pickle=True)
        return "object dtype"
    if not a.size:
        return "nothing to edit"
    a = a.copy()
    i = rng.randrange(a.shape[0])
    if a.dtype.names:
        a[i] = (rng.getrandbits(64), rng.getrandbits(64))
        edit = "an identity"
    elif a.dtype.kind == "f":
        a[i] = rng.choice([np.nan, np.inf, -1.0, 0.0, 1e308])
        edit = f"weight {a[i]}"
    elif what == 3:
        a.reshape(-1)[rng.randrange(a.size)] = rng.choice(_ARRAY_VALUES)
        edit = "a value out of range"
    else:
        j = rng.randrange(a.shape[0])
        a[i], a[j] = a[j].copy(), (a[i] + rng.choice([-1, 1, 0])).copy()
        edit = "two values swapped or shifted"
    np.save(path, a)
    return edit


def _edit_json(path: Path, rng: random.Random) -> str:
    doc = json.loads(path.read_text())
    what = rng.randrange(6)
    if what == 0:
        doc = rng.choice([{}, [], [1, 2], "x", [[]], [{}], None])
        edit = f"document {doc!r}"
    elif isinstance(doc, dict):  # manifest.json
        field = rng.choice([*doc, "k", "k", "fingerprint", "weights", "N"])
        if what == 1:
            doc.pop(field, None)
            edit = f"{field} removed"
        else:
            doc[field] = rng.choice([*_JSON_VALUES, doc.get(field), 10**18, (doc.get("k") or 0) + 1])
            edit = f"{field}={doc[field]!r}"
    else:  # shards.json
        entry = rng.choice(doc)
        field = rng.choice(list(entry))
        if what == 1:
            del entry[field]
            edit = f"{field} removed"
        elif what == 2 and len(doc) > 1:
            other = rng.choice([e for e in doc if e is not entry])
            if rng.random() < 0.5:
                entry["name"] = other["name"]
                edit = "a name twice"
            else:
                moved = rng.choice([1, -1])
                entry["kept"], other["kept"] = entry["kept"] + moved, other["kept"] - moved
                edit = "kept moved between shards"
        elif what == 3:
            doc.insert(rng.randrange(len(doc) + 1), dict(entry) if rng.random() < 0.5 else 7)
            edit = "an entry added"
        else:
            near = [entry[field] + rng.choice([-1, 1])] if isinstance(entry[field], int) else [entry[field] + "x"]
            entry[field] = rng.choice([*_JSON_VALUES, 10**12, 2**62, *near])
            edit = f"{field}={entry[field]!r}"
    path.write_text(json.dumps(doc))
    return edit


def _edit_keep_list(path: Path, rng: random.Random) -> tuple[str, str]:
    """One random edit of one file of a keep-list directory: (the file, what was done)."""
    name = rng.choice(sorted(p.name for p in path.iterdir()))
    file = path / name
    raw = bytearray(file.read_bytes())
    op = rng.choice(["truncate", "extend", "flip", "remove", "edit", "edit", "edit", "edit"])
    if op == "remove" and name != "manifest.json":
        file.unlink()
        return name, "removed"
    if op == "truncate":
        del raw[rng.randrange(len(raw) + 1) :]
    elif op == "extend":
        raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 600))) if rng.random() < 0.5 else bytes(64)
    elif op == "flip" or name == "keys.bin":
        if name == "keys.bin" and op != "flip":  # invalid UTF-8: a stray continuation or lead byte
            op = "invalid UTF-8"
            raw[rng.randrange(len(raw))] = rng.choice([0x80, 0xBF, 0xC3, 0xFF])
        else:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif name.endswith(".npy"):
        return name, _edit_npy(file, rng)
    else:
        return name, _edit_json(file, rng)
    file.write_bytes(bytes(raw))
    return name, op


KEEP_CASES = 200


@pytest.mark.timeout(300)
def test_fuzz_edited_keep_lists_load_as_valid_lists_or_damaged_run_errors_naming_the_file(
    tmp_path, keep_bases, kept_samples, sample_content
):
    import shutil
    import tracemalloc

    from streamprune.errors import DamagedRunError, StreamPruneError

    tally: Counter = Counter()
    failures: list[str] = []
    for case in range(KEEP_CASES):
        rng = random.Random(case)
        base = keep_bases.lists[case % 2]
        path = tmp_path / f"keep-{case}"
        shutil.copytree(base, path)
        name, edit = _edit_keep_list(path, rng)
        label = f"case {case} ({base.name}, {name}: {edit})"
        tracemalloc.start()
        try:
            with _time_limit(5.0, label):
                try:
                    keep = KeepList.load(path)
                    content = _keep_content(keep)
                    again = _keep_content(KeepList.load(keep.save(tmp_path / f"again-{case}")))
                    assert again == content, "saved again, it reads differently"
                    outcome = "loaded"
                except DamagedRunError as exc:
                    assert str(path) in str(exc) and name in str(exc), f"unnamed: {exc}"
                    outcome = "refused"
                if case % 4 < 2:  # the loader on the same list: its kept samples exactly, or a clear error
                    try:
                        weighted = case % 2 == 0  # the reduced list's weights
                        got = list(
                            PrunedWebDataset(
                                keep_bases.paths, keep=path, shardshuffle=False, weights=weighted, empty_check=False
                            )
                        )
                    except StreamPruneError as exc:
                        assert outcome == "refused" or "part-" in str(exc), f"loader: {exc}"
                    else:  # (positions, which it does not read, may be damaged)
                        weights = [s.pop("__weight__", 1.0) for s in got]
                        assert all(w > 0 and np.isfinite(w) for w in weights)
                        want = kept_samples(keep_bases.samples, KeepList.load(path))
                        assert sample_content(got) == sample_content(want), "the loader's samples differ"
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 64 << 20, f"{peak >> 20} MiB allocated"
            tally[outcome] += 1
        except (Exception, _Slow) as exc:  # every case runs; all failures are listed
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
            tally[type(exc).__name__] += 1
        finally:
            tracemalloc.stop()
        shutil.rmtree(path, ignore_errors=True)
    print(f"keep-list fuzz: {KEEP_CASES} cases: {dict(tally)}")
    assert not failures, f"{len(failures)} of {KEEP_CASES} cases failed ({dict(tally)}):\n" + "\n".join(failures)
    assert tally["loaded"] >= 20 and tally["refused"] >= 100  # both outcomes are exercised


@pytest.mark.timeout(60)
def test_a_byte_range_past_a_shards_end_is_an_error_not_a_huge_read(tmp_path, keep_bases):
    """A keep-list of shards whose size was unknown when indexed (`bytes` -1): a range past the
    tar's end is refused naming the shard, without allocating its length."""
    import shutil
    import tracemalloc

    from streamprune.errors import ChangedShardError

    path = tmp_path / "keep"
    shutil.copytree(keep_bases.lists[0], path)
    shards = json.loads((path / "shards.json").read_text())
    (path / "shards.json").write_text(json.dumps([{**s, "bytes": -1} for s in shards]))
    ranges = np.load(path / "ranges.npy")
    size = os.path.getsize(keep_bases.paths[2])
    for end in (size + BLOCK, 2**40, 2**62):
        ranges[-1, 1] = end
        np.save(path / "ranges.npy", ranges)
        tracemalloc.start()
        try:
            with pytest.raises(ChangedShardError, match=rf"part-2.tar' has {size} bytes.* reach {end}"):
                list(PrunedWebDataset(keep_bases.paths, keep=path, shardshuffle=False))
            assert tracemalloc.get_traced_memory()[1] < 64 << 20
        finally:
            tracemalloc.stop()
