"""`captune sweep`: per architecture, a Ray Tune search with Optuna (TPE) and ASHA that maximises
validation bleu4, recorded in MLflow, ending with the best model registered as a champion."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data.cache import default_cache_dir
from infra.mlflow_logging import param_entities, unavailable
from infra.mlflow_names import (ARCH_TAG, BEST_TRIAL_TAG, CHAMPION_TAG, CHAMPION_TRIAL_TAG, CONCURRENT_TAG,
                                FAILED_TRIALS_TAG, KIND_TAG, NOTE_TAG, SLOTS_TAG, STATE_TAG, STOP_TAG, SWEEP_TAG,
                                TRIAL_TAG, TRIALS_TAG, champion_record, champion_tags)
from infra.mlflow_store import (TrackingUnavailable, configure, default_tracking_uri, get_or_create_experiment,
                                require_answering_store, require_free_space, require_writable_store, writable_folder)
from infra.raycluster import init_ray, signal_name, wait_one
from search import sizing
from search.mlflow_trials import MlflowTrials, find_or_create_run, rank_trial_runs
from search.mlflow_view import run_path, save_leaderboard_view
from search.objective import EPOCH_METRIC, METRIC, MODE, sampler_seed
from search.progress import EventQueue, ProgressEvents, SweepView, held_back, queue_name, quiet_libraries
from search.space import SearchSpace, SweepSettings, load_spaces
from search.trial import TrialSetup, trial_trainable
from trainables.catalog import ARCHS
from trainables.config import ConfigError, TrainConfig, compose, preset_layers, replace

if TYPE_CHECKING:  # the search tasks import this module: the data code (and nltk) stays out of them
    from data.prepare import PreparedData


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
    storage: str | None = None  # None: default_storage()
    resume: bool = False
    control: bool = True  # after each search, train its champion's configuration image-blind
    tracking_uri: str | None = None
    address: str | None = None
    verbose: bool = False  # Tune's own output and every trial's epoch lines, not the driver's view


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
    best: dict | None  # {"trial_id", "run_id", "bleu4" (its best_bleu4), "epoch" (that epoch), "config"}
    trials: int
    errors: int
    champion: dict | None = None  # from search.registry.promote
    control: dict | None = None  # from search.control.run_control


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
        if not space.searched:  # Tune would fail later, after Ray and MLflow started, with "no search space"
            raise ConfigError(f"{source} [{arch}]: nothing to search: no key has a range or choices "
                              f"({{loguniform: [low, high]}}, {{choice: [...]}}, ...); give one a range, or train the "
                              f"single configuration with `captune train`")
        fixed_by_set = sorted(set(req.overrides) & set(space.searched))
        if fixed_by_set:  # a trial's drawn value would silently win over --set
            raise ConfigError(f"--set {', '.join(fixed_by_set)}: {source} searches {' and '.join(fixed_by_set)} for "
                              f"{arch}; to fix it, copy that file, give it a plain value there and pass the copy "
                              f"with --config")
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


def default_storage() -> str:
    """$CAPTUNE_STORAGE/sweeps (a cluster's one storage setting, see cluster.yaml), else a local folder."""
    shared = os.environ.get("CAPTUNE_STORAGE", "").rstrip("/")
    return f"{shared}/sweeps" if shared else "runs/sweeps"


def storage_root(storage: str | None) -> str:
    storage = storage or default_storage()
    return storage if "://" in storage else str(Path(storage).resolve())


def run_sweep(req: SweepRequest) -> list[ArchOutcome]:
    try:
        return _run_sweep(req)
    except Exception as e:
        if isinstance(e, TrackingUnavailable) or not unavailable(e):
            raise
        root = storage_root(req.storage)
        started = any(_can_restore(f"{root}/{req.name}-{arch}") for arch in req.archs)
        again = (f"results computed so far are kept under {root}: `{resume_command(req)}` once it answers" if started
                 else "nothing was trained: run the same command again once it answers")
        raise TrackingUnavailable(f"MLflow at {req.tracking_uri or default_tracking_uri()} did not answer "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); {again}") from None


@dataclass
class SearchJob:
    """One architecture's search, as the driver hands it to the task that runs it."""
    req: SweepRequest
    settings: SweepSettings
    search: ArchSearch
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    root: str
    cpus: int
    concurrent: int  # this search's share of the slots (all of them, when it runs alone)
    slots: int  # trial slots shared by the sweep's searches (search.slots); 0: `concurrent` is fixed
    restore: bool  # Tune's experiment state exists: resume it

    @property
    def experiment(self) -> str:
        return f"{self.req.name}-{self.search.arch}"

    @property
    def path(self) -> str:
        return f"{self.root}/{self.experiment}"


def _run_sweep(req: SweepRequest) -> list[ArchOutcome]:
    """Check and prepare everything here, then run the architectures' searches side by side, each
    in a Ray task of its own on this node: one search's last trials and champion registration
    overlap the other's trials instead of leaving cores idle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import mlflow

    settings, searches = plan(req)
    if not req.verbose:
        quiet_libraries()
    root = storage_root(req.storage)
    require_writable_store(req.tracking_uri)
    require_answering_store(req.tracking_uri)
    uri = configure(req.tracking_uri)
    client = mlflow.MlflowClient(uri)
    restorable = _check_name(client, uri, req, root, [search.arch for search in searches])
    experiment_id = get_or_create_experiment(req.name, uri)
    save_leaderboard_view(client, experiment_id)
    client.set_experiment_tag(experiment_id, NOTE_TAG, _experiment_note(req.name))
    init_ray(req.address)
    if req.gpus_per_worker > 0:
        _wait_for_gpus(req)
    cpus = sizing.cpus_per_worker(req.address, req.gpus_per_worker)
    # max_concurrent fixes each search's trials at once; else the searches share the cluster's slots
    slots = 0 if settings.max_concurrent else max(len(searches), sizing.concurrent_trials(
        req.address, req.workers_per_trial, req.gpus_per_worker, cpus))
    concurrent = settings.max_concurrent or slots // len(searches)
    space_needed = []
    for search in searches:  # every architecture's data checked before any run is recorded
        data = _prepare(req.data_root, search.base,
                        features=not _attached(req) and not (FEATURE_KEYS & set(search.space.searched)))
        _check_vocabulary(data, search, req.config_file)
        space_needed.append(_checkpoints_size(search, data, settings.trials))
    if "://" not in root:  # last of the checks: it creates the folder
        writable_folder(Path(root), "--storage")
        require_free_space([(Path(root), sum(space_needed), f"--storage (each trial keeps its best and its "
                                                                     f"latest checkpoint, {settings.trials} trials "
                                                                     f"per architecture, at the default sizes)")])
    jobs = []
    for search in searches:  # with --resume, a search that never started starts now
        parent_id = _parent_run(client, experiment_id, req, settings, search, root)
        jobs.append(SearchJob(req, settings, search, uri, experiment_id, parent_id, root, cpus,
                              min(settings.trials, concurrent), slots, restorable[search.arch]))
    if not all(job.restore for job in jobs):  # create the study database once, before the searches share it
        from optuna.storages import RDBStorage

        RDBStorage(optuna_url(root, req.name))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pool = _slot_pool(req.name, slots, [search.arch for search in searches])  # always: a resumed search may use it
    events = EventQueue.options(name=queue_name(req.name)).remote()
    view = SweepView(req.name, {job.search.arch: settings.trials for job in jobs},
                     {job.search.arch: job.concurrent for job in jobs})
    _show_finished_trials(view, client, experiment_id, req.name)

    def show_events() -> None:
        for event in ray.get(events.take.remote()):
            view.handle(event)
        view.tick()

    task = ray.remote(num_cpus=0, max_retries=0)(_run_search).options(scheduling_strategy=here)
    pending = {task.remote(job): job for job in jobs}
    outcomes, failures = {}, []
    try:
        while pending:  # wait for all: one search failing does not cut the other short
            ref = wait_one(list(pending), between=show_events)
            job = pending.pop(ref)
            try:
                outcomes[job.search.arch] = ray.get(ref)
            except Exception as e:
                failures.append(e)
        show_events()
    except KeyboardInterrupt as e:
        view.close()
        _stop(client, experiment_id, req, list(pending), signal_name(e))
        raise
    finally:
        ray.kill(pool)
        ray.kill(events)
    view.close()
    if failures:
        raise failures[0]
    return [outcomes[job.search.arch] for job in jobs]


def _stop(client, experiment_id: str, req: SweepRequest, searches: list, reason: str) -> None:
    """Ctrl-C or SIGTERM: end the searches now (their trials resume from their last epoch), then
    mark what the sweep left RUNNING in MLflow as KILLED with the reason; --resume reopens it."""
    import ray

    print(f"\ncaptune: {reason}: stopping sweep {req.name!r}; every finished epoch is kept", file=sys.stderr,
          flush=True)
    for ref in searches:
        ray.cancel(ref, force=True)  # the trials' actors end with the task that owns them
    ray.wait(searches, num_returns=len(searches), timeout=15)
    running = client.search_runs([experiment_id], max_results=10000,
                                 filter_string=f"tags.`{SWEEP_TAG}` = '{req.name}' and attributes.status = 'RUNNING'")
    for run in running:
        client.set_tag(run.info.run_id, STOP_TAG, reason)
        if run.data.tags.get(KIND_TAG) == "trial":
            client.set_tag(run.info.run_id, STATE_TAG, "interrupted")
        client.set_terminated(run.info.run_id, "KILLED")
    print(f"stopped: {len(running)} MLflow run(s) marked KILLED. To go on (nothing finished is redone): "
          f"{resume_command(req)}", file=sys.stderr, flush=True)


def resume_command(req: SweepRequest) -> str:
    """The command that goes on with this sweep."""
    q = shlex.quote
    words = ["captune sweep --name", q(req.name), "--data", q(req.data_root), "--resume"]
    if req.config_file:
        words += ["--config", q(req.config_file)]
    if sorted(req.archs) != sorted(ARCHS):
        words += ["--arch", q(",".join(req.archs))]
    for flag, value in (("--trials", req.trials), ("--epochs", req.epochs), ("--storage", req.storage),
                        ("--tracking-uri", req.tracking_uri), ("--address", req.address)):
        if value is not None:
            words += [flag, q(str(value))]
    words += [f"--set {q(f'{k}={v}')}" for k, v in req.overrides.items()]
    if req.workers_per_trial != 1:
        words += ["--workers-per-trial", str(req.workers_per_trial)]
    if req.gpus_per_worker:
        words += ["--gpus-per-worker", f"{req.gpus_per_worker:g}"]
    if not req.control:
        words.append("--no-control")
    return " ".join(words)


def _check_name(client, uri: str, req: SweepRequest, root: str, archs: list[str]) -> dict[str, bool]:
    """A sweep name means one sweep: its Tune results in one storage and its runs in one MLflow
    experiment. Returns, per architecture, whether Tune's state is there to resume."""
    restorable = {arch: _can_restore(f"{root}/{req.name}-{arch}") for arch in archs}
    experiment = client.get_experiment_by_name(req.name)
    parents = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{req.name}' and tags.`{KIND_TAG}` = 'search'")
    elsewhere = sorted({p.data.params["storage"] for p in parents if p.data.params.get("storage", root) != root})
    if elsewhere:
        raise SweepExists(f"sweep {req.name!r} already exists with its results in {elsewhere[0]} (MLflow at {uri}), "
                          f"not in {root}: pass --storage {elsewhere[0]} (the default, runs/sweeps, is relative to "
                          f"the folder you run from), or choose another --name")
    if not req.resume and (any(restorable.values()) or parents):
        where = ", ".join(f"{root}/{req.name}-{a}" for a, found in restorable.items() if found) or f"MLflow at {uri}"
        raise SweepExists(f"sweep {req.name!r} already has results ({where}): continue it with --resume, or choose "
                          f"another --name")
    if req.resume and not any(restorable.values()) and not parents:
        raise SweepExists(f"--resume: there is no sweep {req.name!r} to resume (nothing under {root}, nothing in "
                          f"MLflow at {uri}); leave out --resume to start it")
    return restorable


def _slot_pool(sweep: str, slots: int, archs: list[str]):
    from search.slots import create_pool

    try:
        return create_pool(sweep, slots or len(archs), archs)
    except ValueError as e:  # Ray: the name is taken
        raise SweepExists(f"a sweep named {sweep!r} is already running on this Ray cluster ({e}); wait for it, "
                          f"or choose another --name") from None


def _can_restore(path: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(path)


def _parent_run(client, experiment_id: str, req: SweepRequest, settings: SweepSettings, search: ArchSearch,
                root: str) -> str:
    arch, base = search.arch, search.base
    parent_id, created = find_or_create_run(client, experiment_id, {SWEEP_TAG: req.name, KIND_TAG: "search",
                                                                    "arch": arch}, run_name=f"{arch}-search")
    if created:
        client.log_batch(parent_id, params=param_entities({
            **{f"space.{k}": f"{kind}{args}" for k, (kind, args) in search.space.searched.items()},
            **{f"base.{k}": v for k, v in base.to_dict().items()}, **vars(settings),
            "data": str(Path(req.data_root).resolve()), "workers_per_trial": req.workers_per_trial,
            "gpus_per_worker": req.gpus_per_worker, "sampler_seed": sampler_seed(settings.seed, arch),
            "storage": root}))
    client.update_run(parent_id, status="RUNNING")
    if STOP_TAG in client.get_run(parent_id).data.tags:  # stopped before: it goes on now
        client.delete_tag(parent_id, STOP_TAG)
    return parent_id


def _run_search(job: SearchJob) -> ArchOutcome:
    """One architecture's Tune search (a Ray task): Optuna, ASHA, MLflow, then its champion."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    import mlflow
    from search.slots import pool_name

    # Snapshot Tune's experiment state every second (not every 10 s or more): a killed driver
    # then loses at most a second of it on --resume. An MLflow server that does not answer must
    # not hold the search for minutes per call (the client retries 7 times by default): the
    # trial callback holds records and retries itself.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Keeping one checkpoint per trial makes Tune snapshot after each (a few ms, local): so be it,
    # without its warning every epoch that snapshots are frequent (we ask for them every second).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    req, settings, search = job.req, job.settings, job.search
    if not req.verbose:
        quiet_libraries()
    arch, base = search.arch, search.base
    configure(job.tracking_uri)  # this process's mlflow library (registration uses it)
    client = mlflow.MlflowClient(job.tracking_uri)
    use_gpu = req.gpus_per_worker > 0
    setup = TrialSetup(base=base.to_dict(), data_root=str(Path(req.data_root).resolve()),
                       train_storage=f"{job.path}-train", workers=req.workers_per_trial, use_gpu=use_gpu,
                       gpus_per_worker=req.gpus_per_worker or 1.0, cpus_per_worker=job.cpus,
                       echo_epochs=req.verbose, tracking_uri=job.tracking_uri, experiment_id=job.experiment_id,
                       run_tags=((SWEEP_TAG, req.name), ("arch", arch)))
    trainable = trial_trainable(setup)
    progress = ProgressEvents(req.name, arch, list(search.space.searched), settings.max_epochs)
    if job.restore:
        progress.note(f"resuming {job.path}")
        tuner = tune.Tuner.restore(job.path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=search.space.to_tune())
    else:
        from optuna.storages import RDBStorage

        from search.searcher import ResumableOptunaSearch

        searcher = ResumableOptunaSearch(max_epochs=settings.max_epochs, points_to_evaluate=[search.default_point],
                                         seed=sampler_seed(settings.seed, arch),
                                         storage=RDBStorage(optuna_url(job.root, req.name)),
                                         study_name=job.experiment)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_epochs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
        client.set_tag(job.parent_run_id, CONCURRENT_TAG, str(job.concurrent))
        limit = None
        if job.slots:
            from search.slots import SharedSlots

            client.set_tag(job.parent_run_id, SLOTS_TAG, str(job.slots))
            searcher = SharedSlots(searcher, req.name, arch, min(job.slots, settings.trials), settings.trials)
            at_once = f"{job.concurrent} at a time, more when the other searches leave slots free"
        else:
            limit, at_once = job.concurrent, f"up to {job.concurrent} at a time"
        progress.note(f"{settings.trials} trials, {at_once}, {settings.max_epochs} epochs at most; "
                      f"results in {job.path}")
        tuner = tune.Tuner(
            trainable, param_space=search.space.to_tune(),
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=settings.trials, max_concurrent_trials=limit,
                                        # a reused actor (in-process trials) starts a trial in well
                                        # under a second; a DDP trial's actor is still tearing its
                                        # worker group down when the next one starts
                                        reuse_actors=setup.in_process),
            run_config=tune.RunConfig(
                name=job.experiment, storage_path=job.root,
                # a trial resumes from its last epoch and is registered by its best: Tune keeps
                # those two (the latest always); others are only disk (a fine-tuned ResNet-18's is
                # 138 MB with Adam's moments)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=EPOCH_METRIC,
                                                        checkpoint_score_order=MODE),
                callbacks=[MlflowTrials(job.tracking_uri, job.experiment_id, job.parent_run_id, req.name, arch,
                                        base.to_dict(), settings.max_epochs, setup.data_root,
                                        optuna_study=(optuna_url(job.root, req.name), job.experiment)), progress],
                verbose=None if req.verbose else 0,  # the driver shows progress (search.progress)
                failure_config=tune.FailureConfig(max_failures=settings.max_failures, fail_fast=False)),
        )
    try:
        grid = tuner.fit()
    finally:  # ended or failed: its slots go to the other searches
        ray.get_actor(pool_name(req.name)).satisfied.remote(arch)
    try:
        outcome = _finish(client, grid, search, job.parent_run_id, req, job.experiment, settings.grace_period)
        if req.control and outcome.champion:
            from search.control import run_control

            outcome.control = run_control(client, job, outcome)
        client.set_terminated(job.parent_run_id, "FINISHED" if outcome.best else "FAILED")
        return outcome
    except Exception as e:
        if not unavailable(e):
            raise
        raise TrackingUnavailable(
            f"MLflow at {job.tracking_uri} did not answer ({type(e).__name__}) when the {arch} search ended. Its "
            f"trials are done and kept in {job.path}; once the server answers, `{resume_command(req)}` writes what "
            f"is missing and registers the champions without training again.") from None


def _show_finished_trials(view: SweepView, client, experiment_id: str, sweep: str) -> None:
    """A resumed sweep's view starts from the trials that ended before (from MLflow)."""
    ended = client.search_runs([experiment_id], max_results=10000, order_by=["attributes.start_time ASC"],
                               filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'trial' and "
                                             f"attributes.status != 'RUNNING' and tags.`{STATE_TAG}` != 'interrupted'")
    for run in ended:
        if run.data.tags.get(ARCH_TAG) in view.archs:
            view.ended_before(run.data.tags[ARCH_TAG], run.data.tags[TRIAL_TAG], run.data.metrics.get("best_bleu4"),
                              int(run.data.metrics.get("best_epoch", 0)))


FEATURE_KEYS = {"image_size", "encoder", "pretrained", "fine_tune", "seed"}  # what a feature cache depends on


def _prepare(data_root: str, base: TrainConfig, features: bool) -> PreparedData:
    """Decode every image once, here: a bad dataset stops the sweep before any trial starts. On a
    local cluster, a frozen encoder's features too (when the space leaves them fixed), so the first
    trials start training at once instead of one encoding while the others wait on its lock."""
    import torch

    from data.prepare import prepare_data
    from trainables.features import prepare_with_features

    cache_dir = base.cache_path()
    if features and not base.fine_tune:  # (on a cluster each node builds its own copy, in a trial)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return prepare_with_features(data_root, base, cache_dir, device)[0]
    return prepare_data(data_root, base.image_size, cache_dir, skip_bad=base.skip_bad, seed=base.split_seed)


def _checkpoints_size(search: ArchSearch, data: PreparedData, trials: int) -> int:
    """What the search's trials keep on disk, two checkpoints each (its best and its latest), at
    the default configuration's size. A lower bound where the space reaches wider layers; not the
    widest corner, where a trial fails on memory before its disk, as a trial on its own."""
    from trainables.loop import checkpoint_size

    return 2 * trials * checkpoint_size(search.base, len(data.vocabulary(search.base.vocab_threshold)))


def _check_vocabulary(data: PreparedData, search: ArchSearch, config_file: str | None) -> None:
    """The highest vocabulary threshold a trial may draw must leave words to learn."""
    kind, args = search.space.searched.get("vocab_threshold", ("choice", [search.base.vocab_threshold]))
    highest = max(args) if kind == "choice" else args[1]
    try:
        data.vocabulary(highest)
    except ValueError as e:
        where = f"{config_file or 'search/spaces.yaml'} [{search.arch}]" if "vocab_threshold" in search.space.searched \
            else "the configuration"
        raise ConfigError(f"{where}: {e}") from None


def _finish(client, grid, search: ArchSearch, parent_id: str, req: SweepRequest, study_name: str,
            grace_period: int) -> ArchOutcome:
    from mlflow.entities import RunTag

    from search.analysis import log_search_analysis
    from search.registry import promote

    scored = [r for r in grid if r.error is None and r.metrics and METRIC in r.metrics and not _diverged(r)]
    errors = sum(r.error is not None or _diverged(r) for r in grid)
    outcome = ArchOutcome(search.arch, parent_id, None, len(grid), errors)
    parent = client.get_run(parent_id)
    experiment_id = parent.info.experiment_id
    if scored:
        top = max(scored, key=lambda r: r.metrics[METRIC])
        trial_id = top.metrics["trial_id"]
        runs = client.search_runs([experiment_id],
                                  filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        outcome.best = {"trial_id": trial_id, "run_id": runs[0].info.run_id if runs else None,
                        "bleu4": float(top.metrics[METRIC]), "epoch": int(top.metrics["best_epoch"]),
                        "config": top.config}
        tags = parent.data.tags
        if tags.get(BEST_TRIAL_TAG) == trial_id and CHAMPION_TAG in tags:
            # a resumed sweep whose search had already ended: registered before, not again
            outcome.champion = champion_record(tags, outcome.best["bleu4"])
        elif outcome.best["run_id"]:
            with _best_checkpoint(top).as_directory() as folder, held_back(not req.verbose):
                # (the checkpoint is downloaded when the storage is remote)
                outcome.champion = promote(client, search.arch, {**outcome.best, "checkpoint": Path(folder) / "model.pt"},
                                           req.data_root)
            client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in champion_tags(outcome.champion).items()])
        client.log_metric(parent_id, METRIC, outcome.best["bleu4"])
        client.set_tag(parent_id, BEST_TRIAL_TAG, trial_id)
    client.set_tag(parent_id, TRIALS_TAG, str(len(grid)))
    client.set_tag(parent_id, FAILED_TRIALS_TAG, str(errors))
    rank_trial_runs(client, experiment_id, req.name, search.arch, (outcome.best or {}).get("run_id"))
    client.set_tag(parent_id, NOTE_TAG, _search_note(outcome, experiment_id, req.name))
    log_search_analysis(client, parent_id, optuna_url(storage_root(req.storage), req.name), study_name,
                        list(search.space.searched), at_epoch=grace_period)
    return outcome


def _experiment_note(sweep: str) -> str:
    return (f"captune sweep `{sweep}`: per architecture a parent run (`captune.kind` = search) with a child run per "
            "trial (validation BLEU-4 per epoch; `best_bleu4` at `best_epoch` is what the search ranks and what the "
            "champion keeps), the champion's image-blind control, and the comparison on the test split.\n\n"
            "The leaderboard is the saved view \"captune leaderboard\" (the views menu at the top of the runs page): "
            "trials only, best first, with the searched parameters and charts. `captune leaderboard "
            f"{sweep}` prints it in a terminal.")


def _search_note(outcome: ArchOutcome, experiment_id: str, sweep: str) -> str:
    """The parent run's description in the MLflow UI (markdown)."""
    head = f"**{outcome.arch}** search of sweep `{sweep}`: {outcome.trials} trials, {outcome.errors} failed."
    if not outcome.best:
        return head + " No trial finished an epoch."
    best, champion = outcome.best, outcome.champion or {}
    registered = (f" Registered as `{champion['name']}` version {champion['version']}"
                  + (", now the champion." if champion.get("promoted") else ", not the champion (the current one "
                     "scores higher on the same validation split).")) if champion else ""
    return (f"{head}\n\nBest: trial `{best['trial_id']}`, best validation BLEU-4 **{best['bleu4']:.4f}** at epoch "
            f"{best['epoch']} ([its run]({run_path(experiment_id, best['run_id'])}), tagged "
            f"`{CHAMPION_TRIAL_TAG}`; the model and its figures are in that run's artifacts).{registered}\n\n"
            f"The leaderboard: this experiment's saved view \"captune leaderboard\" (the views menu at the top of "
            f"the runs page).")


def _diverged(result) -> bool:
    """A trial that diverged reports bleu4 0 with the reason (search.trial): not a candidate."""
    return bool((result.metrics or {}).get("diverged_reason"))


def _best_checkpoint(result):
    """The checkpoint of a trial's best epoch (`best_epoch`): for an in-process trial, one Tune
    kept by its bleu4 (beside the latest); for a DDP trial, the Train run's, whose path
    TuneReportCallback reported with that epoch (on the same filesystem as Tune's storage)."""
    from ray.tune import Checkpoint

    epoch = int(result.metrics["best_epoch"])
    for checkpoint, metrics in result.best_checkpoints or []:
        if int(metrics.get("epoch", -1)) == epoch:
            return checkpoint
    frame = result.metrics_dataframe
    if frame is not None and "checkpoint_path" in frame:
        rows = frame[(frame["epoch"] == epoch) & frame["checkpoint_path"].notna()]
        if len(rows):
            return Checkpoint(rows["checkpoint_path"].iloc[-1], filesystem=result.filesystem)
    raise RuntimeError(f"trial {result.metrics.get('trial_id')}: no checkpoint of its best epoch {epoch} was kept "
                       f"(under {result.path})")


def optuna_url(root: str, name: str) -> str:
    """The Optuna study's SQLite file sits beside the Tune results when those are on a local or
    mounted path; with s3:// results it stays on the driver's disk."""
    folder = Path(root) if "://" not in root else default_cache_dir() / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{name}-optuna.db'}"


def _wait_for_gpus(req: SweepRequest) -> None:
    """A local cluster has its GPUs or none. An autoscaling cluster (cluster.yaml's GPU workers
    start at zero) is asked for one trial's worth and given CAPTUNE_GPU_WAIT_S (default 900 s)
    to add a GPU node before the sweep is refused."""
    import time

    import ray

    def gpus() -> float:
        return ray.cluster_resources().get("GPU", 0)

    if gpus() > 0:
        return
    where = "the local Ray cluster has no GPU (torch sees none)"
    if _attached(req):
        from ray.autoscaler.sdk import request_resources

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


def _attached(req: SweepRequest) -> bool:
    return sizing.attached(req.address)
