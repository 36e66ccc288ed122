"""Ray Train: the per-worker function under a TorchTrainer, DDP over N workers (NCCL on GPUs,
gloo on CPUs)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from captune.infra.mlflow_logging import EpochLogger, system_metrics
from captune.infra.mlflow_relay import RelayClient
from captune.trainables.checkpoint import FILENAME, read_payload
from captune.trainables.config import TrainConfig
from captune.trainables.feature_job import load_feature_set
from captune.trainables.loop import WorkerContext, train
from captune.trainables.reporting import train_reporter


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` holds plain values only: the TrainConfig as a dict, the
    dataset folder, and where to log metrics in MLflow (rank 0 does)."""
    # One line per epoch from rank 0 is the progress report; Ray Train's per-report INFO lines
    # (the whole metrics dict, every epoch) would drown it.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # A failing worker's error reaches the driver with its traceback (TrainingFailedError), which
    # names a user's fault (a full disk, a diverged loss) in one line and prints the traceback of
    # anything else. Ray Train 2.60 also logs the traceback here, from this private logger; if it
    # is renamed, tests/test_interrupts.py::test_a_full_disk_is_named_and_loses_no_finished_epoch
    # sees the traceback again.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    cfg = TrainConfig(**config["train"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        logger = EpochLogger(RelayClient(config["relay"]), config["mlflow_run_id"])
    reporter = train_reporter(logger, deadline=config.get("deadline"))
    stop = config.get("stop_signal") and ray.get_actor(config["stop_signal"])
    ctx = WorkerContext(rank=rank, world_size=context.get_world_size(), device=ray.train.torch.get_device(),
                        reporter=reporter, wrap_model=ray.train.torch.prepare_model,
                        stop_requested=StopSignal.watch(stop))
    if not config.get("echo", True):
        ctx.echo = lambda line: None
    try:
        with _system_metrics(config.get("system_metrics"), context):
            data = load_feature_set(config["feature_set"], cfg.cache_path()) if config.get("feature_set") else None
            metrics = train_resuming(cfg, config["data_root"], ctx, _latest(ray.train.get_checkpoint(),
                                                                            config.get("resume_from")), data=data)
    finally:
        reporter.close(timeout=1)  # what is still unwritten, the driver writes from the history
    if stop and rank == 0 and "stopped_in_epoch" in metrics:
        ray.get(stop.stopped.remote())  # every epoch before is reported (and its checkpoint stored)


def _system_metrics(spec: dict | None, context):
    """One worker per machine (local rank 0) logs that machine's system metrics; named by node
    rank when the job spans machines."""
    if not spec or context.get_local_rank() != 0:
        return contextlib.nullcontext()
    spans_nodes = context.get_local_world_size() != context.get_world_size()
    return system_metrics(**spec, node_id=f"node{context.get_node_rank()}" if spans_nodes else None)


def _latest(reported, on_disk: str | None):
    """Of the checkpoint Ray restores (the last its controller recorded) and the newest complete
    one the driver found on disk, the later. The driver of a stopped job does not wait for the
    controller to finish (Ray Train's placement-group cleaner holds it up to 12 s), so its record
    may miss the last epoch; the checkpoint files never do."""
    if on_disk is None:
        return reported
    if reported is not None:
        with reported.as_directory() as folder:
            if read_payload(Path(folder) / FILENAME)["epoch"] >= read_payload(Path(on_disk) / FILENAME)["epoch"]:
                return reported
    return ray.train.Checkpoint.from_directory(on_disk)


@ray.remote(num_cpus=0)
class StopSignal:
    """A stop asked of a training job by its driver (Ctrl-C, SIGTERM), seen by every worker at its
    next step. Ray Train's own SIGINT handling aborts the workers, losing the epoch in progress and
    leaving the driver to find what was kept; this lets the loop end itself cleanly instead."""

    def __init__(self):
        self._set, self._stopped = asyncio.Event(), asyncio.Event()

    async def set(self) -> None:
        self._set.set()

    async def wait(self) -> bool:
        await self._set.wait()
        return True

    async def stopped(self) -> None:
        """Rank 0 has stopped: every epoch before the stop is reported."""
        self._stopped.set()

    async def wait_stopped(self) -> bool:
        await self._stopped.wait()
        return True

    @staticmethod
    def watch(handle):
        """A cheap `stop_requested` for the loop: whether the signal `handle` was set."""
        if not handle:
            return lambda: False
        waiting = handle.wait.remote()  # returns once set
        return lambda: bool(ray.wait([waiting], timeout=0)[0])


def train_resuming(cfg: TrainConfig, data_root: str, ctx: WorkerContext, checkpoint, data=None) -> dict:
    """`train`, going on from `checkpoint` (the last one reported: a Ray Train or a Ray Tune
    Checkpoint) when Ray restarted the run; None for a fresh start."""
    if checkpoint is None:
        return train(cfg, data_root, ctx, data=data)
    with checkpoint.as_directory() as folder:
        ctx.resume_from = Path(folder)
        return train(cfg, data_root, ctx, data=data)


def make_trainer(cfg: TrainConfig, data_root: str | Path, *, workers: int = 1, use_gpu: bool = False,
                 gpus_per_worker: float = 1.0, cpus: int = 1, name: str | None = None,
                 storage_path: str | None = None, max_failures: int = 0, keep: str = "best",
                 callbacks: list | None = None, relay=None,
                 mlflow_run_id: str | None = None, stop_signal: str | None = None,
                 resume_from: str | None = None, echo: bool = True,
                 system_metrics: dict | None = None, feature_set: str | None = None,
                 deadline: float | None = None) -> TorchTrainer:
    """keep="best": the two best checkpoints by validation `cfg.metric`, and the latest (which a restart
    goes on from); keep="last": only the latest. `stop_signal`: the name of a StopSignal actor the
    workers watch. `resume_from`: a checkpoint folder to go on from, if newer than Ray's. `echo`:
    rank 0 prints a line per epoch. `system_metrics`: captune.infra.mlflow_logging.system_metrics's arguments,
    for one worker per machine. `feature_set`: a manifest of shared features (captune.trainables.feature_job):
    the workers then read no image. `deadline`: a sweep trial's time budget's end
    (captune.trainables.reporting.Reporter)."""
    # The controller sees the workers' end (or a stop) at its next health check: every 0.5 s, not 2.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    resources = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "data_root": str(Path(data_root).resolve()),
                           "relay": relay, "mlflow_run_id": mlflow_run_id,
                           "stop_signal": stop_signal, "resume_from": resume_from, "echo": echo,
                           "system_metrics": system_metrics, "feature_set": feature_set, "deadline": deadline},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=cfg.metric,
                                                checkpoint_score_order="max") if keep == "best"
                               else CheckpointConfig(num_to_keep=1)),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=max_failures),
            # print() is left unpatched so that rank 0's epoch line appears once, not twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
