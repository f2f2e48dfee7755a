"""The `streamprune run` configuration: every stage from one YAML or TOML file, checked strictly.

Unknown or mistyped fields are errors naming the field (with a suggestion), never ignored.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from streamprune.errors import SettingsError
from streamprune.settings import (
    EvaluateSettings,
    IndexSettings,
    RecordSettings,
    ReduceSettings,
    ReportSettings,
    default,
)
from streamprune.shards.identity import has_scheme


@dataclass
class Config:
    """A whole `run`: the shards, the run directory, the Ray address and each stage's settings."""

    shards: str | list[str]
    out: str = "run"
    address: str | None = None
    index: IndexSettings = field(default_factory=IndexSettings)
    record: RecordSettings = field(default_factory=RecordSettings)
    reduce: ReduceSettings = field(default_factory=ReduceSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


class ConfigError(SettingsError):
    """A config file that cannot be used; names the file and the field."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's exponent floats (`1e-3`, `1E5`: YAML 1.1 reads them
    as strings) and no key given twice in one mapping (YAML 1.1 keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
            data = yaml.load(text, Loader=_YamlLoader)
    except ConfigError as exc:
        raise ConfigError(f"config {str(path)!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"config {str(path)!r}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r}: expected a mapping of fields, got {type(data).__name__}")
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    problems += config_problems(data)
    if problems or cfg is None:
        raise ConfigError(
            f"config {str(path)!r} has {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems),
            problems=problems,
        )
    return _resolve_paths(cfg, path.parent.resolve())


def config_problems(data: dict) -> list[str]:
    """The problems between fields of a config (its fields as read, defaults filled in), so that
    `run` refuses it before any work, together with each field's own problems."""
    out = [] if data.get("shards") else ["shards: no shard given"]

    def section(name: str) -> dict:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    record, reduce = section("record"), section("reduce")
    recorded = record.get("epochs", default(RecordSettings, "epochs"))
    used, window = reduce.get("epochs"), reduce.get("window")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (recorded, used or 1, window or 2)):
        return out  # a field of the wrong type, reported by itself
    if used is not None and used > recorded:
        out.append(f"reduce.epochs: {used} is more than the {recorded} recorded epochs")
    if window is not None and window > (used or recorded):
        out.append(f"reduce.window: {window} is longer than the {used or recorded} epochs used (T)")
    return out


def _build(cls, data: dict, prefix: str, problems: list[str]):
    """`cls` from `data`, each field's type checked; every problem appended to `problems` (None then)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values, before = {}, len(problems)
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            problems.append(
                f"{prefix + str(k)}: unknown field"
                + (f" (did you mean {prefix + close[0]!r}?)" if close else f"; known: {names}")
            )
    for f in dataclasses.fields(cls):
        name, hint = f.name, hints[f.name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{prefix + name}: missing required field")
            continue
        value = data[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{prefix + name}: must be a section of fields")
            else:
                values[name] = _build(hint, value, f"{prefix}{name}.", problems)
        else:
            try:
                values[name] = _check_type(value, hint, prefix + name)
            except ConfigError as exc:
                problems.append(str(exc))
    if len(problems) > before:
        return None
    try:
        return cls(**values)
    except SettingsError as exc:
        problems.extend(exc.problems)
        return None


def _check_type(value, hint, name: str):
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
    raise ConfigError(f"{name}: must be {expected}, not {value!r}")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def local(p: str) -> str:
        if p.startswith("pipe:") or has_scheme(p) or p.startswith("file:") or os.path.isabs(p):
            return p
        return str(base / p)

    def listed(v: str | list[str]) -> str | list[str]:
        return local(v) if isinstance(v, str) else [local(u) for u in v]

    optional = lambda v: None if v is None else local(v)
    cfg.shards = listed(cfg.shards)
    cfg.out = local(cfg.out)
    test_shards = cfg.evaluate.test_shards
    cfg.evaluate = cfg.evaluate.replace(test_shards=None if test_shards is None else listed(test_shards))
    cfg.index = cfg.index.replace(root=optional(cfg.index.root))
    cfg.record = cfg.record.replace(classes=optional(cfg.record.classes))
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
  allow_broken: false     # true: go on without broken or missing shards (false: stop after indexing, exit 2)

record:                   # the proxy run
  epochs: 10              # T: epochs recorded
  workers: null           # training workers (null: one per GPU, else CPUs/2 up to 4)
  gpus_per_worker: null   # null: 1 when the cluster has GPUs, else 0
  model: null             # small-cnn | resnet18 | package.module:factory (null: by image size; small-cnn on CPUs at 64)
  batch_size: 128         # global batch
  lr: 0.1
  schedule_epochs: 200    # length of the cosine schedule the T epochs are the start of
  seed: 0
  num_classes: null       # null: the class list's length, or the largest label of the first samples + 1
  loader_workers: 2
  max_failures: 3
  on_bad_sample: skip     # skip (counted, listed in RUN/bad-samples.jsonl) | error
  label: null             # cls | a member extension | json:FIELD (json:a.b) | package.module:function
                          # (null: the spec RUN/classes.json was counted with by `index --label`, else cls)
  classes: null           # class-name list file for string labels (null: every label found, RUN/classes.json)
  image_size: null        # S: random resized S x S crops (null: the images' size if they agree and are small,
                          # else 224 on GPUs, 64 on CPUs)
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
