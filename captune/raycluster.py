"""Connecting to Ray: a running cluster when asked (--address or RAY_ADDRESS), else a local one."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    # A local cluster gets more logical CPUs than a 2-core machine has, or the Train controller
    # and the workers wait on each other for a CPU forever. The dashboard (which serves the
    # State API that Train uses to free a stopped run's placement group) listens on localhost.
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level="WARNING")


def root_cause(error: BaseException) -> str:
    """The last 'SomeError: message' line of a Ray error, which wraps the worker's traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Diverged", "Problems")) and " " not in head:
            return line
    return lines[-1] if lines else type(error).__name__
