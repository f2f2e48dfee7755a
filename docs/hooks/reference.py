"""The command-line and config references of the docs, generated from the code.

MkDocs loads this file as a hook (`hooks:` in mkdocs.yml). A page holding a marker line

    <!-- reference: cli -->         every `streamprune` subcommand, from cli.main.build_parser()
    <!-- reference: config -->      every config field, from the settings dataclasses
    <!-- reference: config-example --> the commented example `streamprune init-config` writes

gets the generated Markdown in its place, so a new option or setting is documented by the build
itself. The benchmark result files (benchmarks/*.md) are added as pages under benchmarks/, as
they are in the repository.

`cli_reference()`, `config_reference()` and `config_example()` are plain functions (no MkDocs
needed): tests/test_docs_reference.py calls them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import re
import tokenize
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


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class body of `cls` (settings.py describes its
    fields that way), read with tokenize from the class's source."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens[:-1]):
        # a field: NAME at the class body's indentation followed by ':' (an annotation)
        if tok.type == tokenize.NAME and tokens[i + 1].string == ":" and tokens[i - 1].type == tokenize.INDENT:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.NAME and tokens[i + 1].string == ":" and tokens[i - 1].type == tokenize.NEWLINE:
            line_field[tok.start[0]] = tok.string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            comments[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in comments.items() if k in names}


def example_comments(example: str | None = None) -> dict[str, str]:
    """The comment of each field in the `init-config` example (`section.field` or `field`): its
    trailing comment, else the comment lines just above it; a comment-only line indented under a
    field continues that field's comment."""
    if example is None:
        from streamprune.config import EXAMPLE

        example = EXAMPLE
    out: dict[str, str] = {}
    section, last, above = "", "", []
    for line in example.splitlines():
        m = re.match(r"^(\s*)([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if m and not line.lstrip().startswith("#"):
            indent, key, _value, comment = m.groups()
            name = key if not indent else f"{section}.{key}"
            if not indent:
                section = key
            out[name] = comment or " ".join(above)
            last, above = name, []
        elif line.startswith("#"):
            above.append(line.lstrip("#").strip())
        elif line.strip().startswith("#") and last:
            out[last] = (out[last] + " " + line.strip().lstrip("#").strip()).strip()
        elif not line.strip():
            last, above = "", []
    return out


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


def _describe(*texts: str) -> str:
    """The first non-empty description."""
    return next((t for t in texts if t), "")


def _fields_table(cls: type, prefix: str, command: str | None, flags: dict, examples: dict) -> list[str]:
    own = field_comments(cls)
    rows = ["| field | type | default | option | description |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        flag, cli_help = flags.get((command, f.name), ("", "")) if command else ("", "")
        text = _describe(examples.get(key, ""), own.get(f.name, ""), cli_help)
        row = [f"`{key}`", _code(f.type), _field_default(f), f"`{flag}`" if flag else "", text]
        rows.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return rows


def config_reference(heading: str = "##") -> str:
    """Markdown for every field of the `run` config: the top-level fields of `config.Config`, then
    each stage's settings class (type, default, the command-line option that sets it, and the
    description: the field's comment in the init-config example, else its `#` comment in
    settings.py, else the option's help)."""
    from streamprune.config import Config

    flags = _cli_options()
    examples = example_comments()
    commands = {"index", "record", "reduce", "report"}
    out = [f"{heading} Top level", "", (inspect.getdoc(Config) or "").splitlines()[0], ""]
    out += _fields_table(Config, "", None, flags, examples)
    out.append("")
    for cls in settings_classes():
        stage = cls.STAGE  # type: ignore[attr-defined]
        out += [f"{heading} `{stage}:` ({cls.__name__})", "", inspect.getdoc(cls) or "", ""]
        out += _fields_table(cls, stage, stage if stage in commands else None, flags, examples)
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
