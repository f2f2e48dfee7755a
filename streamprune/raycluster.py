"""Joining Ray: the embedded local instance by default, or an existing cluster by address."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    """Start a local Ray instance (no address) or join the cluster at `address`, once per process.

    An already initialised Ray (a test session, a notebook) is reused as it is.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=address, include_dashboard=False, logging_level="WARNING",
             configure_logging=True, log_to_driver=True)
