"""Connecting to Ray: a running cluster when asked (--address or RAY_ADDRESS), else a local one."""
from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from pathlib import Path

from captune.infra.errors import UserError
from captune.infra.fork_stand_in import worker_command

# ray is imported inside the functions: infra is imported by every layer (the CLI among them, which
# answers `--help` and refuses bad options before Ray loads).


class ClusterTooSmall(UserError, ValueError):
    """A job asks for more workers, CPUs or GPUs than the Ray cluster has."""


def init_ray(address: str | None = None, num_cpus: int | None = None, preload: tuple[str, ...] = ()) -> None:
    """Connect to Ray (a running cluster at `address` or RAY_ADDRESS, else a new local one). With
    fork workers on (fork_workers), every worker is forked from a server that has imported
    `preload`: the modules this job's workers run, named by the caller (infra imports no layer)."""
    import ray

    if ray.is_initialized():
        return
    # Ray 2.60 warns at every start that token authentication is on (its default): nothing to do
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"py_executable": worker_command(preload)} if fork_workers(remote=bool(address)) else None
    if address:
        ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
    else:
        # A local cluster gets more logical CPUs than a 2-core machine has, or the Train controller
        # and the workers wait on each other for a CPU forever. The dashboard (which serves the
        # State API that Train uses to free a stopped run's placement group) listens on localhost.
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True,
                 dashboard_host="127.0.0.1", logging_level="WARNING", runtime_env=runtime_env)
    stop_on_signals()  # ray.init replaced SIGTERM's handler with its own


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `signal` names which, for what a command records of its stop."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


# The signals received, latest last. Ray's waits turn the exception a handler raises into a plain
# KeyboardInterrupt, so which signal it was is kept here too.
_RECEIVED: list[str] = []


def signal_name(interrupt: KeyboardInterrupt) -> str:
    """"SIGINT (Ctrl-C)" or "SIGTERM": what stopped the command."""
    name = getattr(interrupt, "signal", None) or (_RECEIVED[-1] if _RECEIVED else "SIGINT")
    return f"{name} (Ctrl-C)" if name == "SIGINT" else name


def stop_on_signals() -> None:
    """SIGINT and SIGTERM (what a job scheduler sends) stop a command alike: an `Interrupted` that
    the command's own clean-up sees. Ray's driver handler for SIGTERM calls sys.exit inside
    whatever Ray call is waiting, which ends in SIGABRT and a C++ stack dump."""
    def interrupt(signum, _frame):
        _RECEIVED.append(signal.Signals(signum).name)
        raise Interrupted(_RECEIVED[-1])

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupt)


def wait_one(refs: list, between=None):
    """The first of `refs` to be ready. In short waits: a blocking ray.wait does not return to
    Python until a task ends, so Ctrl-C and SIGTERM would wait for it. `between()` is called
    after each wait (a progress view's redraw)."""
    import ray

    while True:
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
        if ready:
            return ready[0]
        if between is not None:
            between()


def fork_workers(remote: bool) -> bool:
    """Whether this job's Ray workers are forks of a preloaded server (captune.infra.forkserver, through
    captune.infra.fork_stand_in): on for a local cluster; on a running cluster only with
    CAPTUNE_FORK_WORKERS=1, as its nodes must have this project installed at this Python's path."""
    value = os.environ.get("CAPTUNE_FORK_WORKERS", "0" if remote else "1")
    if value not in ("0", "1"):
        raise ValueError(f"CAPTUNE_FORK_WORKERS={value!r}: use 1 (fork workers) or 0 (start them plainly)")
    return value == "1"


def root_cause(error: BaseException) -> str:
    """The last 'SomeError: message' line of a Ray error, which wraps the worker's traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Diverged", "Problems")) and " " not in head:
            return line
    return lines[-1] if lines else type(error).__name__


def require_resources(workers: int, cpus_per_worker: int, gpus_per_worker: float, address: str | None) -> None:
    """Refuse up front what the Ray cluster cannot hold: Ray would wait for it forever (a worker
    group that never starts). An autoscaling cluster may grow, so only a local one is refused
    for CPUs; GPUs are refused where there are none to wait for."""
    import ray

    have = ray.cluster_resources()
    need_cpus, need_gpus = workers * cpus_per_worker, workers * gpus_per_worker
    if not (address or os.environ.get("RAY_ADDRESS")) and need_cpus > have.get("CPU", 0):
        raise ClusterTooSmall(f"--workers {workers}: {workers} worker(s) x {cpus_per_worker} CPU need {need_cpus} CPUs; "
                          f"the local Ray cluster has {have.get('CPU', 0):g} ({os.cpu_count()} cores): use at most "
                          f"{int(have.get('CPU', 0) // cpus_per_worker)} workers, or a cluster (--address)")
    if need_gpus > have.get("GPU", 0) and not (address or os.environ.get("RAY_ADDRESS")):
        raise ClusterTooSmall(f"--workers {workers} --gpu: {workers} worker(s) x {gpus_per_worker:g} GPU need "
                          f"{need_gpus:g} GPUs; the local Ray cluster has {have.get('GPU', 0):g}")


class NotShared(UserError, ValueError):
    """A folder the job's tasks read or write on every node is this machine's alone."""


def require_seen_by_every_node(folders: dict[str, Path]) -> None:
    """Each of `folders` ({what: folder}) must be the same folder on every node of the cluster
    this process is attached to (a shared mount, or the same copy on each): a task on a node that
    does not see it would fail there, or write where the driver never looks (a sweep's --storage
    on the driver's own disk). Checked on each live node by a task pinned to it, before any work:
    the node must see a marker the driver writes in the folder, or, in a folder the driver may not
    write (a dataset), the same names."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probes, markers = {}, []
    try:
        for what, folder in folders.items():
            marker = folder / f".captune-seen-{uuid.uuid4().hex[:12]}"
            try:
                marker.write_bytes(b"")
                markers.append(marker)
                probes[what] = (str(folder), marker.name, None)
            except OSError:  # not ours to write: the node must see what the driver sees there
                probes[what] = (str(folder), None, sorted(p.name for p in folder.iterdir())[:200])
        nodes = [n for n in ray.nodes() if n["Alive"]]
        look = ray.remote(num_cpus=0, max_retries=0)(_unseen)
        refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            probes): n for n in nodes}
        faults = []
        for ref, node in refs.items():
            for what in ray.get(ref, timeout=120):
                faults.append(f"{what} {probes[what][0]} is not there on node {node['NodeManagerAddress']} "
                              f"({node['NodeID'][:12]})")
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    if faults:
        raise NotShared("; ".join(faults) + ": a folder that tasks on every node use must be the same there (a "
                                            "shared mount, or the same copy at the same path), or in object "
                                            "storage (s3://...)")


def _unseen(probes: dict[str, tuple[str, str | None, list | None]]) -> list[str]:
    """On one node: what of `probes` it does not see as the driver does."""
    unseen = []
    for what, (folder, marker, names) in probes.items():
        path = Path(folder)
        if marker is not None:
            seen = (path / marker).exists()
        else:
            seen = path.is_dir() and sorted(p.name for p in path.iterdir())[:200] == names
        if not seen:
            unseen.append(what)
    return unseen
