"""Resuming PrunedWebDataset inside an epoch with torchdata's StatefulDataLoader: real shards, a
real keep-list, the state through JSON into a new process, which yields exactly the rest."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from streamprune import PrunedWebDataset
from streamprune.errors import InputError, SettingsError
from streamprune.formats.keeplist import KeepList
from streamprune.loader_state import FORMAT, Layout, share

# Builds the dataset of a case and the loader over it; shared by this process and the resuming one.
BUILD = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from torchdata.stateful_dataloader import StatefulDataLoader
from streamprune import PrunedWebDataset


def build(case, paths, keep):
    ds = PrunedWebDataset(
        paths, keep=keep, shardshuffle=False if case.get("resampled") else 100, seed=5,
        even_epochs=case.get("even", False), resampled=case.get("resampled", False),
    )
    if case.get("shuffle"):
        ds = ds.shuffle(case["shuffle"])
    ds = ds.to_tuple("__key__", "cls")
    if case.get("with_epoch"):
        ds = ds.with_epoch(case["with_epoch"])
    return ds


def run(ds, workers, batches=-1, loader_state=None):
    loader = StatefulDataLoader(ds, batch_size=8, num_workers=workers)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    keys = []
    for i, (k, _) in enumerate(loader):
        keys += list(k)
        if i + 1 == batches:
            break
    return keys, (json.loads(json.dumps(loader.state_dict())) if batches > 0 else None)
"""

# The resuming process: every job's saved state from JSON, the rest of the epoch out.
RESUME = """
jobs = json.load(open(sys.argv[1]))
out = {}
for name, job in jobs.items():
    ds = build(job["case"], job["paths"], job["keep"])
    if job.get("elastic"):  # another number of workers: the dataset merges and shares out
        ds.load_state_dict(job["states"])
        keys, _ = run(ds, job["resume_workers"])
    else:
        keys, _ = run(ds, job["case"]["workers"], loader_state=job["state"])
    out[name] = keys
json.dump(out, open(sys.argv[2], "w"))
"""

BATCHES = 360 // 8  # the 30% list keeps 360 samples: 45 batches of 8

CASES = {
    # name: case (workers, options) and the batches read before the interruption
    "w0-early": ({"workers": 0}, 2),
    "w0-middle": ({"workers": 0}, 22),
    "w0-late": ({"workers": 0}, 44),
    "w1-middle": ({"workers": 1}, 23),
    "w2-early": ({"workers": 2}, 3),
    "w2-middle": ({"workers": 2}, 21),
    "w2-late": ({"workers": 2}, 44),
    "w2-shuffle-buffer": ({"workers": 2, "shuffle": 40}, 17),
    "w2-even-shuffle-buffer": ({"workers": 2, "even": True, "shuffle": 30}, 25),
}
SLOW_CASES = {
    "w1-early": ({"workers": 1}, 1),
    "w1-late": ({"workers": 1}, 44),
    "w0-shuffle-buffer": ({"workers": 0, "shuffle": 40}, 9),
    "w0-with-epoch": ({"workers": 0, "with_epoch": 500}, 50),  # crosses into a second pass
    "w2-even-with-epoch": ({"workers": 2, "even": True, "with_epoch": 260}, 40),
    "w2-resampled": ({"workers": 2, "resampled": True, "with_epoch": 150}, 11),
}
ELASTIC = {
    # name: case, workers when saved, workers when resumed, batches before
    "workers-2-to-1": ({"workers": 2, "shuffle": 30}, 1, 13),
    "workers-0-to-2": ({"workers": 0, "even": True}, 2, 20),
}
SLOW_ELASTIC = {
    "workers-1-to-2": ({"workers": 1}, 2, 31),
}


@pytest.fixture(scope="module")
def data(make_index, uneven_shards, tmp_path_factory):
    """The uneven shards, a 30% keep-list of random rows, and the BUILD helpers."""
    paths, _ = uneven_shards
    work = tmp_path_factory.mktemp("resume")
    idx = make_index(paths, work / "run")
    rows = np.sort(np.random.default_rng(7).choice(idx.n_samples, int(0.3 * idx.n_samples), replace=False))
    KeepList.from_rows(idx, rows, work / "keep-30")
    other = np.sort(np.random.default_rng(8).choice(idx.n_samples, 100, replace=False))
    KeepList.from_rows(idx, other, work / "keep-other")
    helpers: dict = {}
    exec(BUILD, helpers)
    return {"paths": paths, "keep": str(work / "keep-30"), "other": str(work / "keep-other"), "work": work, **helpers}


def _resume_all(data, cases: dict, elastic: dict) -> dict:
    """Each case: its uninterrupted epoch, the part read before the state was saved (here), and
    the rest that one new Python process yielded from the JSON state."""
    build, run, paths, keep = data["build"], data["run"], data["paths"], data["keep"]
    jobs, done = {}, {}
    for name, (case, n) in cases.items():
        full, _ = run(build(case, paths, keep), case["workers"])
        part, state = run(build(case, paths, keep), case["workers"], batches=n)
        done[name] = (full, part)
        jobs[name] = {"case": case, "paths": paths, "keep": keep, "state": state}
    for name, (case, resume_workers, n) in elastic.items():
        full, _ = run(build(case, paths, keep), case["workers"])
        part, state = run(build(case, paths, keep), case["workers"], batches=n)
        done[name] = (full, part)
        jobs[name] = {
            "case": case,
            "paths": paths,
            "keep": keep,
            "elastic": True,
            "states": [state],
            "resume_workers": resume_workers,
        }
    work: Path = data["work"] / ("slow" if "w1-early" in cases else "fast")
    work.mkdir()
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "resume.py").write_text(BUILD + RESUME)
    subprocess.run(
        [sys.executable, str(work / "resume.py"), str(work / "jobs.json"), str(work / "rest.json")],
        check=True,
        timeout=300,
    )
    rest = json.loads((work / "rest.json").read_text())
    return {name: (full, part, rest[name]) for name, (full, part) in done.items()}


@pytest.fixture(scope="module")
def fast(data):
    return _resume_all(data, CASES, ELASTIC)


@pytest.fixture(scope="module")
def slow(data):
    return _resume_all(data, SLOW_CASES, SLOW_ELASTIC)


def _check_rest(full: list[str], part: list[str], rest: list[str], name: str) -> None:
    assert part and (rest or name.endswith("late"))
    assert sorted(part + rest) == sorted(full)  # as many of each sample: none twice, none missing
    if "with-epoch" not in name:
        assert len(set(full)) == len(full)
    if "shuffle" not in name:
        assert part + rest == full  # no sample buffer: even the order is the uninterrupted one


@pytest.mark.parametrize("name", list(CASES))
def test_resuming_in_a_new_process_yields_exactly_the_rest_of_the_epoch(fast, name):
    _check_rest(*fast[name], name)


@pytest.mark.slow  # more subprocess and worker startups
@pytest.mark.parametrize("name", [n for n in SLOW_CASES if "resampled" not in n])
def test_resuming_more_cases_in_a_new_process(slow, name):
    _check_rest(*slow[name], name)


@pytest.mark.slow
def test_resuming_resampled_keeps_the_epoch_length(slow):
    full, part, rest = slow["w2-resampled"]
    assert len(part) == 88 and len(part) + len(rest) == len(full) == 2 * 150


@pytest.mark.parametrize("name", list(ELASTIC))
def test_resuming_with_another_number_of_workers_repeats_and_skips_nothing(fast, name):
    full, part, rest = fast[name]
    assert len(set(part + rest)) == len(part + rest) and sorted(part + rest) == sorted(full)


@pytest.mark.slow
def test_resuming_with_one_worker_more_repeats_and_skips_nothing(slow):
    full, part, rest = slow["workers-1-to-2"]
    assert len(set(part + rest)) == len(part + rest) and sorted(part + rest) == sorted(full)


def test_state_is_small_versioned_json(data):
    ds = data["build"]({"workers": 0, "shuffle": 20}, data["paths"], data["keep"])
    it = iter(ds)
    first = [next(it) for _ in range(30)]
    state = ds.state_dict()
    text = json.dumps(state)
    assert len(text) < 1500 and state["format"] == FORMAT and state["version"] == 1
    assert state["layout"] == {"world": 1, "rank": 0, "workers": 1, "worker": 0}
    assert state["yielded"] == 30 and len(state["pending"]) == state["samples"] - 30 > 0
    again = data["build"]({"workers": 0, "shuffle": 20}, data["paths"], data["keep"])
    again.load_state_dict(json.loads(text))
    rest = list(again)
    whole = data["build"]({"workers": 0}, data["paths"], data["keep"])
    assert sorted(k for k, _ in first + rest) == sorted(k for k, _ in whole)


def test_resume_skips_read_samples_without_reading_them(data):
    whole = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False)
    it = iter(whole)
    for _ in range(200):
        next(it)
    state = whole.state_dict()
    again = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == 160 and again.read_counts.samples == 160  # the 200 before: not read again
    fresh = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False)
    list(fresh)
    assert again.read_counts.bytes_read < 0.6 * fresh.read_counts.bytes_read


def _state(data, **options) -> dict:
    ds = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False, **options)
    it = iter(ds)
    for _ in range(10):
        next(it)
    return json.loads(json.dumps(ds.state_dict()))


def test_a_newer_state_version_is_refused(data):
    state = _state(data)
    ds = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False)
    with pytest.raises(SettingsError, match="version 2 is newer than this streamprune reads"):
        ds.load_state_dict({**state, "version": 2})
    with pytest.raises(SettingsError, match="not a PrunedWebDataset state"):
        ds.load_state_dict({"epoch": 1})


def test_a_state_of_another_keep_list_or_shard_list_is_refused(data):
    state = _state(data)
    with pytest.raises(InputError, match="another keep-list"):
        PrunedWebDataset(data["paths"], keep=data["other"], shardshuffle=False).load_state_dict(state)
    with pytest.raises(InputError, match="another shard list.*6 shards.*this dataset has 5 shards"):
        PrunedWebDataset(data["paths"][:5], keep=data["keep"], shardshuffle=False).load_state_dict(state)
    with pytest.raises(SettingsError, match="mode 'stream'.*this dataset is 'even'"):
        PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False, even_epochs=True).load_state_dict(state)


def test_a_state_of_another_layout_needs_the_merge(data):
    state = _state(data, even_epochs=True)
    moved = {**state, "layout": {"world": 2, "rank": 1, "workers": 1, "worker": 0}}
    ds = PrunedWebDataset(data["paths"], keep=data["keep"], shardshuffle=False, even_epochs=True)
    ds.load_state_dict(moved)
    with pytest.raises(SettingsError, match="saved by rank 1 of 2, worker 0 of 1, this is rank 0 of 1"):
        next(iter(ds))
    with pytest.raises(SettingsError, match=r"missing slots \[0\]"):
        ds.load_state_dict([moved])  # rank 0's state is missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        looped = _state(data, even_epochs=False) | {"limit": 500}
    with pytest.raises(SettingsError, match="with_epoch"):
        ds.merge_states([looped])


def test_share_splits_evenly_and_leaves_nothing_out():
    ranges = [(3, 0, 7), (0, 2, 5), (5, 1, 9)]  # 18 samples
    for world, workers in [(1, 1), (2, 1), (2, 2), (4, 3), (3, 2)]:
        parts = [share(ranges, Layout(world, r, workers, w)) for r in range(world) for w in range(workers)]
        flat = [(s, i) for p in parts for s, a, b in p for i in range(a, b)]
        expected = [(s, i) for s, a, b in ranges for i in range(a, b)]
        assert flat == expected  # in order, each once
        sizes = [sum(b - a for _, a, b in p) for p in parts]
        per_rank = [sum(sizes[r * workers : (r + 1) * workers]) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1 and max(per_rank) - min(per_rank) <= 1
        equal = [share(ranges, Layout(world, r, workers, w), equal=True) for r in range(world) for w in range(workers)]
        flat = [(s, i) for p in equal for s, a, b in p for i in range(a, b)]
        slots = world * workers
        assert flat == expected[: len(expected) - len(expected) % slots]  # the remainder left out, at the end
        assert {sum(b - a for _, a, b in p) for p in equal} == {len(expected) // slots}


def test_a_resumed_epoch_can_be_interrupted_and_resumed_again(data):
    case = {"workers": 0, "shuffle": 40}
    build, paths, keep = data["build"], data["paths"], data["keep"]
    seen, state = [], None
    for stop in (50, 3, 30, None):  # the second stop: while the first resume still re-reads the buffer
        ds = build(case, paths, keep)
        if state is not None:
            ds.load_state_dict(json.loads(json.dumps(state)))
        it = iter(ds)
        seen += [k for k, _ in (it if stop is None else (next(it) for _ in range(stop)))]
        state = ds.state_dict()
    assert len(seen) == len(set(seen)) == 360
    assert sorted(seen) == sorted(k for k, _ in build({"workers": 0}, paths, keep))


def test_a_loaded_state_resumes_its_epoch_only(data):
    import torch

    build, paths, keep = data["build"], data["paths"], data["keep"]
    case = {"workers": 0, "even": True}
    ds = build(case, paths, keep)
    it = iter(ds)
    first = [next(it)[0] for _ in range(100)]
    state = json.loads(json.dumps(ds.state_dict()))
    again = build(case, paths, keep)
    again.load_state_dict([state])  # merged: shared out over the two workers below
    keys = lambda: [k for batch, _ in torch.utils.data.DataLoader(again, batch_size=8, num_workers=2) for k in batch]
    rest = keys()
    assert sorted(first + rest) == sorted(k for k, _ in build(case, paths, keep)) and len(rest) == 260
    again.set_epoch(1)  # the next epoch: whole, not the saved one's rest again
    assert len(keys()) == 360


def test_a_stateful_dataloaders_state_loads_into_the_dataset(data):
    build, run, paths, keep = data["build"], data["run"], data["paths"], data["keep"]
    case = {"workers": 2, "shuffle": 20}
    part, loader_state = run(build(case, paths, keep), 2, batches=10)
    ds = build(case, paths, keep)
    ds.load_state_dict(loader_state)  # two workers' states inside: merged, for this one process
    rest = [k for k, _ in ds]
    assert sorted(part + rest) == sorted(k for k, _ in build({}, paths, keep))
