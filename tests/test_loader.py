"""The loader: PrunedWebDataset, keep_filter, the Ray Data predicate and reshard, on real shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from streamprune import KeepPredicate, PrunedWebDataset, keep_filter, reshard
from streamprune.demo.datasets import write_shards
from streamprune.errors import ChangedShardError
from streamprune.formats.keeplist import KeepList
from streamprune.loader import even_slice


@pytest.fixture(scope="module")
def setup(make_index, uneven_shards, tmp_path_factory):
    """The uneven shards indexed, a keep-all list and a 30% list of random rows."""
    paths, sizes = uneven_shards
    work = tmp_path_factory.mktemp("loader")
    idx = make_index(paths, work / "run")
    rows = np.sort(np.random.default_rng(7).choice(idx.n_samples, int(0.3 * idx.n_samples), replace=False))
    keep_all = KeepList.from_rows(idx, np.arange(idx.n_samples), work / "keep-all")
    keep30 = KeepList.from_rows(idx, rows, work / "keep-30")
    reference = list(wds.WebDataset(paths, shardshuffle=False))
    return {
        "paths": paths,
        "sizes": sizes,
        "work": work,
        "index": idx,
        "all": keep_all,
        "k30": keep30,
        "ref": reference,
    }


def test_keep_all_yields_exactly_webdatasets_samples(setup):
    got = list(PrunedWebDataset(setup["paths"], keep=setup["all"], shardshuffle=False))
    assert got == setup["ref"] and len(got) == 1200
    # the same shard shuffle as webdataset's, given the seed
    shuffled = lambda cls, **kw: [s["__key__"] for s in cls(setup["paths"], shardshuffle=4, seed=3, **kw)]
    assert shuffled(PrunedWebDataset, keep=setup["all"]) == shuffled(wds.WebDataset)


def test_a_30_percent_list_yields_exactly_the_kept_samples_and_skips_bytes(setup, kept_samples):
    ds = PrunedWebDataset(setup["paths"], keep=str(setup["work"] / "keep-30"), shardshuffle=False)
    got = list(ds)
    assert got == kept_samples(setup["ref"], setup["k30"]) and len(got) == len(setup["k30"]) == 360
    total = sum(os.path.getsize(p) for p in setup["paths"])
    assert ds.read_counts.samples == 360 and ds.read_counts.shards_opened == 6 and ds.read_counts.bytes_total == total
    # kept samples plus at most a page of gap read through per kept sample
    kept_bytes = int(np.diff(np.asarray(setup["k30"].ranges), axis=1).sum())
    assert kept_bytes <= ds.read_counts.bytes_read <= kept_bytes + 4096 * 360
    assert ds.read_counts.bytes_read < 0.6 * total


def test_header_scan_and_stream_fallbacks_yield_the_same(setup, kept_samples, sample_content):
    k30 = setup["k30"]
    by_keys = KeepList.from_keys([(n, k) for n in k30.names for k in k30.shard_keys(n)])
    assert by_keys.ranges is None
    expected = kept_samples(setup["ref"], k30)
    ds = PrunedWebDataset(setup["paths"], keep=by_keys, shardshuffle=False)
    assert list(ds) == expected
    assert 0 < ds.read_counts.bytes_read < sum(os.path.getsize(p) for p in setup["paths"])
    piped = [f"pipe:cat {p}" for p in setup["paths"]]
    got = list(PrunedWebDataset(piped, keep=k30, shardshuffle=False))
    assert sample_content(got) == sample_content(expected)


def test_a_shard_with_nothing_kept_is_never_opened(setup, tmp_path):
    idx = setup["index"]
    rows = [r for s in (0, 2) for r in idx.rows(s)][::3]
    keep = KeepList.from_rows(idx, rows, tmp_path / "keep")
    copies = []
    for i, p in enumerate(setup["paths"]):
        copies.append(str(tmp_path / os.path.basename(p)))
        if i in (0, 2):
            shutil.copy(p, copies[-1])  # the others do not exist: opening one would fail
    ds = PrunedWebDataset(copies, keep=keep, shardshuffle=False)
    assert len(list(ds)) == len(rows)
    assert (ds.read_counts.shards_opened, ds.read_counts.shards_skipped) == (2, 4)


def test_fluid_methods_keep_the_class_and_decode_only_kept(setup):
    ds = PrunedWebDataset(setup["paths"], keep=setup["k30"], shardshuffle=False)
    stages = [
        ds.decode("pil"),
        ds.decode("pil").to_tuple("png", "cls"),
        ds.map(lambda s: s),
        ds.shuffle(10),
        ds.batched(8),
        ds.select(lambda s: True),
    ]
    assert all(isinstance(s, PrunedWebDataset) for s in stages)
    image, label = next(iter(stages[1]))
    assert image.size == (28, 28) and 0 <= label < 10
    decoded = []
    counting = ds.map(lambda s: decoded.append(s["__key__"]) or s).decode("pil")
    assert len(list(counting)) == 360 and len(decoded) == 360
    assert sum(len(b[0]) for b in ds.to_tuple("png", "cls").batched(8)) == 360
    assert sorted(s["__key__"] for s in ds.shuffle(50)) == sorted(s["__key__"] for s in ds)
    fixed = PrunedWebDataset(setup["paths"], keep=setup["k30"], shardshuffle=False).with_epoch(500)
    assert isinstance(fixed, PrunedWebDataset) and len(list(fixed)) == 500  # repeats, as webdataset's


def test_dataloader_with_several_workers_yields_each_kept_sample_once(setup, kept_samples):
    import torch

    ds = PrunedWebDataset(setup["paths"], keep=setup["k30"], shardshuffle=False).to_tuple("__key__", "cls")
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    keys = [k for batch_keys, _ in loader for k in batch_keys]
    assert sorted(keys) == sorted(s["__key__"] for s in kept_samples(setup["ref"], setup["k30"]))


def test_even_slice_gives_every_slot_the_same_count():
    counts = np.array([5, 0, 17, 3, 9, 1])
    parts = [even_slice(counts, 4, slot) for slot in range(4)]
    assert [sum(b - a for _, a, b in p) for p in parts] == [8] * 4
    flat = [(s, i) for p in parts for s, a, b in p for i in range(a, b)]
    assert len(set(flat)) == 32 and all(0 <= i < counts[s] for s, i in flat)


def _ddp_rank(rank: int, world: int, init: str, paths: list[str], keep: str, out: str, even: bool) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ds = (
        PrunedWebDataset(paths, keep=keep, shardshuffle=100, nodesplitter=wds.split_by_node, even_epochs=even)
        .decode()
        .to_tuple("__key__", "cls")
        .batched(10)
    )
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keys, batches = [], 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for batch_keys, labels in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
            loss = torch.nn.functional.cross_entropy(model(torch.ones(len(labels), 1)), labels)
            opt.zero_grad()
            loss.backward()  # an all-reduce: ranks with fewer batches would leave the others hanging
            opt.step()
            keys.extend(f"{epoch}:{k}" for k in batch_keys)
            batches += 1
    Path(out, f"rank{rank}.txt").write_text("\n".join([str(batches), *keys]))
    dist.destroy_process_group()


@pytest.mark.slow  # two torch.distributed processes
def test_two_ddp_ranks_on_uneven_pruned_shards_get_equal_batches(setup, tmp_path):
    import torch.multiprocessing as mp

    keep = str(setup["work"] / "keep-30")
    counts = [setup["k30"].kept_count(os.path.basename(p)) for p in setup["paths"]]
    assert sum(counts[0::2]) != sum(counts[1::2])  # split_by_node alone would give the ranks unequal epochs
    mp.start_processes(
        _ddp_rank,
        args=(2, f"file://{tmp_path}/rendezvous", setup["paths"], keep, str(tmp_path), True),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in range(2)]
    per_slot = 360 // 4
    assert [int(r[0]) for r in ranks] == [2 * 2 * -(-per_slot // 10)] * 2  # 2 epochs x 2 workers x batches
    for epoch in range(2):
        seen = [k for r in ranks for k in r[1:] if k.startswith(f"{epoch}:")]
        assert len(seen) == len(set(seen)) == 4 * per_slot


def test_a_keep_list_for_other_shards_is_refused(setup, tmp_path, fmnist):
    images, labels = fmnist
    other = write_shards(images[:50], labels[:50], tmp_path / "other", samples_per_shard=25, prefix="other")
    with pytest.raises(ValueError, match="made for another dataset"):
        PrunedWebDataset(other, keep=setup["k30"], shardshuffle=False)
    forced = PrunedWebDataset(other, keep=setup["k30"], shardshuffle=False, allow_mismatch=True, unknown_shards="keep")
    assert len(list(forced)) == 50
    with pytest.raises(ValueError, match="other-000000.tar.*not in the keep-list"):
        PrunedWebDataset([*setup["paths"], other[0]], keep=setup["k30"], shardshuffle=False)
    mixed = list(
        PrunedWebDataset([setup["paths"][0], other[0]], keep=setup["k30"], shardshuffle=False, unknown_shards="keep")
    )
    assert len(mixed) == setup["k30"].kept_count(os.path.basename(setup["paths"][0])) + 25


def test_a_rewritten_shard_is_refused_unless_allowed(setup, tmp_path, fmnist):
    images, labels = fmnist
    n0 = setup["sizes"][0]
    # same name and keys, other images: byte ranges no longer hold the expected samples
    rewritten = write_shards(images[n0 : 2 * n0][::-1][:n0], labels[:n0], tmp_path, sizes=[n0], prefix="train")
    with pytest.raises(ChangedShardError, match="train-000000.tar"):
        list(PrunedWebDataset(rewritten, keep=setup["k30"], shardshuffle=False))
    got = list(PrunedWebDataset(rewritten, keep=setup["k30"], shardshuffle=False, allow_mismatch=True))
    assert [s["__key__"] for s in got] == setup["k30"].shard_keys("train-000000.tar")


def test_importance_weights_in_samples(setup, tmp_path):
    k = setup["k30"]
    weights = np.linspace(1.0, 2.0, len(k))
    KeepList(
        k.manifest,
        k.names,
        k.kept,
        k.key_blob,
        k.key_offset,
        k.id_pairs,
        k.positions,
        weights,
        k.samples,
        k.ranges,
        k.shard_bytes,
    ).save(tmp_path / "weighted")
    got = list(PrunedWebDataset(setup["paths"], keep=tmp_path / "weighted", shardshuffle=False, weights=True))
    assert [s["__weight__"] for s in got] == pytest.approx(weights.tolist())
    with pytest.raises(ValueError, match="no importance weights"):
        PrunedWebDataset(setup["paths"], keep=k, shardshuffle=False, weights=True)


def test_keep_filter_in_a_custom_pipeline(setup, kept_samples, sample_content):
    expected = kept_samples(setup["ref"], setup["k30"])
    in_place = wds.DataPipeline(wds.SimpleShardList(setup["paths"]), keep_filter(setup["k30"]))
    after = wds.DataPipeline(wds.SimpleShardList(setup["paths"]), wds.tarfile_to_samples(), keep_filter(setup["k30"]))
    assert list(in_place) == expected
    assert sample_content(after) == sample_content(expected)


def test_ray_data_filter(ray_session, setup, kept_samples):
    import ray

    ds = ray.data.read_webdataset(setup["paths"], decoder=None).filter(KeepPredicate(setup["k30"]))
    keys = sorted(row["__key__"] for row in ds.take_all())
    assert keys == sorted(s["__key__"] for s in kept_samples(setup["ref"], setup["k30"]))


def test_reshard_equals_the_filtered_stream_and_resumes(ray_session, setup, tmp_path, kept_samples, sample_content):
    run = setup["work"] / "run"
    out = tmp_path / "pruned"
    paths = reshard(run, out, 100, keep=setup["k30"], progress=False)
    assert [p.name for p in paths] == [f"pruned-{j:06d}.tar" for j in range(4)]
    written = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert sample_content(written) == sample_content(kept_samples(setup["ref"], setup["k30"]))
    assert [len(list(wds.WebDataset(str(p), shardshuffle=False))) for p in paths] == [100, 100, 100, 60]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    paths[2].unlink()
    reshard(run, out, 100, keep=setup["k30"], progress=False)  # rewrites only the missing shard
    assert [p.stat().st_mtime_ns for i, p in enumerate(paths) if i != 2] == mtimes[:2] + mtimes[3:]
    assert sample_content(wds.WebDataset([str(p) for p in paths], shardshuffle=False)) == sample_content(written)
    with pytest.raises(ValueError, match="another reshard"):
        reshard(run, out, 50, keep=setup["k30"], progress=False)


def test_cli_reshard(ray_session, setup, tmp_path, capsys):
    from streamprune.cli.main import main

    run = setup["work"] / "run"
    assert (
        main(
            [
                "reshard",
                str(run),
                "--out",
                str(tmp_path / "o"),
                "--keep",
                str(setup["work"] / "keep-30"),
                "--shard-size",
                "200",
                "--quiet",
            ]
        )
        == 0
    )
    assert "2 shards" in capsys.readouterr().out
    assert main(["reshard", str(run), "--out", str(tmp_path / "o2"), "--quiet"]) == 2  # no RUN/keep
    assert "no keep-list" in capsys.readouterr().err


def test_importing_the_loader_and_its_resume_state_pulls_in_nothing_heavy():
    code = (
        "import sys, streamprune; from streamprune import PrunedWebDataset, keep_filter, KeepPredicate; "
        "import streamprune.loader_state; "
        "heavy = ('ray', 'zarr', 'scipy', 'torchdata', 'streamprune.formats.stats_store', "
        "'streamprune.stages.record'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # torchrun
def test_the_ddp_example_runs_under_torchrun(setup):
    example = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
    shards = os.path.join(os.path.dirname(setup["paths"][0]), "train-*.tar")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(example),
            "--shards",
            shards,
            "--keep",
            str(setup["work"] / "keep-30"),
            "--epochs",
            "1",
            "--num-workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-12000:]
    assert "epoch 0: samples, steps per rank = [(180, 4), (180, 4)] (expected 180 samples each)" in done.stdout


def test_reshard_refuses_a_keep_list_of_another_index(setup, make_index, tmp_path):
    other = make_index(setup["paths"][:3], tmp_path / "other")
    foreign = KeepList.from_rows(other, [0, 1, 2], tmp_path / "foreign")
    with pytest.raises(ValueError, match="made for another index"):
        reshard(setup["work"] / "run", tmp_path / "out", 10, keep=foreign, progress=False)


def test_stats_is_the_deprecated_name_of_read_counts(setup):
    """`.stats` (the loader's I/O counters; "stats" are per-sample training statistics) still works
    for one release: it warns, naming the new name, and is the same object as `.read_counts`."""
    ds = PrunedWebDataset(setup["paths"], keep=setup["k30"], shardshuffle=False)
    assert len(list(ds)) == 360 and ds.read_counts.samples == 360
    with pytest.warns(DeprecationWarning, match=r"PrunedWebDataset\.stats is now \.read_counts") as caught:
        old = ds.stats
    assert old is ds.read_counts and caught[0].filename == __file__  # the warning points at the caller
    stage = keep_filter(setup["k30"])
    with pytest.warns(DeprecationWarning, match=r"KeepFilter\.stats is now \.read_counts"):
        assert stage.stats is stage.read_counts
