"""The command-line and config references of the docs, generated from the code.

MkDocs loads this file as a hook (`hooks:` in mkdocs.yml). A page holding a marker line

    <!-- reference: cli -->         every `streamprune` subcommand, from cli.main.build_parser()
    <!-- reference: config -->      every config field, from the settings dataclasses
    <!-- reference: config-example --> the commented example `streamprune init-config` writes

gets the generated Markdown in its place, so a new option or setting is documented by the build
itself. A setting's description is its `setting(..., help=...)` in streamprune/settings.py, the
same text its command-line option and the init-config example show. The benchmark result files
(benchmarks/*.md) are added as pages under benchmarks/, as they are in the repository.

`cli_reference()`, `config_reference()` and `config_example()` are plain functions (no MkDocs
needed): tests/test_docs_reference.py calls them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*reference:\s*([\w-]+)\s*-->\s*$", re.MULTILINE)
# benchmark result files shown as pages: repository path -> page path in the site
BENCHMARK_PAGES = {
    "benchmarks/RESULTS.md": "benchmarks/results.md",
    "benchmarks/QUALITY.md": "benchmarks/quality.md",
    "benchmarks/VALIDATION.md": "benchmarks/validation.md",
}
# flags every subcommand takes (from the parser's common parent): documented once, above the commands
COMMON_DESTS = ("quiet", "debug")


# ---------------------------------------------------------------------------------------------
# helpers


def _cell(text: object) -> str:
    """A Markdown table cell: pipes escaped, newlines joined."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: object) -> str:
    """A value as inline code (`None` as `null`-free Python repr)."""
    text = repr(value) if not isinstance(value, str) else value
    return "`" + text.replace("`", "'") + "`"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", name.lower().replace(" ", "-"))


# ---------------------------------------------------------------------------------------------
# the command line


def _kind(action: argparse.Action) -> str:
    """What an argument takes, in a few words."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "flag"
    if action.choices:
        return " \\| ".join(str(c) for c in action.choices)
    kind = getattr(action.type, "__name__", "str") if action.type is not None else "str"
    if kind.startswith("_"):  # a checking function such as _at_least_1
        kind = "int " + kind.strip("_").replace("_", " ").replace("at least ", ">= ")
    if isinstance(action, argparse._AppendAction):
        kind += ", repeatable"
    if action.nargs in ("+", "*"):
        kind += ", one or more"
    return kind


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        flags = ", ".join(action.option_strings)
        if action.nargs != 0:
            flags += " " + (action.metavar or action.dest.upper())
        return flags
    return action.metavar or action.dest.upper()


def _default(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.required:
        return "required"
    if not action.option_strings and action.nargs in ("?", "*") and action.default is not None:
        return _code(action.default)
    value = parser.get_default(action.dest)
    if value in (None, False, argparse.SUPPRESS):
        return ""
    return _code(value)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog, "default": parser.get_default(action.dest)}
    return text


def _arguments_table(parser: argparse.ArgumentParser, skip: tuple[str, ...]) -> list[str]:
    rows = ["| argument | takes | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in skip:
            continue
        cells = [_name(action), _kind(action), _default(parser, action), _help(parser, action)]
        name, kind, default, help_ = (_cell(c) for c in cells)
        rows.append(f"| `{name}` | {kind} | {default} | {help_} |")
    return rows


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width (argparse wraps by the terminal's)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference(parser: argparse.ArgumentParser | None = None, heading: str = "##") -> str:
    """Markdown for every `streamprune` subcommand: usage, what it does, an example and each
    argument with what it takes, its default and its help (from `build_parser()`)."""
    if parser is None:
        from streamprune.cli.main import build_parser

        parser = build_parser()
    sub = _subparsers(parser)
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [f"{heading} Commands", "", "| command | what it does |", "|---|---|"]
    for name in sub.choices:
        out.append(f"| [`{name}`](#{_anchor('streamprune ' + name)}) | {_cell(helps.get(name, ''))} |")
    out += ["", f"{heading} Options of every command", ""]
    first = next(iter(sub.choices.values()))
    common = [a for a in first._actions if a.dest in COMMON_DESTS]
    out += ["| argument | what it does |", "|---|---|"]
    out += [f"| `{_cell(_name(a))}` | {_cell(a.help)} |" for a in common]
    out.append("| `-h, --help` | show the command's options and an example |")
    version = [a for a in parser._actions if isinstance(a, argparse._VersionAction)]
    out += [f"| `streamprune {', '.join(a.option_strings)}` | {_cell(a.help or 'the version')} |" for a in version]
    out.append("")
    for name, s in sub.choices.items():
        out += [f"{heading} streamprune {name}", "", _cell(s.description or helps.get(name, "")), ""]
        out += ["```text", _usage(s), "```", ""]
        out += _arguments_table(s, skip=COMMON_DESTS)
        out.append("")
        if s.epilog:
            example = s.epilog.split(":", 1)[1].strip() if s.epilog.startswith("example:") else s.epilog.strip()
            out += ["Example:", "", "```bash", example, "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the config file and the settings classes


def _cli_options() -> dict[tuple[str, str], tuple[str, str]]:
    """(command, dest) -> (the option that sets it, its help), for every subcommand."""
    from streamprune.cli.main import build_parser

    out = {}
    for name, s in _subparsers(build_parser()).choices.items():
        for a in s._actions:
            if a.dest == "help":
                continue
            flag = max(a.option_strings, key=len) if a.option_strings else (a.metavar or a.dest.upper())
            out[(name, a.dest)] = (flag, _help(s, a))
    return out


def settings_classes() -> list[type]:
    """The stage settings classes, in pipeline order."""
    from streamprune.settings import EvaluateSettings, IndexSettings, RecordSettings, ReduceSettings, ReportSettings

    return [IndexSettings, RecordSettings, ReduceSettings, EvaluateSettings, ReportSettings]


def _yaml(value: object) -> str:
    """A default as the config file spells it (YAML: null, true, false)."""
    if value is None or isinstance(value, bool):
        return _code({None: "null", True: "true", False: "false"}[value])
    return _code(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    if f.default_factory is not dataclasses.MISSING:  # a section
        return "a section (below)"
    return "required"


def _description(f: dataclasses.Field) -> str:
    """A field's help as the config file shows it; a section's: what its settings class is for."""
    from streamprune.config import summary
    from streamprune.settings import described

    section = f.default_factory
    return summary(section) if isinstance(section, type) else described(f)


def _fields_table(cls: type, prefix: str, command: str | None, flags: dict) -> list[str]:
    rows = ["| field | type | default | option | description |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        flag = flags.get((command, f.name), ("", ""))[0] if command else ""
        row = [f"`{key}`", _code(f.type), _field_default(f), f"`{flag}`" if flag else "", _description(f)]
        rows.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return rows


def config_reference(heading: str = "##") -> str:
    """Markdown for every field of the `run` config: the top-level fields of `config.RunSettings`, then
    each stage's settings class (type, default, the command-line option that sets it, and the
    field's help, as `setting()` declares it in settings.py)."""
    from streamprune.config import RunSettings

    flags = _cli_options()
    out = [f"{heading} Top level", "", " ".join((inspect.getdoc(RunSettings) or "").split("\n\n")[0].split()), ""]
    out += _fields_table(RunSettings, "", None, flags)
    out.append("")
    for cls in settings_classes():
        stage = cls.STAGE  # type: ignore[attr-defined]
        out += [f"{heading} `{stage}:` ({cls.__name__})", "", inspect.getdoc(cls) or "", ""]
        out += _fields_table(cls, stage, stage, flags)
        out.append("")
    return "\n".join(out)


def config_example() -> str:
    """The commented example config `streamprune init-config` writes, as a code block."""
    from streamprune.config import EXAMPLE

    return "```yaml\n" + EXAMPLE.rstrip("\n") + "\n```\n"


GENERATORS = {"cli": cli_reference, "config": config_reference, "config-example": config_example}


def expand(markdown: str) -> str:
    """`markdown` with every reference marker replaced by its generated text."""

    def one(m: re.Match) -> str:
        if m.group(1) not in GENERATORS:
            raise ValueError(f"unknown reference marker {m.group(0)!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[m.group(1)]()

    return MARKER.sub(one, markdown)


# ---------------------------------------------------------------------------------------------
# MkDocs hooks


def on_files(files, config, **kwargs):  # noqa: ARG001
    """Add the benchmark result files as pages (their text as in the repository)."""
    from mkdocs.structure.files import File

    for source, page in BENCHMARK_PAGES.items():
        path = REPO / source
        if path.exists() and files.get_file_from_path(page) is None:
            files.append(File.generated(config, page, content=path.read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):  # noqa: ARG001
    return expand(markdown)
