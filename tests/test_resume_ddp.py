"""Elastic resume across world sizes: a state saved by 2 DDP ranks (torchrun, gloo) resumed by 1,
and one saved by 1 resumed by 2; over all ranks the epoch's kept samples, each exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamprune.formats.keeplist import KeepList

# One phase on this rank: `part` (the uninterrupted epoch, then n batches and the states of all
# ranks, gathered with all_gather_object) or `rest` (all saved states in, the rest of the epoch out).
SCRIPT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset import split_by_node
from streamprune import PrunedWebDataset

phase, cfg = sys.argv[1], json.load(open(sys.argv[2]))
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")


def dataset():
    if cfg["even"]:
        ds = PrunedWebDataset(cfg["paths"], keep=cfg["keep"], shardshuffle=100, seed=11, even_epochs=True)
    else:  # webdataset's own split: whole shards per rank, then per worker
        ds = PrunedWebDataset(cfg["paths"], keep=cfg["keep"], shardshuffle=100, seed=11, nodesplitter=split_by_node)
    return ds.shuffle(20).to_tuple("__key__", "cls")


def keys_of(loader, batches=-1):
    keys = []
    for i, (k, _) in enumerate(loader):
        keys += list(k)
        if i + 1 == batches:
            break
    return keys


out = {}
if phase == "part":
    out["full"] = keys_of(StatefulDataLoader(dataset(), batch_size=8, num_workers=cfg["workers"]))
    loader = StatefulDataLoader(dataset(), batch_size=8, num_workers=cfg["workers"])
    out["part"] = keys_of(loader, cfg["batches"])
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, loader.state_dict())
    else:
        states = [loader.state_dict()]
    out["states"] = json.loads(json.dumps(states))
else:
    ds = dataset()
    ds.load_state_dict(json.load(open(cfg["states"])))  # every rank: all states, merged, its share
    out["rest"] = keys_of(StatefulDataLoader(ds, batch_size=8, num_workers=cfg["workers"]))
json.dump(out, open(os.path.join(cfg["out"], f"{phase}-{rank}.json"), "w"))
if world > 1:
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def data(make_index, uneven_shards, tmp_path_factory):
    paths, _ = uneven_shards
    work = tmp_path_factory.mktemp("resume-ddp")
    idx = make_index(paths, work / "run")
    rows = np.sort(np.random.default_rng(3).choice(idx.n_samples, 357, replace=False))  # 357: not even
    KeepList.from_rows(idx, rows, work / "keep")
    (work / "script.py").write_text(SCRIPT)
    return {"paths": paths, "keep": str(work / "keep"), "work": work}


def _phase(data, tmp_path, phase: str, ranks: int, workers: int, **cfg) -> list[dict]:
    cfg = {"paths": data["paths"], "keep": data["keep"], "workers": workers, "out": str(tmp_path), **cfg}
    path = tmp_path / f"{phase}.json"
    path.write_text(json.dumps(cfg))
    script = str(data["work"] / "script.py")
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    else:
        launch = [sys.executable]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([*launch, script, phase, str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-6000:]
    return [json.loads((tmp_path / f"{phase}-{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize(
    ("saved", "resumed", "workers", "batches", "even"),
    [(2, 1, (2, 1), 6, True), (1, 2, (0, 2), 17, True), (2, 1, (1, 2), 9, False)],
    ids=["2-ranks-to-1", "1-rank-to-2", "2-ranks-to-1-webdataset-split"],
)
def test_elastic_resume_over_another_world_size(data, tmp_path, saved, resumed, workers, batches, even):
    before = _phase(data, tmp_path, "part", saved, workers[0], batches=batches, even=even)
    full = [k for r in before for k in r["full"]]
    part = [k for r in before for k in r["part"]]
    # an even epoch leaves out what does not divide evenly; webdataset's split reads every sample
    assert len(full) == len(set(full)) == (357 - 357 % (saved * max(1, workers[0])) if even else 357)
    (tmp_path / "states.json").write_text(json.dumps(before[0]["states"]))  # rank 0 gathered all
    after = _phase(data, tmp_path, "rest", resumed, workers[1], states=str(tmp_path / "states.json"), even=even)
    rest = [k for r in after for k in r["rest"]]
    assert len(part + rest) == len(set(part + rest)) and set(part + rest) <= set(full)
    lengths = [len(r["rest"]) for r in after]
    if even:  # equal ranks (no rank waits in a collective): the rest's remainder is left out, as at an epoch's start
        slots = resumed * max(1, workers[1])
        left = len(full) - len(part)
        assert len(rest) == left - left % slots and len(set(lengths)) == 1
    else:  # webdataset's split: every sample, the ranks' shares as equal as they can be
        assert sorted(part + rest) == sorted(full) and max(lengths) - min(lengths) <= 1
