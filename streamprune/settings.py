"""Each stage's settings: frozen, typed, and checked when built, with every problem listed.

The command line, the `run` config file and the Python API all build these classes, so each
default is written once, here, and bad values are refused before any work starts. Each field is
declared with `setting()`, which also holds its help text: the command's options
(`cli.options`), the commented config file `streamprune init-config` writes and the docs'
reference are all generated from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from streamprune.errors import SettingsError
from streamprune.scoring.sampling import BALANCES

S = TypeVar("S", bound="StageSettings")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Problems(list[str]):
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


def setting(
    default: Any,
    help: str,
    *,
    unset: str = "",
    cli: bool | str = True,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field: its `default` and what the command line, the config file and the docs
    say of it (the single place each is written).

    help: what the setting does, in a phrase; unset: what None means, shown as "(default: ...)"
    in `--help` and "(null: ...)" in the config file; cli: the command-line option (True: `--name`
    with `_` as `-`; a string: that flag; False: set in config files only); choices and metavar:
    as argparse's (choices are also the values the field's check accepts)."""
    metadata = {"help": help, "unset": unset, "cli": cli, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata={**metadata, "metavar": metavar})


def described(f: dataclasses.Field[Any], unset_word: str = "null") -> str:
    """Field `f`'s help with what leaving it unset means: "(null: ...)" in config files and the
    docs, `unset_word="default"` for the command line."""
    text, unset = f.metadata.get("help", ""), f.metadata.get("unset", "")
    return f"{text} ({unset_word}: {unset})" if unset else text


def cli_flag(f: dataclasses.Field[Any]) -> str | None:
    """The command-line option of field `f` (None: config files only)."""
    cli = f.metadata.get("cli", True)
    if cli is False:
        return None
    return cli if isinstance(cli, str) else "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class IndexSettings(StageSettings):
    """`index`: where shard names start, and what identifies a sample."""

    STAGE = "index"
    root: str | None = setting(None, "dataset root that shard names are relative to", unset="the shards' common folder")
    identity: str = setting(
        "shard-key", "what identifies a sample: shard-key, json:FIELD (e.g. json:uid) or package.module:function"
    )
    allow_broken: bool = setting(
        False,
        "succeed when some shards are broken or missing: they are listed and left out of the index "
        "(without it such an index is still written, but the exit status is 2 and `run` stops after indexing)",
    )

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
LABEL_HELP = (
    "where the label is: cls, another member extension (txt, label, ...), json:FIELD "
    "(dotted paths allowed, e.g. json:meta.label) or package.module:function on the sample dict; "
    "integers or class names"
)
ON_BAD_SAMPLE = ("skip", "error")


@dataclass(frozen=True)
class RecordSettings(StageSettings):
    """`record`: the proxy run whose per-sample statistics are recorded."""

    STAGE = "record"
    epochs: int = setting(10, "epochs to run and record (T)")
    workers: int | None = setting(None, "training workers", unset="one per GPU, else CPUs/2 up to 4")
    gpus_per_worker: float | None = setting(
        None, "GPUs per training worker", unset="1 when the cluster has GPUs, else 0"
    )
    model: str | None = setting(
        None,
        "the proxy model: small-cnn, resnet18 or package.module:factory",
        unset="by image size; small-cnn on CPUs at 64 px",
    )
    batch_size: int = setting(128, "global batch size")
    lr: float = setting(0.1, "peak learning rate of the cosine schedule")
    schedule_epochs: int = setting(200, "length of the full cosine schedule; the T recorded epochs are its start")
    seed: int = setting(0, "training seed (shuffling, augmentation, initialisation)")
    num_classes: int | None = setting(
        None,
        "number of classes",
        unset="the class list's length for class names, else the largest label of the first 2,000 samples plus one",
    )
    loader_workers: int = setting(2, "DataLoader processes per training worker")
    max_failures: int = setting(3, "worker failures to recover from")
    on_bad_sample: str = setting(
        "skip",
        "an undecodable sample: skip it (counted, listed in RUN/bad-samples.jsonl) or stop with an error",
        choices=ON_BAD_SAMPLE,
    )
    label: str | None = setting(
        None, LABEL_HELP, unset="the spec `index --label` wrote RUN/classes.json with, else cls"
    )
    classes: str | None = setting(
        None,
        "a file of class names, one per line or a JSON list, for string labels",
        unset="every label found, sorted, kept in RUN/classes.json",
    )
    image_size: int | None = setting(
        None,
        "train on random resized crops of S x S",
        unset="the images' own size when the first ones agree and are <= 256 px, else 224 on GPUs and 64 on CPUs",
    )
    decode: str | None = setting(
        None,
        "package.module:function turning a sample dict into (tensor, label), for data that is not an image "
        "(pair it with a package.module:factory model)",
    )

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
            self.on_bad_sample in ON_BAD_SAMPLE,
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


MISSING = ("drop", "error")  # samples with missing statistics: left out (counted) or refused
SCORES = ("all", "method")  # which scores go to scores.zarr


@dataclass(frozen=True)
class ReduceSettings(StageSettings):
    """`reduce`: the scores and the keep-list drawn from them."""

    STAGE = "reduce"
    ratio: float = setting(0.5, "pruning ratio r in [0, 1): the fraction removed")
    method: str = setting(
        "dual-beta",
        "the score and sampler: dual-beta, dual, dyn-unc, el2n, forgetting, entropy, aum, ccs:SCORE, random",
    )
    seed: int = setting(0, "keep-list seed (Beta and random samplers)")
    window: int | None = setting(
        None, "window length J of DUAL and Dyn-Unc, at most T", unset="10, or T when fewer epochs were recorded"
    )
    epochs: int | None = setting(
        None, "the number T of recorded epochs to use", unset="every completely recorded epoch"
    )
    missing: str = setting(
        "drop", "samples with missing statistics: drop them (counted) or refuse them with an error", choices=MISSING
    )
    scores: str = setting(
        "all",
        "which scores go to RUN/scores.zarr: all of them, or only what the method needs, which is faster",
        choices=SCORES,
    )
    c_d: float | None = setting(
        None,
        "DUAL+Beta's c_d (docs/scoring.md): how fast the Beta mode moves to easy samples as the ratio grows",
        unset="8 with balance classes, chosen on validation data; 4 with none, the paper's",
    )
    C: float = setting(15.0, "DUAL+Beta's C: the concentration of the Beta weight")
    alpha_plus_beta: float | None = setting(None, "DUAL+Beta's alpha + beta", unset="C + 1, as the reference code")
    cut: float = setting(0.2, "CCS: hardest fraction dropped first")
    balance: str | None = setting(
        None,
        "how the budget is spread (docs/scoring.md): classes splits it across the recorded labels by class "
        "size, each class kept by the method; none runs the method over all samples",
        unset="classes, or none for ccs: methods, which stratify by score",
        choices=BALANCES,
    )

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
        out.check(self.missing in MISSING, "missing", f"must be drop or error, not {self.missing!r}")
        out.check(self.scores in SCORES, "scores", f"must be all or method, not {self.scores!r}")
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
    """`evaluate`: optional: fresh models trained on the keep-list, a baseline and all data, tested on
    held-out shards."""

    STAGE = "evaluate"  # no command of its own: `run` evaluates, from a config file's `evaluate:` section
    test_shards: str | list[str] | None = setting(
        None,
        'the held-out shards the fresh models are tested on, e.g. "data/test-{000000..000001}.tar"',
        unset="this stage is skipped",
        cli=False,
    )
    epochs: int = setting(10, "epochs of the full-data run", cli=False)
    budget: str = setting(
        "steps",
        "steps: every subset gets the full run's SGD steps; epochs: its epochs",
        choices=BUDGETS,
        cli=False,
    )
    seeds: int = setting(3, "fresh models per subset (keep-list seed and training seed vary together)", cli=False)
    baseline: str | None = setting(
        "random", "a second method at the same ratio, without class balance", unset="none", cli=False
    )
    full: bool = setting(True, "also train on all samples (one seed)", cli=False)
    model: str | None = setting(
        None, "the fresh models: small-cnn, resnet18 or package.module:factory", unset="by image size", cli=False
    )
    num_classes: int | None = setting(None, "number of classes", unset="the recorded run's classes", cli=False)
    batch_size: int = setting(128, "global batch size", cli=False)
    lr: float = setting(0.1, "peak learning rate of the cosine schedule", cli=False)
    seed: int = setting(
        0,
        "training seed: the i-th fresh model of a subset trains with seed + i (and its keep-list is drawn "
        "with reduce.seed + i)",
        cli=False,
    )
    device: str | None = setting(None, "torch device", unset="cuda when available, else cpu", cli=False)

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
    enabled: bool = setting(True, "write RUN/report/index.html with PNGs", cli=False)
    max_rows: int = setting(1_000_000, "samples the figures are drawn from, at most")

    def problems(self) -> list[str]:
        out = _Problems()
        out.at_least(self.max_rows, "max_rows", 1)
        return out
