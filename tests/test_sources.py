"""A run directory is data, never code: the shard URLs stored in `RUN/index/shards.jsonl` are
never opened as given. Shards are read from the URLs the user names (matched to the index's
shard names) or from the index root plus the shard name; a stored `pipe:` command or remote
URL the user did not give is refused naming the file, and `inspect --verify` reports it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import IndexedShards, KeepList, reshard
from streamprune.cli.main import main
from streamprune.errors import DamagedRunError, InputError
from streamprune.formats.index import Index
from streamprune.formats.sources import shard_urls
from streamprune.inspection.verify import verify_run
from streamprune.stages.label_scan import scan_classes


def _set_stored(run: Path, shard: int, **fields) -> None:
    """Write `fields` into shard `shard`'s line of `run/index/shards.jsonl`."""
    path = run / "index" / "shards.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[shard].update(fields)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def small(make_index, uneven_shards, tmp_path):
    """An index of the first two uneven shards (without Ray) and a marker file a command would make."""
    paths, _ = uneven_shards
    run = tmp_path / "run"
    make_index(paths[:2], run)
    return {"paths": paths[:2], "run": run, "marker": tmp_path / "ran"}


STORED = {
    "a pipe: command": ("pipe:touch {marker}; cat {path}", InputError, "--shards"),
    "an http URL": ("http://127.0.0.1:9/train-000000.tar", InputError, "--shards"),
    "an s3 URL": ("s3://bucket/train-000000.tar", InputError, "--shards"),
    "another local file": ("{other}", DamagedRunError, "root"),
}


@pytest.mark.parametrize("kind", list(STORED))
def test_a_stored_url_the_user_did_not_give_is_never_opened(small, tmp_path, kind):
    template, error, words = STORED[kind]
    run, paths, marker = small["run"], small["paths"], small["marker"]
    _set_stored(run, 0, url=template.format(marker=marker, path=paths[0], other=paths[1]))
    idx = Index(run)
    refused = rf"index/shards\.jsonl.*'train-000000\.tar'.*{words}"
    with pytest.raises(error, match=refused):
        shard_urls(idx)
    with pytest.raises(error, match=refused):
        scan_classes(run)
    with pytest.raises(error, match=refused):
        IndexedShards(run)
    with pytest.raises(error, match=refused):
        reshard(run, tmp_path / "out", 10, keep=KeepList.from_rows(idx, [0, 5], tmp_path / "keep"), progress=False)
    report = verify_run(run, progress=False)
    assert report["damaged"], report
    assert any(p["file"] == "index/shards.jsonl" and "train-000000.tar" in p["problem"] for p in report["problems"])
    assert not marker.exists()
    # the URLs the user gives are the ones read
    assert shard_urls(idx, paths) == paths
    ref = [int(s["cls"]) for p in paths for s in wds.WebDataset(p, shardshuffle=False)]
    assert scan_classes(run, shards=paths).counts == tuple(np.bincount(ref))
    rows = [int(row) for _, _, row in IndexedShards(run, lambda s: (0, 0), shards=paths, shuffle_buffer=1)]
    assert sorted(rows) == list(range(idx.n_samples)) and not marker.exists()


@pytest.mark.parametrize(
    "file, field, value, words",
    [
        ("shards.jsonl", "name", "../../elsewhere/train-000000.tar", "name"),
        ("shards.jsonl", "name", "/etc/passwd", "name"),
        ("manifest.json", "root", "relative/root", "root"),
    ],
)
def test_names_and_roots_that_leave_the_dataset_are_refused(small, file, field, value, words):
    run = small["run"]
    if file == "shards.jsonl":
        _set_stored(run, 1, **{field: value})
    else:
        manifest = json.loads((run / "index" / file).read_text())
        manifest[field] = value
        (run / "index" / file).write_text(json.dumps(manifest))
    with pytest.raises(DamagedRunError, match=rf"index/{file}.*{words}"):
        Index(run)
    assert any(p["file"] == f"index/{file}" for p in verify_run(run, progress=False)["problems"])


def test_given_shards_are_matched_to_the_index_by_name(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    piped = [f"pipe:cat {p}" for p in paths[:3]]
    idx = make_index(piped, tmp_path / "run")
    with pytest.raises(InputError, match=r"shards\.jsonl.*'train-000000\.tar'.*pass --shards"):
        shard_urls(idx)
    assert shard_urls(idx, piped) == piped
    assert shard_urls(idx, list(reversed(paths[:3]))) == paths[:3]  # the same files, matched by name
    assert shard_urls(idx, "::".join(piped)) == piped
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = [shutil.copy(p, moved) for p in paths[:3]]
    assert shard_urls(idx, copies) == copies  # moved elsewhere: the name ends the path
    with pytest.raises(InputError, match=r"'train-000002\.tar' of the index .* is not among the given shards"):
        shard_urls(idx, piped[:2])
    with pytest.raises(InputError, match=rf"{paths[4]!r} .*not a shard of the index"):
        shard_urls(idx, [*piped, paths[4]])
    with pytest.raises(InputError, match=r"both shard 'train-000001\.tar'"):
        shard_urls(idx, [*piped, paths[1]])


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reduced(synthetic_run, uneven_shards, tmp_path_factory):
    """A complete run of the uneven shards (synthetic statistics, a real `reduce`), to copy."""
    from streamprune import reduce

    paths, _ = uneven_shards
    run = tmp_path_factory.mktemp("sources") / "run"
    synthetic_run(run, paths, seed=3)
    reduce(run, 0.5, "dual-beta", window=5, progress=False)
    return run


def test_report_reshard_and_record_run_no_command_from_the_run_directory(reduced, uneven_shards, tmp_path, capsys):
    paths, _ = uneven_shards
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(reduced, run)
    _set_stored(run, 2, url=f"pipe:touch {marker}; cat {paths[2]}")
    spec = str(Path(paths[0]).parent / "train-*.tar")
    for command in (["report", str(run)], ["reshard", str(run), "--out", str(tmp_path / "out")]):
        assert main([*command, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "shards.jsonl" in err and "'train-000002.tar'" in err and "--shards" in err, err
        assert main([*command, "--quiet", "--shards", spec]) == 0, capsys.readouterr().err
    assert main(["record", str(run), "--epochs", "1", "--quiet"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert (run / "report" / "index.html").exists() and len(list((tmp_path / "out").glob("pruned-*.tar"))) > 0
    assert not marker.exists()
