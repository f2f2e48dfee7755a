"""One-paragraph summaries of what a stage did, for the command line and `run`'s log."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports this module before it knows which stage runs
    from streamprune.formats.index import Index
    from streamprune.formats.keeplist import KeepList
    from streamprune.stages.record import RecordSummary


def index_summary(idx: Index) -> str:
    """The index: counts, bytes read, and every broken, empty or duplicated thing found."""
    m = idx.manifest
    lines = [
        f"index: {idx.path}",
        f"  shards {m['n_shards']}  samples {m['n_samples']}  members {m['n_members']}  fingerprint {m['fingerprint']}",
    ]
    if m["bytes_total"]:
        lines.append(
            f"  read {m['bytes_read']:,} of {m['bytes_total']:,} bytes "
            f"({m['bytes_read'] / m['bytes_total']:.1%}: tar headers only where seekable)"
        )
    through = sum(s.get("access") == "through" for s in idx.shards)
    ranged = sum(s.get("access") == "headers" and "://" in s["url"] for s in idx.shards)
    if through:
        lines.append(f"  {through} shards read through (remote with small members, compressed or pipe:)")
    if ranged:
        lines.append(f"  {ranged} remote shards scanned by header range requests (large members)")
    for b in m["broken"]:
        lines.append(f"  BROKEN {b['shard']}: {b['error']}")
    if m["empty"]:
        lines.append(f"  empty shards ({len(m['empty'])}): {', '.join(m['empty'][:10])}")
    if m["duplicates"]["rows"]:
        ex = ", ".join(f"{e['shard']}:{e['key']}" for e in m["duplicates"]["examples"][:5])
        lines.append(f"  DUPLICATE identities: {m['duplicates']['rows']} rows share an identity (e.g. {ex})")
    return "\n".join(lines)


def record_line(s: RecordSummary) -> str:
    """The epochs recorded now, their speed, and samples skipped."""
    if not s.epochs_run:
        return f"record: all {s.epochs_done} epochs of {s.run} were already recorded"
    rate = s.samples / max(sum(s.epoch_seconds), 1e-9)
    bad = (
        f"; {s.bad_samples:,} undecodable samples skipped (listed in {s.run}/bad-samples.jsonl)"
        if s.bad_samples
        else ""
    )
    inputs = f"\n  inputs: {s.inputs}" if s.inputs else ""
    return (
        f"record: epochs {s.epochs_run[0]}..{s.epochs_run[-1]} of {s.run} done in {sum(s.epoch_seconds):.1f} s "
        f"({rate:,.0f} samples/s); {s.epochs_done} epochs recorded{bad}{inputs}"
    )


def reduce_line(keep: KeepList, out: str | os.PathLike) -> str:
    """The keep-list: method, ratio, kept of all, and samples left out for missing statistics."""
    m = keep.manifest
    balanced = " (class-balanced)" if m.get("balance") == "classes" else ""
    return (
        f"reduce: {m['method']}{balanced} at ratio {m['ratio']}: kept {m['k']:,} of {m['N']:,} samples "
        f"({m['dropped_missing']:,} with missing statistics left out"
        + (f", {m['filled_zero_weight']:,} filled uniformly from zero weights" if m["filled_zero_weight"] else "")
        + f"); keep-list: {out}"
    )
