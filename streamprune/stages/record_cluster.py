"""`record` and the Ray cluster: how many training workers and GPUs each when not given, the
refusal of workers the cluster's nodes cannot hold, and what Ray Train's failures mean to the
user (a start that timed out; a user's error wrapped in Ray's exceptions)."""

from __future__ import annotations

import ray

from streamprune.errors import SettingsError, StreamPruneError
from streamprune.stages.ray_cluster import placeable


def placement(workers: int | None, gpus_per_worker: float | None, resources: dict[str, float]) -> tuple[int, float]:
    """The training workers and GPUs per worker: as given, else one GPU each when the cluster
    has GPUs, one worker per GPU, and on CPUs half the CPUs up to 4 workers; refused when the
    cluster's nodes cannot hold them."""
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if workers is None:
        workers = (  # one at least: a cluster without room for it is refused below, naming what it has
            max(1, int(resources.get("GPU", 0) // gpus_per_worker))
            if gpus_per_worker
            else max(1, min(4, int(resources.get("CPU", 1)) // 2))
        )
    _refuse_unplaceable(workers, gpus_per_worker, resources)
    return workers, gpus_per_worker


def per_worker(gpus_per_worker: float) -> dict[str, float]:
    """What each training worker reserves: 1 CPU, and its GPUs."""
    return {"CPU": 1.0, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}


def _refuse_unplaceable(workers: int, gpus_per_worker: float, resources: dict[str, float]) -> None:
    """Refuse `workers` training workers that the Ray cluster's nodes cannot hold at once (Ray Train
    would wait for them forever), naming what it has. The nodes up now count, with all their
    resources (work holding some only delays the start); nodes an autoscaler may add do not."""
    room = placeable(per_worker(gpus_per_worker))
    if workers <= room:
        return
    gpus = resources.get("GPU", 0.0)
    each = "1 CPU" + (f" + {_count(gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
    need = _count(workers, "CPU") + (f" and {_count(workers * gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
    if room:
        fix = f"use --workers {room} or fewer"
    elif gpus_per_worker and not gpus:
        fix = "use --gpus-per-worker 0 (train on CPUs)"
    else:
        fix = f"use a smaller --gpus-per-worker or add nodes with {'GPUs' if gpus_per_worker else 'CPUs'}"
    split = workers <= resources.get("CPU", 0.0) and workers * gpus_per_worker <= gpus  # enough, not on a node
    raise SettingsError(
        f"record: {_count(workers, 'worker')} x {each} need{'s' if workers == 1 else ''} {need}, the Ray cluster "
        f"has {_cpus_gpus(resources)}"
        + (", but a worker's resources must be on one node" if split else "")
        + f"; {fix}"
    )


def fit_error(exc: BaseException, max_failures: int) -> BaseException:
    """What to raise for a failure of Ray Train's `fit`: a start that timed out, said in the
    cluster's terms; else the user's error it wraps; else the failure itself."""
    return _start_timed_out(exc, max_failures) or _user_error(exc)


def _start_timed_out(exc: BaseException, max_failures: int) -> SettingsError | None:
    """What to report when Ray Train gave up starting the workers (`max_failures` + 1 start timeouts:
    the cluster has room for them, but other work holds it); None for any other failure."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    failure = getattr(exc, "controller_failure", None)
    if not isinstance(failure, WorkerGroupStartupTimeoutError):
        return None
    what = str(failure).split(". ")[0]  # "The worker group startup timed out after 60.0 seconds waiting for 2 workers"
    return SettingsError(
        f"record: {what[:1].lower()}{what[1:]}, {_count(max_failures + 1, 'time')} (--max-failures {max_failures}); "
        f"other work holds the Ray cluster's {_cpus_gpus(ray.cluster_resources())} (free now: "
        f"{_cpus_gpus(ray.available_resources())}); wait for it, use fewer --workers, or a larger --max-failures"
    )


def _user_error(exc: BaseException) -> BaseException:
    """The `StreamPruneError` (bad input or settings: a user's error) a Ray Train failure wraps, so
    that it is reported as such (exit 2); the failure itself when it wraps none."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StreamPruneError):
            return e
        stack += [
            e.__cause__,
            e.__context__,
            getattr(e, "cause", None),
            getattr(e, "controller_failure", None),
            *getattr(e, "worker_failures", {}).values(),
        ]
    return exc


def _count(n: float, what: str) -> str:
    """`n` things: '1 CPU', '6 CPUs', '0.5 GPUs'."""
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def _cpus_gpus(resources: dict[str, float]) -> str:
    """'2 CPUs (0 GPUs)'."""
    return f"{_count(resources.get('CPU', 0.0), 'CPU')} ({_count(resources.get('GPU', 0.0), 'GPU')})"
