"""Each stage's settings: frozen, typed, and checked when built, with every problem listed.

The command line, the `run` config file and the Python API all build these classes, so each
default is written once, here, and bad values are refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from streamprune.errors import SettingsError

S = TypeVar("S", bound="StageSettings")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Problems(list):
    """Problem lines, one per bad field: `field: what is wrong`."""

    def check(self, ok: object, name: str, message: str) -> None:
        if not ok:
            self.append(f"{name}: {message}")

    def at_least(self, value: object, name: str, low: int, optional: bool = False) -> None:
        if optional and value is None:
            return
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        self.check(ok, name, f"must be an integer >= {low}, not {value!r}")

    def seed(self, value: object, name: str = "seed") -> None:
        from streamprune.scoring.methods import SEED_LIMIT

        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT
        self.check(ok, name, f"must be an integer in [0, 2^63), not {value!r}")

    def raises(self, name: str, check: Callable[[], object]) -> None:
        try:
            check()
        except SettingsError as exc:
            self.append(f"{name}: {exc}")


class StageSettings:
    """Base of the stage settings: refuses bad values when built, listing every problem."""

    STAGE = ""

    def problems(self) -> list[str]:
        """Every value that cannot work, one line each, naming the field."""
        return []

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError(
                f"{self.STAGE} settings: " + "; ".join(problems), problems=[f"{self.STAGE}.{p}" for p in problems]
            )

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes` (checked again); an unknown name is refused with a suggestion."""
        return build(type(self), {**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (what manifests record)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def build(cls: type[S], values: dict[str, Any]) -> S:
    """`cls(**values)`, refusing an unknown name with the closest known one."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in values if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {names}"
        raise SettingsError(
            f"unknown {cls.STAGE} setting {unknown[0]!r}{hint}", problems=[f"{cls.STAGE}.{unknown[0]}: unknown{hint}"]
        )
    return cls(**values)


def default(cls: type, name: str) -> Any:
    """The default of setting `name` of `cls` (for help texts)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclass(frozen=True)
class IndexSettings(StageSettings):
    """`index`: where shard names start, and what identifies a sample."""

    STAGE = "index"
    root: str | None = None  # dataset root that shard names are relative to (None: the shards' common folder)
    identity: str = "shard-key"  # shard-key | json:FIELD | package.module:function
    allow_broken: bool = False  # index the healthy shards and succeed when some are broken (else exit status 2)

    def problems(self) -> list[str]:
        from streamprune.plugins import is_function_spec

        out = _Problems()
        ok = self.identity == "shard-key" or (
            isinstance(self.identity, str)
            and ((self.identity.startswith("json:") and len(self.identity) > 5) or is_function_spec(self.identity))
        )
        out.check(ok, "identity", f"must be shard-key, json:FIELD or package.module:function, not {self.identity!r}")
        return out


MODELS = ("small-cnn", "resnet18")


@dataclass(frozen=True)
class RecordSettings(StageSettings):
    """`record`: the proxy run whose per-sample statistics are recorded."""

    STAGE = "record"
    epochs: int = 10  # T: epochs recorded
    workers: int | None = None  # None: one per GPU, else CPUs/2 up to 4
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    model: str | None = None  # small-cnn | resnet18 | package.module:factory (None: by image size)
    batch_size: int = 128  # global batch
    lr: float = 0.1
    schedule_epochs: int = 200  # the cosine schedule the T epochs are the start of
    seed: int = 0
    num_classes: int | None = None  # None: the class list's length, or the largest early label + 1
    loader_workers: int = 2
    max_failures: int = 3
    on_bad_sample: str = "skip"  # skip | error
    label: str | None = None  # None: the spec RUN/classes.json was counted with (index --label), else cls
    classes: str | None = None  # class-name list file (None: every label found, RUN/classes.json)
    image_size: int | None = None  # None: the images' own size (one, <= 256 px), else 224 on GPUs, 64 on CPUs
    decode: str | None = None  # package.module:function -> (tensor, label)

    def problems(self) -> list[str]:
        from streamprune.plugins import is_function_spec
        from streamprune.shards.labels import LabelSpec

        out = _Problems()
        out.at_least(self.epochs, "epochs", 1)
        out.at_least(self.schedule_epochs, "schedule_epochs", 1)
        if isinstance(self.epochs, int) and isinstance(self.schedule_epochs, int):
            out.check(
                self.schedule_epochs >= self.epochs,
                "schedule_epochs",
                f"must be >= epochs ({self.epochs}): the recorded epochs are the start of the schedule, "
                f"not {self.schedule_epochs}",
            )
        out.at_least(self.workers, "workers", 1, optional=True)
        out.check(
            self.gpus_per_worker is None or (_finite(self.gpus_per_worker) and self.gpus_per_worker >= 0),
            "gpus_per_worker",
            f"must be >= 0, not {self.gpus_per_worker!r}",
        )
        out.at_least(self.batch_size, "batch_size", 1)
        out.check(_finite(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, not {self.lr!r}")
        out.seed(self.seed)
        out.at_least(self.num_classes, "num_classes", 1, optional=True)
        out.at_least(self.loader_workers, "loader_workers", 0)
        out.at_least(self.max_failures, "max_failures", 0)
        out.check(
            self.on_bad_sample in ("skip", "error"),
            "on_bad_sample",
            f"must be skip or error, not {self.on_bad_sample!r}",
        )
        out.at_least(self.image_size, "image_size", 8, optional=True)
        out.check(
            self.decode is None or is_function_spec(self.decode),
            "decode",
            f"must be package.module:function, not {self.decode!r}",
        )
        out.check(
            self.decode is None or self.label in (None, "cls"),
            "label",
            "does not apply with a decode function (it returns the label)",
        )
        out.check(
            self.model is None or callable(self.model) or self.model in MODELS or is_function_spec(self.model),
            "model",
            f"must be small-cnn, resnet18 or package.module:factory, not {self.model!r}",
        )
        label = self.label
        if label is not None:
            out.raises("label", lambda: LabelSpec(label))
        return out


@dataclass(frozen=True)
class ReduceSettings(StageSettings):
    """`reduce`: the scores and the keep-list drawn from them."""

    STAGE = "reduce"
    ratio: float = 0.5  # fraction pruned, in [0, 1)
    method: str = "dual-beta"
    seed: int = 0
    window: int | None = None  # J (None: 10, or T when smaller)
    epochs: int | None = None  # T used (None: every completely recorded epoch)
    missing: str = "drop"  # drop | error: samples with missing statistics
    scores: str = "all"  # all | method: which scores go to scores.zarr
    c_d: float | None = None  # None: by balance (sampling.DEFAULT_C_D)
    C: float = 15.0
    alpha_plus_beta: float | None = None  # None: C + 1
    cut: float = 0.2  # CCS: hardest fraction dropped first
    balance: str | None = None  # classes | none (None: classes, or none for ccs: methods)

    def problems(self) -> list[str]:
        from streamprune.scoring.methods import Method
        from streamprune.scoring.sampling import resolve_balance

        out = _Problems()
        out.check(
            _finite(self.ratio) and 0 <= self.ratio < 1,
            "ratio",
            f"must be in [0, 1) (the fraction of samples removed), not {self.ratio!r}",
        )
        out.raises("method", lambda: Method.parse(self.method))
        out.seed(self.seed)
        out.at_least(self.window, "window", 2, optional=True)
        out.at_least(self.epochs, "epochs", 1, optional=True)
        if isinstance(self.window, int) and isinstance(self.epochs, int):
            out.check(
                self.window <= self.epochs, "window", f"{self.window} is longer than the {self.epochs} epochs used (T)"
            )
        out.check(self.missing in ("drop", "error"), "missing", f"must be drop or error, not {self.missing!r}")
        out.check(self.scores in ("all", "method"), "scores", f"must be all or method, not {self.scores!r}")
        out.check(self.c_d is None or (_finite(self.c_d) and self.c_d > 0), "c_d", f"must be > 0, not {self.c_d!r}")
        out.check(_finite(self.C) and self.C > 0, "C", f"must be > 0, not {self.C!r}")
        out.check(
            self.alpha_plus_beta is None or (_finite(self.alpha_plus_beta) and self.alpha_plus_beta > self.C),
            "alpha_plus_beta",
            f"must be > C ({self.C}) so that alpha stays positive, not {self.alpha_plus_beta!r}",
        )
        out.check(_finite(self.cut) and 0 <= self.cut < 1, "cut", f"must be in [0, 1), not {self.cut!r}")
        if isinstance(self.method, str):
            out.raises("balance", lambda: resolve_balance(self.balance, self.method))
            out.check(
                not (self.balance == "classes" and self.method.startswith("ccs:")),
                "balance",
                "classes cannot be combined with ccs: methods (they stratify by score)",
            )
        return out


BUDGETS = ("steps", "epochs")  # what subsets of the same run share: SGD steps, or epochs


@dataclass(frozen=True)
class EvaluateSettings(StageSettings):
    """`evaluate`: fresh models trained on the keep-list, a baseline and all data, tested on held-out shards."""

    STAGE = "evaluate"
    test_shards: str | list[str] | None = None  # None skips the stage
    epochs: int = 10  # epochs of the full-data run
    budget: str = "steps"  # steps | epochs
    seeds: int = 3
    baseline: str | None = "random"
    full: bool = True
    model: str | None = None
    num_classes: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu

    def problems(self) -> list[str]:
        from streamprune.scoring.methods import Method

        out = _Problems()
        out.at_least(self.epochs, "epochs", 1)
        out.check(self.budget in BUDGETS, "budget", f"must be one of {list(BUDGETS)}, not {self.budget!r}")
        out.at_least(self.seeds, "seeds", 1)
        out.at_least(self.batch_size, "batch_size", 1)
        out.check(_finite(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, not {self.lr!r}")
        out.at_least(self.num_classes, "num_classes", 1, optional=True)
        out.seed(self.seed)
        baseline = self.baseline
        if baseline is not None:
            out.raises("baseline", lambda: Method.parse(baseline))
        return out


@dataclass(frozen=True)
class ReportSettings(StageSettings):
    """`report`: the HTML report of a run."""

    STAGE = "report"
    enabled: bool = True
    max_rows: int = 1_000_000  # samples drawn for the score plots

    def problems(self) -> list[str]:
        out = _Problems()
        out.at_least(self.max_rows, "max_rows", 1)
        return out
