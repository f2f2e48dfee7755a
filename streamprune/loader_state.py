"""Resume state of `PrunedWebDataset` inside an epoch: the JSON state, its checks, and the
elastic merge that re-partitions an epoch's remaining samples over another layout.

Pure functions over plain dicts, lists and NumPy arrays (no torch, no webdataset): the loader
wires them in. A *slot* is one (DDP rank, DataLoader worker) pair; a slot state says where
one slot is in its epoch, a merged state holds the remaining sample ranges of every slot of
a layout, to be shared out over a new one.

Sample ranges are `(shard, first, stop)`: `shard` indexes the dataset's URL list, `first`,
`stop` index the shard's kept samples (in tar order, as in the keep-list).

A slot state (version 1), as `PrunedWebDataset.state_dict()` returns it:

    format, version   "streamprune-loader-state", 1 (a higher version is refused)
    keep, shards      ids of the keep-list and of the shard list (names in order); n_shards
    mode              "even" (even_epochs), "stream" (webdataset's shard list), "resampled"
    seed, epoch       the shard-order seed; the epoch (set_epoch, or iterations so far)
    pass, limit       with_epoch: the pass over the shards it is in, and its sample count (-1: none)
    layout            {"world", "rank", "workers", "worker"} it was saved under
    plan              null, or its own [shard, first, stop] runs after an elastic resume
    position          {"item", "shard", "index"}: plan item being read, its shard, next kept index
    done              stream mode: base64 bitmap of the shards finished in this pass
    pending           [shard, index] pairs read but not yet yielded (a shuffle buffer's samples)
    samples, yielded  samples read, and items yielded (after batching), in this iteration
    finished          the iteration ended

A merged state (`merge`) has mode "merged", `from_layout`, and `remaining`: [shard, first, stop]
runs of every sample no slot had yielded, which `share` splits over the new slots.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamprune.errors import InputError, SettingsError

FORMAT = "streamprune-loader-state"
VERSION = 1
MODES = ("even", "stream", "resampled")

Range = tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    """Where a slot sits: DDP `rank` of `world`, DataLoader `worker` of `workers` (1 without workers)."""

    world: int
    rank: int
    workers: int
    worker: int

    @property
    def slots(self) -> int:
        return self.world * self.workers

    @property
    def slot(self) -> int:
        return self.rank * self.workers + self.worker

    def as_dict(self) -> dict[str, int]:
        return {"world": self.world, "rank": self.rank, "workers": self.workers, "worker": self.worker}

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}, worker {self.worker} of {self.workers}"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (identifies a keep-list or a shard list in a state)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_bits(flags: np.ndarray) -> str:
    """A boolean array as base64 of its packed bits (a shard set costs n/6 characters of JSON)."""
    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode("ascii")


def decode_bits(text: str, n: int) -> np.ndarray:
    """The `n` booleans `encode_bits` wrote."""
    packed = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    flags = np.unpackbits(packed)[:n].astype(bool)
    if len(flags) != n:
        raise SettingsError(f"loader state: the 'done' shard set holds {len(flags)} shards, expected {n}")
    return flags


def check(state: Any, keep_id: str, shards_id: str, n_shards: int) -> None:
    """Refuse a state that is not a loader state, is newer than this code reads, or was saved
    for another keep-list or shard list; each message names what differs."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SettingsError(f"not a PrunedWebDataset state (format {got!r}, expected {FORMAT!r})")
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SettingsError(
            f"loader state version {version!r} is newer than this streamprune reads (version {VERSION}): "
            "upgrade streamprune to resume from it"
        )
    if state.get("keep") != keep_id:
        raise InputError(
            f"the loader state was saved with another keep-list (keep-list id {state.get('keep')!r}, "
            f"this dataset's is {keep_id!r}): resume with the keep-list it was saved with"
        )
    if state.get("shards") != shards_id or state.get("n_shards") != n_shards:
        raise InputError(
            f"the loader state was saved for another shard list ({state.get('n_shards')} shards, "
            f"id {state.get('shards')!r}; this dataset has {n_shards} shards, id {shards_id!r}): "
            "resume with the same shard URLs in the same order"
        )
    if state.get("mode") not in (*MODES, "merged"):
        raise SettingsError(f"loader state: unknown mode {state.get('mode')!r}")


def slot_remaining(plan: Sequence[Range], item: int, index: int) -> list[Range]:
    """What a slot that walks `plan` has left when it is in item `item` before sample `index`."""
    if item >= len(plan):
        return []
    shard, first, stop = plan[item]
    head = [(shard, max(first, index), stop)] if max(first, index) < stop else []
    return head + [tuple(r) for r in plan[item + 1 :] if r[2] > r[1]]  # type: ignore[misc]


def share(ranges: Sequence[Range], layout: Layout, equal: bool = False) -> list[Range]:
    """Slot `layout.slot`'s part of `ranges` (in order): consecutive runs whose lengths differ by
    at most one between slots, nothing left out. The extra samples go to worker 0 of every rank,
    then worker 1, ..., so that the ranks' totals also differ by at most one.

    `equal` (even epochs, DDP): every slot gets exactly `total // slots` and the last
    `total % slots` samples are left out, as an even epoch leaves out its remainder at its start,
    so that no rank waits in a collective for a batch another rank does not have."""
    counts = np.array([b - a for _, a, b in ranges], dtype=np.int64)
    total, slots = int(counts.sum()), layout.slots
    base, extra = divmod(total, slots)
    if equal:
        extra = 0
    # slot s gets one extra when its (worker-major) rank among slots is < extra
    order = [w * layout.world + r for r in range(layout.world) for w in range(layout.workers)]
    sizes = [base + (1 if order[s] < extra else 0) for s in range(slots)]
    lo = sum(sizes[: layout.slot])
    hi = lo + sizes[layout.slot]
    ends = np.cumsum(counts)
    starts = ends - counts
    out = []
    for i in np.nonzero((ends > lo) & (starts < hi))[0]:
        shard, first, _ = ranges[int(i)]
        a, b = max(lo, starts[i]) - starts[i], min(hi, ends[i]) - starts[i]
        out.append((int(shard), int(first + a), int(first + b)))
    return out


def merge(states: Iterable[dict], plans: dict[int, list[Range]], counts: np.ndarray | None) -> dict:
    """One merged state from the slot states of every slot of one layout (all ranks' workers).

    `plans[slot]`: the plan of each even-mode slot (the loader recomputes it from seed and epoch).
    `counts`: kept samples per shard (stream mode: the shards no slot finished are left whole).
    The merged state lists every sample none of them handed out (`remaining`, in shard order of
    the epoch's plans), for `share` to split over any new layout.
    """
    states = list(states)
    _check_one_epoch(states)
    layouts = [Layout(**s["layout"]) for s in states]
    world, workers = _check_layouts(layouts)
    pending, remaining = _planned_remaining(states, layouts, plans)
    first = states[0]
    if first["mode"] == "stream" and all(s.get("plan") is None for s in states):
        remaining += _stream_remaining(states, counts)
    return {
        "format": FORMAT,
        "version": VERSION,
        "keep": first["keep"],
        "shards": first["shards"],
        "n_shards": first["n_shards"],
        "mode": "merged",
        "from_mode": first["mode"],
        "seed": first["seed"],
        "epoch": first["epoch"],
        "from_layout": {"world": world, "workers": workers},
        "remaining": [list(r) for r in pending + remaining],
        "yielded": sum(int(s.get("yielded", 0)) for s in states),
    }


def _check_one_epoch(states: list[dict]) -> None:
    """Refuse states that are not the slot states of one epoch of one run, or whose epoch has no
    fixed set of remaining samples."""
    if not states:
        raise SettingsError("merge_states: no states given")
    for field in ("keep", "shards", "n_shards", "mode", "epoch", "seed"):
        values = {json.dumps(s.get(field)) for s in states}
        if len(values) > 1:
            raise SettingsError(
                f"merge_states: the states differ in {field!r} ({sorted(values)}): not one epoch's states"
            )
    if states[0]["mode"] == "merged":
        raise SettingsError("merge_states: these are merged states already; load one of them")
    if states[0]["mode"] == "resampled" or any(s.get("limit", -1) > 0 for s in states):
        raise SettingsError(
            "merge_states: an epoch of resampled=True or with_epoch(n) has no fixed set of remaining samples; "
            "resume it with the same world size and workers"
        )


def _check_layouts(layouts: list[Layout]) -> tuple[int, int]:
    """The (world size, workers) of one layout whose every slot is in `layouts` exactly once."""
    world, workers = layouts[0].world, layouts[0].workers
    if any((lay.world, lay.workers) != (world, workers) for lay in layouts):
        raise SettingsError("merge_states: the states come from different layouts (world size, workers)")
    seen = sorted(lay.slot for lay in layouts)
    if seen != list(range(world * workers)):
        missing = sorted(set(range(world * workers)) - set(seen))
        raise SettingsError(
            f"merge_states: need one state per rank and worker ({world} ranks x {workers} workers); "
            f"missing slots {missing}, duplicated {sorted({s for s in seen if seen.count(s) > 1})}"
        )
    return world, workers


def _planned_remaining(
    states: list[dict], layouts: list[Layout], plans: dict[int, list[Range]]
) -> tuple[list[Range], list[Range]]:
    """In slot order: the samples the slots' shuffle buffers held (`pending`), and what the slots
    that walk a plan (even mode, or after an elastic resume) have left of it."""
    remaining: list[Range] = []
    pending: list[Range] = []
    for state, lay in sorted(zip(states, layouts, strict=True), key=lambda p: p[1].slot):
        pending += [(int(u), int(i), int(i) + 1) for u, i in state.get("pending", [])]
        pos = state["position"]
        plan = state.get("plan")
        if plan is None and state["mode"] == "even":
            plan = plans[lay.slot]
        if plan is not None:
            remaining += slot_remaining([tuple(r) for r in plan], int(pos["item"]), int(pos["index"]))
    return pending, remaining


def _stream_remaining(states: list[dict], counts: np.ndarray | None) -> list[Range]:
    """Stream mode: the shards no slot finished, each from where a slot was reading it (if one was)."""
    if counts is None:
        raise SettingsError("merge_states: elastic resume needs every shard in the keep-list")
    done = np.zeros(len(counts), dtype=bool)
    started = {}
    for state in states:
        if state.get("done"):  # None: saved before its first sample
            done |= decode_bits(state["done"], len(counts))
        if state["position"]["shard"] is not None:
            started[int(state["position"]["shard"])] = int(state["position"]["index"])
    remaining: list[Range] = []
    for u in range(len(counts)):
        start = started.get(u, 0)
        if not done[u] and start < counts[u]:
            remaining.append((u, start, int(counts[u])))
    return remaining


def find_states(obj: Any) -> list[dict]:
    """Every loader state inside `obj` (e.g. a StatefulDataLoader's `state_dict()`, whose worker
    snapshots each hold one, or a list of those gathered from the ranks)."""
    if isinstance(obj, dict):
        if obj.get("format") == FORMAT:
            return [obj]
        return [s for v in obj.values() for s in find_states(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in find_states(v)]
    return []
