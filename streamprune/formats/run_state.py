"""`streamprune inspect RUN`: the state of each stage (done, partial, missing), sizes,
configuration and fingerprint, read from what is on disk (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from streamprune.formats.headers import INDEX_FORMAT, KEEP_FORMAT, check_format
from streamprune.formats.rundir import RunDir
from streamprune.shards.labels import Classes


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(path: Path) -> str:
    return f"{_size(path) / 1e6:,.1f} MB"


def run_state(run: str | os.PathLike) -> dict:
    """Per stage: `state` (done | partial | missing) and what is known about it."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {str(run)!r}")
    out: dict = {"run": str(run.resolve())}
    rd, fingerprint = RunDir(run), None
    try:
        out["index"], fingerprint = _index_state(rd)
    except Exception as exc:  # damaged: `inspect --verify` tells what
        out["index"] = _damaged(exc)
    out["record"] = _guarded(_record_state, rd, fingerprint)
    out["reduce"] = _guarded(_keep_state, rd.keep, fingerprint, rd.scores)
    out["baselines"] = {
        p.name: _guarded(_keep_state, RunDir.keep_in(p), fingerprint, RunDir.scores_in(p))
        for p in rd.baselines()
        if RunDir.keep_in(p).exists()
    }
    ev = rd.evaluate
    try:
        out["evaluate"] = (
            {
                "state": "done",
                "rows": [
                    {
                        "method": r["method"],
                        "seed": r.get("seed", 0),
                        **{k: r[k] for k in ("ratio", "kept", "test_accuracy")},
                    }
                    for r in json.loads(ev.read_text())["rows"]
                ],
            }
            if ev.exists()
            else {"state": "missing"}
        )
    except Exception as exc:
        out["evaluate"] = _damaged(exc)
    page = rd.report_page
    out["report"] = (
        {"state": "done", "path": str(page), "size": _mb(page.parent)} if page.exists() else {"state": "missing"}
    )
    return out


def _damaged(exc: Exception) -> dict:
    return {"state": "damaged", "error": f"{exc}", "hint": "`streamprune inspect RUN --verify` lists the damage"}


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:
        return _damaged(exc)


def _index_state(rd: RunDir) -> tuple[dict, str | None]:
    out: dict = {}
    fingerprint, index_dir = None, rd.index
    manifest = index_dir / "manifest.json"
    if manifest.exists():
        m = check_format(json.loads(manifest.read_text()), INDEX_FORMAT, repr(str(manifest)))
        fingerprint = m["fingerprint"]
        out["index"] = {
            "state": "done",
            "shards": m["n_shards"],
            "samples": m["n_samples"],
            "broken": len(m["broken"]),
            "empty": len(m["empty"]),
            "duplicates": m["duplicates"]["rows"],
            "fingerprint": fingerprint,
            "root": m["root"],
            "identity": m["identity"],
            "size": _mb(index_dir),
        }
        with open(index_dir / "shards.jsonl") as f:
            compressed = sum(bool(json.loads(line).get("compression")) for line in f)
        if compressed:
            out["index"]["compressed_shards"] = compressed  # read through: no byte skipping inside
        classes = Classes.load(rd.root)
        if classes is not None:
            out["index"]["classes"] = f"{classes.num_classes} ({classes.label}" + (
                ", names in classes.json)" if classes.names else ", integers)"
            )
    elif rd.index_parts.exists():
        out["index"] = {
            "state": "partial",
            "shards_scanned": len([p for p in rd.index_parts.glob("*.npz") if not p.name.endswith(".tmp.npz")]),
        }
    else:
        out["index"] = {"state": "missing"}
    return out["index"], fingerprint


def _record_state(rd: RunDir, fingerprint: str | None) -> dict:
    path = rd.stats
    if not (path / "zarr.json").exists():
        return {"state": "missing"}
    from streamprune.formats.stats_store import StatsStore

    store = StatsStore.open(path, mode="r")
    done = store.done()
    complete = store.complete_epochs()
    state = {
        "state": "done" if complete == store.epochs else "partial",
        "epochs": store.epochs,
        "complete_epochs": complete,
        "epoch_fraction_done": [round(float(d.mean()), 3) for d in done],
        "samples": store.n_samples,
        "size": _mb(path),
        "config": store.config,
        "checkpoints": [p.name for p in rd.checkpoint_files()],
    }
    if fingerprint is not None and store.fingerprint != fingerprint:
        state["warning"] = "recorded for another index than RUN/index"
    return state


def _keep_state(keep: Path, fingerprint: str | None, scores: Path) -> dict:
    mpath = keep / "manifest.json"
    if not mpath.exists():
        return {"state": "missing"}
    m = check_format(json.loads(mpath.read_text()), KEEP_FORMAT, f"keep-list {str(mpath)!r}")
    state = {
        "state": "done",
        "method": m.get("method"),
        "ratio": m.get("ratio"),
        "k": m.get("k"),
        "N": m.get("N"),
        "seed": m.get("seed"),
        "epochs": m.get("epochs"),
        "window": m.get("window"),
        "created": m.get("created"),
        "size": _mb(keep),
        "scores": "present" if scores.exists() else "missing",
    }
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        state["warning"] = "made for another index than RUN/index"
    return state


def format_state(state: dict) -> str:
    """Readable lines, one block per stage."""
    lines = [f"run: {state['run']}"]
    for stage in ("index", "record", "reduce", "evaluate", "report"):
        info = dict(state[stage])
        lines.append(f"{stage}: {info.pop('state')}")
        config = info.pop("config", None)
        for k, v in info.items():
            lines.append(f"  {k}: {v}")
        if config:
            lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    for name, info in state["baselines"].items():
        info = dict(info)
        lines.append(f"baseline {name}: {info.pop('state')}  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return "\n".join(lines)
