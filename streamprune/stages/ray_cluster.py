"""Joining Ray: the embedded local instance by default, or an existing cluster by address."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import ray

from streamprune.stages.ray_output import attach


def ensure_ray(address: str | None = None) -> None:
    """Start a local Ray instance (no address) or join the cluster at `address`, once per process.

    An already initialised Ray (a test session, a notebook) is reused as it is. Without an
    address a new local instance is started even when others run on the machine (Ray's own
    default would join the latest one, warning "Found multiple active Ray instances"). Ray's own
    output goes where `ray_output.routed_to` says, if anywhere (else to the terminal).
    """
    if not ray.is_initialized():
        _start(address)
    attach()


def _start(address: str | None) -> None:
    """`ray.init` of the local instance or of the cluster at `address`."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    # An embedded instance gets a token (safe); saying so on every run reads like a problem.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "streamprune.stages.ray_cluster.quiet_worker_logs"},
    )


def placeable(per_worker: dict[str, float]) -> int:
    """How many workers reserving `per_worker` resources each the Ray cluster's live nodes hold at
    once (each worker on one node), by the nodes' total resources."""

    def units(amount: float) -> int:  # Ray counts resources in ten-thousandths
        return round(amount * 10_000)

    return sum(
        min(units(node["Resources"].get(name, 0)) // units(need) for name, need in per_worker.items() if need)
        for node in ray.nodes()
        if node["Alive"]
    )


def quiet_worker_logs() -> None:
    """Ray worker setup: silence Ray Train's warnings that are not failures: without the dashboard
    its placement-group cleaner warns every second that the state API is unavailable."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # A resource request to Ray's autoscaling coordinator that times out on a busy machine is
    # retried by Ray Train; its warning (with a traceback) reads like a failure, and is not one.
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").setLevel(
        logging.ERROR
    )


def bounded_map(
    submit: Callable[[Any], ray.ObjectRef], items: Sequence, limit: int, on_result: Callable[[int, Any], None], bar=None
) -> None:
    """Run `submit(item)` for every item with at most `limit` tasks in flight, handing each
    result to `on_result(position, result)` as it arrives (memory stays bounded)."""
    pending: dict = {}
    todo = iter(enumerate(items))

    def submit_next() -> None:
        nxt = next(todo, None)
        if nxt is not None:
            pending[submit(nxt[1])] = nxt[0]

    for _ in range(max(1, limit)):
        submit_next()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        on_result(i, ray.get(done[0]))
        if bar is not None:
            bar.update()
        submit_next()
