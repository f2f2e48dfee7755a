"""The `streamprune run` config file: every stage's settings from one YAML or TOML file, checked strictly.

Unknown or mistyped fields are errors naming the field (with a suggestion), never ignored.
Relative paths are relative to the config file's folder. The commented example `init-config`
writes (`EXAMPLE`) is generated from the settings classes' fields and their help.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from streamprune.errors import SettingsError
from streamprune.settings import (
    EvaluateSettings,
    IndexSettings,
    RecordSettings,
    ReduceSettings,
    ReportSettings,
    StageSettings,
    default,
    described,
    setting,
)
from streamprune.shards.identity import has_scheme


@dataclass
class RunSettings:
    """A whole `run`: the shards, the run directory, the Ray address and each stage's settings (what
    a config file holds, checked: `load_config`)."""

    shards: str | list[str] = field(
        metadata={
            "help": "the training shards: paths, braces, globs, `::` lists, file://, fsspec URLs (s3://...) or "
            "pipe: commands (pipe: URLs are shell commands, run as written); a list of such strings also works",
            "example": "data/train-{000000..000009}.tar",
        }
    )
    out: str = setting("run", "the run directory: index, stats.zarr, keep/, report/")
    address: str | None = setting(None, "Ray cluster address", unset="start a local Ray instance")
    index: IndexSettings = field(default_factory=IndexSettings)
    record: RecordSettings = field(default_factory=RecordSettings)
    reduce: ReduceSettings = field(default_factory=ReduceSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


if TYPE_CHECKING:
    Config = RunSettings  # the old name; deprecated (one release), see __getattr__


def __getattr__(name: str) -> Any:
    """`Config`, the old name of `RunSettings`: still importable, with a DeprecationWarning."""
    if name == "Config":
        warnings.warn(
            "streamprune.config.Config is now streamprune.config.RunSettings; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return RunSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def load_config(path: str | os.PathLike) -> RunSettings:
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
    cfg = _build(RunSettings, data, "", problems)
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


def _resolve_paths(cfg: RunSettings, base: Path) -> RunSettings:
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


HEADER = """\
# streamprune run CONFIG: every stage from one file. Rerunning after an interruption
# finishes only what is missing. Relative paths are relative to this file's folder.
"""
COMMENT_AT = 26  # the column of the fields' comments
WIDTH = 110


def _yaml_value(value: object) -> str:
    """`value` as a YAML scalar (strings quoted only where YAML would read them otherwise)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w.:/-]*", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    return repr(value)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _commented(left: str, comment: str, indent: str) -> list[str]:
    """`left` (`key: value`) with `comment` after it, wrapped at the comment column; above it when
    `left` reaches that column."""
    if not comment:
        return [left]
    if len(left) >= COMMENT_AT - 1:
        return [indent + "# " + line for line in _wrap(comment, WIDTH - len(indent) - 2)] + [left]
    lines = _wrap(comment, WIDTH - COMMENT_AT - 2)
    return [left.ljust(COMMENT_AT) + "# " + lines[0]] + [" " * COMMENT_AT + "# " + line for line in lines[1:]]


def summary(cls: type) -> str:
    """What a settings class is for, from its docstring: "`record`: the proxy run ..." -> "the proxy run ..."."""
    first = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(re.sub(r"^`\w+`:\s*", "", first).split()).rstrip(".")


def _example_field(f: dataclasses.Field, indent: str) -> list[str]:
    value = f.metadata.get("example", f.default)
    return _commented(f"{indent}{f.name}: {_yaml_value(value)}", described(f), indent)


def example_config() -> str:
    """The commented example config `streamprune init-config` writes: every field of `RunSettings` and
    of each stage's settings, at its default, with its help."""
    out = HEADER.splitlines() + [""]
    for f in dataclasses.fields(RunSettings):
        section = f.default_factory
        if isinstance(section, type) and issubclass(section, StageSettings):
            out += ["", *_commented(f"{f.name}:", summary(section), "")]
            out += [line for sf in dataclasses.fields(section) for line in _example_field(sf, "  ")]
        else:
            out += _example_field(f, "")
    return "\n".join(out) + "\n"


EXAMPLE = example_config()
