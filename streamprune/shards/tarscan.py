"""Tar member scanning that reads headers only and seeks past data where the stream allows, through
`CountingReader`: the one byte-counting stream wrapper (the parser's, a decompressor's, a remote stream's).

Samples are grouped exactly as webdataset groups them (`base_plus_ext`, lower-cased
extensions, `__*__` metadata skipped), so index rows line up with what a loader yields.
"""

from __future__ import annotations

import ast
import io
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streamprune.errors import InputError

BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's regular types (but GNU sparse "S", refused)
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories: tarfile reads no data after them
_EXTENDED = (b"L", b"K", b"x", b"X", b"g")  # GNU long name / link, pax (and Solaris) extended, pax global
MAX_EXTENDED = 1 << 20  # largest extended header (pax records, GNU long name) read into memory
READ_CHUNK = 16 << 20  # largest single read: a size field claims more than a stream may hold
_HIGH = bytes(range(128, 256))
_PAX_RECORD = re.compile(rb"\d+ [^=]+=")  # where tarfile parses a pax record
# mode, uid, gid, size, mtime, checksum as tarfile and GNU tar write them (and devmajor, devminor)
_PLAIN = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0([0-7]{11})\0[0-7]{11}\0([0-7]{6})\0 ")
_PLAIN_DEVICES = (b"0000000\x000000000\x00", bytes(16))
_SHARD_AT = re.compile(r"""shard ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"): .*? at byte (\d+)""")


class TarFormatError(tarfile.ReadError, InputError):
    """A corrupt or truncated tar; names the shard and the byte offset of the problem.

    A `tarfile.ReadError` (what webdataset raises on such tars) and an `InputError`; picklable.
    Built from one preformatted message (as torch's DataLoader re-raises a worker's error), it
    takes `shard` and `offset` from the message when it names them.
    """

    shard: str | None
    offset: int | None
    message: str | None
    _args: tuple[str | int | None, ...]

    def __init__(self, shard: str | None, offset: int | None = None, message: str | None = None):
        if offset is None and message is None:
            text = str(shard)
            self.shard, self.offset = _shard_at(text)
            self.message, self._args = text, (text,)
            super().__init__(text)
            return
        self.shard, self.offset, self.message = shard, offset, message
        self._args = (shard, offset, message)
        super().__init__(f"shard {shard!r}: {message} at byte {offset}")

    def __reduce__(self):
        return type(self), self._args


def _shard_at(text: str) -> tuple[str | None, int | None]:
    """The shard and offset the last `shard NAME: ... at byte N` in `text` names (None, None: none)."""
    for found in reversed(list(_SHARD_AT.finditer(text))):
        try:
            return ast.literal_eval(found[1]), int(found[2])
        except (ValueError, SyntaxError):
            continue
    return None, None


class StreamDataError(InputError):
    """Compressed shard data that is cut or corrupt (raised by the decompressing stream; a
    `CountingReader` reading it turns it into a `TarFormatError` naming the shard and the tar offset)."""


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
    """The one byte-counting stream wrapper: `read(n)` returns `n` bytes of `stream` unless it ends
    (`-1`: all), counting them (`bytes_read`; `counted(n)` is told each read's count too, e.g. a
    remote file's bytes received), and `skip(n)` moves forward, by seeking when `seekable`.

    It serves the tar parser (`pos`: the shard offset read up to, starting at `pos` for a slice of a
    shard read into memory; `size`: the tar's size when known, which no skip may pass), a
    decompressor (the compressed bytes under it, through `readinto`; `failed`: the stream itself
    raised, so an error of the decompressor is one of storage, not of the data) and remote
    read-through streams (`stream_error(exc, shard, offset)`: a backend's exception as one naming them).
    `shard` names the shard in errors; a `StreamDataError` of `stream` (a decompressor's) becomes a
    `TarFormatError` at the tar offset where it was met. Closing it closes `stream`.
    """

    def __init__(
        self,
        stream,
        seekable: bool = False,
        size: int | None = None,
        shard: str = "",
        pos: int = 0,
        counted: Callable[[int], None] | None = None,
        stream_error: Callable[[Exception, str, int], BaseException] | None = None,
    ):
        self.stream, self.seekable, self.size, self.shard = stream, seekable, size, shard
        self.pos = pos
        self.bytes_read = 0
        self.counted, self.stream_error = counted, stream_error
        self.failed = False  # `stream` raised (not a StreamDataError)
        self.closed = False

    def read(self, n: int | None = -1) -> bytes:
        want = -1 if n is None else n  # < 0: to the end
        chunks, got = [], 0
        while want < 0 or got < want:
            chunk = self._read1(READ_CHUNK if want < 0 else min(want - got, READ_CHUNK), got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        self.pos += got
        self.bytes_read += got
        if self.counted is not None and got:
            self.counted(got)
        return b"".join(chunks)

    def _read1(self, n: int, got: int) -> bytes:
        """One read of `stream` (`got` bytes into the current `read`), its errors as the class says."""
        try:
            return self.stream.read(n)
        except StreamDataError as exc:
            raise TarFormatError(self.shard, self.pos + got, str(exc)) from None
        except BaseException as exc:
            self.failed = True
            error = exc
            if self.stream_error is not None and isinstance(exc, Exception):
                error = self.stream_error(exc, self.shard, self.pos + got)
            if error is exc:
                raise
            raise error from None

    def readinto(self, buffer) -> int:
        """`read` into `buffer` (so that an `io.BufferedReader` can read through this one)."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self.stream.close()

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            if self.size is not None and self.pos + n > self.size:
                raise TarFormatError(self.shard, self.size, "truncated: data ends early")
            try:
                self.stream.seek(n, io.SEEK_CUR)
            except (OverflowError, ValueError, OSError):
                raise TarFormatError(self.shard, self.pos, f"cannot skip {n} bytes: data ends early") from None
            self.pos += n
            return
        end = self.pos + n
        while self.pos < end:
            if not self.read(min(1 << 20, end - self.pos)):
                raise TarFormatError(self.shard, self.pos, "truncated: data ends early")


def _number(field_: bytes, shard: str, offset: int, what: str) -> int:
    """A numeric header field as tarfile reads it: octal text up to a NUL (spaces stripped), or
    GNU base-256 after a first byte 0x80 (0xff: negative)."""
    first = field_[0]
    if first == 0x80 or first == 0xFF:
        n = int.from_bytes(field_[1:], "big")
        return n - (1 << 8 * (len(field_) - 1)) if first == 0xFF else n
    text = field_.split(b"\0", 1)[0]
    try:
        return int(text.decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise TarFormatError(shard, offset, f"corrupt tar header (bad number {text!r} in the {what} field)") from None


def _check_header(header: bytes, shard: str, offset: int) -> int:
    """Check a header block as tarfile does (checksum, unsigned or signed; every numeric field);
    return its size field."""
    plain = _PLAIN.match(header, 100, 156)
    if plain is not None and header[329:345] in _PLAIN_DEVICES:  # the usual layout: every field a number
        stored, size = int(plain[2], 8), int(plain[1], 8)
    else:
        stored = _number(header[148:156], shard, offset, "checksum")
        size = None
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned:
        rest = header[:148] + header[156:]
        if stored != unsigned - 256 * (len(rest) - len(rest.translate(None, _HIGH))):
            raise TarFormatError(shard, offset, "corrupt tar header (checksum mismatch)")
    if size is not None:
        return size
    for a, b, what in (
        (100, 108, "mode"),
        (108, 116, "uid"),
        (116, 124, "gid"),
        (136, 148, "mtime"),
        (329, 337, "devmajor"),
        (337, 345, "devminor"),
    ):
        _number(header[a:b], shard, offset, what)
    size = _number(header[124:136], shard, offset, "size")
    if size < 0:
        raise TarFormatError(shard, offset, f"corrupt tar header (negative size {size})")
    return size


def _text(raw: bytes) -> str:
    """Bytes of a name as tarfile decodes them (UTF-8; other bytes kept as surrogates)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def _is_utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pax_records(block: bytes, size: int, shard: str, offset: int) -> dict[str, bytes]:
    """The records of a pax header at `offset` (its first `size` bytes of `block`, its padded data).

    Strictly POSIX: each record is `LENGTH KEYWORD=VALUE\n`, LENGTH its length in bytes, the
    records fill the data exactly, and the padding holds nothing tarfile would read as one.
    Anything else is a `TarFormatError` naming the shard and the pax header's offset.
    """

    def bad(why: str) -> TarFormatError:
        return TarFormatError(shard, offset, f"corrupt pax header ({why})")

    out: dict[str, bytes] = {}
    pos = 0
    while pos < size:
        space = block.find(b" ", pos, size)
        digits = block[pos:space] if space > pos else b""
        if not digits.isdigit() or len(digits) > 18:
            raise bad(f"record at {pos} does not start with its length")
        end = pos + int(digits)
        if end > size:
            raise bad(f"record at {pos} of {int(digits)} bytes runs past the header's {size}")
        eq = block.find(b"=", space + 2, end - 1)  # a keyword of one byte or more
        if eq < 0 or block[end - 1] != 0x0A:
            raise bad(f"record at {pos} is not 'LENGTH KEYWORD=VALUE\\n'")
        out[block[space + 1 : eq].decode("utf-8", "surrogateescape")] = block[eq + 1 : end - 1]
        pos = end
    if _PAX_RECORD.match(block, size):
        raise bad(f"a record in the padding past its {size} bytes")
    return out


def iter_members(  # noqa: C901 (the tar parser: one loop over hostile bytes, read whole)
    reader: CountingReader, want: Callable[[str], bool] = lambda name: False, require_end: bool = True
) -> Iterator[tuple[Member, bytes | None]]:
    """Yield each regular member and, when `want(name)`, its data; headers only otherwise.

    Names, sizes and where data follows are as Python's tarfile (so webdataset) reads them;
    what it reads differently or loosely (a corrupt header, a malformed pax record, a name that
    is not UTF-8, GNU sparse members, a global pax header setting path or size) is a
    `TarFormatError`. Every step moves forward by at least a block or raises.
    `require_end=False` reads a slice of a tar: a clean end of stream ends it.
    """
    shard = reader.shard
    chain: int | None = None  # offset of the first extended header of the coming member
    first_header: int | None = None  # the member's first header (pax global headers excluded)
    ext_name: str | None = None  # set by the first extended header that names the member (as tarfile)
    ext_size: int | None = None
    while True:
        offset = reader.pos
        header = reader.read(BLOCK)
        if len(header) == 0:
            if not require_end and first_header is None and chain is None:
                return
            raise TarFormatError(shard, offset, "truncated: no end-of-archive marker")
        if len(header) < BLOCK:
            raise TarFormatError(shard, offset, "truncated tar header")
        if header == _ZERO_BLOCK:
            if chain is not None:
                raise TarFormatError(shard, chain, "extended header with no member after it")
            return
        size = _check_header(header, shard, offset)
        kind = header[156:157]
        data_offset = offset + BLOCK
        if first_header is None:
            first_header = offset
        if kind in _EXTENDED:
            if chain is None:
                chain = offset
            if kind == b"g" and first_header == offset:  # global: not part of the next sample
                first_header = None
            if reader.size is not None and data_offset + size > reader.size:
                raise TarFormatError(
                    shard, offset, f"truncated: member claims {size} bytes, file has {reader.size - data_offset}"
                )
            if size > MAX_EXTENDED:
                raise TarFormatError(shard, offset, f"extended header of {size} bytes (at most {MAX_EXTENDED})")
            block = reader.read(_padded(size))  # tarfile reads the padded blocks
            if len(block) < _padded(size):
                raise TarFormatError(shard, data_offset, "truncated extended header")
            if kind == b"L":
                if ext_name is None:
                    ext_name = _text(block.split(b"\0", 1)[0])
            elif kind != b"K":
                records = _pax_records(block, size, shard, offset)
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise TarFormatError(shard, offset, "GNU sparse member in a pax header (not supported)")
                if kind == b"g":
                    if "path" in records or "size" in records:
                        raise TarFormatError(
                            shard, offset, "global pax header sets a member's path or size (not supported)"
                        )
                else:
                    if ext_name is None and "path" in records:
                        ext_name = _text(records["path"]).rstrip("/")
                    if ext_size is None and "size" in records:
                        value = records["size"]
                        if not value.isdigit() or len(value) > 18:
                            raise TarFormatError(shard, offset, f"corrupt pax header (size {value[:40]!r})")
                        ext_size = int(value)
            continue
        if kind == b"S":
            raise TarFormatError(shard, offset, "GNU sparse member (not supported)")
        name = _text(header[:100].split(b"\0", 1)[0])
        if kind == b"\0" and name.endswith("/"):  # an old-style directory
            kind = b"5"
        prefix = header[345:500].split(b"\0", 1)[0]
        if ext_name is not None:
            name = ext_name
        elif prefix:
            name = _text(prefix) + "/" + name
        if ext_size is not None:
            size = ext_size
        start = first_header
        chain, first_header, ext_name, ext_size = None, None, None, None
        if kind in _NO_DATA:
            continue
        if reader.size is not None and data_offset + size > reader.size:
            raise TarFormatError(
                shard, offset, f"truncated: member claims {size} bytes, file has {reader.size - data_offset}"
            )
        if kind not in _REGULAR:
            reader.skip(_padded(size))
            continue
        if not _is_utf8(name):
            raise TarFormatError(shard, offset, f"member name {name!r} is not UTF-8")
        member = Member(name, start, data_offset, size)
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


def iter_samples(
    reader: CountingReader,
    read_exts: tuple[str, ...] | None = (),
    keep: Callable[[str], bool] | None = None,
    require_end: bool = True,
) -> Iterator[Sample]:
    """Group members into samples as webdataset does.

    `read_exts`: extensions whose bytes are read into `Sample.data` (None: all).
    `keep(key)`: when given, only kept samples are read and yielded; the others' data is skipped.
    A repeated extension inside one sample is an error (webdataset refuses it too).
    """

    def want(name: str) -> bool:
        parts = split_name(name)
        return parts is not None and (read_exts is None or parts[1] in read_exts) and (keep is None or keep(parts[0]))

    current: Sample | None = None
    exts: set[str] = set()  # the current sample's (a set: linear in members, however many)
    for member, data in _kept_members(iter_members(reader, want, require_end), keep):
        parts = split_name(member.name)
        if parts is None:
            continue
        key, ext = parts
        if current is None or key != current.key:
            if current is not None:
                yield current
            current, exts = Sample(key), set()
        if ext in exts:
            raise TarFormatError(
                reader.shard, member.header_offset, f"member {member.name!r} repeats extension .{ext} of sample {key!r}"
            )
        exts.add(ext)
        current.members.append(member)
        if data is not None:
            current.data[ext] = data
    if current is not None:
        yield current


def _kept_members(
    members: Iterator[tuple[Member, bytes | None]], keep: Callable[[str], bool] | None
) -> Iterator[tuple[Member, bytes | None]]:
    if keep is None:
        yield from members
        return
    for member, data in members:
        parts = split_name(member.name)
        if parts is not None and keep(parts[0]):
            yield member, data
