"""Where a sample's label comes from (`--label SPEC`), and the run's class list `RUN/classes.json`.

A spec is `cls` (the default), any other member extension (`txt`, `label`, ...), `json:FIELD`
(dotted paths such as `json:meta.label`) or `package.module:function` taking the sample dict.
A label is an integer class index or a string class name; names are mapped to indices by the
class list: every distinct name of the dataset, sorted, found by `scan_labels` over all shards
(or given as a file), stored with the run so that record, reduce and report agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeGuard

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError, SettingsError, StreamPruneError
from streamprune.formats.headers import CLASSES_FORMAT, check_format, header
from streamprune.formats.rundir import RunDir
from streamprune.plugins import import_function, is_function_spec

_EXT = re.compile(r"^[a-z0-9_][a-z0-9_.-]*$")
_DIGITS = re.compile(r"[-+]?\d+")
MAX_LABEL = 2**63 - 1  # the largest class index that int64 targets hold
MAX_INFERRED_CLASSES = 100_000  # more classes are given (num_classes or a class list), never inferred

Label = int | str


class BadSample(InputError):
    """A sample that cannot become a training example (undecodable, a bomb, no usable label)."""


class LabelError(BadSample):
    """A sample's label is missing or unreadable; names the sample."""


def _is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_name(sample: dict) -> str:
    """How errors name a sample: its key and shard."""
    return f"sample {sample.get('__key__')!r} of {sample.get('__url__') or sample.get('__shard__')!r}"


def _from_text(raw: bytes | str, where: str, origin: str) -> Label:
    text = (raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else str(raw)).strip()
    try:
        return int(text)
    except ValueError:
        if _DIGITS.fullmatch(text):  # more digits than Python turns into an int
            raise LabelError(f"{where}: {origin} is an integer of {len(text):,} digits, not a class index") from None
        return text


def check_label(value, where: str, origin: str) -> Label:
    """`value` as a label (an int in [0, 2^63) or a non-empty name), or a LabelError naming the sample."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) and not hasattr(value, "__index__"):
        raise LabelError(f"{where}: {origin} is {value!r}, not an integer class or a class name")
    if isinstance(value, str):
        if not value:
            raise LabelError(f"{where}: {origin} is an empty string")
        return value
    value = int(value.__index__()) if not isinstance(value, int) else value
    if not 0 <= value <= MAX_LABEL:
        shown = value if value.bit_length() <= 128 else f"an integer of {value.bit_length():,} bits"
        raise LabelError(f"{where}: {origin} is {shown}, not a class index in [0, 2^63)")
    return value


def class_count(largest: int, where: str) -> int:
    """The class count of integer labels whose largest is `largest` (found at `where`): that plus
    one, up to MAX_INFERRED_CLASSES; above, one stray label would build a huge model silently."""
    if largest >= MAX_INFERRED_CLASSES:
        raise InputError(
            f"{where}: label {largest:,} would make {largest + 1:,} classes, more than the "
            f"{MAX_INFERRED_CLASSES:,} inferred at most; if there are that many, give the count "
            "(--num-classes, record's num_classes) or a class list (--classes)"
        )
    return largest + 1


@dataclass(frozen=True)
class LabelSpec:
    """A parsed `--label` spec; picklable (a function spec is imported where it is called)."""

    spec: str = "cls"
    member: str | None = field(init=False, default=None)  # the member extension read, None for a function
    path: tuple[str, ...] = field(init=False, default=())  # json field path

    def __post_init__(self):
        spec = self.spec
        if spec.startswith("json:"):
            path = tuple(spec[5:].split("."))
            if not all(path):
                raise SettingsError(f"label {spec!r}: expected json:FIELD or json:a.b.c")
            object.__setattr__(self, "member", "json")
            object.__setattr__(self, "path", path)
        elif is_function_spec(spec):
            pass
        elif _EXT.match(spec):
            object.__setattr__(self, "member", spec)
        else:
            raise SettingsError(
                f"label {spec!r}: expected 'cls', a member extension, 'json:FIELD' or 'package.module:function'"
            )

    @property
    def members(self) -> tuple[str, ...] | None:
        """The member extensions to read for the label; None: all (a function sees the whole sample)."""
        return None if self.member is None else (self.member,)

    def function(self) -> Callable[[dict], Label]:
        return import_function(self.spec, "label")

    def __call__(self, sample: dict) -> Label:
        """The label of a webdataset sample dict (raw member bytes): an int or a class name."""
        where = sample_name(sample)
        if self.member is None:
            try:
                value = self.function()(sample)
            except LabelError:
                raise
            except Exception as exc:
                raise LabelError(f"{where}: label function {self.spec!r} failed: {exc!r}") from None
            return check_label(value, where, f"the label from {self.spec}")
        if self.member not in sample:
            raise LabelError(f"{where}: no .{self.member} member for the label")
        if self.member != "json":
            try:
                origin = f"label .{self.member}"
                return check_label(_from_text(sample[self.member], where, origin), where, origin)
            except UnicodeDecodeError:
                raise LabelError(f"{where}: label .{self.member} is not UTF-8 text") from None
        try:
            value = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise LabelError(f"{where}: .json member is not valid JSON: {exc}") from None
        for i, part in enumerate(self.path):
            if not isinstance(value, dict) or part not in value:
                raise LabelError(f"{where}: .json has no field {'.'.join(self.path[: i + 1])!r}")
            value = value[part]
        return check_label(value, where, f"json field {'.'.join(self.path)!r}")


@dataclass(frozen=True)
class Classes:
    """The run's classes: `names` (string labels, index = position) or only a count (integer labels)."""

    num_classes: int
    names: tuple[str, ...] | None = None
    label: str = "cls"
    counts: tuple[int, ...] | None = None  # samples per class, when scanned

    def __post_init__(self):
        if self.num_classes < 1:
            raise SettingsError(f"need at least one class, not {self.num_classes}")
        if self.names is not None:
            if len(self.names) != self.num_classes or len(set(self.names)) != len(self.names):
                raise SettingsError(f"class names must be {self.num_classes} distinct strings")

    @property
    def digest(self) -> str:
        """A short hash of the class list (kept in the stats store's config, compared on resume)."""
        blob = json.dumps([self.num_classes, self.names]).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def index_of(self, label: Label, where: str = "a sample") -> int:
        """The class index of a label; a name not in the list or an index out of range is a ValueError
        (the run's classes do not fit the data: stop, do not skip)."""
        if isinstance(label, str):
            if self.names is None:
                raise InputError(
                    f"{where}: label {label!r} is a name, but the run's classes are integers 0..{self.num_classes - 1}"
                )
            lookup = self.__dict__.get("_lookup")
            if lookup is None:
                lookup = {n: i for i, n in enumerate(self.names)}
                object.__setattr__(self, "_lookup", lookup)
            if label not in lookup:
                raise InputError(f"{where}: label {label!r} is not among the run's {self.num_classes} classes")
            return lookup[label]
        if not 0 <= label < self.num_classes:
            raise InputError(f"{where}: label {label} is outside [0, {self.num_classes})")
        return label

    def name(self, index: int) -> str:
        return self.names[index] if self.names is not None else str(index)

    @classmethod
    def from_labels(cls, counts: Counter, label: str = "cls") -> "Classes":
        """Classes of a dataset from its label counts: sorted names, or 0..max for integers."""
        names = sorted(k for k in counts if isinstance(k, str))
        ints = [k for k in counts if not isinstance(k, str)]
        if names and ints:
            raise InputError(
                f"labels ({label}) mix class names ({names[:3]}) and integers ({sorted(ints)[:3]}); make them one kind"
            )
        if not counts:
            raise InputError(f"no sample has a label ({label})")
        if names:
            return cls(len(names), tuple(names), label, tuple(counts[n] for n in names))
        n = class_count(max(ints), f"labels ({label})")
        return cls(n, None, label, tuple(counts.get(i, 0) for i in range(n)))

    @classmethod
    def from_file(cls, path: str | os.PathLike, label: str = "cls") -> "Classes":
        """A user's class list (a local path or an object-store URL): a JSON list of names, a
        `classes.json` of a run, or one name per line."""
        path = os.fspath(path)
        try:
            text = storage.read_bytes(path).decode()
        except OSError as exc:
            raise InputError(f"class list {path!r}: cannot read: {exc.strerror or 'no such file'}") from None
        except UnicodeDecodeError:
            raise InputError(f"class list {path!r}: cannot read: not UTF-8 text") from None
        if storage.name(path).endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise InputError(f"class list {path!r} is not valid JSON: {exc}") from None
            if isinstance(data, dict) and data.get("format") == CLASSES_FORMAT.name:
                return cls._from_doc(data, path, InputError)
            if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
                raise InputError(f"class list {path!r}: expected a JSON list of class names")
            names = data
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise InputError(f"class list {path!r}: names no class; write one name per line or a JSON list")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InputError(f"class list {path!r} names {dup!r} twice")
        return cls(len(names), tuple(names), label)

    def save(self, run: str | os.PathLike) -> str:
        """Write `RUN/classes.json` whole (readers see the old list or the new one: a rename
        locally, one request on object stores); return where."""
        path = RunDir(run).classes
        doc = {
            **header(CLASSES_FORMAT, stamp=False),
            "label": self.label,
            "num_classes": self.num_classes,
            "names": None if self.names is None else list(self.names),
            "counts": None if self.counts is None else list(self.counts),
        }
        storage.write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, run: str | os.PathLike) -> "Classes | None":
        """`RUN/classes.json`, or None when the run has none."""
        path = RunDir(run).classes
        try:
            raw = storage.read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw.decode())
        except ValueError as exc:  # UnicodeDecodeError included
            raise DamagedRunError(f"{path!r} is damaged: {exc}") from None
        return cls._from_doc(doc, path, DamagedRunError)

    @classmethod
    def _from_doc(cls, doc: dict, path: str, error: type[StreamPruneError]) -> "Classes":
        """The classes of a `classes.json` document, each field checked: a wrong one is an `error`
        naming the file and the field."""
        check_format(doc, CLASSES_FORMAT, repr(path))
        n, names, counts, label = (doc.get(k) for k in ("num_classes", "names", "counts", "label"))

        def refuse(field: str, expected: str, value) -> StreamPruneError:
            return error(f"class list {path!r}: {field}: must be {expected}, not {reprlib.repr(value)}")

        if not _is_int(n) or n < 1:
            raise refuse("num_classes", "an integer >= 1", n)
        if label is not None and not (isinstance(label, str) and label):
            raise refuse("label", "a label spec (a non-empty string)", label)
        if names is not None and not (
            isinstance(names, list)
            and len(names) == n
            and all(isinstance(x, str) and x for x in names)
            and len(set(names)) == n
        ):
            raise refuse("names", f"null or a list of {n} distinct non-empty strings (one per class)", names)
        if counts is not None and not (
            isinstance(counts, list) and len(counts) == n and all(_is_int(c) and c >= 0 for c in counts)
        ):
            raise refuse("counts", f"null or a list of {n} integers >= 0 (one per class)", counts)
        return cls(
            n,
            None if names is None else tuple(names),
            label or "cls",
            None if counts is None else tuple(counts),
        )


def scan_labels(
    url: str, name: str, label_of: Callable[[dict], Label], members: tuple[str, ...] | None
) -> tuple[Counter, int, list[str]]:
    """Count the labels of one shard, reading only the label's members (all for a function).

    Returns the counts, the number of samples without a usable label and up to 3 of their reasons.
    """
    from streamprune.shards.tarscan import CountingReader, iter_samples
    from streamprune.shards.urls import open_shard

    opened = open_shard(url)
    reader = CountingReader(opened.stream, opened.seekable, opened.tar_size, name)
    counts: Counter = Counter()
    bad = 0
    reasons: list[str] = []
    try:
        for s in iter_samples(reader, members):
            try:
                counts[label_of({"__key__": s.key, "__url__": url, **s.data})] += 1
            except LabelError as exc:
                bad += 1
                if len(reasons) < 3:
                    reasons.append(str(exc))
        opened.close(url)
    finally:
        opened.release()
    return counts, bad, reasons


def count_classes(parts: "Iterable[tuple[Counter, int, list[str]]]", label: str, where: str) -> Classes:
    """The class list from per-shard `scan_labels` results (any order); an error when no label was usable."""
    counts: Counter = Counter()
    reasons: list[str] = []
    for part, _, why in parts:
        counts.update(part)
        reasons.extend(why[: 3 - len(reasons)])
    if not counts:
        raise InputError(f"no sample of {where} has a usable label ({label})" + (f": {reasons[0]}" if reasons else ""))
    return Classes.from_labels(counts, label)


def scan_classes(run: str | os.PathLike, label: str = "cls", *, shards: str | Iterable[str] | None = None) -> Classes:
    """`RUN/classes.json` from every indexed sample's label, counted here in one process (no Ray;
    `labelscan.build_classes` spreads the same over Ray tasks), saved and returned. `shards`: the
    URLs of the indexed shards to read (`shards.sources.shard_urls`)."""
    from streamprune.formats.index import Index
    from streamprune.shards.sources import shard_urls

    spec = LabelSpec(label)
    idx = Index(RunDir(run).index)
    urls = shard_urls(idx, shards)
    parts = (
        scan_labels(urls[s], idx.names[s], spec, spec.members)
        for s, info in enumerate(idx.shards)
        if info["status"] == "ok"
    )
    classes = count_classes(parts, label, repr(os.fspath(run)))
    classes.save(run)
    return classes
