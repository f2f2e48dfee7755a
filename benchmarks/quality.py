"""Quality: do streamprune's keep-lists train better models than random ones at the same budget?

Real Fashion-MNIST through the real pipeline (shards, Ray, the stats store): record T proxy
epochs, reduce with each method at each pruning ratio, train a fresh model on each kept
subset on several seeds and measure its accuracy. The fair protocol: every subset trains
for as many SGD steps as the full-data run (`streamprune.stages.evaluate`'s `steps` budget), so a
subset is judged near the convergence its size allows. A method name with `+classes`
(`dual-beta+classes`) is that method with class-balanced quotas (`reduce(balance="classes")`).
A second setting flips 20% of the training labels at random (symmetric noise) and reports
the fraction of mislabelled samples each keep-list keeps. Also the cost: proxy recording
time against one full training run.

`--eval test` (default) measures on the 10,000 test images: the published figures.
`--eval validation` measures on 5,000 training images the proxy never sees (50,000-54,999):
the split every setting is chosen on, never the test set.

    python benchmarks/quality.py                           # CPU recipe, 60-80 minutes on 2 cores
    python benchmarks/quality.py --recipe demo --eval validation   # the demo's sizes, on validation
    python benchmarks/quality.py --device cuda             # the larger recipe on a GPU
    python benchmarks/quality.py --quick                   # a smoke run

Results: benchmarks/QUALITY.md and quality.json (test), VALIDATION.md and validation.json
(validation), each with command, machine, wall time and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from streamprune import KeepList, ensure_ray, index, record, reduce, train_subset
from streamprune.demo import fashion_mnist_dir, load_fashion_mnist, shard_sizes, write_shards

HERE = Path(__file__).resolve().parent
METHODS = ["random", "random+classes", "dual-beta", "dual-beta+classes"]
RATIOS = [0.3, 0.5, 0.7, 0.9]
VALIDATION = slice(50_000, 55_000)  # training images no recipe trains on
RECIPES = {  # documented recipes; train_epochs: the full-data run, every subset gets its steps
    "cpu": {
        "train_samples": 8000,
        "proxy_epochs": 10,
        "schedule_epochs": 200,
        "train_epochs": 10,
        "model": "small-cnn",
        "workers": 2,
    },
    "demo": {
        "train_samples": 4000,
        "proxy_epochs": 10,
        "schedule_epochs": 30,
        "train_epochs": 10,
        "model": "small-cnn",
        "workers": 2,
    },
    "cuda": {
        "train_samples": 50000,
        "proxy_epochs": 20,
        "schedule_epochs": 200,
        "train_epochs": 30,
        "model": "resnet18",
        "workers": 1,
    },
    "quick": {
        "train_samples": 1200,
        "proxy_epochs": 3,
        "schedule_epochs": 200,
        "train_epochs": 1,
        "model": "small-cnn",
        "workers": 2,
    },
}


def parse_method(name: str) -> tuple[str, str, dict]:
    """`dual-beta+classes@c_d=2` -> (`dual-beta`, `classes`, {"c_d": 2.0}): a method, its class
    balance (`none` without `+`) and sampler settings after `@` (comma-separated)."""
    name, _, settings = name.partition("@")
    method, _, balance = name.partition("+")
    values = dict(item.split("=", 1) for item in settings.split(",") if item)
    return method, balance or "none", {k: float(v) for k, v in values.items()}


def flip_labels(labels: np.ndarray, fraction: float, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric noise: `fraction` of labels moved to a uniformly drawn other class; returns (labels, noisy mask)."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(len(labels), dtype=bool)
    noisy[rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)] = True
    out = labels.copy()
    out[noisy] = (labels[noisy] + rng.integers(1, classes, noisy.sum())) % classes
    return out, noisy


def kept_indices(keep: KeepList) -> np.ndarray:
    """Original sample numbers of the kept samples (shard keys are `{index:08d}`)."""
    return np.array([int(k) for n in keep.names for k in keep.shard_keys(n)], dtype=np.int64)


def proxy_run(folder: Path, images, labels, r: dict, gpus: float) -> float:
    """Shards, index and T recorded proxy epochs under `folder`; returns the recording seconds."""
    shards = write_shards(
        images,
        labels,
        folder / "shards",
        sizes=shard_sizes(len(images), max(4, len(images) // 2000), uneven=True),
        progress=False,
    )
    index(shards, folder / "run", progress=False)
    t = time.perf_counter()
    record(
        folder / "run",
        r["proxy_epochs"],
        workers=r["workers"],
        gpus_per_worker=gpus,
        model=r["model"],
        schedule_epochs=r["schedule_epochs"],
        num_classes=10,
        progress=False,
    )
    return time.perf_counter() - t


class _Done:
    """Finished steps of the run, one JSON line each, so that a rerun picks up where it stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.values = {}
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.values[entry["step"]] = entry["value"]

    def get(self, step: str, compute):
        """The saved value of `step`, or `compute()`, saved now."""
        if step not in self.values:
            self.values[step] = compute()
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "value": self.values[step]}, default=float) + "\n")
        return self.values[step]


def noise_setting(
    args, recipe: dict, images, labels, done: _Done, work: Path, gpus: float, window: int
) -> tuple[list[dict], float]:
    """Flip `args.noise` of the labels, record a proxy on them, and measure the mislabelled
    fraction of every method's keep-list at every ratio; returns the rows and the recording seconds."""
    noisy_labels, noisy = flip_labels(labels, args.noise, seed=123)
    nrecord_s = done.get("record noisy", lambda: proxy_run(work / "noisy", images, noisy_labels, recipe, gpus))
    nrun = work / "noisy" / "run"
    noise_rows = []
    for method in args.methods:
        for ratio in args.ratios:
            name, balance, settings = parse_method(method)
            keep = reduce(
                nrun,
                ratio,
                name,
                seed=0,
                window=window,
                balance=balance,
                **settings,
                out=work / "noisy-keeps" / f"{method.replace(':', '-')}-{ratio}",
                scores_out=work / "noisy-scores.zarr",
                scores="method",
                progress=False,
            )
            frac = float(noisy[kept_indices(keep)].mean())
            noise_rows.append({"method": method, "ratio": ratio, "kept": len(keep), "noisy_kept_fraction": frac})
            print(f"  noisy {method:>10} r={ratio}: {frac:.1%} of the kept samples are mislabelled", flush=True)
    return noise_rows, nrecord_s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a smoke run (minutes)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: the --device one")
    p.add_argument(
        "--eval",
        default="test",
        choices=["test", "validation"],
        help="measure on the test set, or on held-out training images (for choosing settings)",
    )
    p.add_argument(
        "--budget",
        default="steps",
        choices=["steps", "epochs"],
        help="fresh runs: the full run's SGD steps on every subset, or its epochs",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--noise", type=float, default=0.2, help="fraction of labels flipped (0: skip that setting)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: ../shared/datasets/fashion-mnist)")
    p.add_argument("--out", default=str(HERE), help="where QUALITY.md and quality.json go")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    recipe = dict(RECIPES["quick" if args.quick else args.recipe or args.device])
    if args.quick:
        args.seeds, args.ratios, args.methods = 1, [0.5, 0.9], ["random", "dual-beta+classes"]
    t0 = time.time()
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    images, labels = load_fashion_mnist("train", args.data_dir)
    if args.eval == "validation":
        if len(images) < VALIDATION.stop:
            p.error(f"--eval validation needs the full Fashion-MNIST training set ({len(images)} images found)")
        test_images, test_labels = images[VALIDATION], labels[VALIDATION]
    else:
        test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    n = min(recipe["train_samples"], len(images))
    images, labels = images[:n], labels[:n]
    print(
        f"quality: {n} training and {len(test_images)} {args.eval} images from {fashion_mnist_dir(args.data_dir)}; "
        f"recipe {recipe}; {args.seeds} seeds",
        flush=True,
    )
    ensure_ray()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="sp-quality-"))
    gpus = 1.0 if args.device == "cuda" else 0.0
    test = write_shards(
        test_images, test_labels, work / args.eval, samples_per_shard=2500, prefix=args.eval, progress=False
    )
    train = lambda shards, keep, seed: train_subset(
        shards,
        test,
        keep,
        epochs=recipe["train_epochs"],
        model=recipe["model"],
        seed=seed,
        device=args.device,
        budget=args.budget,
        progress=False,
    )

    window = min(10, recipe["proxy_epochs"])
    done = _Done(work / f"finished-{args.eval}-{args.budget}.jsonl")  # a rerun with the same --work resumes
    record_s = done.get("record clean", lambda: proxy_run(work / "clean", images, labels, recipe, gpus))
    run, shards = work / "clean" / "run", sorted(str(p) for p in (work / "clean" / "shards").glob("*.tar"))
    print(f"clean proxy: {recipe['proxy_epochs']} epochs recorded in {record_s:.0f} s", flush=True)
    full = [
        done.get(f"full {seed}", lambda seed=seed: train(shards, None, seed).figures()) for seed in range(args.seeds)
    ]
    full_s = float(np.mean([f["seconds"] for f in full]))
    print(f"full data: {[round(f['test_accuracy'], 4) for f in full]} ({full_s:.0f} s per run)", flush=True)
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            accs, kept = [], None
            for seed in range(args.seeds):
                out = work / "keeps" / f"{method.replace(':', '-')}-{ratio}-{seed}"

                def fresh(method=method, ratio=ratio, seed=seed, out=out):
                    name, balance, settings = parse_method(method)
                    keep = reduce(
                        run,
                        ratio,
                        name,
                        seed=seed,
                        window=window,
                        out=out,
                        balance=balance,
                        scores_out=work / "scores.zarr",
                        scores="method",
                        progress=False,
                        **settings,
                    )
                    per_class = np.bincount(labels[kept_indices(keep)], minlength=10) / np.bincount(
                        labels, minlength=10
                    )
                    res = train(shards, keep, seed)
                    return {
                        "kept": len(keep),
                        "acc": res.test_accuracy,
                        "epochs": res.epochs,
                        "per_class": per_class.tolist(),
                    }

                got = done.get(f"train {method} {ratio} {seed}", fresh)
                accs.append(got["acc"])
                kept, epochs, per_class = got["kept"], got["epochs"], got["per_class"]
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "kept": kept,
                    "acc": accs,
                    "epochs": epochs,
                    "per_class_seed0": per_class,
                    "mean": float(np.mean(accs)),
                    "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                }
            )
            print(
                f"  {method:>10} r={ratio}: {kept} kept, test accuracy {rows[-1]['mean']:.4f} +- {rows[-1]['std']:.4f}",
                flush=True,
            )

    noise_rows, nrecord_s = [], None
    if args.noise > 0:  # --noise 0 skips the label-noise setting
        noise_rows, nrecord_s = noise_setting(args, recipe, images, labels, done, work, gpus, window)
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.device}, python {platform.python_version()}",
        "wall_s": round(time.time() - t0),
        "recipe": recipe,
        "seeds": args.seeds,
        "train_samples": n,
        "eval": args.eval,
        "budget": args.budget,
        "test_samples": len(test_images),
        "full": [f["test_accuracy"] for f in full],
        "rows": rows,
        "noise": args.noise,
        "noise_rows": noise_rows,
        "cost": {"record_s": record_s, "full_train_s": full_s, "ratio": record_s / full_s, "noisy_record_s": nrecord_s},
    }
    out = Path(args.out)
    stem = ("quality" if args.eval == "test" else "validation") + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem.upper().replace('-QUICK', '-quick')}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The results as Markdown tables."""
    ratios = sorted({row["ratio"] for row in r["rows"]})
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    cell = {(row["method"], row["ratio"]): row for row in r["rows"]}
    full = np.array(r["full"])
    rec = r["recipe"]
    where = (
        "the 10,000 test images"
        if r["eval"] == "test"
        else f"{r['test_samples']:,} held-out training images (validation: never trained on, not the test set)"
    )
    rule = (
        f"every subset trains for as many SGD steps as the full-data run of {rec['train_epochs']} epochs "
        f"(`round({rec['train_epochs']} N / k)` epochs of the subset, cosine over them)"
        if r["budget"] == "steps"
        else f"every subset trains for {rec['train_epochs']} epochs (fewer steps on smaller subsets)"
    )
    header = "| method | " + " | ".join(f"r={x:.0%}" for x in ratios) + " |"
    rule_row = "|---|" + "---|" * len(ratios)
    lines = [
        f"# Quality: keep-lists against random at the same budget ({r['eval']} split)",
        "",
        f"`{r['command']}` — {r['date']}, {r['machine']}, wall time {r['wall_s'] / 60:.0f} min.",
        "",
        f"Fashion-MNIST: first {r['train_samples']:,} training images; accuracy on {where}. "
        f"Proxy: `{rec['model']}`, {rec['proxy_epochs']} recorded epochs of a {rec['schedule_epochs']}-epoch "
        f"cosine schedule, {rec['workers']} Ray Train workers. Fresh models: `{rec['model']}`, batch 128, "
        f"lr 0.1; {rule}. {r['seeds']} seeds: seed s draws the keep-list and initialises the model. "
        f"DUAL window min(10, T), DUAL+Beta defaults (C=15; c_d=4 over all samples, 8 with class balance; "
        f"`@c_d=4` overrides). `+classes`: class-balanced quotas (`--balance classes`); plain names: "
        f"docs/scoring.md's samplers over all samples.",
        "",
        f"Full data: accuracy {full.mean():.4f} +- {full.std(ddof=1) if len(full) > 1 else 0:.4f}.",
        "",
        "Accuracy, mean +- std over seeds (pruning ratio = fraction removed):",
        "",
        header,
        rule_row,
    ]
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(
                f"{cell[(m, x)]['mean']:.4f} +- {cell[(m, x)]['std']:.4f}" if (m, x) in cell else "" for x in ratios
            )
            + " |"
        )
    if "random" in methods:
        lines += [
            "",
            "Difference to random, percentage points: mean over seeds +- std of the per-seed "
            "differences (seed s against random's seed s):",
            "",
            header,
            rule_row,
        ]
        for m in methods:
            if m == "random":
                continue
            parts = []
            for x in ratios:
                if (m, x) not in cell or ("random", x) not in cell:
                    parts.append("")
                    continue
                d = 100 * (np.array(cell[(m, x)]["acc"]) - np.array(cell[("random", x)]["acc"]))
                parts.append(f"{d.mean():+.2f} +- {d.std(ddof=1) if len(d) > 1 else 0:.2f}")
            lines.append(f"| {m} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "Kept fraction per class (seed 0), least and most kept class (random keeps about 1 - r of each):",
        "",
        header,
        rule_row,
    ]
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(
                f"{min(cell[(m, x)]['per_class_seed0']):.2f}-{max(cell[(m, x)]['per_class_seed0']):.2f}"
                if (m, x) in cell
                else ""
                for x in ratios
            )
            + " |"
        )
    lines += [
        "",
        "Epochs each subset trained: "
        + ", ".join(f"r={x:.0%}: {cell[(methods[0], x)]['epochs']}" for x in ratios if (methods[0], x) in cell)
        + ".",
    ]
    nc = {(row["method"], row["ratio"]): row for row in r["noise_rows"]}
    if not nc:
        lines += ["", "Label noise: not run here (`--noise 0`)."]
    lines += (
        []
        if not nc
        else [
            "",
            f"Label noise: {r['noise']:.0%} of the training labels flipped to another class "
            "at random; "
            "a separate proxy recorded on the noisy labels. Fraction of the kept samples that are mislabelled "
            f"(random keeps about {r['noise']:.0%}):",
            "",
            header,
            rule_row,
        ]
    )
    for m in methods if nc else []:
        lines.append(
            f"| {m} | "
            + " | ".join(f"{nc[(m, x)]['noisy_kept_fraction']:.1%}" if (m, x) in nc else "" for x in ratios)
            + " |"
        )
    c = r["cost"]
    rec_epoch, train_epoch = c["record_s"] / rec["proxy_epochs"], c["full_train_s"] / rec["train_epochs"]
    lines += [
        "",
        f"Cost: recording the proxy ({rec['proxy_epochs']} epochs on Ray, with statistics, Ray Train "
        f"start-up included) took {c['record_s']:.0f} s; one full training run ({rec['train_epochs']} epochs "
        f"on all samples, in one process) took {c['full_train_s']:.0f} s: ratio {c['ratio']:.2f}. Per epoch: "
        f"{rec_epoch:.1f} s recording, {train_epoch:.1f} s training (ratio {rec_epoch / train_epoch:.2f}). "
        f"Against one run of the {rec['schedule_epochs']}-epoch schedule the proxy follows, "
        f"{rec['proxy_epochs']} recorded epochs cost "
        f"{rec['proxy_epochs'] * rec_epoch / (rec['schedule_epochs'] * train_epoch):.1%} of it.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
