"""The docs' command-line and config references are generated from the code (docs/hooks/reference.py):
every subcommand, every option and every settings field must appear, so none can miss the reference.
Needs neither MkDocs nor Ray."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from streamprune.cli.main import build_parser
from streamprune.config import RunSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_generator()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _section(text: str, title: str) -> str:
    """The generated text under `## streamprune NAME`, up to the next heading of that level."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_cli_reference_has_every_subcommand_and_option():
    text = ref.cli_reference()
    commands = _subcommands()
    assert {"demo", "run", "init-config", "index", "record", "reduce", "reshard", "report", "inspect"} <= set(commands)
    for name, parser in commands.items():
        section = _section(text, f"streamprune {name}")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in ref.COMMON_DESTS:
                continue
            shown = action.option_strings or [action.metavar or action.dest.upper()]
            for flag in shown:
                assert re.search(rf"`{re.escape(flag)}[ `,]", section), f"{name}: {flag} missing from the reference"
            if action.help:
                first_words = " ".join(action.help.split()[:4]).replace("|", "\\|")
                assert first_words in section, f"{name} {shown[0]}: help text missing"
    for dest in ref.COMMON_DESTS:  # documented once, above the commands
        assert f"`--{dest}`" in text


def test_cli_reference_shows_defaults():
    text = ref.cli_reference()
    assert re.search(r"`--batch-size BATCH_SIZE` \| int \| `128`", _section(text, "streamprune record"))
    assert re.search(r"`--ratio RATIO` \| float \| required", _section(text, "streamprune reduce"))
    assert re.search(r"`--samples SAMPLES` \| int \| `6000`", _section(text, "streamprune demo"))


def test_config_reference_has_every_field():
    text = ref.config_reference()
    for f in dataclasses.fields(RunSettings):
        assert f"| `{f.name}` |" in text, f"config field {f.name} missing"
    for cls in ref.settings_classes():
        assert cls.__name__ in text
        for f in dataclasses.fields(cls):
            row = next((line for line in text.splitlines() if line.startswith(f"| `{cls.STAGE}.{f.name}` |")), None)
            assert row is not None, f"{cls.STAGE}.{f.name} missing from the config reference"
            if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
                assert f"`{f.default}`" in row, f"{cls.STAGE}.{f.name}: default missing"


def test_settings_classes_are_every_config_section():
    """A new stage section in the config must be a settings class the reference lists."""
    sections = {f.name for f in dataclasses.fields(RunSettings) if dataclasses.is_dataclass(f.default_factory)}
    assert sections == {cls.STAGE for cls in ref.settings_classes()}


def test_config_reference_describes_each_field_with_its_setting_help():
    """One text per setting: the reference's description is the field's `setting()` help, the same
    the option's --help and the init-config example show."""
    from streamprune.settings import described

    text = ref.config_reference()
    for cls in ref.settings_classes():
        for f in dataclasses.fields(cls):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{cls.STAGE}.{f.name}` |"))
            assert row.endswith(" | " + ref._cell(described(f)) + " |"), row
    row = next(line for line in text.splitlines() if line.startswith("| `reduce.ratio` |"))
    assert "| `--ratio` | pruning ratio r in [0, 1): the fraction removed |" in row
    assert "(null: one per GPU, else CPUs/2 up to 4)" in text  # what None means, as the config file says it


def test_config_example_is_the_init_config_text():
    from streamprune.config import EXAMPLE

    assert EXAMPLE.strip() in ref.config_example()


@pytest.mark.parametrize("page,marker", [("cli.md", "cli"), ("config.md", "config")])
def test_pages_hold_the_markers(page, marker):
    assert f"<!-- reference: {marker} -->" in (DOCS / page).read_text()
    expanded = ref.expand((DOCS / page).read_text())
    assert "<!-- reference:" not in expanded
