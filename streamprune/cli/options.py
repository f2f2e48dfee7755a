"""A command's options from a settings class: one per field, from the field's type, default and
`setting()` help (streamprune/settings.py), so that no option re-types what a setting says."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

from streamprune.errors import SettingsError
from streamprune.settings import S, StageSettings, cli_flag, described


def _parsed_type(hint: Any) -> Any:
    """The one type a field holds besides None: `int | None` -> int."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [t for t in typing.get_args(hint) if t is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"no single command-line type for {hint}; mark the setting cli=False")
        return kinds[0]
    return hint


def _argument(f: dataclasses.Field, hint: Any, required: bool) -> dict[str, Any]:
    """argparse's keywords for the option of field `f`."""
    kind = _parsed_type(hint)
    help_ = (f.metadata["help"] if required else described(f, "default")).replace("%", "%%")
    kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_}
    if kind is bool:
        kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        return kw
    if typing.get_origin(kind) is list:
        kw["action"] = "append"
    elif kind in (int, float):
        kw["type"] = kind
    if required:
        kw["required"] = True
    for key in ("choices", "metavar"):
        if f.metadata.get(key):
            kw[key] = list(f.metadata[key]) if key == "choices" else f.metadata[key]
    return kw


def add_settings(parser: argparse.ArgumentParser, cls: type[StageSettings], required: Iterable[str] = ()) -> None:
    """An option for each field of `cls` not marked config-file-only, in the class's order, with
    the field's default (`required`: fields the command insists on, whatever their default)."""
    hints = typing.get_type_hints(cls)
    needed = set(required)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = cli_flag(f)
        if flag is not None:
            parser.add_argument(flag, **_argument(f, hints[f.name], f.name in needed))


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """A stage's settings from its command's options; problems name the options (`--batch-size`)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if cli_flag(f) is not None}  # type: ignore[arg-type]
    try:
        return cls(**{name: getattr(args, name) for name in fields})
    except SettingsError as exc:

        def flag(m: re.Match) -> str:
            f = fields.get(m.group(1))
            return (cli_flag(f) if f is not None else None) or m.group(1)

        problems = [re.sub(r"^\w+\.(\w+)", flag, p) for p in exc.problems]
        raise SettingsError("; ".join(problems), problems=problems) from None
