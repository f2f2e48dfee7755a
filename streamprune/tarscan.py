"""Tar member scanning that reads headers only and seeks past data where the stream allows.

Samples are grouped exactly as webdataset groups them (`base_plus_ext`, lower-cased
extensions, `__*__` metadata skipped), so index rows line up with what a loader yields.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_REGULAR = (b"0", b"\0", b"7")


class TarFormatError(ValueError):
    """A corrupt or truncated tar; names the shard and the byte offset of the problem."""

    def __init__(self, shard: str, offset: int, message: str):
        self.shard, self.offset = shard, offset
        super().__init__(f"shard {shard!r}: {message} at byte {offset}")


class StreamDataError(ValueError):
    """Compressed shard data that is cut or corrupt (raised by the decompressing stream; a
    `CountingReader` turns it into a `TarFormatError` naming the shard and the tar offset)."""


@dataclass
class Member:
    """A regular file in a tar: where its headers start, where its data starts, its size."""

    name: str
    header_offset: int
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        """Offset just past the member's padded data."""
        return self.data_offset + _padded(self.size)


@dataclass
class Sample:
    """A webdataset sample: its key and members, in tar order; `data` holds members that were read."""

    key: str
    members: list[Member] = field(default_factory=list)
    data: dict[str, bytes] = field(default_factory=dict)

    @property
    def start(self) -> int:
        return self.members[0].header_offset

    @property
    def end(self) -> int:
        return self.members[-1].end


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class CountingReader:
    """Reads a binary stream exactly, counting bytes read, seeking past data when allowed.

    `pos` is the shard offset the stream starts at (a slice of a shard read into memory).
    """

    def __init__(self, stream, seekable: bool, size: int | None, shard: str, pos: int = 0):
        self.stream, self.seekable, self.size, self.shard = stream, seekable, size, shard
        self.pos = pos
        self.bytes_read = 0

    def read(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            try:
                chunk = self.stream.read(n - got)
            except StreamDataError as exc:
                raise TarFormatError(self.shard, self.pos + got, str(exc)) from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        self.pos += got
        self.bytes_read += got
        return b"".join(chunks)

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            if self.size is not None and self.pos + n > self.size:
                raise TarFormatError(self.shard, self.size, "truncated: data ends early")
            self.stream.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        end = self.pos + n
        while self.pos < end:
            if not self.read(min(1 << 20, end - self.pos)):
                raise TarFormatError(self.shard, self.pos, "truncated: data ends early")


def _octal(field_: bytes, shard: str, offset: int) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(shard, offset, f"corrupt tar header (bad number {text!r})") from None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def iter_members(reader: CountingReader, want: Callable[[str], bool] = lambda name: False,
                 require_end: bool = True) -> Iterator[tuple[Member, bytes | None]]:
    """Yield each regular member and, when `want(name)`, its data; headers only otherwise.

    `require_end=False` reads a slice of a tar: a clean end of stream ends it.
    """
    shard = reader.shard
    long_name: str | None = None
    pax: dict[str, str] = {}
    first_header: int | None = None
    while True:
        offset = reader.pos
        header = reader.read(BLOCK)
        if len(header) == 0:
            if not require_end and first_header is None:
                return
            raise TarFormatError(shard, offset, "truncated: no end-of-archive marker")
        if len(header) < BLOCK:
            raise TarFormatError(shard, offset, "truncated tar header")
        if header == bytes(BLOCK):
            return
        stored = _octal(header[148:156], shard, offset)
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise TarFormatError(shard, offset, "corrupt tar header (checksum mismatch)")
        size = _octal(header[124:136], shard, offset)
        kind = header[156:157]
        data_offset = offset + BLOCK
        if reader.size is not None and data_offset + size > reader.size:
            raise TarFormatError(shard, offset, f"truncated: member claims {size} bytes, file has "
                                               f"{reader.size - data_offset}")
        if first_header is None:
            first_header = offset
        if kind in (b"L", b"x", b"g"):
            data = reader.read(size)
            reader.skip(_padded(size) - size)
            if len(data) < size:
                raise TarFormatError(shard, data_offset, "truncated extended header")
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            elif kind == b"x":
                pax.update(_pax_records(data))
            if kind == b"g":
                first_header = None
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        name = pax.get("path", long_name or name)
        size = int(pax.get("size", size))
        member = Member(name, first_header, data_offset, size)
        long_name, pax, first_header = None, {}, None
        if kind not in _REGULAR:
            reader.skip(_padded(size))
            continue
        data = None
        if want(name):
            data = reader.read(size)
            if len(data) < size:
                raise TarFormatError(shard, data_offset, f"truncated: member {name!r} data ends early")
            reader.skip(_padded(size) - size)
        else:
            reader.skip(_padded(size))
        yield member, data


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's (key, extension) of a member name, or None for a member it skips."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
        return None
    m = _BASE_EXT.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def iter_samples(reader: CountingReader, read_exts: tuple[str, ...] | None = (),
                 keep: Callable[[str], bool] | None = None, require_end: bool = True) -> Iterator[Sample]:
    """Group members into samples as webdataset does.

    `read_exts`: extensions whose bytes are read into `Sample.data` (None: all).
    `keep(key)`: when given, only kept samples are read and yielded; the others' data is skipped.
    A repeated extension inside one sample is an error (webdataset refuses it too).
    """
    def want(name: str) -> bool:
        parts = split_name(name)
        return (parts is not None and (read_exts is None or parts[1] in read_exts)
                and (keep is None or keep(parts[0])))

    current: Sample | None = None
    for member, data in _kept_members(iter_members(reader, want, require_end), keep):
        parts = split_name(member.name)
        if parts is None:
            continue
        key, ext = parts
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key)
        if any(split_name(m.name)[1] == ext for m in current.members):
            raise TarFormatError(reader.shard, member.header_offset,
                                 f"member {member.name!r} repeats extension .{ext} of sample {key!r}")
        current.members.append(member)
        if data is not None:
            current.data[ext] = data
    if current is not None:
        yield current


def _kept_members(members: Iterator[tuple[Member, bytes | None]], keep: Callable[[str], bool] | None
                  ) -> Iterator[tuple[Member, bytes | None]]:
    if keep is None:
        yield from members
        return
    for member, data in members:
        parts = split_name(member.name)
        if parts is not None and keep(parts[0]):
            yield member, data
