"""The sweep driver's look at the data before any trial starts: every image read once (a bad
dataset stops the sweep here), a frozen encoder's features built once (here, or by a Ray Data job
into shared storage), the vocabulary at the highest threshold a trial may draw, the disk the
checkpoints will take, and the GPUs a GPU sweep asks for."""
from __future__ import annotations

import os
import time

import ray
import torch
from ray.autoscaler.sdk import request_resources

from captune.infra import sizing

from captune.data.prepare import PreparedData, prepare_data
from captune.search.request import ArchSearch, SweepRequest
from captune.search.space import DEFAULT_FILE
from captune.trainables.config import ConfigError, TrainConfig
from captune.trainables.feature_job import FeatureSet, build_features
from captune.trainables.features import prepare_with_features
from captune.trainables.loop import checkpoint_size

FEATURE_KEYS = {"image_size", "encoder", "pretrained", "fine_tune", "seed"}  # what a feature cache depends on


def prepare(data_root: str, base: TrainConfig, features: bool, shared: str | None = None
            ) -> tuple[PreparedData, FeatureSet | None]:
    """Decode every image once, here: a bad dataset stops the sweep before any trial starts. A
    frozen encoder's features too (when the space leaves them fixed): with `shared` storage (a
    folder every node mounts, or object storage), found there or built into it by a Ray Data job
    across the cluster, and the trials read them from there, holding no image; else on a local cluster in one pass here, so the first trials
    start training at once instead of one encoding while the others wait on its lock. (On a
    cluster without shared storage each node builds its own copy, in a trial.)"""
    if features and not base.fine_tune and shared is not None:
        built = build_features(data_root, base, shared)
        return built.data, built
    cache_dir = base.cache_path()
    if features and not base.fine_tune:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return prepare_with_features(data_root, base, cache_dir, device)[0], None
    return prepare_data(data_root, base.image_size, cache_dir, skip_bad=base.skip_bad, seed=base.split_seed), None


def checkpoints_size(search: ArchSearch, data: PreparedData, trials: int) -> int:
    """What the search's trials keep on disk, two checkpoints each (its best and its latest), at
    the default configuration's size. A lower bound where the space reaches wider layers; not the
    widest corner, where a trial fails on memory before its disk, as a trial on its own."""
    return 2 * trials * checkpoint_size(search.base, len(data.vocabulary(search.base.vocab_threshold)))


def check_vocabulary(data: PreparedData, search: ArchSearch, config_file: str | None) -> None:
    """The highest vocabulary threshold a trial may draw must leave words to learn."""
    kind, args = search.space.searched.get("vocab_threshold", ("choice", [search.base.vocab_threshold]))
    highest = max(args) if kind == "choice" else args[1]
    try:
        data.vocabulary(highest)
    except ValueError as e:
        where = f"{config_file or DEFAULT_FILE} [{search.arch}]" if "vocab_threshold" in search.space.searched \
            else "the configuration"
        raise ConfigError(f"{where}: {e}") from None


def wait_for_gpus(req: SweepRequest) -> None:
    """A local cluster has its GPUs or none. An autoscaling cluster (cluster.yaml's GPU workers
    start at zero) is asked for one trial's worth and given CAPTUNE_GPU_WAIT_S (default 900 s)
    to add a GPU node before the sweep is refused."""
    def gpus() -> float:
        return ray.cluster_resources().get("GPU", 0)

    if gpus() > 0:
        return
    where = "the local Ray cluster has no GPU (torch sees none)"
    if sizing.attached(req.address):
        wait = float(os.environ.get("CAPTUNE_GPU_WAIT_S", "900"))
        print(f"waiting up to {wait:.0f}s for the autoscaler to add a GPU node ...", flush=True)
        request_resources(bundles=[{"GPU": req.gpus_per_worker}] * req.workers_per_trial)
        deadline = time.monotonic() + wait
        while gpus() == 0 and time.monotonic() < deadline:
            time.sleep(5)
        request_resources(bundles=[])  # from now on, pending trials drive the autoscaler
        if gpus() > 0:
            return
        where = f"the Ray cluster at {req.address or os.environ.get('RAY_ADDRESS')} has no GPU after {wait:.0f}s"
    raise ConfigError(f"--gpus-per-worker {req.gpus_per_worker}: {where}; leave the option out to train on CPUs")
