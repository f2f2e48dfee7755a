"""`streamprune report RUN`: a self-contained HTML page (PNGs inlined, also written beside it).

At the top, a summary: what was pruned (method, ratio, kept count, the per-class range of kept
shares), where the keep-list is, the two lines of Python that apply it, and the evaluation's
verdict when one was saved; under it, a warning naming the classes kept far below the overall
fraction (`STARVED`). Figures, each with a line saying what to read from it: each score's
distribution (all vs kept), the Beta weight curve over mean p_true at the chosen ratio, kept
fraction per class and per shard, image grids of the easiest, the hardest and the most
uncertain samples (kept and pruned), and the proxy's training curves (mean loss and accuracy
per recorded epoch, from the stats store). Classes are named when the run's class list has
names. On large runs the figures use whole score chunks drawn at random, up to `max_rows`
rows (said on the page).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Iterable

import numpy as np

from streamprune import storage
from streamprune.errors import DamagedRunError
from streamprune.formats.classes import Classes
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.formats.sources import shard_urls
from streamprune.formats.stats_store import StatsStore
from streamprune.scoring.columns import CORRECT_MISSING, LABEL, LABEL_MISSING
from streamprune.settings import ReportSettings
from streamprune.shards.labels import BadSample, LabelSpec
from streamprune.shards.reader import ReadCounts, iter_ranges
from streamprune.training.decode import decode_image

GRID = 8  # images per grid row
STARVED = 1 / 3  # a class is starved when its kept fraction is below this share of the overall one
MAX_BARS = 60  # more classes or shards than this: a histogram of their kept fractions instead of one bar each
NEAR_ZERO = 0.01  # a Beta density below this share of its peak draws (almost) no sample by weight

SCORES_NOTE = (
    "Each panel is one score over all samples (grey) and the kept ones (blue), counts on a log scale. "
    "Where blue falls well below grey, the keep-list pruned that range of the score; where it is level "
    "with grey, that range was kept whole."
)
GRIDS_NOTE = (
    "Eight samples per row with their class and mean p_true; green frame: kept, red: pruned. The easiest "
    "rows show what the proxy learned at once (redundant when pruned), the hardest what it never learned: "
    "look there for wrong labels and broken images."
)
TRAINING_NOTE = (
    "Mean training loss and accuracy of the proxy model over the recorded epochs, which the scores are "
    "computed from. Accuracy still rising steeply at the end means the proxy had not settled: more "
    "epochs (record --epochs) give steadier scores."
)


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
    rng = np.random.default_rng(seed)
    rows, values, row_labels = _score_sample(rd.scores, index.n_samples, max_rows, rng)
    kept = _kept_mask(index, keep, rows)
    labels, labelled_kept = _class_labels(row_labels, index, urls, rows, kept, label_rows, rng)
    fractions, overall = class_kept_fractions(labels, labelled_kept)
    classes = Classes.load(run)
    name = classes.name if classes is not None else str
    saved = _saved_evaluation(rd.evaluate)
    main = _main_method(keep.manifest)
    sections = [
        _summary(rd.keep, _apply_shards(index, shards), keep, fractions, name, saved, main),
        _starvation_warning(_below_share(fractions, overall), overall, keep.manifest, name),
        _overview(run, index, keep, len(rows)),
        _figure(out, "scores", "Score distributions (all samples vs kept)", _plot_scores(values, kept), SCORES_NOTE),
    ]
    sections += _beta_section(out, keep.manifest, values.get("mean_p"), kept)
    sections.append(
        _figure(
            out,
            "kept-fraction",
            "Kept fraction per class and per shard",
            _plot_fractions(keep, fractions, int((labels >= 0).sum()), name),
            _fractions_note(keep.manifest),
        )
    )
    sections.append(
        _figure(
            out,
            "grids",
            "Easiest, hardest and most uncertain samples: kept and pruned",
            _plot_grids(index, urls, rows, kept, values, row_labels, name),
            GRIDS_NOTE,
        )
    )
    training = _plot_training(StatsStore.open(rd.stats, mode="r"), rows)
    sections.append(_figure(out, "training", "Proxy training curves (recorded statistics)", training, TRAINING_NOTE))
    if saved is not None:
        budget = saved.get("key", {}).get("settings", {}).get("budget", "epochs")  # files of 0.1.0: epochs
        sections.append(_evaluation_section(saved["rows"], main, budget))
    page = storage.join(out, "index.html")
    title = html.escape(f"streamprune report: {storage.name(run)}")
    storage.write_bytes(page, _PAGE.format(title=title, body="\n".join(sections)).encode())
    return page


def _score_sample(
    location: str, n: int, max_rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """The rows the figures show (`_sample_rows`), every computed score of them and their labels
    (None: the store has none), read chunk by chunk."""
    scores = ScoresStore.open(location)
    rows = _sample_rows(n, scores.block_rows, max_rows, rng)
    values = {name: scores.column(name).at(rows) for name in scores.scores}
    return rows, values, scores.column(LABEL).at(rows) if LABEL in scores else None


def _beta_section(out: str, manifest: dict, mean_p: np.ndarray | None, kept: np.ndarray) -> list[str]:
    """The Beta weight figure, for keep-lists drawn by Beta sampling (none for the others)."""
    if "alpha" not in manifest.get("params", {}):
        return []
    title = "Beta sampling weight over mean p_true"
    return [_figure(out, "beta", title, _plot_beta(manifest, mean_p, kept), _beta_note(manifest, mean_p, kept))]


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
    from streamprune.stages.verdicts import subset_label

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
            mine,
            iter_ranges(url, name, index.byte_ranges(mine), [keys[r - first] for r in mine], ReadCounts()),
            strict=True,
        ):
            data = sample.data if members is None else {m: sample.data[m] for m in members if m in sample.data}
            out[int(row)] = {"__key__": sample.key, "__url__": url, **data}
    return out


def _figure(out: str, name: str, title: str, fig, note: str) -> str:
    """A section with `fig` inlined as a PNG (also written to `out/NAME.png`) and `note` under it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes(storage.join(out, f"{name}.png"), buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (
        f'<section><h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}"><p class="note">{html.escape(note)}</p></section>'
    )


def _summary(
    keep_at: str,
    shards: str,
    keep: KeepList,
    fractions: np.ndarray,
    name: Callable[[int], str],
    saved: dict | None,
    main: str,
) -> str:
    """The report's head: what was pruned, where the keep-list is, how to apply it, the verdict."""
    m = keep.manifest
    n = int(m.get("N") or len(keep))
    balance = " (class-balanced)" if m.get("balance") == "classes" else ""
    pruned = (
        f"<strong>Pruned</strong> with {html.escape(str(m.get('method')))}{balance} at pruning ratio {m.get('ratio')}: "
        f"kept {len(keep):,} of {n:,} samples ({len(keep) / max(1, n):.1%}){_class_range(fractions, name)}."
    )
    code = f"from streamprune import PrunedWebDataset\nds = PrunedWebDataset({shards}, keep={json.dumps(keep_at)})"
    return (
        f'<section class="summary"><h2>Summary</h2><p>{pruned}</p>'
        f"<p><strong>Keep-list</strong>: <code>{html.escape(keep_at)}</code></p>"
        f"<p><strong>Apply it</strong> (the kept samples, streamed from the original shards):</p>"
        f"<pre>{html.escape(code)}</pre>"
        f"<p><strong>Evaluation</strong>: {_summary_verdict(saved, main)}</p></section>"
    )


def _class_range(fractions: np.ndarray, name: Callable[[int], str]) -> str:
    """`; per class 48.0% (Coat) to 52.0% (Bag)` over the classes seen, "" without labels."""
    seen = np.flatnonzero(np.isfinite(fractions))
    if not len(seen):
        return ""
    lo, hi = (int(seen[f(fractions[seen])]) for f in (np.argmin, np.argmax))
    low, high = f"{fractions[lo]:.1%}", f"{fractions[hi]:.1%}"
    if low == high:
        return f"; every class {low}"
    return f"; per class {low} ({html.escape(name(lo))}) to {high} ({html.escape(name(hi))})"


def _summary_verdict(saved: dict | None, main: str) -> str:
    """The evaluation's verdict line, or how to get one."""
    from streamprune.stages.verdicts import verdict

    if saved is None:
        return "none saved (add an <code>evaluate</code> section to the config and <code>streamprune run</code> it)."
    line = verdict(saved["rows"], main)
    return f"<strong>{html.escape(line)}</strong> (table at the end)." if line else "no comparison with random saved."


def _apply_shards(index: Index, shards: str | Iterable[str] | None) -> str:
    """The shards argument of the apply line (Python source): the specs given, else a glob of the
    indexed shards under the index root (their common prefix, less its last digits, and suffix),
    else `SHARDS`."""
    given = [shards] if isinstance(shards, str) else list(shards or ())
    if given:
        return json.dumps(given[0] if len(given) == 1 else given)
    names = index.names
    if len(names) == 1:
        return json.dumps(storage.join(index.root, names[0]))
    prefix = os.path.commonprefix(names).rstrip("0123456789")  # train-000000.tar, train-000001.tar: train-*.tar
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    varying = [n[len(prefix) : len(n) - len(suffix)] for n in names]
    if len(prefix) + len(suffix) > min(map(len, names), default=0) or any("/" in v for v in varying):
        return "SHARDS"
    return json.dumps(storage.join(index.root, f"{prefix}*{suffix}"))


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
    for ax, name in zip(axes.flat, names, strict=False):
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
    """Mean p_true of all and kept samples, under the Beta density of the sampler and its anchor;
    the legend sits below the axes, off the curve."""
    import matplotlib.pyplot as plt

    p = manifest["params"]
    m = np.linspace(1e-3, 1 - 1e-3, 400)
    fig, ax = plt.subplots(figsize=(8, 4))
    if mean_p is not None:
        ok = np.isfinite(mean_p)
        bins = np.linspace(0, 1, 51).tolist()
        ax.hist(mean_p[ok], bins=bins, color="#bbbbbb", label="all samples")
        ax.hist(mean_p[ok & kept], bins=bins, color="#2a7ab9", alpha=0.8, label="kept")
        ax.set_ylabel("samples")
    ax.set_xlabel("mean p_true over the recorded epochs (low: hard, high: easy)")
    twin = ax.twinx()
    twin.plot(
        m,
        _beta_density(manifest, m),
        color="#d62728",
        lw=2,
        label=f"Beta({p['alpha']:.2f}, {p['beta']:.2f}) density at r={manifest['ratio']}",
    )
    twin.set_ylabel("Beta density (weight = density x DUAL)")
    anchor = f"anchor {p['anchor']:.2f}: mean p_true of the 10 highest-DUAL samples"
    twin.axvline(p["anchor"], color="#d62728", ls=":", lw=1.5, label=anchor)
    handles, labels = (
        a + b for a, b in zip(ax.get_legend_handles_labels(), twin.get_legend_handles_labels(), strict=True)
    )
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def _beta_density(manifest: dict, m: np.ndarray) -> np.ndarray:
    """The sampler's Beta density at mean p_true `m`."""
    from scipy import stats

    p = manifest["params"]
    return stats.beta.pdf(m, p["alpha"], p["beta"])


def _beta_note(manifest: dict, mean_p: np.ndarray | None, kept: np.ndarray) -> str:
    """What to read from the Beta figure, with the kept samples the density gives (almost) no weight."""
    note = (
        "Samples are drawn by weight (the red density times DUAL): the kept ones (blue) gather under the "
        "curve, the easiest (right) are pruned first."
    )
    if mean_p is None:
        return note
    ok = np.isfinite(mean_p) & kept
    density = _beta_density(manifest, np.clip(mean_p[ok], 1e-3, 1 - 1e-3))
    outside = int((density < NEAR_ZERO * density.max(initial=0)).sum())
    if not outside:
        return note
    why = (
        "class-balanced selection fills each class's quota, so a class whose samples are mostly easy keeps "
        "some outside the sampler's mass"
        if manifest.get("balance") == "classes"
        else "the budget is larger than the samples under the curve, so the rest is drawn from the small weights"
    )
    return f"{note} {outside:,} of the {int(ok.sum()):,} kept samples lie where the density is near zero: {why}."


def _plot_fractions(keep: KeepList, fractions: np.ndarray, n_labelled: int, name: Callable[[int], str] = str):
    """Kept fraction per class (horizontal bars named by class) and per shard (bars on integer ticks);
    over `MAX_BARS` classes or shards, a histogram of their kept fractions instead."""
    import matplotlib.pyplot as plt

    classes = np.flatnonzero(np.isfinite(fractions)) if n_labelled else np.array([], dtype=np.int64)
    height = max(4.0, 0.3 * len(classes) + 1.2) if len(classes) <= MAX_BARS else 4.0
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, height))
    overall = len(keep) / max(1, int(keep.manifest.get("N") or len(keep)))
    _class_panel(a, fractions, classes, n_labelled, overall, name)
    samples = keep.samples if keep.samples is not None else keep.kept
    _shard_panel(b, keep.kept / np.maximum(samples, 1))
    fig.tight_layout()
    return fig


def _class_panel(
    ax, fractions: np.ndarray, classes: np.ndarray, n_labelled: int, overall: float, name: Callable[[int], str]
) -> None:
    """One horizontal bar per class, named, red below the starvation line; a histogram over `MAX_BARS`."""
    from matplotlib.ticker import MaxNLocator

    if not len(classes):
        ax.text(0.5, 0.5, "no labels", ha="center")
        ax.set_title("per class")
        return
    ax.set_title(f"per class (labels of {n_labelled:,} samples; dotted: overall {overall:.1%})")
    if len(classes) > MAX_BARS:
        ax.hist(fractions[classes], bins=40, range=(0, 1), color="#2a7ab9")
        ax.axvline(overall, color="#d62728", ls=":")
        ax.set_xlabel("kept fraction")
        ax.set_ylabel("classes")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        starved = fractions[classes] < STARVED * overall
        ax.barh(range(len(classes)), fractions[classes], color=np.where(starved, "#d62728", "#2a7ab9"))
        ax.set_yticks(range(len(classes)), [name(int(c)) for c in classes], fontsize=9)
        ax.invert_yaxis()
        ax.axvline(overall, color="#d62728", ls=":")
        ax.set_xlim(0, 1)
        ax.set_xlabel("kept fraction")


def _shard_panel(ax, frac: np.ndarray) -> None:
    """One bar per shard on integer ticks (index order), or a histogram over `MAX_BARS` shards."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"per shard ({len(frac):,} shards)")
    if len(frac) <= MAX_BARS:
        ax.bar(range(len(frac)), frac, color="#2a7ab9")
        ax.set_xlabel("shard (index order)")
        ax.set_ylabel("kept fraction")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.hist(frac, bins=40, color="#2a7ab9")
        ax.set_xlabel("kept fraction")
        ax.set_ylabel("shards")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _fractions_note(manifest: dict) -> str:
    """What to read from the kept-fraction figure."""
    left = (
        "Left: the share of each class kept; with class balance every class keeps about the overall share (dotted)."
        if manifest.get("balance") == "classes"
        else "Left: the share of each class kept against the overall share (dotted); red bars are classes kept "
        "below a third of it, nearly pruned away (reduce with --balance classes to keep every class's share)."
    )
    return (
        f"{left} Right: the share of each shard kept; shares far from the overall one mean the method "
        "prefers some shards' content (e.g. easier or noisier sources)."
    )


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
    fig = plt.figure(figsize=(GRID * 1.25, len(picks) * 1.9), layout="constrained")
    subfigures = fig.subfigures(len(picks), 1, squeeze=False)
    for row, (title, pick) in zip(subfigures[:, 0], picks, strict=True):  # a row title sits above its row
        row.suptitle(title, x=0.01, ha="left", fontsize=10, fontweight="bold")
        for j, ax in enumerate(row.subplots(1, GRID)):
            if j >= len(pick):
                ax.axis("off")
                continue
            sample = samples[int(rows[pick[j]])]
            cls = int(labels[pick[j]]) if labels is not None else _cls(sample)
            caption = f"{name(cls) if cls >= 0 else '?'}\np={mean_p[pick[j]]:.2f}"
            _thumbnail(ax, sample, caption, "#2ca02c" if title.endswith("kept") else "#d62728")
    return fig


def _thumbnail(ax, sample: dict, caption: str, frame: str) -> None:
    """The sample's image letterboxed to a square (tall or wide images keep to their cell, clear of
    the row titles), framed in `frame`, captioned below."""
    try:
        img = decode_image(sample)
    except BadSample:
        img = np.zeros((1, 8, 8), np.uint8)
    ax.imshow(_square(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)), cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(caption, fontsize=7)
    for spine in ax.spines.values():
        spine.set_color(frame)
        spine.set_linewidth(2)


def _square(img: np.ndarray) -> np.ndarray:
    """`img` (H, W[, C]) centred on a black square of side max(H, W)."""
    h, w = img.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, *img.shape[2:]), dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def _cls(sample: dict) -> int:
    """The integer `cls` label of a sample, -1 when it has none (runs recorded without labels)."""
    try:
        label = LabelSpec("cls")(sample)
    except BadSample:
        return LABEL_MISSING
    return label if isinstance(label, int) else LABEL_MISSING


def _plot_training(store: StatsStore, rows: np.ndarray):
    """Mean training loss and accuracy of the sampled rows per recorded epoch (integer epoch ticks)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _evaluation_section(rows: list[dict], main: str, budget: str = "steps") -> str:
    """One row per subset (test accuracy mean +- std over seeds), then `main` against `random`, and
    a note when the model trained on all samples scored below a subset."""
    from streamprune.stages.verdicts import summarize_evaluation, verdict

    groups = summarize_evaluation(rows)
    head = "<tr><th>subset</th><th>ratio</th><th>kept</th><th>epochs</th><th>seeds</th><th>test accuracy</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(g['method'])}</td><td>{g['ratio']:.2f}</td><td>{g['kept']:,}</td>"
        f"<td>{g['epochs']}</td><td>{g['seeds']}</td><td>{g['mean']:.4f}"
        + (f" +- {g['std']:.4f}" if g["seeds"] > 1 else "")
        + "</td></tr>"
        for g in groups
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
        + "mean +- std over seeds.</p>"
        + _full_below_note(groups, budget)
        + "</section>"
    )


def _full_below_note(groups: list[dict], budget: str) -> str:
    """A note when `full` (all samples) scored below a subset: expected at a short budget, not a bug."""
    full = next((g for g in groups if g["method"] == "full"), None)
    best = max((g for g in groups if g["method"] != "full"), key=lambda g: g["mean"], default=None)
    if full is None or best is None or full["mean"] >= best["mean"]:
        return ""
    why = (
        f"at the same SGD steps the subset sees each of its samples more often ({best['epochs']} epochs against "
        f"{full['epochs']}), and a well-chosen subset can beat all the data at this budget"
        if budget == "steps"
        else "with the same epochs the full run takes more steps, so the gap is within the training noise "
        "or the pruned samples hurt (label noise)"
    )
    seeds = " The full run is one seed, so its accuracy carries a seed's noise." if full["seeds"] == 1 else ""
    return (
        f'<p class="note">All samples ({full["mean"]:.4f}) scored below {html.escape(best["method"])} on '
        f"{1 - best['ratio']:.0%} of them ({best['mean']:.4f}): {why}.{seeds} The full run is a reference "
        "at this budget, not an upper bound.</p>"
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
p.note {{ color: #444; font-size: .95em; margin-top: .2em; }}
section.summary {{ background: #f4f8fb; border: 1px solid #cfe0ee; padding: .2em 1em .6em; }}
pre {{ background: #fff; border: 1px solid #ddd; padding: .5em .8em; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
