"""One sweep trial: a Tune function trainable.

A single-worker trial trains right inside the Tune actor, which Tune reuses for the next trial
(`reuse_actors=True`), so a trial starts in well under a second: no worker group, no new process,
no re-import, no re-parsed dataset. A multi-worker trial runs a Ray Train `TorchTrainer` (DDP),
whose reports reach Tune through `TuneReportCallback`. Either way ASHA and Optuna see `bleu4`
every epoch, and a trial that Tune restarts (after a failure, or on `--resume`) goes on from its
last checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import tune

from captune.infra.mlflow_logging import system_metrics
from captune.infra.mlflow_relay import RelayClient
from captune.infra.mlflow_names import TRIAL_TAG
from captune.trainables.catalog import SCORES
from captune.trainables.config import TrainConfig

if TYPE_CHECKING:
    from captune.data.prepare import PreparedData

# torch, torchvision, nltk and the training code are imported where trials run (see _Entry), not
# on import: the search task that builds the trainable from this module neither waits for them nor
# holds them (benchmarks/RESULTS.md, section 2).


@dataclass(frozen=True)
class TrialSetup:
    base: dict  # TrainConfig values shared by all trials of one architecture
    data_root: str
    train_storage: str  # where a multi-worker trial's Train run keeps its checkpoints
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    echo_epochs: bool = False  # a line per epoch from each trial (`sweep --verbose`); else the driver's view
    relay: object = None  # the driver's MLflow relay (captune.infra.mlflow_relay): each trial adds its
    experiment_id: str | None = None  # machine's system metrics to its run (found by these tags)
    run_tags: tuple[tuple[str, str], ...] = ()
    feature_set: str | None = None  # a manifest of shared features: trials then read no image
    deadline: float | None = None  # the sweep's time budget ends then (captune.search.budget)

    def system_metrics(self) -> dict | None:
        """captune.infra.mlflow_logging.system_metrics's arguments for this trial's run, if runs are recorded."""
        if self.relay is None:
            return None
        tags = {**dict(self.run_tags), TRIAL_TAG: tune.get_context().get_trial_id()}
        return {"client": RelayClient(self.relay), "experiment_id": self.experiment_id, "run_tags": tags}

    @property
    def in_process(self) -> bool:
        return self.workers == 1

    def resources(self) -> dict:
        """What the Tune trial itself reserves. A DDP trial's function only waits on its Train
        workers, which reserve their own CPUs and GPUs."""
        if not self.in_process:
            return {"cpu": 0, "memory": 1}  # {"cpu": 0} alone is refused
        return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_worker if self.use_gpu else 0}


def run_trial(config: dict, setup: TrialSetup) -> None:
    # Invalid combinations fail here, loudly: Tune records the trial as errored with this reason.
    cfg = TrainConfig(**{**setup.base, **config}).validate(f"trial config {config}")
    if setup.in_process:
        with _system_metrics(setup.system_metrics()):
            _train_here(cfg, setup)
    else:
        _train_ddp(cfg, setup)


def _train_here(cfg: TrainConfig, setup: TrialSetup) -> None:
    import torch

    from captune.trainables.loop import Diverged, WorkerContext
    from captune.trainables.ray_train import train_resuming
    from captune.trainables.reporting import tune_reporter

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per saved checkpoint
    torch.set_num_threads(setup.cpus_per_worker)  # one thread per reserved core: trials share a node
    # Ray sets CUDA_VISIBLE_DEVICES to this trial's GPU, fractions included.
    device = torch.device("cuda") if setup.use_gpu else torch.device("cpu")

    ctx = WorkerContext(device=device, reporter=tune_reporter(setup.deadline))
    if not setup.echo_epochs:
        ctx.echo = lambda line: None
    data = _from_feature_set(setup.feature_set, cfg.cache_path()) if setup.feature_set else \
        _prepared(setup.data_root, cfg.image_size, cfg.cache_path(), cfg.skip_bad, cfg.split_seed)
    try:
        train_resuming(cfg, setup.data_root, ctx, tune.get_checkpoint(), data=data)
    except Diverged as e:
        # Not an error to retry (it would diverge again) but a result: worthless (every score 0) to
        # ASHA and Optuna, recorded in MLflow as diverged with the reason.
        ctx.reporter.report({"epoch": e.epoch, **{k: 0.0 for k in SCORES}, **{f"best_{k}": 0.0 for k in SCORES},
                             "diverged_reason": str(e)}, None)


def _system_metrics(spec: dict | None):
    return system_metrics(**spec) if spec else contextlib.nullcontext()


@functools.lru_cache(maxsize=2)
def _prepared(root: str, image_size: int, cache_dir: Path, skip_bad: bool, split_seed: int) -> PreparedData:
    """The checked dataset and its memory-mapped pixel cache, read once per reused trial actor
    (the sweep driver has already built the cache and stopped on any problem)."""
    from captune.data.prepare import prepare_data

    return prepare_data(root, image_size, cache_dir, skip_bad=skip_bad, seed=split_seed, progress=False)


@functools.lru_cache(maxsize=2)
def _from_feature_set(manifest: str, cache_dir: Path) -> PreparedData:
    from captune.trainables.feature_job import load_feature_set

    return load_feature_set(manifest, cache_dir)


def _train_ddp(cfg: TrainConfig, setup: TrialSetup) -> None:
    # The Train run is named after the trial, so a restarted trial finds its own checkpoints.
    from ray.tune.integration.ray_train import TuneReportCallback

    from captune.trainables.ray_train import make_trainer

    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, setup.data_root, workers=setup.workers, use_gpu=setup.use_gpu,
                           gpus_per_worker=setup.gpus_per_worker, cpus=setup.cpus_per_worker,
                           name=f"trial-{trial_id}", storage_path=setup.train_storage, keep="best",
                           callbacks=[TuneReportCallback()], echo=setup.echo_epochs,
                           system_metrics=setup.system_metrics(), feature_set=setup.feature_set,
                           deadline=setup.deadline)
    trainer.fit()


class _Entry:
    """What the trainable calls. Unpickled in a trial actor, as Ray creates the actor and before
    Tune starts a trial on it, it imports the training code (about 10 s in a new process), so a
    trial's start-up holds only its own work. The search task, which unpickles the trainable too
    (Tune's registry), has no actor id and skips the import."""

    def __reduce__(self):
        return _entry, ()

    def run(self, config: dict, setup: TrialSetup) -> None:
        run_trial(config, setup)


def _entry() -> _Entry:
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        import captune.trainables.loop  # noqa: F401
        import captune.trainables.ray_train  # noqa: F401
    return _Entry()



def trial_trainable(setup: TrialSetup):
    """A trainable named after its architecture. Tune registers trainables cluster-wide by name
    (tune.with_parameters included), so two searches running side by side under one name would
    share one setup: the last one registered."""
    arch = setup.base["arch"].replace("-", "_")
    entry = _Entry()

    def trainable(config: dict) -> None:
        entry.run(config, setup)

    trainable.__name__ = trainable.__qualname__ = f"trial_{arch}"
    return tune.with_resources(trainable, setup.resources())
