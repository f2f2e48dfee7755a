"""`streamprune run`: index, record, reduce, evaluate and report from one config, resumably.

Each stage first checks what is already on disk for the same settings and skips it when
complete (the index, recorded epochs, a keep-list with the same manifest, evaluations in
`RUN/evaluate.json`), so rerunning after an interruption finishes only what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config
from .keeplist import KeepList
from .shardlist import absolute, expand_urls

BASELINE_DIR = "baseline"


@dataclass
class PipelineResult:
    """What `run_pipeline` did: seconds per stage (skipped stages: 0) and the evaluation rows."""

    run: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)
    keep: KeepList | None = None
    report: Path | None = None


def run_pipeline(cfg: Config, progress: bool = True, log=print) -> PipelineResult:
    """Run every stage of `cfg` that is not already complete on disk."""
    run = Path(cfg.out).resolve()
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
    stage("record", lambda: _record(cfg, run, progress, log), _record_done(cfg, run))
    stage("reduce", lambda: _reduce(cfg, run, cfg.reduce.method, run / "keep", None, progress, log),
          _keep_matches(cfg, run, cfg.reduce.method, run / "keep"))
    result.keep = KeepList.load(run / "keep")
    if cfg.evaluate.test_shards is not None:
        stage("evaluate", lambda: _evaluate(cfg, run, progress, log), _evaluation_done(cfg, run))
        result.evaluation = _load_evaluation(run)["rows"]
    if cfg.report.enabled:
        from .report import build_report

        t = time.perf_counter()
        result.report = build_report(run, progress=progress)
        result.stage_seconds["report"] = time.perf_counter() - t
    return result


def _index_done(cfg: Config, run: Path) -> bool:
    from .shardindex import Index

    try:
        idx = Index(run / "index")
    except FileNotFoundError:
        return False
    return ([s["url"] for s in idx.shards] == [absolute(u) for u in expand_urls(cfg.shards)]
            and idx.manifest["identity"] == cfg.index.identity)


def _index(cfg: Config, run: Path, progress: bool, log) -> None:
    from .cli import index_summary
    from .indexer import index

    idx = index(cfg.shards, run, root=cfg.index.root,
                identity=None if cfg.index.identity == "shard-key" else cfg.index.identity,
                address=cfg.address, progress=progress)
    log(index_summary(idx))


def _record_done(cfg: Config, run: Path) -> bool:
    from .store import StatsStore

    try:
        store = StatsStore.open(run / "stats.zarr", mode="r")
    except (FileNotFoundError, ValueError):
        return False
    return store.epochs == cfg.record.epochs and store.complete_epochs() == cfg.record.epochs


def _record(cfg: Config, run: Path, progress: bool, log) -> None:
    from .cli import record_line
    from .recorder import record

    r = cfg.record
    log(record_line(record(run, r.epochs, workers=r.workers, gpus_per_worker=r.gpus_per_worker, model=r.model,
                           address=cfg.address, batch_size=r.batch_size, lr=r.lr, schedule_epochs=r.schedule_epochs,
                           seed=r.seed, num_classes=r.num_classes, loader_workers=r.loader_workers,
                           max_failures=r.max_failures, on_bad_sample=r.on_bad_sample, progress=progress)))


def _reduce_settings(cfg: Config, method: str) -> dict:
    r = cfg.reduce
    return {"method": method, "ratio": r.ratio, "seed": r.seed, "window": r.window,
            "epochs": r.epochs or cfg.record.epochs}


def _keep_matches(cfg: Config, run: Path, method: str, out: Path) -> bool:
    from .shardindex import Index

    try:
        manifest = json.loads((out / "manifest.json").read_text())
        fingerprint = Index(run / "index").fingerprint
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    want = {**_reduce_settings(cfg, method), "fingerprint": fingerprint}
    params = manifest.get("params", {})
    return (all(manifest.get(k) == v for k, v in want.items())
            and all(params[k] == v for k, v in _sampler_settings(cfg).items() if k in params))


def _sampler_settings(cfg: Config) -> dict:
    """The samplers' parameters (each method's keep-list manifest records the ones it used)."""
    r = cfg.reduce
    return {"c_d": r.c_d, "C": r.C, "alpha_plus_beta": r.alpha_plus_beta, "cut": r.cut}


def _reduce(cfg: Config, run: Path, method: str, out: Path, scores_out: Path | None, progress: bool, log) -> None:
    from .cli import reduce_line
    from .reducer import reduce

    s = _reduce_settings(cfg, method)
    keep = reduce(run, s["ratio"], method, seed=s["seed"], epochs=s["epochs"], window=s["window"], out=out,
                  missing=cfg.reduce.missing, address=cfg.address, which=cfg.reduce.scores,
                  scores_out=scores_out, progress=progress, **_sampler_settings(cfg))
    log(reduce_line(keep, out))


def _evaluation_key(cfg: Config, run: Path) -> dict:
    e = cfg.evaluate
    return {"settings": {k: v for k, v in asdict(e).items()},
            "keep_created": json.loads((run / "keep" / "manifest.json").read_text())["created"]}


def _load_evaluation(run: Path) -> dict:
    path = run / "evaluate.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def _evaluation_done(cfg: Config, run: Path) -> bool:
    saved = _load_evaluation(run)
    return saved.get("key") == _evaluation_key(cfg, run) and len(saved["rows"]) == len(_subsets(cfg))


def _subsets(cfg: Config) -> list[str]:
    e = cfg.evaluate
    return [cfg.reduce.method, *([e.baseline] if e.baseline else []), *(["full"] if e.full else [])]


def _evaluate(cfg: Config, run: Path, progress: bool, log) -> None:
    """Train a fresh model per subset (the keep-list, the baseline at the same ratio, all data);
    each finished row is saved at once so that an interrupted evaluation resumes."""
    from .evaluate import train_subset

    e, key = cfg.evaluate, _evaluation_key(cfg, run)
    saved = _load_evaluation(run)
    rows = saved["rows"] if saved.get("key") == key else []
    for method in _subsets(cfg)[len(rows):]:
        keep_dir = run / "keep"
        if method == "full":
            keep_dir = None
        elif method != cfg.reduce.method:
            keep_dir = run / BASELINE_DIR / method.replace(":", "-") / "keep"
            if not _keep_matches(cfg, run, method, keep_dir):
                _reduce(cfg, run, method, keep_dir, keep_dir.parent / "scores.zarr", progress, log)
        res = train_subset(cfg.shards, e.test_shards, keep_dir, epochs=e.epochs, model=e.model,
                           num_classes=e.num_classes, batch_size=e.batch_size, lr=e.lr, seed=e.seed,
                           device=e.device, desc=f"train on {method}", progress=progress)
        rows.append({"method": method, "ratio": 0.0 if method == "full" else cfg.reduce.ratio,
                     "kept": res.train_samples, "test_accuracy": res.test_accuracy, "epochs": res.epochs,
                     "seconds": res.seconds, "history": res.history})
        log(f"evaluate: {method}: {res.train_samples:,} samples, test accuracy {res.test_accuracy:.4f} "
            f"({res.seconds:.1f} s)")
        _save_evaluation(run, key, rows)


def _save_evaluation(run: Path, key: dict, rows: list[dict]) -> None:
    tmp = run / "evaluate.json.tmp"
    tmp.write_text(json.dumps({"key": key, "rows": rows}, indent=1))
    tmp.replace(run / "evaluate.json")


def format_table(result: PipelineResult) -> str:
    """The results as a small text table: subsets, then stage times."""
    lines = []
    if result.evaluation:
        lines += [f"{'method':<14}{'ratio':>7}{'kept':>9}{'test acc':>10}{'train s':>9}"]
        lines += [f"{r['method']:<14}{r['ratio']:>7.2f}{r['kept']:>9,}{r['test_accuracy']:>10.4f}{r['seconds']:>9.1f}"
                  for r in result.evaluation]
        lines.append("")
    lines.append("  ".join(f"{k} {v:.1f} s" + (" (done before)" if k in result.skipped else "")
                           for k, v in result.stage_seconds.items()))
    return "\n".join(lines)
