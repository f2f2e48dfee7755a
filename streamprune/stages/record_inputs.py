"""What `record` trains on, found before any training: the run's label spec, its first samples'
images (sizes, greyscale) or a decode function's example, the classes (a class list of names, or
a count of integer labels, checked on the first samples), the training view and model size, and
the errors that say what to pass when the first samples have no label."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from streamprune.errors import InputError, SettingsError
from streamprune.formats.classes import Classes
from streamprune.formats.index import Index
from streamprune.formats.rundir import RunDir
from streamprune.formats.stats_store import StatsStore, store_exists
from streamprune.shards.labels import BadSample, LabelSpec, class_count, sample_name
from streamprune.training.decode import (
    CPU_SIZE,
    DEFAULT_SIZE,
    IMAGE_EXTS,
    PROBE_SAMPLES,
    Probe,
    SampleDecoder,
    View,
    probe_images,
)
from streamprune.training.models import CPU_MODEL, model_name
from streamprune.training.samples import indexed_samples


def record_label(run: str, label: str | None, decode: str | None, classes: str | None) -> str:
    """The label spec to record with: `label`, else the one `RUN/classes.json` was counted with
    (`index --label`), else cls. Without a class list file (`classes`), a `label` other than the
    run's class list's is refused, naming both."""
    stored = None if decode else Classes.load(run)
    if stored is None or label in (None, stored.label):
        return label or (stored.label if stored is not None else "cls")
    if classes is not None:
        return label
    path = RunDir(run).classes
    raise SettingsError(
        f"record --label {label}: the run's class list {path!r} was counted with the label {stored.label} "
        f"(by `index --label {stored.label}` or an earlier record); leave --label out to record with "
        f"{stored.label}, or remove {path!r} to count the labels of {label}"
    )


def _first_samples(idx: Index, healthy: list[int], urls: list[str], limit: int = 2000) -> Iterator[dict]:
    """Raw sample dicts of the first `limit` samples of the first shards (at most 4), read from `urls`."""
    seen = 0
    for shard in healthy[:4]:
        for sample, _ in indexed_samples(idx, shard, urls[shard]):
            yield sample
            seen += 1
            if seen >= limit:
                return


def inputs(
    run: str,
    idx: Index,
    healthy: list[int],
    urls: list[str],
    shards: str | Iterable[str] | None,
    label: str,
    decode: str | None,
    classes: Classes | str | os.PathLike | None,
    num_classes: int | None,
    address: str | None,
    progress: bool,
) -> tuple[Probe | None, tuple[int, ...] | None, Classes, bool]:
    """What the run trains on, from its first samples: the images' sizes (None with a decode function),
    the decode function's example shape (None for images) and the classes; True when the classes
    are a list of names.

    Class names (string labels) come from `classes` (a list file or Classes), else `RUN/classes.json`
    made for the same label, else a scan of every label (saved there). Integer labels need no list:
    their count is `num_classes`, else the largest label among the first 2,000 samples plus one
    (up to MAX_INFERRED_CLASSES); a label of those samples outside the count is refused here."""
    probe, shape, raw = _first_labels(run, idx, healthy, urls, label, decode)
    key = decode or LabelSpec(label).spec
    if isinstance(classes, (str, os.PathLike)):
        classes = Classes.from_file(classes, key)
    if classes is None:
        stored = Classes.load(run)
        if stored is not None and stored.label == key:
            classes = stored
        elif any(isinstance(r, str) for r, _ in raw):  # names: a class list of every label
            from streamprune.stages.label_scan import build_classes

            classes = build_classes(run, label, decode=decode, address=address, progress=progress, shards=shards)
    found, named = _counted(raw, key, classes, num_classes)
    return probe, shape, found, named


def _first_labels(
    run: str, idx: Index, healthy: list[int], urls: list[str], label: str, decode: str | None
) -> tuple[Probe | None, tuple[int, ...] | None, list[tuple[int | str, str]]]:
    """The images' sizes (None with a decode function), the decode function's example shape (None
    for images) and `(label, sample)` of the first samples that have one; an InputError when none has."""
    spec = LabelSpec(label)
    samples = _first_samples(idx, healthy, urls)
    head = list(itertools.islice(samples, PROBE_SAMPLES))  # the rest is streamed: memory stays small
    probe = None if decode else probe_images(head)
    decoder = SampleDecoder(None, spec, None, decode)
    raw: list[tuple[int | str, str]] = []  # (label, sample)
    shape: tuple[int, ...] | None = None
    seen, reason = 0, ""
    for sample in itertools.chain(head, samples):
        seen += 1
        try:
            if decode:
                x, lab = decoder.user_decode(sample)
                shape = shape or tuple(torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).shape)
            else:
                lab = decoder.raw_label(sample)
        except BadSample as exc:
            reason = reason or str(exc)
            continue
        raw.append((lab, sample_name(sample)))
    if not raw:
        raise _no_label(run, decode or spec.spec, decode, seen, reason, head)
    return probe, shape, raw


def _counted(
    raw: list[tuple[int | str, str]], key: str, classes: Classes | None, num_classes: int | None
) -> tuple[Classes, bool]:
    """The run's classes, and whether they are a list of names: `classes` when it has names (with
    `num_classes` agreeing), else a count of integer labels (`num_classes`, the class list's, or the
    largest label seen plus one), checked on the first samples' labels."""
    if classes is not None and classes.names is not None:
        if num_classes is not None and num_classes != classes.num_classes:
            raise SettingsError(
                f"num_classes {num_classes} differs from the {classes.num_classes} class names of the run's "
                "class list; leave --num-classes out"
            )
        return classes, True
    largest = max(((r, where) for r, where in raw if isinstance(r, int)), default=None)
    count = num_classes or (classes.num_classes if classes is not None else None)
    if count is None:
        assert largest is not None  # every label is an int: names made a class list above
        return Classes(class_count(*largest), label=key), False
    given = Classes(count, label=key)
    if largest is not None:
        given.index_of(*largest)  # a label outside the given count: refused before any work
    return given, False


def _no_label(run: str, key: str, decode: str | None, seen: int, reason: str, head: list[dict]) -> InputError:
    """The error when none of the first `seen` samples gave a label: the first reason, the members
    the samples have, and what to pass."""
    where = f"none of the first {seen:,} samples of {run!r}"
    if decode:
        return InputError(f"{where} could be decoded by {decode} ({reason}); fix the decode function")
    members = sorted({k for sample in head for k in sample if not k.startswith("__")})
    return InputError(
        f"{where} has a label {key} ({reason}); the shards' members are: {', '.join(members) or 'none'}; "
        f"pass --label SPEC (e.g. {_label_example(head, members)})"
    )


def _label_example(head: list[dict], members: list[str]) -> str:
    """A label spec these samples may have: a JSON field named like a label, another member, or json:label."""
    doc: object = None
    if "json" in members:
        with contextlib.suppress(ValueError):  # UnicodeDecodeError included
            doc = json.loads(next(s["json"] for s in head if "json" in s))
    fields = [str(f) for f in doc] if isinstance(doc, dict) else []
    named = [f for f in fields if "label" in f.lower() or "class" in f.lower()]
    others = [m for m in members if m not in IMAGE_EXTS and m != "json"]
    return f"json:{named[0]}" if named else others[0] if others else f"json:{fields[0] if fields else 'label'}"


def training_view(
    probe: Probe | None,
    decoded: tuple[int, ...] | None,
    image_size: int | None,
    model: Any,
    store_path: str,
    gpus_per_worker: float,
) -> tuple[View | None, tuple[int, ...], Any, str | None]:
    """How images become examples (None with a decode function), the examples' shape, the model
    (chosen by size when none is given and the images are not kept at their own size), and the
    line saying so (None when nothing was chosen)."""
    view, note = None, None
    if probe is not None:
        size, default_model = _unset_size_model(store_path, gpus_per_worker)
        view = probe.view(image_size, size)
        if image_size is None and not probe.native:
            model = model or default_model
            note = _size_note(probe, view, model, gpus_per_worker)
    shape = view.shape if view is not None else decoded
    assert shape is not None  # a decode function gave an example, else `inputs` refused
    return view, shape, model, note


def _unset_size_model(store_path: str, gpus_per_worker: float) -> tuple[int, str | None]:
    """The square size, and the model when none is given, of images not kept at their own size: the
    run's own when it was recorded (a resume on other hardware trains the same), else DEFAULT_SIZE
    and the model by size (None) on GPUs, CPU_SIZE and CPU_MODEL on CPUs."""
    stored = StatsStore.open(store_path, mode="r").config if store_exists(store_path) else {}
    view = stored.get("view")
    if view and view[3]:  # [channels, height, width, resized]
        return int(view[1]), stored.get("model")
    return (DEFAULT_SIZE, None) if gpus_per_worker else (CPU_SIZE, CPU_MODEL)


def _size_note(probe: Probe, view: View, model: Any, gpus_per_worker: float) -> str:
    """The line saying which size and model images not kept at their own size are trained at."""
    where = "GPUs" if gpus_per_worker else "CPU"
    return (
        f"record: {probe.describe()} on {where}: training a {model_name(model, view.height)} at "
        f"{view.width}x{view.height} px; set --image-size / --model to choose"
    )


def describe(view: View | None, shape: tuple[int, ...], decode: str | None, classes: Classes, named: bool) -> str:
    """One line on what the proxy trained on, for the summary."""
    what = view.describe() if view is not None else f"{decode} -> {tuple(shape)}"
    return f"{what}; {classes.num_classes} classes" + (f" ({classes.label}, names in classes.json)" if named else "")
