"""`captune sweep`: per architecture, a Ray Tune search with Optuna (TPE) and ASHA that maximises
validation bleu4, recorded in MLflow, ending with the best model registered as a champion."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from captune import tracking
from captune.raycluster import init_ray
from data.cache import default_cache_dir
from data.prepare import prepare_data
from search.mlflow_trials import KIND_TAG, SWEEP_TAG, MlflowTrials, find_or_create_run
from search.space import SearchSpace, SweepSettings, load_spaces
from search.trial import TrialSetup, trial_trainable
from trainables.config import ConfigError, TrainConfig, compose, preset_layers, replace
from trainables.models import ARCHS

METRIC, MODE = "bleu4", "max"


class SweepExists(ConfigError):
    """A sweep of that name exists and --resume was not given (or the reverse)."""


@dataclass
class SweepRequest:
    name: str
    data_root: str
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    trials: int | None = None  # None: the config file's
    epochs: int | None = None
    config_file: str | None = None
    overrides: dict = field(default_factory=dict)  # --set, applied to every trial
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0  # 0: CPU trials
    storage: str = "runs/sweeps"
    resume: bool = False
    tracking_uri: str | None = None
    address: str | None = None


@dataclass
class ArchSearch:
    arch: str
    space: SearchSpace
    base: TrainConfig
    default_point: dict


@dataclass
class ArchOutcome:
    arch: str
    parent_run_id: str
    best: dict | None  # {"trial_id", "run_id", "bleu4", "config", "checkpoint"}
    trials: int
    errors: int
    champion: dict | None = None  # from search.registry.promote


def plan(req: SweepRequest) -> tuple[SweepSettings, list[ArchSearch]]:
    """Everything checked before any trial starts: settings, spaces, every architecture's base
    configuration and that its defaults lie inside its space."""
    for arch in req.archs:
        if arch not in ARCHS:
            raise ConfigError(f"--arch: unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    settings, spaces = load_spaces(req.config_file)
    if req.trials is not None:
        settings.trials = req.trials
    if req.epochs is not None:
        settings.max_epochs = req.epochs
    settings.grace_period = min(settings.grace_period, settings.max_epochs)
    source = str(req.config_file or "search/spaces.yaml")
    searches = []
    for arch in req.archs:
        space = spaces[arch]
        base = compose(arch, preset_layers(req.data_root, arch) + [(f"{source} [{arch}]", space.fixed),
                                                                   ("--set", req.overrides)])
        base = replace(base, epochs=settings.max_epochs)
        for key in space.searched:  # each bound of the space must make a valid configuration
            kind, args = space.searched[key]
            for value in (args if kind == "choice" else args[:2]):
                try:
                    replace(base, **{key: value})
                except (ConfigError, TypeError) as e:
                    raise ConfigError(f"{source} [{arch}]: {key} value {value!r} is invalid: {e}") from None
        searches.append(ArchSearch(arch, space, base, space.default_point(base, f"{source} [{arch}]")))
    return settings, searches


def storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


def run_sweep(req: SweepRequest) -> list[ArchOutcome]:
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    settings, searches = plan(req)
    root = storage_root(req.storage)
    uri = tracking.configure(req.tracking_uri)
    experiment_id = tracking.experiment_id(req.name, uri)
    client = mlflow.MlflowClient(uri)
    init_ray(req.address)
    use_gpu = req.gpus_per_worker > 0
    if use_gpu and not _cluster_has("GPU"):
        raise ConfigError(f"--gpus-per-worker {req.gpus_per_worker}: the Ray cluster has no GPU")
    outcomes = []
    for search in searches:
        arch, base = search.arch, search.base
        # Decode every image once, here: a bad dataset stops the sweep before any trial starts.
        prepare_data(req.data_root, base.image_size, Path(base.cache_dir) if base.cache_dir else default_cache_dir(),
                     skip_bad=base.skip_bad, seed=base.seed)
        parent_id, created = find_or_create_run(client, experiment_id, {SWEEP_TAG: req.name, KIND_TAG: "search",
                                                                        "arch": arch}, run_name=f"{arch}-search")
        if created:
            client.log_batch(parent_id, params=_params({
                **{f"space.{k}": f"{kind}{args}" for k, (kind, args) in search.space.searched.items()},
                **{f"base.{k}": v for k, v in base.to_dict().items()}, **vars(settings),
                "data": str(Path(req.data_root).resolve()), "workers_per_trial": req.workers_per_trial,
                "gpus_per_worker": req.gpus_per_worker}))
        client.update_run(parent_id, status="RUNNING")
        experiment = f"{req.name}-{arch}"
        path = f"{root}/{experiment}"
        cpus = _cpus_per_worker(req)
        setup = TrialSetup(base=base.to_dict(), data_root=str(Path(req.data_root).resolve()),
                           train_storage=f"{root}/{experiment}-train", workers=req.workers_per_trial,
                           use_gpu=use_gpu, gpus_per_worker=req.gpus_per_worker or 1.0, cpus_per_worker=cpus)
        trainable = trial_trainable(setup)
        exists = tune.Tuner.can_restore(path)
        if exists and not req.resume:
            raise SweepExists(f"sweep {req.name!r} already has results for {arch} at {path}: "
                              f"continue it with --resume, or choose another --name")
        if exists:
            print(f"[{arch}] resuming {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       param_space=search.space.to_tune())
        else:
            from optuna.storages import RDBStorage
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(points_to_evaluate=[search.default_point], seed=settings.seed,
                                    storage=RDBStorage(_optuna_url(root, req.name)), study_name=experiment)
            scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_epochs,
                                      grace_period=settings.grace_period,
                                      reduction_factor=settings.reduction_factor)
            concurrent = min(settings.trials, settings.max_concurrent or
                             _max_concurrent(req.workers_per_trial, cpus, req.gpus_per_worker))
            print(f"[{arch}] {settings.trials} trials, up to {concurrent} at a time, "
                  f"{settings.max_epochs} epochs at most; results in {path}")
            tuner = tune.Tuner(
                trainable, param_space=search.space.to_tune(),
                tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                            num_samples=settings.trials, max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(
                    name=experiment, storage_path=root,
                    callbacks=[MlflowTrials(uri, experiment_id, parent_id, req.name, arch, base.to_dict(),
                                            settings.max_epochs)],
                    failure_config=tune.FailureConfig(fail_fast=False)),
            )
        grid = tuner.fit()
        outcomes.append(_finish(client, grid, search, parent_id, req))
    return outcomes


def _finish(client, grid, search: ArchSearch, parent_id: str, req: SweepRequest) -> ArchOutcome:
    from search.mlflow_trials import TRIAL_TAG
    from search.registry import promote

    scored = [r for r in grid if r.error is None and r.metrics and METRIC in r.metrics]
    errors = sum(r.error is not None for r in grid)
    outcome = ArchOutcome(search.arch, parent_id, None, len(grid), errors)
    if scored:
        top = max(scored, key=lambda r: r.metrics[METRIC])
        trial_id = top.metrics["trial_id"]
        runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        outcome.best = {"trial_id": trial_id, "run_id": runs[0].info.run_id if runs else None,
                        "bleu4": float(top.metrics[METRIC]), "config": top.config,
                        "checkpoint": str(Path(top.metrics["checkpoint_path"]) / "model.pt")}
        tags = client.get_run(parent_id).data.tags
        if tags.get("captune.best_trial") == trial_id and "captune.champion" in tags:
            # a resumed sweep whose search had already ended: registered before, not again
            outcome.champion = json.loads(tags["captune.champion"])
        elif outcome.best["run_id"]:
            outcome.champion = promote(client, search.arch, outcome.best, req.data_root)
            client.set_tag(parent_id, "captune.champion", json.dumps(outcome.champion))
        client.log_metric(parent_id, f"best_{METRIC}", outcome.best["bleu4"])
        client.set_tag(parent_id, "captune.best_trial", trial_id)
    client.set_tag(parent_id, "captune.trials", str(len(grid)))
    client.set_tag(parent_id, "captune.failed_trials", str(errors))
    client.set_terminated(parent_id, "FINISHED" if scored else "FAILED")
    return outcome


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _optuna_url(root: str, name: str) -> str:
    """The Optuna study's SQLite file sits beside the Tune results when those are on a local or
    mounted path; with s3:// results it stays on the driver's disk."""
    folder = Path(root) if "://" not in root else default_cache_dir() / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{name}-optuna.db'}"


def _cluster_has(resource: str) -> bool:
    import ray

    return ray.cluster_resources().get(resource, 0) > 0


def _cpus_per_worker(req: SweepRequest) -> int:
    if req.address or os.environ.get("RAY_ADDRESS"):
        return 1 if req.gpus_per_worker else 2
    from trainables.ray_train import cpus_per_worker

    return cpus_per_worker(req.workers_per_trial)


def _max_concurrent(workers: int, cpus: int, gpus_per_worker: float) -> int:
    """As many trials as the cluster holds at once: by GPUs for GPU trials (fractions pack
    several on one GPU), else by CPUs."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // (workers * gpus_per_worker)))
    return max(1, int(resources.get("CPU", 1) // (workers * cpus)))
