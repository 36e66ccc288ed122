"""What one rerun is (the image-blind control of a champion, or one seed replicate of it): a fixed
configuration trained again outside the search, found again by its key (its kind, configuration
and data), with its MLflow run and its checkpoints in the sweep's storage. The driver opens its run
(captune.search.reruns); a Ray task trains it on any node (captune.search.rerun)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from captune.infra import storage
from captune.infra.mlflow_names import ARCH_TAG, KIND_TAG, RERUN_KEY_TAG, SEED_TAG, SWEEP_TAG
from captune.trainables.config import TrainConfig, split_seed_of


@dataclass(frozen=True)
class RerunJob:
    kind: str  # "control" or "replicate"
    config: dict  # TrainConfig values
    data_root: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    run_name: str
    storage: str  # the sweep's storage (a folder every node sees, or s3://...): the rerun's checkpoints
    relay: object = None  # the driver's MLflow relay (captune.infra.mlflow_relay): how the task records
    also_score: str | None = None  # a model URI scored on the same test images (the champion)
    use_gpu: bool = False
    threads: int = 1
    echo_epochs: bool = True  # a line per epoch (a sweep's controls keep quiet unless --verbose)
    feature_set: str | None = None  # a manifest of shared features (captune.trainables.feature_job): no image read
    run_id: str | None = None  # its MLflow run, opened by run_reruns

    @property
    def key(self) -> str:
        """The rerun's identity: what it trains, and how."""
        what = json.dumps({"kind": self.kind, "config": self.config, "data": self.data_root}, sort_keys=True)
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    @property
    def checkpoints(self) -> str:
        """Where its checkpoints are kept while it trains (latest and best), for a resume."""
        return storage.join(self.storage, f"{self.sweep}-reruns", self.key)

    def tags(self) -> dict[str, str]:
        return {SWEEP_TAG: self.sweep, KIND_TAG: self.kind, ARCH_TAG: self.config["arch"],
                SEED_TAG: str(self.config["seed"]), RERUN_KEY_TAG: self.key, "mlflow.parentRunId": self.parent_run_id}


def replicate_jobs(train_config: dict, seeds: int, label: str, **fields) -> list[RerunJob]:
    """A configuration's seed replicates: trained with its own seed + 1 .. + `seeds` (a search's
    best trials are picked on their own seed, so it is left out; the same new seeds for every
    configuration, so they are compared seed by seed), on the validation and test images its own
    split seed drew. The same configuration gives the same jobs (their keys) wherever they are
    asked for: the sweep's choice of its champion and `captune compare --seeds` share them. `label`
    names the runs (`<label>-seed<N>`); `fields`: the rest of RerunJob's."""
    config = TrainConfig(**train_config).to_dict()
    config["split_seed"] = split_seed_of(train_config)  # a checkpoint from before split_seed drew it from seed
    first = int(config["seed"]) + 1
    return [RerunJob(kind="replicate", config={**config, "seed": seed}, run_name=f"{label}-seed{seed}", **fields)
            for seed in range(first, first + seeds)]
