"""Where a sample's label comes from (`--label SPEC`), and the run's class list `RUN/classes.json`.

A spec is `cls` (the default), any other member extension (`txt`, `label`, ...), `json:FIELD`
(dotted paths such as `json:meta.label`) or `package.module:function` taking the sample dict.
A label is an integer class index or a string class name; names are mapped to indices by the
class list: every distinct name of the dataset, sorted, found by `scan_labels` over all shards
(or given as a file), stored with the run so that record, reduce and report agree.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard

from streamprune.errors import InputError, SettingsError
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


def is_int(value) -> TypeGuard[int]:
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


def scan_labels(
    url: str, name: str, label_of: Callable[[dict], Label], members: tuple[str, ...] | None
) -> tuple[Counter, int, list[str]]:
    """Count the labels of one shard, reading only the label's members (all for a function).

    Returns the counts, the number of samples without a usable label and up to 3 of their reasons.
    """
    from streamprune.shards.opening import open_shard
    from streamprune.shards.tarscan import CountingReader, iter_samples

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
