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
        "record.batch_size: must be >= 1",
        "record.lr: must be a finite number > 0",
        "record.num_classes: must be >= 1",
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
    with pytest.raises(ValueError, match=r"batch_size: must be >= 1.*seed: must be in \[0, 2\^63\)"):
        record(tmp_path / "run", 2, batch_size=0, seed=2**64)
    with pytest.raises(ValueError, match="lr: must be a finite number > 0"):
        record(tmp_path / "run", 2, lr=float("nan"))
    with pytest.raises(ValueError, match="decode: must be package.module:function"):
        record(tmp_path / "run", 2, decode="not a function")
    assert time.perf_counter() - t < 5  # before any index is read or Ray started
    assert main(["record", str(tmp_path / "run"), "--epochs", "2", "--num-classes", "0", "--quiet"]) == 2
    assert "num_classes: must be >= 1" in capsys.readouterr().err
