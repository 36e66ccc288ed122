"""One sweep trial: a Tune function trainable that runs a Ray Train TorchTrainer.

`TuneReportCallback` forwards each epoch's report (metrics plus the checkpoint's path) to Tune,
so ASHA and Optuna see `bleu4` every epoch. The Train run is named after the trial, so a trial
restarted by `--resume` finds its own checkpoints and goes on from its last epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.config import TrainConfig
from trainables.ray_train import make_trainer


@dataclass(frozen=True)
class TrialSetup:
    base: dict  # TrainConfig values shared by all trials of one architecture
    data_root: str
    train_storage: str  # where each trial's Train run keeps its checkpoints
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1


def run_trial(config: dict, setup: TrialSetup) -> None:
    # Invalid combinations fail here, loudly: Tune records the trial as errored with this reason.
    cfg = TrainConfig(**{**setup.base, **config}).validate(f"trial config {config}")
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, setup.data_root, workers=setup.workers, use_gpu=setup.use_gpu,
                           gpus_per_worker=setup.gpus_per_worker, cpus=setup.cpus_per_worker,
                           name=f"trial-{trial_id}", storage_path=setup.train_storage, keep="last",
                           callbacks=[TuneReportCallback()])
    trainer.fit()


def trial_trainable(setup: TrialSetup):
    """The trainable Tune runs, holding no CPU itself (its Train workers reserve theirs)."""
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": 1})

