"""The `streamprune run` configuration: every stage from one YAML or TOML file, checked strictly.

Unknown or mistyped fields are errors naming the field (with a suggestion), never ignored.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from streamprune.errors import SettingsError
from streamprune.shards.identity import has_scheme


@dataclass
class IndexSection:
    root: str | None = None
    identity: str = "shard-key"


@dataclass
class RecordSection:
    epochs: int = 10
    workers: int | None = None
    gpus_per_worker: float | None = None
    model: str | None = None
    batch_size: int = 128
    lr: float = 0.1
    schedule_epochs: int = 200
    seed: int = 0
    num_classes: int | None = None
    loader_workers: int = 2
    max_failures: int = 3
    on_bad_sample: str = "skip"
    label: str = "cls"
    classes: str | None = None
    image_size: int | None = None
    decode: str | None = None


@dataclass
class ReduceSection:
    ratio: float = 0.5
    method: str = "dual-beta"
    seed: int = 0
    window: int | None = None
    epochs: int | None = None
    missing: str = "drop"
    scores: str = "all"
    c_d: float | None = None
    C: float = 15.0
    alpha_plus_beta: float | None = None
    cut: float = 0.2
    balance: str | None = None


@dataclass
class EvaluateSection:
    test_shards: str | list[str] | None = None
    epochs: int = 10
    budget: str = "steps"
    seeds: int = 3
    baseline: str | None = "random"
    full: bool = True
    model: str | None = None
    num_classes: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    device: str | None = None


@dataclass
class ReportSection:
    enabled: bool = True


@dataclass
class Config:
    shards: str | list[str]
    out: str = "run"
    address: str | None = None
    index: IndexSection = field(default_factory=IndexSection)
    record: RecordSection = field(default_factory=RecordSection)
    reduce: ReduceSection = field(default_factory=ReduceSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    report: ReportSection = field(default_factory=ReportSection)


class ConfigError(SettingsError):
    """A config file that cannot be used; names the file and the field."""


def load_config(path: str | os.PathLike) -> Config:
    """Read and check a YAML (`.yaml`, `.yml`) or TOML (`.toml`) config file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file {str(path)!r} (write one with `streamprune init-config`)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"config {str(path)!r}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r}: expected a mapping of fields, got {type(data).__name__}")
    cfg = _build(Config, data, f"config {str(path)!r}", "")
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(
            f"config {str(path)!r} has {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems)
        )
    return _resolve_paths(cfg, path.parent.resolve())


SEED_LIMIT = 1 << 63  # seeds are hashed as 64-bit numbers: larger (or negative) ones would alias


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_problems(r: RecordSection, prefix: str = "record.") -> list[str]:
    """Every value of a record section that cannot work, one line each (the field named)."""
    from streamprune.plugins import is_function_spec
    from streamprune.shards.labels import LabelSpec

    out = []
    check = lambda ok, field_, msg: None if ok else out.append(f"{prefix}{field_}: {msg}")
    check(r.epochs >= 1, "epochs", f"must be >= 1, not {r.epochs}")
    check(
        r.schedule_epochs >= r.epochs,
        "schedule_epochs",
        f"must be >= epochs ({r.epochs}): the recorded epochs are the start of the schedule, not {r.schedule_epochs}",
    )
    check(r.workers is None or r.workers >= 1, "workers", f"must be >= 1, not {r.workers}")
    check(
        r.gpus_per_worker is None or (_finite(r.gpus_per_worker) and r.gpus_per_worker >= 0),
        "gpus_per_worker",
        f"must be >= 0, not {r.gpus_per_worker}",
    )
    check(r.batch_size >= 1, "batch_size", f"must be >= 1, not {r.batch_size}")
    check(_finite(r.lr) and r.lr > 0, "lr", f"must be a finite number > 0, not {r.lr}")
    check(0 <= r.seed < SEED_LIMIT, "seed", f"must be in [0, 2^63), not {r.seed}")
    check(r.num_classes is None or r.num_classes >= 1, "num_classes", f"must be >= 1, not {r.num_classes}")
    check(r.loader_workers >= 0, "loader_workers", f"must be >= 0, not {r.loader_workers}")
    check(r.max_failures >= 0, "max_failures", f"must be >= 0, not {r.max_failures}")
    check(r.on_bad_sample in ("skip", "error"), "on_bad_sample", f"must be skip or error, not {r.on_bad_sample!r}")
    check(r.image_size is None or r.image_size >= 8, "image_size", f"must be >= 8 pixels, not {r.image_size}")
    check(
        r.decode is None or is_function_spec(r.decode), "decode", f"must be package.module:function, not {r.decode!r}"
    )
    check(r.decode is None or r.label == "cls", "label", "does not apply with a decode function (it returns the label)")
    check(
        r.model is None or r.model in ("small-cnn", "resnet18") or is_function_spec(r.model),
        "model",
        f"must be small-cnn, resnet18 or package.module:factory, not {r.model!r}",
    )
    try:
        LabelSpec(r.label)
    except ValueError as exc:
        out.append(f"{prefix}label: {exc}")
    return out


def reduce_problems(r: ReduceSection, prefix: str = "reduce.") -> list[str]:
    """Every value of a reduce section that cannot work, one line each."""
    from streamprune.scoring.sampling import resolve_balance
    from streamprune.stages.reduce import Method

    out = []
    check = lambda ok, field_, msg: None if ok else out.append(f"{prefix}{field_}: {msg}")
    check(_finite(r.ratio) and 0 <= r.ratio < 1, "ratio", f"must be in [0, 1) (the fraction removed), not {r.ratio}")
    try:
        Method.parse(r.method)
    except ValueError as exc:
        out.append(f"{prefix}method: {exc}")
    check(0 <= r.seed < SEED_LIMIT, "seed", f"must be in [0, 2^63), not {r.seed}")
    check(r.window is None or r.window >= 2, "window", f"must be >= 2, not {r.window}")
    check(r.epochs is None or r.epochs >= 1, "epochs", f"must be >= 1, not {r.epochs}")
    check(r.missing in ("drop", "error"), "missing", f"must be drop or error, not {r.missing!r}")
    check(r.scores in ("all", "method"), "scores", f"must be all or method, not {r.scores!r}")
    check(r.c_d is None or (_finite(r.c_d) and r.c_d > 0), "c_d", f"must be > 0, not {r.c_d}")
    check(_finite(r.C) and r.C > 0, "C", f"must be > 0, not {r.C}")
    check(
        r.alpha_plus_beta is None or (_finite(r.alpha_plus_beta) and r.alpha_plus_beta > r.C),
        "alpha_plus_beta",
        f"must be > C ({r.C}) so that alpha stays positive, not {r.alpha_plus_beta}",
    )
    check(_finite(r.cut) and 0 <= r.cut < 1, "cut", f"must be in [0, 1), not {r.cut}")
    try:
        balance = resolve_balance(r.balance, r.method)
        check(
            not (balance == "classes" and r.method.startswith("ccs:")),
            "balance",
            "classes cannot be combined with ccs: methods (they stratify by score)",
        )
    except ValueError as exc:
        out.append(f"{prefix}balance: {exc}")
    return out


def evaluate_problems(e: EvaluateSection, prefix: str = "evaluate.") -> list[str]:
    """Every value of an evaluate section that cannot work, one line each."""
    from streamprune.stages.evaluate import BUDGETS
    from streamprune.stages.reduce import Method

    out = []
    check = lambda ok, field_, msg: None if ok else out.append(f"{prefix}{field_}: {msg}")
    check(e.epochs >= 1, "epochs", f"must be >= 1, not {e.epochs}")
    check(e.budget in BUDGETS, "budget", f"must be one of {list(BUDGETS)}, not {e.budget!r}")
    check(e.seeds >= 1, "seeds", f"must be >= 1, not {e.seeds}")
    check(e.batch_size >= 1, "batch_size", f"must be >= 1, not {e.batch_size}")
    check(_finite(e.lr) and e.lr > 0, "lr", f"must be a finite number > 0, not {e.lr}")
    check(e.num_classes is None or e.num_classes >= 1, "num_classes", f"must be >= 1, not {e.num_classes}")
    check(0 <= e.seed < SEED_LIMIT, "seed", f"must be in [0, 2^63), not {e.seed}")
    if e.baseline is not None:
        try:
            Method.parse(e.baseline)
        except ValueError as exc:
            out.append(f"{prefix}baseline: {exc}")
    return out


def config_problems(cfg: Config) -> list[str]:
    """Every problem of a whole config, so that `run` refuses it before any work."""
    out = [] if cfg.shards else ["shards: no shard given"]
    out += record_problems(cfg.record) + reduce_problems(cfg.reduce)
    if cfg.evaluate.test_shards is not None:
        out += evaluate_problems(cfg.evaluate)
    if cfg.reduce.epochs is not None and cfg.reduce.epochs > cfg.record.epochs:
        out.append(f"reduce.epochs: {cfg.reduce.epochs} is more than the {cfg.record.epochs} recorded epochs")
    window, t = cfg.reduce.window, cfg.reduce.epochs or cfg.record.epochs
    if window is not None and window > t:
        out.append(f"reduce.window: {window} is longer than the {t} epochs used (T)")
    return out


def _build(cls, data: dict, where: str, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        raise ConfigError(
            f"{where}: unknown field {prefix + str(k)!r}"
            + (f" (did you mean {prefix + close[0]!r}?)" if close else f"; known: {names}")
        )
    values = {}
    for f in dataclasses.fields(cls):
        name, hint = f.name, hints[f.name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required field {prefix + name!r}")
            continue
        value = data[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {prefix + name!r} must be a section of fields")
            values[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, where, prefix + name)
    return cls(**values)


def _check_type(value, hint, where: str, name: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if typing.get_origin(t) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    expected = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{where}: field {name!r} must be {expected}, got {value!r}")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def local(p: str) -> str:
        if p.startswith("pipe:") or has_scheme(p) or p.startswith("file:") or os.path.isabs(p):
            return p
        return str(base / p)

    listed = lambda v: None if v is None else local(v) if isinstance(v, str) else [local(u) for u in v]
    cfg.shards = listed(cfg.shards)
    cfg.out = local(cfg.out)
    cfg.evaluate.test_shards = listed(cfg.evaluate.test_shards)
    if cfg.index.root is not None:
        cfg.index.root = local(cfg.index.root)
    if cfg.record.classes is not None:
        cfg.record.classes = local(cfg.record.classes)
    return cfg


EXAMPLE = """\
# streamprune run CONFIG: every stage from one file. Rerunning after an interruption
# finishes only what is missing. Relative paths are relative to this file's folder.

# Shards: paths, braces, globs, `::` lists, file://, fsspec URLs (s3://...) or pipe: commands
# (pipe: URLs are shell commands, run as written). A list of such strings also works.
shards: "data/train-{000000..000009}.tar"
out: run                  # the run directory: index, stats.zarr, keep/, report/
address: null             # Ray cluster address (null: start a local Ray instance)

index:
  root: null              # dataset root that shard names are relative to (null: common folder)
  identity: shard-key     # shard-key | json:FIELD (e.g. json:uid) | package.module:function

record:                   # the proxy run
  epochs: 10              # T: epochs recorded
  workers: null           # training workers (null: one per GPU, else CPUs/2 up to 4)
  gpus_per_worker: null   # null: 1 when the cluster has GPUs, else 0
  model: null             # small-cnn | resnet18 | package.module:factory (null: by image size)
  batch_size: 128         # global batch
  lr: 0.1
  schedule_epochs: 200    # length of the cosine schedule the T epochs are the start of
  seed: 0
  num_classes: null       # null: the class list's length, or the largest label of the first samples + 1
  loader_workers: 2
  max_failures: 3
  on_bad_sample: skip     # skip (counted, listed in RUN/bad-samples.jsonl) | error
  label: cls              # cls | a member extension | json:FIELD (json:a.b) | package.module:function
  classes: null           # class-name list file for string labels (null: every label found, RUN/classes.json)
  image_size: null        # S: random resized S x S crops (null: the images' size if they agree and are small, else 224)
  decode: null            # package.module:function -> (tensor, label), for data that is not an image

reduce:                   # scores and the keep-list (RUN/keep)
  ratio: 0.5              # fraction pruned, in [0, 1)
  method: dual-beta       # dual-beta | dual | dyn-unc | el2n | forgetting | entropy | aum | ccs:SCORE | random
  seed: 0
  window: null            # J for DUAL and Dyn-Unc (<= T; null: 10, or T when smaller)
  epochs: null            # T used (null: all recorded)
  missing: drop           # drop | error: samples with missing statistics
  scores: all             # all | method: which scores go to RUN/scores.zarr
  c_d: null               # DUAL+Beta: how fast the Beta mode moves to easy samples as the ratio grows
                          # (null: 8 with balance classes, chosen on validation data; 4 with none, the paper's)
  C: 15.0                 # DUAL+Beta: concentration of the Beta weight
  alpha_plus_beta: null   # DUAL+Beta: alpha + beta (null: C + 1, as the reference code)
  cut: 0.2                # CCS: hardest fraction dropped first
  balance: null           # classes: split the budget across the recorded labels by class size | none
                          # (null: classes, or none for ccs: methods, which stratify by score)

evaluate:                 # optional: train fresh models and compare test accuracy
  test_shards: null       # e.g. "data/test-{000000..000001}.tar"; null skips this stage
  epochs: 10              # epochs of the full-data run
  budget: steps           # steps: every subset gets the full run's SGD steps | epochs: its epochs
  seeds: 3                # fresh models per subset (keep-list seed and training seed vary together)
  baseline: random        # a second method at the same ratio, without class balance (null: none)
  full: true              # also train on all samples (one seed)
  model: null
  num_classes: null       # null: the recorded run's classes
  batch_size: 128
  lr: 0.1
  seed: 0
  device: null            # null: cuda when available, else cpu

report:
  enabled: true           # RUN/report/index.html with PNGs
"""
