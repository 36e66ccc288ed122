"""How many CPUs a training worker takes and how many trials (or reruns) run at once: the one
sizing rule for `captune train`, for sweeps and for the reruns after them."""
from __future__ import annotations

import os

# ray is imported inside the functions that read the cluster: the local rules need none of it.


def attached(address: str | None) -> bool:
    """Whether this job runs on an existing cluster (--address or RAY_ADDRESS) rather than a local one."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def cpus_per_worker_alone(workers: int) -> int:
    """A job alone on this machine (`captune train`): its workers split the cores (Ray sets each
    worker's thread count from this), at least one each."""
    return max(1, (os.cpu_count() or 1) // workers)


def cpus_per_worker(address: str | None, gpus_per_worker: float) -> int:
    """CPUs (and torch threads) per training worker. Locally: CPU trials get one core per worker,
    which beats fewer trials with more threads for models this small (two 1-thread trials on 2
    cores train 1.25x faster in total than one 2-thread trial); GPU trials split the cores
    between the trials that share the GPUs, to keep batches coming. On a cluster: 2 per CPU
    worker, 1 per GPU worker (its GPU does the work)."""
    if attached(address):
        return 1 if gpus_per_worker else 2
    cores = os.cpu_count() or 1
    if not gpus_per_worker:
        return 1
    import ray

    slots = max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
    return max(1, cores // slots)


def concurrent_trials(address: str | None, workers: int, gpus_per_worker: float, cpus: int) -> int:
    """As many trials as the cluster holds at once: by GPUs for GPU trials (fractions pack
    several on one GPU), else by CPUs: the real cores of this machine for a local cluster, whose
    logical CPU count is padded (see captune.infra.raycluster)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // (workers * gpus_per_worker)))
    cpus_total = resources.get("CPU", 1) if attached(address) else (os.cpu_count() or 1)
    return max(1, int(cpus_total // (workers * cpus)))
