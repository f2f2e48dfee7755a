"""`streamprune report RUN`: a self-contained HTML page (PNGs inlined, also written beside it).

Figures: each score's distribution (all vs kept), the Beta weight curve over mean p_true at
the chosen ratio, kept fraction per class and per shard, image grids of the easiest, the
hardest and the most uncertain samples (kept and pruned), and the proxy's training curves
(mean loss and accuracy per recorded epoch, from the stats store). On large runs the
figures use whole score chunks drawn at random, up to `max_rows` rows (said on the page).
A warning at the top names the classes kept far below the overall fraction (`STARVED`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats.headers import CORRECT_MISSING, LABEL_MISSING
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.formats.stats_store import LABEL, StatsStore
from streamprune.settings import ReportSettings
from streamprune.shards.labels import BadSample, Classes, LabelSpec
from streamprune.shards.reader import ReadStats, iter_ranges
from streamprune.shards.sources import shard_urls
from streamprune.training.decode import decode_image

GRID = 8  # images per grid row
STARVED = 1 / 3  # a class is starved when its kept fraction is below this share of the overall one


def build_report(
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    max_rows: int = ReportSettings.max_rows,
    label_rows: int = 20_000,
    seed: int = 0,
    progress: bool = True,
    shards: str | Iterable[str] | None = None,
) -> str:
    """Write `out/index.html` (default `RUN/report/`) and its PNGs; returns the HTML page's location.
    `shards`: the URLs of the indexed shards, read for the image grids (`shard_urls`)."""
    import matplotlib

    matplotlib.use("Agg")
    rd = RunDir(run)
    run = rd.root
    out = storage.absolute(out) if out is not None else rd.report
    index = Index(rd.index)
    keep = KeepList.load(rd.keep)
    if keep.fingerprint != index.fingerprint:
        raise DamagedRunError(f"{rd.keep} was made for another index than {index.path}")
    urls = shard_urls(index, shards)
    scores = ScoresStore.open(rd.scores)
    rng = np.random.default_rng(seed)
    rows = _sample_rows(index.n_samples, scores.block_rows, max_rows, rng)
    kept = _kept_mask(index, keep, rows)
    values = {name: _gather(partial(scores.read, name), rows) for name in scores.scores}
    row_labels = _gather(partial(scores.read, LABEL), rows) if LABEL in scores else None
    labels, labelled_kept = _class_labels(row_labels, index, urls, rows, kept, label_rows, rng)
    fractions, overall = class_kept_fractions(labels, labelled_kept)
    classes = Classes.load(run)
    name = classes.name if classes is not None else str
    sections = [
        _overview(run, index, keep, len(rows)),
        _starvation_warning(_below_share(fractions, overall), overall, keep.manifest, name),
    ]
    sections.append(_figure(out, "scores", "Score distributions (all samples vs kept)", _plot_scores(values, kept)))
    if "alpha" in keep.manifest.get("params", {}):
        sections.append(
            _figure(
                out,
                "beta",
                "Beta sampling weight over mean p_true",
                _plot_beta(keep.manifest, values.get("mean_p"), kept),
            )
        )
    sections.append(
        _figure(
            out,
            "kept-fraction",
            "Kept fraction per class and per shard",
            _plot_fractions(keep, fractions, int((labels >= 0).sum()), name),
        )
    )
    sections.append(
        _figure(
            out,
            "grids",
            "Easiest, hardest and most uncertain samples: kept and pruned",
            _plot_grids(index, urls, rows, kept, values, row_labels, name),
        )
    )
    store = StatsStore.open(rd.stats, mode="r")
    sections.append(
        _figure(out, "training", "Proxy training curves (recorded statistics)", _plot_training(store, rows))
    )
    saved = _saved_evaluation(rd.evaluate)
    if saved is not None:
        budget = saved.get("key", {}).get("settings", {}).get("budget", "epochs")  # files of 0.1.0: epochs
        sections.append(_evaluation_section(saved["rows"], _main_method(keep.manifest), budget))
    page = storage.join(out, "index.html")
    title = html.escape(f"streamprune report: {storage.name(run)}")
    storage.write_bytes(page, _PAGE.format(title=title, body="\n".join(sections)).encode())
    return page


def _saved_evaluation(location: str) -> dict | None:
    """The saved evaluation results (`RUN/evaluate.json`), or None when there are none."""
    try:
        return json.loads(storage.read_bytes(location))
    except FileNotFoundError:
        return None


def _sample_rows(n: int, chunk: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """All rows, or whole chunks drawn at random until `max_rows` (reads stay chunk-aligned)."""
    if n <= max_rows:
        return np.arange(n)
    chunks = np.sort(rng.permutation(-(-n // chunk))[: max(1, max_rows // chunk)])
    return np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in chunks])


def _gather(read, rows: np.ndarray) -> np.ndarray:
    """`read(slice)` over the contiguous runs of sorted `rows`, concatenated: one read per run."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.concatenate([np.asarray(read(slice(int(r[0]), int(r[-1]) + 1))) for r in np.split(rows, cuts)])


def _kept_mask(index: Index, keep: KeepList, rows: np.ndarray) -> np.ndarray:
    shards = index.shard_of(rows)
    mask = np.zeros(len(rows), dtype=bool)
    for s in np.unique(shards):
        positions = keep.shard_positions(index.names[s])
        if positions is None:
            raise DamagedRunError(f"keep-list {str(keep.path)!r} has no sample positions: write it with reduce")
        sel = shards == s
        mask[sel] = np.isin(rows[sel] - index.shard_offset[s], positions)
    return mask


def _class_labels(
    row_labels: np.ndarray | None,
    index: Index,
    urls: list[str],
    rows: np.ndarray,
    kept: np.ndarray,
    label_rows: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (-1 unknown) and kept flags for the per-class figures: every sampled row's label
    from `scores.zarr` when it has any, else the `cls` member of up to `label_rows` rows read
    from the shards (runs reduced before labels were recorded)."""
    if row_labels is not None and (row_labels >= 0).any():
        return row_labels, kept
    pick = np.sort(rng.choice(len(rows), min(label_rows, len(rows)), replace=False))
    found = _samples(index, urls, rows[pick], members=("cls",))
    labels = np.fromiter((_cls(found.get(int(r), {})) for r in rows[pick]), dtype=np.int64, count=len(pick))
    return labels, kept[pick]


def class_kept_fractions(labels: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, float]:
    """Kept fraction per class id (nan for ids without samples) and overall, over the labelled rows."""
    ok = labels >= 0
    ids = labels[ok].astype(np.int64)
    total = np.bincount(ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.bincount(ids, weights=kept[ok], minlength=len(total)) / total
    return fractions, float(kept[ok].mean()) if ok.any() else float("nan")


def starved_classes(labels: np.ndarray, kept: np.ndarray) -> tuple[list[tuple[int, float]], float]:
    """`(class, kept fraction)` of each class kept below `STARVED` times the overall fraction, and
    that overall fraction: such classes are nearly pruned away and the subset loses them."""
    fractions, overall = class_kept_fractions(labels, kept)
    return _below_share(fractions, overall), overall


def _below_share(fractions: np.ndarray, overall: float) -> list[tuple[int, float]]:
    return [(int(c), float(fractions[c])) for c in np.flatnonzero(fractions < STARVED * overall)]


def _starvation_warning(
    starved: list[tuple[int, float]], overall: float, manifest: dict, name: Callable[[int], str] = str
) -> str:
    """A red paragraph naming the starved classes ("" when none), suggesting class balance when off."""
    if not starved:
        return ""
    named = ", ".join(f"class {html.escape(name(c))} kept {f:.1%}" for c, f in starved)
    advice = (
        ""
        if manifest.get("balance") == "classes"
        else " Reduce again with <code>--balance classes</code> to give every class its share of the budget."
    )
    return (
        f'<p class="warn">Starved classes: {named}, against {overall:.1%} overall (below '
        f"{STARVED:.0%} of it).{advice}</p>"
    )


def _main_method(manifest: dict) -> str:
    """The keep-list's name in the evaluation rows."""
    from streamprune.stages.pipeline import subset_label

    return subset_label(manifest.get("method", ""), manifest.get("balance"))


def _samples(
    index: Index, urls: list[str], rows: np.ndarray, members: tuple[str, ...] | None = None
) -> dict[int, dict]:
    """Member bytes of the samples at `rows`, read by byte range from their shards (at `urls`)."""
    out: dict[int, dict] = {}
    shards = index.shard_of(rows)
    for s in np.unique(shards):
        mine = np.sort(rows[shards == s])
        keys = index.keys(int(s))
        first = index.shard_offset[s]
        url, name = urls[int(s)], index.names[int(s)]
        for row, (sample, _) in zip(
            mine, iter_ranges(url, name, index.byte_ranges(mine), [keys[r - first] for r in mine], ReadStats())
        ):
            data = sample.data if members is None else {m: sample.data[m] for m in members if m in sample.data}
            out[int(row)] = {"__key__": sample.key, "__url__": url, **data}
    return out


def _figure(out: str, name: str, title: str, fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes(storage.join(out, f"{name}.png"), buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (
        f'<section><h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}"></section>'
    )


def _overview(run: str, index: Index, keep: KeepList, n_rows: int) -> str:
    m = keep.manifest
    facts = [
        ("run", str(run)),
        ("shards", f"{index.n_shards:,}"),
        ("samples", f"{index.n_samples:,}"),
        ("fingerprint", index.fingerprint),
        ("method", m.get("method")),
        ("balance", m.get("balance", "none")),
        ("ratio (pruned)", m.get("ratio")),
        ("kept", f"{len(keep):,} of {m.get('N', index.n_samples):,}"),
        ("epochs (T)", m.get("epochs")),
        ("window (J)", m.get("window")),
        (
            "parameters",
            ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in m.get("params", {}).items()
                if not isinstance(v, list)
            )
            or "-",
        ),
        (
            "figures drawn from",
            f"{n_rows:,} samples" + ("" if n_rows == index.n_samples else " (whole score chunks drawn at random)"),
        ),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return f"<section><h2>Overview</h2><table>{body}</table></section>"


def _plot_scores(values: dict[str, np.ndarray], kept: np.ndarray):
    import matplotlib.pyplot as plt

    names = [n for n in values if np.isfinite(values[n]).any()]
    cols = 4
    fig, axes = plt.subplots(
        -(-len(names) // cols), cols, figsize=(4 * cols, 3 * -(-len(names) // cols)), squeeze=False
    )
    for ax, name in zip(axes.flat, names):
        v = values[name]
        ok = np.isfinite(v)
        bins = np.histogram_bin_edges(v[ok], bins=50)
        ax.hist(v[ok], bins=bins, color="#bbbbbb", label="all")
        ax.hist(v[ok & kept], bins=bins, color="#2a7ab9", alpha=0.8, label="kept")
        ax.set_title(name)
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    return fig


def _plot_beta(manifest: dict, mean_p: np.ndarray | None, kept: np.ndarray):
    import matplotlib.pyplot as plt
    from scipy import stats

    p = manifest["params"]
    m = np.linspace(1e-3, 1 - 1e-3, 400)
    fig, ax = plt.subplots(figsize=(8, 4))
    if mean_p is not None:
        ok = np.isfinite(mean_p)
        bins = np.linspace(0, 1, 51).tolist()
        ax.hist(mean_p[ok], bins=bins, color="#bbbbbb", label="all samples")
        ax.hist(mean_p[ok & kept], bins=bins, color="#2a7ab9", alpha=0.8, label="kept")
        ax.set_ylabel("samples")
    ax.set_xlabel("mean p_true over the recorded epochs")
    twin = ax.twinx()
    twin.plot(
        m,
        stats.beta.pdf(m, p["alpha"], p["beta"]),
        color="#d62728",
        lw=2,
        label=f"Beta({p['alpha']:.2f}, {p['beta']:.2f}) at r={manifest['ratio']}",
    )
    twin.set_ylabel("Beta density (weight = density x DUAL)")
    twin.axvline(p["anchor"], color="#d62728", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")
    fig.tight_layout()
    return fig


def _plot_fractions(keep: KeepList, fractions: np.ndarray, n_labelled: int, name: Callable[[int], str] = str):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    if n_labelled:
        classes = np.flatnonzero(np.isfinite(fractions))
        a.bar([name(int(c)) for c in classes], fractions[classes], color="#2a7ab9")
        if len(classes) > 10 or max((len(name(int(c))) for c in classes), default=0) > 3:
            a.tick_params(axis="x", labelrotation=90, labelsize=7 if len(classes) <= 40 else 4)
        a.set_title(f"per class (labels of {n_labelled:,} samples)")
        a.set_xlabel("class")
    else:
        a.text(0.5, 0.5, "no labels", ha="center")
    a.axhline(len(keep) / max(1, int(keep.manifest.get("N") or len(keep))), color="#d62728", ls=":", label="overall")
    a.set_ylabel("kept fraction")
    a.set_ylim(0, 1)
    a.legend()
    samples = keep.samples if keep.samples is not None else keep.kept
    frac = keep.kept / np.maximum(samples, 1)
    if len(frac) <= 60:
        b.bar(range(len(frac)), frac, color="#2a7ab9")
        b.set_xlabel("shard (index order)")
    else:
        b.hist(frac, bins=40, color="#2a7ab9")
        b.set_xlabel("kept fraction")
        b.set_ylabel("shards")
    b.set_title(f"per shard ({len(frac):,} shards)")
    fig.tight_layout()
    return fig


def _plot_grids(
    index: Index,
    urls: list[str],
    rows: np.ndarray,
    kept: np.ndarray,
    values: dict[str, np.ndarray],
    labels: np.ndarray | None,
    name: Callable[[int], str] = str,
):
    import matplotlib.pyplot as plt

    mean_p = values["mean_p"]
    unc_name = "dyn_unc" if "dyn_unc" in values and np.isfinite(values["dyn_unc"]).any() else "dual"
    unc = values.get(unc_name, np.full(len(rows), np.nan))
    groups = [
        ("easiest (highest mean p_true)", -mean_p),
        ("hardest (lowest mean p_true)", mean_p),
        (f"most uncertain (highest {unc_name})", -unc),
    ]
    picks = []
    for title, order_key in groups:
        ok = np.isfinite(order_key)
        for label, sel in (("kept", kept), ("pruned", ~kept)):
            cand = np.flatnonzero(ok & sel)
            picks.append((f"{title}: {label}", cand[np.argsort(order_key[cand], kind="stable")[:GRID]]))
    wanted = np.unique(np.concatenate([rows[p] for _, p in picks]))
    samples = _samples(index, urls, wanted) if len(wanted) else {}
    fig, axes = plt.subplots(len(picks), GRID, figsize=(GRID * 1.2, len(picks) * 1.45), squeeze=False)
    for i, (title, pick) in enumerate(picks):
        axes[i, 0].set_title(title, loc="left", fontsize=9, x=0)
        for j in range(GRID):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(pick):
                ax.axis("off")
                continue
            sample = samples[int(rows[pick[j]])]
            try:
                img = decode_image(sample)
            except BadSample:
                img = np.zeros((1, 8, 8), np.uint8)
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
            cls = int(labels[pick[j]]) if labels is not None else _cls(sample)
            ax.set_xlabel(f"{name(cls) if cls >= 0 else '?'} p={mean_p[pick[j]]:.2f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_color("#2ca02c" if "kept" in title else "#d62728")
                spine.set_linewidth(2)
    fig.tight_layout()
    return fig


def _cls(sample: dict) -> int:
    """The integer `cls` label of a sample, -1 when it has none (runs recorded without labels)."""
    try:
        label = LabelSpec("cls")(sample)
    except BadSample:
        return LABEL_MISSING
    return label if isinstance(label, int) else LABEL_MISSING


def _plot_training(store: StatsStore, rows: np.ndarray):
    import matplotlib.pyplot as plt

    t = store.complete_epochs()
    loss = _gather(lambda s: store.read("loss", s, slice(0, t)), rows)
    correct = _gather(lambda s: store.read("correct", s, slice(0, t)), rows).astype(np.float64)
    correct[correct == CORRECT_MISSING] = np.nan
    epochs = np.arange(1, t + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.plot(epochs, np.nanmean(loss, axis=0), marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("mean training loss")
    b.plot(epochs, np.nanmean(correct, axis=0), marker="o", color="#2ca02c")
    b.set_xlabel("epoch")
    b.set_ylabel("training accuracy")
    fig.tight_layout()
    return fig


def _evaluation_section(rows: list[dict], main: str, budget: str = "steps") -> str:
    """One row per subset (test accuracy mean +- std over seeds), then `main` against `random`."""
    from streamprune.stages.pipeline import summarize_evaluation, verdict

    head = "<tr><th>subset</th><th>ratio</th><th>kept</th><th>epochs</th><th>seeds</th><th>test accuracy</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(g['method'])}</td><td>{g['ratio']:.2f}</td><td>{g['kept']:,}</td>"
        f"<td>{g['epochs']}</td><td>{g['seeds']}</td><td>{g['mean']:.4f}"
        + (f" +- {g['std']:.4f}" if g["seeds"] > 1 else "")
        + "</td></tr>"
        for g in summarize_evaluation(rows)
    )
    line = verdict(rows, main)
    return (
        f"<section><h2>Fresh models trained on each subset</h2><table>{head}{body}</table>"
        + (f"<p><strong>{html.escape(line)}</strong></p>" if line else "")
        + (
            "<p>Every subset trained for as many SGD steps as the full-data run (its epochs column); "
            if budget == "steps"
            else "<p>Every subset trained for the same epochs (fewer steps on smaller subsets); "
        )
        + "mean +- std over seeds.</p></section>"
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; }}
img {{ max-width: 100%; }}
p.warn {{ color: #c00; font-weight: bold; border: 2px solid #c00; padding: .5em .8em; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
