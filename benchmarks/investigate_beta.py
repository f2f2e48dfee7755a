"""Why is DUAL+Beta's lead over random small at high pruning ratios? A sweep on held-out data.

Reuses the clean proxy of a finished `quality.py --work DIR` run and varies, one at a time,
the settings the issue names: c_d, the DUAL window and T (the first T recorded epochs).
Each keep-list trains a fresh model with quality.py's recipe; accuracy is measured on a
**validation** set of 5,000 training images the proxy never saw (not the test set, so
nothing here tunes on the test set). Also per keep-list: the fraction kept of each class.

    python benchmarks/quality.py --work /tmp/quality-work      # first
    python benchmarks/investigate_beta.py --work /tmp/quality-work

Results: benchmarks/INVESTIGATION.md and investigation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import HERE, RECIPES, _Done, kept_indices  # noqa: E402

from streamprune import reduce  # noqa: E402
from streamprune.datasets import load_fashion_mnist, write_shards  # noqa: E402
from streamprune.evaluate import train_subset  # noqa: E402
from streamprune.raycluster import ensure_ray  # noqa: E402

VALIDATION = slice(50_000, 55_000)  # training images outside quality.py's first 20,000
# (label, method, reduce settings): the defaults first, then one setting changed at a time
CONFIGS = [("random", "random", {}),
           ("dual-beta (T=10, window 10, c_d=4)", "dual-beta", {}),
           ("c_d=1", "dual-beta", {"c_d": 1.0}),
           ("c_d=2", "dual-beta", {"c_d": 2.0}),
           ("c_d=8", "dual-beta", {"c_d": 8.0}),
           ("window 5", "dual-beta", {"window": 5}),
           ("T=5, window 5", "dual-beta", {"epochs": 5, "window": 5})]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", required=True, help="the --work folder of a finished quality.py run")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.9])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: ../shared/datasets/fashion-mnist)")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args(argv)
    work = Path(args.work)
    run, shards = work / "clean" / "run", sorted(str(s) for s in (work / "clean" / "shards").glob("*.tar"))
    if not (run / "index").exists() or not shards:
        p.error(f"--work {work}: no clean proxy run there; run benchmarks/quality.py --work {work} first")
    images, labels = load_fashion_mnist("train", args.data_dir)
    if len(images) < VALIDATION.stop:
        p.error(f"the validation set needs the full Fashion-MNIST training set ({len(images)} images found)")
    recipe = RECIPES["cpu"]
    t0 = time.time()
    ensure_ray()
    val = write_shards(images[VALIDATION], labels[VALIDATION], work / "validation", samples_per_shard=2500,
                       prefix="val", key_offset=VALIDATION.start, progress=False)
    train_labels = labels[:recipe["train_samples"]]
    done = _Done(work / "investigation.jsonl")
    rows = []
    for ratio in args.ratios:
        for label, method, settings in CONFIGS:
            accs, classes = [], []
            for seed in range(args.seeds):
                name = f"{label} r={ratio} seed={seed}"

                def fresh():
                    keep = reduce(run, ratio, method, seed=seed, out=work / "investigate" / f"{len(rows)}-{seed}",
                                  scores_out=work / "investigate-scores.zarr", which="method", progress=False,
                                  **settings)
                    per_class = np.bincount(train_labels[kept_indices(keep)], minlength=10) / np.bincount(
                        train_labels, minlength=10)
                    acc = train_subset(shards, val, keep, epochs=recipe["train_epochs"], model=recipe["model"],
                                       seed=seed, device="cpu", progress=False).test_accuracy
                    return {"acc": acc, "per_class": per_class.tolist()}
                got = done.get(name, fresh)
                accs.append(got["acc"])
                classes.append(got["per_class"])
            rows.append({"config": label, "method": method, "settings": settings, "ratio": ratio, "acc": accs,
                         "mean": float(np.mean(accs)), "per_class": classes})
            print(f"  r={ratio} {label:>36}: validation accuracy {rows[-1]['mean']:.4f} {accs}; kept per class "
                  f"(seed 0) {np.round(classes[0], 2).tolist()}", flush=True)
    result = {"command": "python benchmarks/investigate_beta.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0), "seeds": args.seeds,
              "recipe": recipe, "rows": rows}
    out = Path(args.out)
    (out / "investigation.json").write_text(json.dumps(result, indent=1))
    (out / "INVESTIGATION.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The sweep as a Markdown table: validation accuracy and the least/most kept class."""
    lines = ["# DUAL+Beta at high pruning ratios: a sweep on held-out data", "",
             f"`{r['command']}` — {r['date']}, wall time {r['wall_s'] / 60:.0f} min. Proxy and fresh-model "
             f"recipe as in QUALITY.md; accuracy on 5,000 held-out training images (validation, not the test "
             f"set), mean of {r['seeds']} seeds. Kept per class: the least and the most kept class's fraction "
             "(seed 0; random keeps about 1 - r of every class).", "",
             "| r | keep-list | validation accuracy | vs random (points) | kept per class, min-max |",
             "|---|---|---|---|---|"]
    base = {row["ratio"]: row["mean"] for row in r["rows"] if row["method"] == "random"}
    for row in r["rows"]:
        pc = row["per_class"][0]
        lines.append(f"| {row['ratio']:.0%} | {row['config']} | {row['mean']:.4f} | "
                     f"{100 * (row['mean'] - base[row['ratio']]):+.2f} | {min(pc):.2f}-{max(pc):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
