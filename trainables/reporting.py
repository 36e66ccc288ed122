"""Where a training job's epochs go: the one `Reporter` that `train` hands each epoch to.

Every job trains through it: a sweep's trial in its Tune actor, each rank of a DDP job under Ray
Train (a sweep's multi-worker trial, `captune train`), a control and a seed replicate. It fans
each epoch out, in this order, to
- `sink`: Ray's report with the epoch's checkpoint (`tune.report` in a trial, `ray.train.report`
  in a Train worker), which keeps the checkpoint and tells the search;
- `kept`: the checkpoint kept in the sweep's storage, latest and best, where no Ray keeps it (a
  control or a replicate runs as a Ray task);
- `mlflow`: the epoch's record in the job's MLflow run, named by `mlflow_epoch` and written by an
  EpochLogger from a thread of its own, held and retried while the store is away.
Kept before logged: MLflow never shows an epoch that a resume would train again.

A sweep's trials send their epochs to MLflow through the sink: the driver receives each as a
Tune result and writes it through its outbox (captune.search.mlflow_trials), which Tune's
experiment snapshot keeps across a driver's restart. `mlflow_epoch` names them there too, so an
epoch's `bleu4` lands at the same step under the same name whoever trained it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from captune.infra import storage
from captune.infra.mlflow_logging import EpochLogger
from captune.infra.storage import put_file
from captune.trainables.catalog import CHECKPOINT_FILE as FILENAME  # (checkpoint.py loads torch; this is the driver's too)
from captune.trainables.catalog import OUT_OF_TIME, SCORES

# What MLflow records of an epoch's report (captune.trainables.loop.train), at step = its epoch.
EPOCH_METRICS = ("loss", *SCORES, *(f"best_{k}" for k in SCORES), "best_epoch", "epoch_seconds", "val_seconds")
ONCE = ("setup_seconds", "vocab_size", "skipped_items")  # a run's constants: with its first recorded epoch only


def mlflow_epoch(metrics: dict, first: bool) -> dict[str, float]:
    """The values MLflow records of one epoch's report: every writer's names (a trial's, a
    rerun's, `captune train`'s, and the records completed after an outage)."""
    keys = EPOCH_METRICS + ONCE if first else EPOCH_METRICS
    return {k: float(metrics[k]) for k in keys if k in metrics}


@dataclass
class Reporter:
    sink: Callable[[dict, Path | None], None] | None = None  # (metrics, checkpoint folder or None)
    kept: KeptCheckpoints | None = None
    mlflow: EpochLogger | None = None
    node_id: str | None = None  # which node trained: every report names it (a trial's run shows it)
    deadline: float | None = None  # a sweep's time budget ends then (time.time()): reports say so after it

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """One epoch, from every rank (`checkpoint_dir` from rank 0 only)."""
        if self.node_id is not None:
            metrics = {**metrics, "node_id": self.node_id}
        if self.deadline is not None and time.time() >= self.deadline:
            metrics = {**metrics, OUT_OF_TIME: 1.0}
        if self.sink is not None:
            self.sink(metrics, checkpoint_dir)
        if self.kept is not None and checkpoint_dir is not None:
            self.kept.save(checkpoint_dir / FILENAME, best=metrics["best_epoch"] == metrics["epoch"])
        self._record(metrics)

    def replay(self, history: list[dict]) -> None:
        """Epochs a resumed job kept but never recorded (stopped between the two): to MLflow."""
        for metrics in history:
            self._record(metrics)

    def _record(self, metrics: dict) -> None:
        if self.mlflow is None:
            return
        # (its constants with the first epoch the run records; a resumed run's are there already)
        self.mlflow.log(int(metrics["epoch"]), mlflow_epoch(metrics, first=self.mlflow.queued == 0))

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for MLflow to take the records in hand (what it has not
        taken by then, the job's driver writes from the checkpoint's history)."""
        if self.mlflow is not None:
            self.mlflow.close(timeout)


def tune_reporter(deadline: float | None = None) -> Reporter:
    """A sweep trial's, training in its Tune actor (`deadline`: the sweep's time budget's end)."""
    import ray
    from ray import tune

    def to_tune(metrics: dict, checkpoint_dir: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)

    return Reporter(sink=to_tune, node_id=ray.get_runtime_context().get_node_id(), deadline=deadline)


def train_reporter(mlflow: EpochLogger | None, deadline: float | None = None) -> Reporter:
    """A Ray Train worker's (`mlflow`: rank 0's EpochLogger, when the job has a run of its own;
    `deadline`: a sweep trial's time budget's end)."""
    import ray
    import ray.train

    def to_train(metrics: dict, checkpoint_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir))
                         if checkpoint_dir else None)

    return Reporter(sink=to_train, mlflow=mlflow, node_id=ray.get_runtime_context().get_node_id(), deadline=deadline)


class KeptCheckpoints:
    """A job's latest and best checkpoints, kept in the sweep's storage (a folder every node
    sees, or object storage) so that a job stopped on one node goes on from there on any node.
    Each is written whole or not at all."""

    def __init__(self, location: str, scratch: Path):
        self.location, self.scratch = location, scratch

    def save(self, checkpoint: Path, best: bool) -> None:
        # best first: a stop between the two leaves a latest whose best epoch is in `best`
        for name in (*(("best",) if best else ()), "latest"):
            put_file(checkpoint, storage.join(self.location, name, FILENAME))

    def latest(self) -> Path | None:
        """The folder of the latest checkpoint, fetched into `scratch`; None before the first."""
        return self._fetch("latest")

    def best(self) -> Path:
        return self._fetch("best") / FILENAME

    def _fetch(self, name: str) -> Path | None:
        where = storage.join(self.location, name, FILENAME)
        if not storage.exists(where):
            return None
        folder = self.scratch / name
        folder.mkdir(exist_ok=True)
        storage.download(where, folder / FILENAME)
        return folder

    def remove(self) -> None:
        storage.remove_tree(self.location)
