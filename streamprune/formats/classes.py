"""`RUN/classes.json`: the run's class list (names, or only a count for integer labels) and the
samples per class, versioned (`CLASSES_FORMAT`) and checked on read, so that record, reduce and
report agree on what label index means which class."""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from streamprune import storage
from streamprune.errors import DamagedRunError, InputError, SettingsError, StreamPruneError
from streamprune.formats.headers import CLASSES_FORMAT, check_format, header
from streamprune.formats.rundir import RunDir
from streamprune.shards.labels import Label, class_count, is_int


@dataclass(frozen=True)
class Classes:
    """The run's classes: `names` (string labels, index = position) or only a count (integer labels)."""

    num_classes: int
    names: tuple[str, ...] | None = None
    label: str = "cls"
    counts: tuple[int, ...] | None = None  # samples per class, when scanned

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise SettingsError(f"need at least one class, not {self.num_classes}")
        if self.names is not None and (len(self.names) != self.num_classes or len(set(self.names)) != len(self.names)):
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
            lookup: dict[str, int] | None = self.__dict__.get("_lookup")
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
    def from_labels(cls, counts: Counter[Label], label: str = "cls") -> Classes:
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
    def from_file(cls, path: str | os.PathLike[str], label: str = "cls") -> Classes:
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

    def save(self, run: str | os.PathLike[str]) -> str:
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
    def load(cls, run: str | os.PathLike[str]) -> Classes | None:
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
    def _from_doc(cls, doc: dict[str, Any], path: str, error: type[StreamPruneError]) -> Classes:
        """The classes of a `classes.json` document, each field checked: a wrong one is an `error`
        naming the file and the field."""
        check_format(doc, CLASSES_FORMAT, repr(path))
        n, names, counts, label = (doc.get(k) for k in ("num_classes", "names", "counts", "label"))

        def refuse(field: str, expected: str, value: object) -> StreamPruneError:
            return error(f"class list {path!r}: {field}: must be {expected}, not {reprlib.repr(value)}")

        if not is_int(n) or n < 1:
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
            isinstance(counts, list) and len(counts) == n and all(is_int(c) and c >= 0 for c in counts)
        ):
            raise refuse("counts", f"null or a list of {n} integers >= 0 (one per class)", counts)
        return cls(
            n,
            None if names is None else tuple(names),
            label or "cls",
            None if counts is None else tuple(counts),
        )
