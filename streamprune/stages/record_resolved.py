"""`record`'s settings resolved (`ResolvedSettings`: the model as a name, the workers, label,
classes and inputs found), stored in the stats store (`StatsStore.config`) so that a resume
trains the same; which of them a rerun must keep, and which given settings differ from a store's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamprune.formats.classes import Classes
from streamprune.settings import RecordSettings
from streamprune.training.decode import View

# The resolved settings a rerun of a run must give the same (`StatsStore.create(..., same=...)`)
TRAINING_KEYS = (
    "epochs",
    "schedule_epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "seed",
    "model",
    "num_classes",
    "augment",
    "label",
    "decode",
    "view",
    "classes",
)
# RecordSettings fields the stored settings keep as given (the others are resolved, or only say how to run)
_STORED_AS_GIVEN = ("epochs", "schedule_epochs", "batch_size", "lr", "seed", "model", "label", "decode", "image_size")


def changed_settings(stored: dict, settings: RecordSettings) -> list[str]:
    """The settings whose value differs from those a store was recorded with (`StatsStore.config`)."""
    unset = {k: getattr(settings, k) or stored.get(k) for k in ("label", "model")}  # unset: the run's own
    given = {**settings.to_dict(), **unset}
    return [k for k in _STORED_AS_GIVEN if k in stored and stored[k] != given[k]]


@dataclass
class ResolvedSettings:
    """A run's record settings, resolved; stored in the stats store so that a resume uses the same."""

    epochs: int
    schedule_epochs: int
    batch_size: int
    lr: float
    seed: int
    model: str | None
    num_classes: int
    augment: bool
    workers: int
    gpus_per_worker: float
    loader_workers: int
    record: bool
    on_bad_sample: str
    label: str
    decode: str | None
    image_size: int | None  # as asked; `view` is what the run uses
    view: list | None  # [channels, height, width, resized]; None with a decode function
    input_shape: list  # one example's shape as the model sees it
    classes: str | None  # digest of RUN/classes.json, when the labels are names or were scanned
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    shuffle_buffer: int = 1000


def resolve_settings(
    s: RecordSettings,
    *,
    model: Any,
    workers: int,
    gpus_per_worker: float,
    label: str,
    classes: Classes,
    named: bool,
    view: View | None,
    shape: tuple[int, ...],
    augment: bool,
    record_stats: bool,
) -> ResolvedSettings:
    """The settings of a run recorded with settings `s`, resolved: the model as a name (a model
    class as `module:qualname`), the cluster's workers, the label, classes and inputs found."""
    return ResolvedSettings(
        epochs=s.epochs,
        schedule_epochs=s.schedule_epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        model=model if isinstance(model, str) or model is None else f"{model.__module__}:{model.__qualname__}",
        num_classes=classes.num_classes,
        augment=augment,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        loader_workers=s.loader_workers,
        on_bad_sample=s.on_bad_sample,
        record=record_stats,
        label=label,
        decode=s.decode,
        image_size=s.image_size,
        view=None if view is None else [*view.shape, view.resized],
        input_shape=list(shape),
        classes=classes.digest if named else None,
    )
