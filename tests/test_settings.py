"""Settings are checked before any work: a config lists every problem at once, `record` and the
CLI refuse bad values at the start, naming the field."""

from __future__ import annotations

import time

import pytest

from streamprune.config import ConfigError, load_config


def test_a_config_with_bad_values_is_refused_whole_before_any_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "shards: data/x.tar\n"
        "record: {epochs: 4, batch_size: 0, lr: .nan, num_classes: 0, label: 'json:'}\n"
        "reduce: {ratio: 1.0, method: dual-betta, window: 6, c_d: -1}\n"
        "evaluate: {test_shards: t.tar, budget: forever}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "9 problem(s), nothing was run" in text
    for field in (
        "record.batch_size: must be an integer >= 1",
        "record.lr: must be a finite number > 0",
        "record.num_classes: must be an integer >= 1",
        "record.label: label 'json:'",
        "reduce.ratio: must be in [0, 1)",
        "reduce.method: unknown method 'dual-betta'",
        "reduce.c_d: must be > 0",
        "reduce.window: 6 is longer than the 4 epochs used",
        "evaluate.budget: must be one of",
    ):
        assert field in text, field


def test_a_good_config_loads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "shards: data/x.tar\nrecord: {epochs: 3, label: 'json:meta.label', image_size: 64}\n"
        "reduce: {ratio: 0.3, method: 'ccs:el2n'}\n"
    )
    c = load_config(cfg)
    assert c.record.image_size == 64 and c.reduce.method == "ccs:el2n"


def test_record_refuses_bad_settings_at_once(tmp_path, capsys):
    from streamprune import record
    from streamprune.cli.main import main

    t = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"batch_size: must be an integer >= 1.*seed: must be an integer in \[0, 2\^63\)"
    ):
        record(tmp_path / "run", 2, batch_size=0, seed=2**64)
    with pytest.raises(ValueError, match="lr: must be a finite number > 0"):
        record(tmp_path / "run", 2, lr=float("nan"))
    with pytest.raises(ValueError, match="decode: must be package.module:function"):
        record(tmp_path / "run", 2, decode="not a function")
    assert time.perf_counter() - t < 5  # before any index is read or Ray started
    assert main(["record", str(tmp_path / "run"), "--epochs", "2", "--num-classes", "0", "--quiet"]) == 2
    assert "--num-classes: must be an integer >= 1" in capsys.readouterr().err
    assert main(["reduce", str(tmp_path / "run"), "--ratio", "1", "--C", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--ratio: must be in [0, 1)" in err and "--C: must be > 0" in err
    assert not (tmp_path / "run").exists()


def test_run_with_an_invalid_setting_exits_2_in_seconds_having_written_nothing(tmp_path, capsys):
    from streamprune.cli.main import main

    for bad in ("reduce: {method: dual-betta}", "reduce: {ratio: 1}", "record: {batch_size: 0}", "record: {lr: .nan}"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"shards: data/x.tar\nout: run\n{bad}\n")
        t = time.perf_counter()
        assert main(["run", str(cfg), "--quiet"]) == 2, bad
        assert time.perf_counter() - t < 5, bad
        assert "nothing was run" in capsys.readouterr().err, bad
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"], bad


def test_settings_are_frozen_checked_and_share_their_defaults():
    from dataclasses import FrozenInstanceError

    from streamprune import ReduceSettings, SettingsError
    from streamprune.cli.main import build_parser
    from streamprune.config import RunSettings

    s = ReduceSettings(ratio=0.3)
    with pytest.raises(FrozenInstanceError):
        s.ratio = 0.4  # type: ignore[misc]
    assert s.replace(seed=2) == ReduceSettings(ratio=0.3, seed=2)
    with pytest.raises(SettingsError, match="unknown reduce setting 'methd' \\(did you mean 'method'\\?\\)"):
        s.replace(methd="dual")
    with pytest.raises(SettingsError) as info:
        ReduceSettings(ratio=-0.1, window=1, cut=1.0)
    assert [p.split(":")[0] for p in info.value.problems] == ["reduce.ratio", "reduce.window", "reduce.cut"]
    # one default: the CLI's and the config's are the class's
    args = build_parser().parse_args(["reduce", "run", "--ratio", "0.5"])
    assert (args.method, args.C, args.cut, args.scores) == (s.method, s.C, s.cut, s.scores)
    assert RunSettings(shards="x").reduce == ReduceSettings()


def test_run_indexes_again_when_the_index_settings_change(make_index, uneven_shards, tmp_path):
    import dataclasses
    import os

    from streamprune.config import RunSettings
    from streamprune.settings import IndexSettings
    from streamprune.stages.pipeline import _index_done

    paths, _ = uneven_shards
    run = tmp_path / "run"
    cfg = RunSettings(shards=paths, out=str(run))
    assert not _index_done(cfg, run)  # nothing indexed yet
    make_index(paths, run)
    assert _index_done(cfg, run)
    parent = os.path.dirname(os.path.dirname(paths[0]))
    assert not _index_done(dataclasses.replace(cfg, index=IndexSettings(root=parent)), run)
    assert not _index_done(dataclasses.replace(cfg, index=IndexSettings(identity="json:uid")), run)
    assert not _index_done(dataclasses.replace(cfg, shards=paths[:-1]), run)


@pytest.mark.parametrize(
    "text, lr",
    [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("+2.5e-2", 2.5e-2), ("1.0e3", 1e3), ("3", 3.0)],
)
def test_yaml_floats_in_exponent_form_are_floats(tmp_path, text, lr):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"shards: data/x.tar\nrecord: {{lr: {text}}}\nevaluate: {{lr: {text}}}\n")
    c = load_config(cfg)
    assert (c.record.lr, c.evaluate.lr) == (lr, lr) and isinstance(c.record.lr, float)
    cfg.write_text(f"shards: data/x.tar\nrecord: {{seed: {text}, label: '{text}'}}\n")
    if text != "3":  # a float is no integer; quoted, it stays a string
        with pytest.raises(ConfigError, match=r"record.seed: must be int"):
            load_config(cfg)


def test_a_yaml_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shards: data/x.tar\nrecord:\n  epochs: 3\nreduce:\n  ratio: 0.3\nrecord:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml'.*'record' is given twice \(lines 2 and 6\)"):
        load_config(cfg)
    cfg.write_text("shards: data/x.tar\nrecord: {epochs: 3,\n  lr: 0.1, epochs: 4}\n")
    with pytest.raises(ConfigError, match=r"'epochs' is given twice \(lines 2 and 3\)"):
        load_config(cfg)
    cfg.write_text("base: &b {epochs: 3}\nshards: data/x.tar\nrecord: {<<: *b, epochs: 4}\n")
    with pytest.raises(ConfigError, match="base: unknown field"):  # a merge key overridden is no duplicate
        load_config(cfg)


def test_a_toml_key_given_twice_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('shards = "data/x.tar"\n[record]\nepochs = 3\n[record]\nepochs = 5\n')
    with pytest.raises(ConfigError, match="c.toml': cannot parse: .*record"):
        load_config(cfg)
    cfg.write_text('shards = "data/x.tar"\n[record]\nepochs = 3\nlr = 1e-3\n')
    assert load_config(cfg).record.lr == 1e-3
