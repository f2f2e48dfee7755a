"""`streamprune run`: index, record, reduce, evaluate and report from one config, resumably.

Each stage first checks what is already on disk for the same settings and skips it when
complete (the index, recorded epochs, a keep-list with the same manifest, evaluations in
`RUN/evaluate.json`), so rerunning after an interruption finishes only what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from streamprune import storage
from streamprune.config import RunSettings
from streamprune.errors import DamagedRunError
from streamprune.formats.commit import committed
from streamprune.formats.keeplist import KeepList
from streamprune.formats.rundir import RunDir
from streamprune.scoring.sampling import resolve_balance, resolve_c_d
from streamprune.scoring.scores import resolve_window
from streamprune.settings import ReduceSettings
from streamprune.shards.identity import shard_names
from streamprune.shards.urls import absolute, expand_urls
from streamprune.stages.summaries import index_summary, record_line, reduce_line
from streamprune.stages.verdicts import subset_label, summarize_evaluation, verdict


@dataclass
class PipelineResult:
    """What `run_pipeline` did: seconds per stage (skipped stages: 0) and the evaluation rows."""

    run: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)
    keep: KeepList | None = None
    report: str | None = None
    verdict: str | None = None  # the keep-list against the baseline, when both were evaluated


def run_pipeline(cfg: RunSettings, progress: bool = True, log=print, restart: bool = False) -> PipelineResult:
    """Run every stage of `cfg` that is not already complete on disk; `restart`: record again from
    epoch 0 (`record(restart=True)`), and so every stage after it."""
    run = storage.absolute(cfg.out)
    result = PipelineResult(run)

    def stage(name: str, fn, done: bool) -> None:
        if done:
            result.skipped.append(name)
            result.stage_seconds[name] = 0.0
            log(f"{name}: already complete, skipped")
            return
        t = time.perf_counter()
        fn()
        result.stage_seconds[name] = time.perf_counter() - t

    stage("index", lambda: _index(cfg, run, progress, log), _index_done(cfg, run))
    stage("record", lambda: _record(cfg, run, progress, log, restart), not restart and _record_done(cfg, run))
    main = _main_subset(cfg)
    stage(
        "reduce",
        lambda: _reduce(cfg, run, main, RunDir(run).keep, None, progress, log),
        _keep_matches(cfg, run, main, RunDir(run).keep),
    )
    result.keep = KeepList.load(RunDir(run).keep)
    if cfg.evaluate.test_shards is not None:
        stage("evaluate", lambda: _evaluate(cfg, run, progress, log), _evaluation_done(cfg, run))
        result.evaluation = _load_evaluation(run)["rows"]
        if cfg.evaluate.baseline:
            result.verdict = verdict(result.evaluation, main.label, cfg.evaluate.baseline)
    if cfg.report.enabled:
        from streamprune.stages.report import build_report

        t = time.perf_counter()
        result.report = build_report(run, max_rows=cfg.report.max_rows, progress=progress, shards=cfg.shards)
        result.stage_seconds["report"] = time.perf_counter() - t
    return result


def _index_done(cfg: RunSettings, run: str) -> bool:
    from streamprune.formats.index import Index

    try:
        idx = Index(RunDir(run).index)
    except FileNotFoundError:
        return False
    urls = [absolute(u) for u in expand_urls(cfg.shards)]
    return (
        [s["url"] for s in idx.shards] == urls
        and idx.manifest["identity"] == cfg.index.identity
        and idx.root == shard_names(urls, cfg.index.root)[1]
    )


def _index(cfg: RunSettings, run: str, progress: bool, log) -> None:
    from streamprune.stages.index import index, refuse_broken

    idx = index(cfg.shards, run, settings=cfg.index, address=cfg.address, progress=progress)
    log(index_summary(idx))
    refuse_broken(idx, cfg.index)


def _record_done(cfg: RunSettings, run: str) -> bool:
    """Whether the store is complete with these settings (changed ones go to `record`, which refuses them)."""
    from streamprune.formats.stats_store import StatsStore
    from streamprune.stages.record_resolved import changed_settings

    try:
        store = StatsStore.open(RunDir(run).stats, mode="r")
    except (FileNotFoundError, ValueError):
        return False
    complete = store.epochs == cfg.record.epochs and store.complete_epochs() == cfg.record.epochs
    return complete and not changed_settings(store.config, cfg.record)


def _record(cfg: RunSettings, run: str, progress: bool, log, restart: bool) -> None:
    from streamprune.stages.record import record

    summary = record(
        run, settings=cfg.record, address=cfg.address, progress=progress, shards=cfg.shards, restart=restart
    )
    log(record_line(summary))


@dataclass(frozen=True)
class _Subset:
    """One keep-list of the run: a method, its class balance and its seed."""

    method: str
    balance: str
    seed: int

    @property
    def label(self) -> str:
        return subset_label(self.method, self.balance)


def _main_subset(cfg: RunSettings, i: int = 0) -> _Subset:
    """The run's own keep-list drawn with seed `reduce.seed + i`."""
    r = cfg.reduce
    return _Subset(r.method, resolve_balance(r.balance, r.method), r.seed + i)


def _reduce_settings(cfg: RunSettings, subset: _Subset) -> ReduceSettings:
    """The reduce settings of one keep-list, with T, the window and c_d resolved (as its manifest records them)."""
    r = cfg.reduce
    epochs = r.epochs or cfg.record.epochs
    return r.replace(
        method=subset.method,
        balance=subset.balance,
        seed=subset.seed,
        epochs=epochs,
        window=resolve_window(r.window, epochs),
        c_d=resolve_c_d(r.c_d, subset.balance),
    )


def _keep_matches(cfg: RunSettings, run: str, subset: _Subset, out: str) -> bool:
    """Whether `out` holds the keep-list of `subset` drawn from this run's index with these settings."""
    from streamprune.formats.index import Index

    try:
        manifest = _manifest(out)
        fingerprint = Index(RunDir(run).index).fingerprint
    except (FileNotFoundError, ValueError, DamagedRunError):
        return False
    s = _reduce_settings(cfg, subset).to_dict()
    want = {k: s[k] for k in ("method", "balance", "ratio", "seed", "window", "epochs")} | {"fingerprint": fingerprint}
    params = manifest.get("params", {})  # each sampler's manifest records the parameters it used
    return all(manifest.get(k) == v for k, v in want.items()) and all(
        params[k] == s[k] for k in ("c_d", "C", "alpha_plus_beta", "cut") if k in params
    )


def _manifest(keep: str) -> dict:
    """The manifest of the keep-list committed at `keep` (FileNotFoundError: none; ValueError: not JSON)."""
    return json.loads(storage.read_bytes(storage.join(committed(keep), "manifest.json")))


def _reduce(cfg: RunSettings, run: str, subset: _Subset, out: str, scores_out: str | None, progress: bool, log) -> None:
    from streamprune.stages.reduce import reduce

    settings = _reduce_settings(cfg, subset)
    keep = reduce(run, settings=settings, out=out, scores_out=scores_out, address=cfg.address, progress=progress)
    log(reduce_line(keep, out))


def _evaluation_key(cfg: RunSettings, run: str) -> dict:
    e = cfg.evaluate
    return {
        "settings": {k: v for k, v in asdict(e).items()},
        "keep_created": _manifest(RunDir(run).keep)["created"],
    }


def _load_evaluation(run: str) -> dict:
    try:
        return json.loads(storage.read_bytes(RunDir(run).evaluate))
    except FileNotFoundError:
        return {"rows": []}


def _evaluation_done(cfg: RunSettings, run: str) -> bool:
    saved = _load_evaluation(run)
    return saved.get("key") == _evaluation_key(cfg, run) and len(saved["rows"]) == len(_subsets(cfg))


def _subsets(cfg: RunSettings) -> list[tuple[_Subset | None, int]]:
    """Every fresh model to train: `(keep-list, seed index)`, `None` for all samples (one seed).
    Seed index `i` draws the keep-lists with seed `reduce.seed + i` and trains with `evaluate.seed + i`."""
    e, r = cfg.evaluate, cfg.reduce
    out: list[tuple[_Subset | None, int]] = []
    for i in range(e.seeds):
        out.append((_main_subset(cfg, i), i))
        if e.baseline:
            out.append((_Subset(e.baseline, "none", r.seed + i), i))
    return out + ([(None, 0)] if e.full else [])


def _keep_dir(cfg: RunSettings, run: str, subset: _Subset) -> str:
    if subset == _main_subset(cfg):
        return RunDir(run).keep
    name = subset.label.replace(":", "-") + (f"-seed{subset.seed}" if subset.seed != cfg.reduce.seed else "")
    return RunDir.keep_in(RunDir(run).baseline(name))


def _evaluate(cfg: RunSettings, run: str, progress: bool, log) -> None:
    """Train a fresh model per subset and seed (the keep-list, the baseline at the same ratio,
    all data); each finished row is saved at once so that an interrupted evaluation resumes."""
    from streamprune.stages.evaluate import train_subset
    from streamprune.training.decode import run_decoder

    e, key = cfg.evaluate, _evaluation_key(cfg, run)
    decoder = run_decoder(run)
    assert e.test_shards is not None and decoder.classes is not None  # run() evaluates only with test shards
    saved = _load_evaluation(run)
    rows = saved["rows"] if saved.get("key") == key else []
    for subset, i in _subsets(cfg)[len(rows) :]:
        keep_dir = None
        if subset is not None:
            keep_dir = _keep_dir(cfg, run, subset)
            if not _keep_matches(cfg, run, subset, keep_dir):
                _reduce(cfg, run, subset, keep_dir, RunDir.scores_in(storage.parent(keep_dir)), progress, log)
        name = "full" if subset is None else subset.label
        res = train_subset(
            cfg.shards,
            e.test_shards,
            keep_dir,
            epochs=e.epochs,
            model=e.model,
            num_classes=e.num_classes or decoder.classes.num_classes,
            batch_size=e.batch_size,
            lr=e.lr,
            seed=e.seed + i,
            device=e.device,
            budget=e.budget,
            decoder=decoder,
            desc=f"train on {name} (seed {i})",
            progress=progress,
        )
        rows.append(
            {
                "method": name,
                "ratio": 0.0 if subset is None else cfg.reduce.ratio,
                "seed": i,
                "kept": res.train_samples,
                "test_accuracy": res.test_accuracy,
                "epochs": res.epochs,
                "seconds": res.seconds,
                "history": res.history,
            }
        )
        log(
            f"evaluate: {name} (seed {i}): {res.train_samples:,} samples, {res.epochs} epochs, test accuracy "
            f"{res.test_accuracy:.4f} ({res.seconds:.1f} s)"
        )
        _save_evaluation(run, key, rows)


def _save_evaluation(run: str, key: dict, rows: list[dict]) -> None:
    storage.write_bytes(RunDir(run).evaluate, json.dumps({"key": key, "rows": rows}, indent=1).encode())


def format_table(result: PipelineResult) -> str:
    """The results as a small text table: subsets, then stage times."""
    lines = []
    if result.evaluation:
        lines += [f"{'method':<20}{'ratio':>6}{'kept':>8}{'epochs':>8}{'seeds':>6}  test accuracy"]
        lines += [
            f"{g['method']:<20}{g['ratio']:>6.2f}{g['kept']:>8,}{g['epochs']:>8}{g['seeds']:>6}  "
            f"{g['mean']:.4f}" + (f" +- {g['std']:.4f}" if g["seeds"] > 1 else "")
            for g in summarize_evaluation(result.evaluation)
        ]
        if result.verdict:
            lines += ["", result.verdict]
        lines.append("")
    lines.append(
        "  ".join(
            f"{k} {v:.1f} s" + (" (done before)" if k in result.skipped else "")
            for k, v in result.stage_seconds.items()
        )
    )
    return "\n".join(lines)
