"""`streamprune inspect RUN`: the state of each stage (done, partial, missing), sizes,
configuration and fingerprint, read from what is on disk (no Ray)."""

from __future__ import annotations

import json
import os

from streamprune import storage
from streamprune.formats.classes import Classes
from streamprune.formats.commit import committed
from streamprune.formats.headers import INDEX_FORMAT, KEEP_FORMAT, check_format
from streamprune.formats.rundir import RunDir


def _mb(location: str) -> str:
    return f"{storage.total_size(location) / 1e6:,.1f} MB"


def _committed_file(output: str, name: str) -> str | None:
    """File `name` of output `output` as committed, or None when there is none."""
    try:
        location = storage.join(committed(output), name)
    except FileNotFoundError:
        return None
    return location if storage.exists(location) else None


def _read_json(location: str):
    return json.loads(storage.read_bytes(location))


def run_state(run: str | os.PathLike) -> dict:
    """Per stage: `state` (done | partial | missing) and what is known about it."""
    rd, fingerprint = RunDir(run), None
    if not storage.exists(rd.root) or (not storage.is_url(rd.root) and not os.path.isdir(rd.root)):
        raise FileNotFoundError(f"no run directory {os.fspath(run)!r}")
    out: dict = {"run": rd.root}
    try:
        out["index"], fingerprint = _index_state(rd)
    except Exception as exc:  # damaged: `inspect --verify` tells what
        out["index"] = _damaged(exc)
    out["record"] = _guarded(_record_state, rd, fingerprint)
    out["reduce"] = _guarded(_keep_state, rd.keep, fingerprint, rd.scores)
    out["baselines"] = {
        storage.name(p): _guarded(_keep_state, RunDir.keep_in(p), fingerprint, RunDir.scores_in(p))
        for p in rd.baselines()
        if storage.exists(RunDir.keep_in(p))
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
                    for r in _read_json(ev)["rows"]
                ],
            }
            if storage.exists(ev)
            else {"state": "missing"}
        )
    except Exception as exc:
        out["evaluate"] = _damaged(exc)
    page = rd.report_page
    out["report"] = (
        {"state": "done", "path": page, "size": _mb(rd.report)} if storage.exists(page) else {"state": "missing"}
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
    manifest = _committed_file(index_dir, "manifest.json")
    if manifest is not None:
        m = check_format(_read_json(manifest), INDEX_FORMAT, repr(manifest))
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
        lines = storage.read_bytes(storage.join(storage.parent(manifest), "shards.jsonl")).decode().splitlines()
        compressed = sum(bool(json.loads(line).get("compression")) for line in lines if line.strip())
        if compressed:
            out["index"]["compressed_shards"] = compressed  # read through: no byte skipping inside
        classes = Classes.load(rd.root)
        if classes is not None:
            out["index"]["classes"] = f"{classes.num_classes} ({classes.label}" + (
                ", names in classes.json)" if classes.names else ", integers)"
            )
    elif parts := storage.names(rd.index_parts):
        out["index"] = {
            "state": "partial",
            "shards_scanned": len([p for p in parts if p.endswith(".npz") and not p.endswith(".tmp.npz")]),
        }
    else:
        out["index"] = {"state": "missing"}
    return out["index"], fingerprint


def _record_state(rd: RunDir, fingerprint: str | None) -> dict:
    from streamprune.formats.stats_store import StatsStore, store_exists

    path = rd.stats
    if not store_exists(path):
        return {"state": "missing"}

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
        "checkpoints": [storage.name(p) for p in rd.checkpoint_files()],
    }
    if fingerprint is not None and store.fingerprint != fingerprint:
        state["warning"] = "recorded for another index than RUN/index"
    return state


def _keep_state(keep: str, fingerprint: str | None, scores: str) -> dict:
    mpath = _committed_file(keep, "manifest.json")
    if mpath is None:
        return {"state": "missing"}
    m = check_format(_read_json(mpath), KEEP_FORMAT, f"keep-list {mpath!r}")
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
        "scores": "present" if storage.exists(scores) else "missing",
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
