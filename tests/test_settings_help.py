"""One source per setting (issue 25): each settings field carries its help, and the command's
options, the init-config example and the docs' reference are generated from it, so none can lack
a field or describe it differently."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from streamprune.cli.main import build_parser, main
from streamprune.cli.options import add_settings
from streamprune.config import EXAMPLE, RunSettings, example_config
from streamprune.settings import (
    EvaluateSettings,
    IndexSettings,
    RecordSettings,
    ReduceSettings,
    ReportSettings,
    StageSettings,
    cli_flag,
    described,
    setting,
)

SETTINGS = [IndexSettings, RecordSettings, ReduceSettings, EvaluateSettings, ReportSettings]
# the settings set in config files only, with the reason: a new one must be listed here on purpose
CONFIG_FILE_ONLY = {
    **{f"evaluate.{f.name}": "no evaluate command: `run` evaluates" for f in dataclasses.fields(EvaluateSettings)},
    "report.enabled": "`streamprune report` always writes the report",
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("cls", [*SETTINGS, RunSettings], ids=lambda c: c.__name__)
def test_every_settings_field_has_help(cls):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            continue  # a section: described by its class's docstring
        text = f.metadata.get("help", "")
        assert len(text.split()) >= 2, f"{cls.__name__}.{f.name}: no help text (declare it with setting(...))"
        assert text == text.strip() and "  " not in text, f"{cls.__name__}.{f.name}: stray spaces"
        if f.default is None and cls is not EvaluateSettings:
            assert f.metadata.get("unset") or f.name == "decode", f"{cls.__name__}.{f.name}: say what None means"


def test_every_settings_field_is_an_option_of_its_command_or_config_file_only():
    commands = _commands()
    for cls in SETTINGS:
        for f in dataclasses.fields(cls):
            key = f"{cls.STAGE}.{f.name}"
            flag = cli_flag(f)
            if flag is None:
                assert key in CONFIG_FILE_ONLY, f"{key}: config-file-only (cli=False) but not listed as such"
                if cls.STAGE in commands:
                    assert f.name not in {a.dest for a in commands[cls.STAGE]._actions}, key
                continue
            assert key not in CONFIG_FILE_ONLY, f"{key}: listed as config-file-only but has {flag}"
            action = next((a for a in commands[cls.STAGE]._actions if a.dest == f.name), None)
            assert action is not None, f"{key}: no option of `streamprune {cls.STAGE}`"
            assert action.option_strings == [flag], key
            shown = f.metadata["help"] if action.required else described(f, "default")
            assert action.help == shown, f"{key}: the option's help is not the setting's"
            if not action.required:
                assert action.default == f.default, f"{key}: the option's default is not the setting's"


def test_options_from_settings_parse_like_the_fields():
    args = build_parser().parse_args(
        ["reduce", "run", "--ratio", "0.3", "--c-d", "2", "--C", "9", "--balance", "none", "--window", "4"]
    )
    assert (args.ratio, args.c_d, args.C, args.balance, args.window) == (0.3, 2.0, 9.0, "none", 4)
    assert (args.method, args.epochs, args.missing) == ("dual-beta", None, "drop")
    args = build_parser().parse_args(["record", "run", "--epochs", "3", "--gpus-per-worker", "0.5"])
    assert (args.epochs, args.gpus_per_worker, args.on_bad_sample, args.label) == (3, 0.5, "skip", None)
    args = build_parser().parse_args(["index", "a.tar", "--out", "run", "--allow-broken"])
    assert (args.allow_broken, args.identity, args.root) == (True, "shard-key", None)
    assert build_parser().parse_args(["report", "run"]).max_rows == ReportSettings().max_rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reduce", "run"], "the following arguments are required: --ratio"),
        (["record", "run"], "the following arguments are required: --epochs"),
        (["reduce", "run", "--ratio", "0.5", "--balance", "some"], "invalid choice: 'some'"),
        (["record", "run", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["record", "run", "--epochs", "2", "--on-bad-sample", "ignore"], "invalid choice: 'ignore'"),
    ],
)
def test_parser_errors_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_refused_value_names_the_option(tmp_path, capsys):
    assert main(["reduce", str(tmp_path / "run"), "--ratio", "0.5", "--c-d", "0", "--alpha-plus-beta", "3"]) == 2
    err = capsys.readouterr().err
    assert "--c-d: must be > 0" in err and "--alpha-plus-beta: must be > C (15.0)" in err


def test_the_init_config_example_holds_every_field_at_its_default_with_its_help():
    assert example_config() == EXAMPLE
    data = yaml.safe_load(EXAMPLE)
    assert data["shards"] == "data/train-{000000..000009}.tar" and data["out"] == "run"
    for cls in SETTINGS:
        assert data[cls.STAGE] == cls().to_dict(), cls.STAGE
        for f in dataclasses.fields(cls):
            words = " ".join(described(f).split()[:5])
            section = EXAMPLE.split(f"\n{cls.STAGE}:", 1)[1].split("\n\n", 1)[0]
            flat = " ".join(line.split("# ", 1)[-1] for line in section.splitlines())
            assert words in " ".join(flat.split()), f"{cls.STAGE}.{f.name}: help missing from the example"
    assert max(len(line) for line in EXAMPLE.splitlines()) <= 110


def test_help_says_what_an_unset_value_means_in_each_place():
    f = next(f for f in dataclasses.fields(RecordSettings) if f.name == "workers")
    assert described(f, "default") == "training workers (default: one per GPU, else CPUs/2 up to 4)"
    assert described(f) == "training workers (null: one per GPU, else CPUs/2 up to 4)"
    assert "  workers: null           # training workers (null: one per GPU, else CPUs/2 up to 4)\n" in EXAMPLE


def test_add_settings_follows_the_field_declarations():
    @dataclasses.dataclass(frozen=True)
    class Toy(StageSettings):
        STAGE = "toy"
        size: int | None = setting(None, "how big", unset="as big as it gets", metavar="N")
        count: int | None = setting(None, "how many", unset="all")
        names: list[str] | None = setting(None, "names, one per option", cli="--name")
        on: bool = setting(True, "switched on")
        secret: str = setting("x", "config files only", cli=False)

    p = argparse.ArgumentParser()
    add_settings(p, Toy, required=["count"])
    args = p.parse_args(["--count", "2", "--size", "3", "--name", "a", "--name", "b", "--no-on"])
    assert (args.size, args.names, args.on) == (3, ["a", "b"], False) and not hasattr(args, "secret")
    text = " ".join(p.format_help().split())
    assert "--size N how big (default: as big as it gets)" in text
    assert "--count COUNT how many --name" in text  # required: no default claimed


def test_the_old_name_of_run_settings_still_imports_with_a_deprecation_warning():
    import streamprune.config

    with pytest.warns(DeprecationWarning, match="streamprune.config.Config is now streamprune.config.RunSettings"):
        from streamprune.config import Config
    assert Config is RunSettings
    with pytest.raises(AttributeError):
        streamprune.config.Konfig  # noqa: B018
