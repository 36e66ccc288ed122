"""`captune sweep`, the driver: the sweep checked and its data prepared here, then one Ray task
per architecture (captune.search.search_task) run side by side on this node, their progress shown, and a
stop (Ctrl-C, SIGTERM) recorded so that `--resume` goes on."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
import ray
from optuna.storages import RDBStorage
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from captune.infra import sizing
from captune.infra.errors import UserError
from captune.infra.mlflow_logging import find_or_create_run, param_entities, unavailable
from captune.infra.mlflow_names import (ARCH_TAG, ERROR_TAG, KIND_TAG, NOTE_TAG, STATE_TAG, STOP_TAG,
                                        SWEEP_TAG, TRIAL_TAG)
from captune.infra.mlflow_relay import start_relay
from captune.infra.mlflow_store import (TrackingUnavailable, configure, default_tracking_uri, get_or_create_experiment,
                                record_dataset, require_answering_store, require_free_space, require_not_deleted,
                                require_writable_store, writable_folder)
from captune.infra.raycluster import init_ray, require_seen_by_every_node, root_cause, signal_name, wait_one
from captune.search.budget import announce_budget
from captune.search.growth import planned_trials, require_finished_searches, search_part
from captune.search.mlflow_view import experiment_note, save_leaderboard_view
from captune.search.objective import metric_of, objective, sampler_seed
from captune.search.preflight import FEATURE_KEYS, check_vocabulary, checkpoints_size, prepare, wait_for_gpus
from captune.search.progress import EventQueue, SweepView, queue_name, quiet_libraries
from captune.search.request import (ArchOutcome, ArchSearch, SearchJob, SweepExists, SweepRequest, optuna_url, plan,
                            resume_command, storage_root, sweep_seeds)
from captune.search.search_task import run_search
from captune.search.slots import create_pool
from captune.search.space import SweepSettings
from captune.search.speed import measure_after_searches
from captune.search.strategy import startup_trials
from captune.search.warm_start import tell_study, warm_trials
from captune.trainables import WORKER_PRELOAD
from captune.trainables.feature_job import shared_feature_folder


def run_sweep(req: SweepRequest, planned: tuple[SweepSettings, list[ArchSearch]] | None = None) -> list[ArchOutcome]:
    """The sweep `req` asks for; `planned`: captune.search.request.plan(req), when already made."""
    try:
        return _run_sweep(req, planned or plan(req))
    except Exception as e:
        if isinstance(e, TrackingUnavailable) or not unavailable(e):
            raise
        root = storage_root(req.storage)
        started = any(_can_restore(f"{root}/{req.name}-{arch}") for arch in req.archs)
        again = (f"results computed so far are kept under {root}: `{resume_command(req)}` once it answers" if started
                 else "nothing was trained: run the same command again once it answers")
        raise TrackingUnavailable(f"MLflow at {req.tracking_uri or default_tracking_uri()} did not answer "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); {again}") from None


def _run_sweep(req: SweepRequest, planned: tuple[SweepSettings, list[ArchSearch]]) -> list[ArchOutcome]:
    """Check and prepare everything here, then run the architectures' searches side by side, each
    in a Ray task of its own on this node: one search's last trials and champion registration
    overlap the other's trials instead of leaving cores idle."""
    settings, searches = planned
    if not req.verbose:
        quiet_libraries()
    root = storage_root(req.storage)
    require_writable_store(req.tracking_uri)
    require_answering_store(req.tracking_uri)
    uri = configure(req.tracking_uri)
    client = mlflow.MlflowClient(uri)
    restorable = _check_name(client, uri, req, root, [search.arch for search in searches], settings.metric)
    # what the earlier sweep's trials can tell each search, refused here if it cannot be used
    warm = {search.arch: warm_trials(client, req.warm_start, search, settings.metric) for search in searches
            if req.warm_start and not restorable[search.arch]}
    init_ray(req.address, preload=WORKER_PRELOAD)
    if req.gpus_per_worker > 0:
        wait_for_gpus(req)
    cpus = sizing.cpus_per_worker(req.address, req.gpus_per_worker)
    # max_concurrent fixes each search's trials at once; else the searches share the cluster's slots
    slots = 0 if settings.max_concurrent else max(len(searches), sizing.concurrent_trials(
        req.address, req.workers_per_trial, req.gpus_per_worker, cpus))
    concurrent = settings.max_concurrent or slots // len(searches)
    space_needed, feature_sets = [], {}
    shared = shared_feature_folder()
    for search in searches:  # every architecture's data checked before any run is recorded
        fixed = not (FEATURE_KEYS & set(search.space.searched))
        data, feature_sets[search.arch] = prepare(req.data_root, search.base, features=fixed and (
            shared is not None or not _attached(req)), shared=shared)
        check_vocabulary(data, search, req.config_file)
        space_needed.append(checkpoints_size(search, data, settings.trials))
    if "://" not in root:  # last of the checks: it creates the folder
        writable_folder(Path(root), "--storage")
        require_free_space([(Path(root), sum(space_needed), f"--storage (each trial keeps its best and its "
                                                                     f"latest checkpoint, {settings.trials} trials "
                                                                     f"per architecture, at the default sizes)")])
    if _attached(req):  # the trials, controls and replicates run on any node: so must what they read and write
        folders = {"--storage": Path(root)} if "://" not in root else {}
        if not all(feature_sets.values()):  # (trials reading shared features read no image)
            folders["the dataset"] = Path(req.data_root).resolve()
        for features in filter(None, feature_sets.values()):
            if "://" not in features.manifest:  # ($CAPTUNE_STORAGE a folder: on this machine only?)
                folders["the shared features"] = Path(features.manifest).parent
        require_seen_by_every_node(folders)
    experiment_id, parents = open_sweep_records(req, settings, searches, root)
    parts = {search.arch: search_part(client, req, settings, root, search.arch, parents[search.arch])
             for search in searches}
    # Trials, controls and replicates run on any node; MLflow is this node's (a loopback server, a
    # SQLite file): what they record goes through this relay (captune.infra.mlflow_relay).
    relay = start_relay(uri)
    deadline = announce_budget(req, settings, len(searches))  # counted from here, the searches about to start
    jobs = []
    for search in searches:
        features = feature_sets[search.arch]
        part, restore, trials = parts[search.arch]
        jobs.append(SearchJob(req, settings, search, uri, experiment_id, parents[search.arch], root, cpus,
                              min(trials, concurrent), slots, restore, deadline, part=part, trials=trials,
                              feature_set=features.manifest if features else None, relay=relay))
    if not all(job.restore for job in jobs):  # create the study database once, before the searches share it
        RDBStorage(optuna_url(root, req.name))
    for job in jobs:
        if job.search.arch in warm:  # (a search never run: its first part)
            tell_study(client, job, *warm[job.search.arch])
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pool = _slot_pool(req.name, slots, [search.arch for search in searches])  # always: a resumed search may use it
    events = EventQueue.options(name=queue_name(req.name)).remote()
    view = SweepView(req.name, {job.search.arch: planned_trials(client, job) for job in jobs},
                     {job.search.arch: job.concurrent for job in jobs}, metric=settings.metric, deadline=deadline)
    _show_finished_trials(view, client, experiment_id, req.name, settings.metric)

    def show_events() -> None:
        for event in ray.get(events.take.remote()):
            view.handle(event)
        view.tick()

    task = ray.remote(num_cpus=0, max_retries=0)(run_search).options(scheduling_strategy=here)
    pending = {task.remote(job): job for job in jobs}
    outcomes, failures = {}, {}
    try:
        while pending:  # wait for all: one search failing does not cut the other short
            ref = wait_one(list(pending), between=show_events)
            job = pending.pop(ref)
            try:
                outcomes[job.search.arch] = ray.get(ref)
            except Exception as e:
                failures[job.search.arch] = e
                if pending:
                    view.handle({"arch": job.search.arch, "kind": "note", "time": time.time(),
                                 "text": f"the search failed ({root_cause(e)}); the others go on"})
        show_events()
    except KeyboardInterrupt as e:
        view.close()
        _stop(client, experiment_id, req, list(pending), signal_name(e))
        raise
    finally:
        ray.kill(pool)
        ray.kill(events)
        ray.kill(relay)
    view.close()
    if any(o.champion for o in outcomes.values()):
        measure_after_searches(req, uri, here, {arch: f.manifest if f else None for arch, f in feature_sets.items()})
    if failures:
        _search_failed(client, experiment_id, req, failures)
    return [outcomes[job.search.arch] for job in jobs]


def open_sweep_records(req: SweepRequest, settings: SweepSettings, searches: list[ArchSearch],
                       root: str) -> tuple[str, dict[str, str]]:
    """What the sweep shares in MLflow, written here before its searches start, each once: the
    experiment, its saved view and description, the request's seeds, and per architecture its
    parent run with the dataset as its input (with --resume, a search that never started gets its
    parent now). Returns (experiment id, {arch: parent run id})."""
    uri = configure(req.tracking_uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = get_or_create_experiment(req.name, uri)
    sweep_seeds(client, experiment_id, req)  # remembered as the sweep starts; --resume without --seeds reads them
    save_leaderboard_view(client, experiment_id, settings.metric)
    client.set_experiment_tag(experiment_id, NOTE_TAG, experiment_note(req.name, settings.metric))
    return experiment_id, {search.arch: _parent_run(client, experiment_id, req, settings, search, root)
                           for search in searches}


class SweepFailed(UserError, RuntimeError):
    """A search of the sweep failed (its traceback was printed): what it finished is kept and
    `--resume` goes on. Not the user's doing as such, so the command exits 1, not 2."""
    exit_code = 1


def _search_failed(client, experiment_id: str, req: SweepRequest, failures: dict[str, Exception]) -> None:
    """A search task raised. One the user can act on (the store went away, a setting) is raised
    as it is; anything else: its traceback printed, the runs it left RUNNING marked FAILED with
    the reason, and a SweepFailed saying how to go on."""
    for error in failures.values():
        if isinstance(error, UserError):
            raise error
    for arch, error in failures.items():
        print(f"\n[{arch}] the search failed:\n{error}", file=sys.stderr, flush=True)
        _close_running(client, experiment_id, req, ERROR_TAG, f"the {arch} search failed: {root_cause(error)}",
                       "FAILED", arch)
    said = "; ".join(f"the {arch} search failed: {root_cause(error)}" for arch, error in failures.items())
    raise SweepFailed(f"{said} (traceback above). What it finished is kept and its MLflow runs that were running "
                      f"are marked FAILED; to go on (nothing finished is redone): {resume_command(req)}")


def _close_running(client, experiment_id: str, req: SweepRequest, tag: str, reason: str, status: str,
                   arch: str | None = None) -> int:
    """Mark the runs of the sweep (of one architecture, if given) left RUNNING as ended with
    `status`, `tag` saying why; a trial run's end state becomes "interrupted". --resume reopens
    what goes on."""
    query = f"tags.`{SWEEP_TAG}` = '{req.name}' and attributes.status = 'RUNNING'"
    if arch:
        query += f" and tags.`{ARCH_TAG}` = '{arch}'"
    running = client.search_runs([experiment_id], max_results=10000, filter_string=query)
    for run in running:
        client.set_tag(run.info.run_id, tag, reason)
        if run.data.tags.get(KIND_TAG) == "trial":
            client.set_tag(run.info.run_id, STATE_TAG, "interrupted")
        client.set_terminated(run.info.run_id, status)
    return len(running)


def _stop(client, experiment_id: str, req: SweepRequest, searches: list, reason: str) -> None:
    """Ctrl-C or SIGTERM: end the searches now (their trials resume from their last epoch), then
    mark what the sweep left RUNNING in MLflow as KILLED with the reason; --resume reopens it."""
    print(f"\ncaptune: {reason}: stopping sweep {req.name!r}; every finished epoch is kept", file=sys.stderr,
          flush=True)
    for ref in searches:
        ray.cancel(ref, force=True)  # the trials' actors end with the task that owns them
    ray.wait(searches, num_returns=len(searches), timeout=15)
    stopped = _close_running(client, experiment_id, req, STOP_TAG, reason, "KILLED")
    print(f"stopped: {stopped} MLflow run(s) marked KILLED. To go on (nothing finished is redone): "
          f"{resume_command(req)}", file=sys.stderr, flush=True)


def _check_name(client, uri: str, req: SweepRequest, root: str, archs: list[str], metric: str) -> dict[str, bool]:
    """A sweep name means one sweep: its Tune results in one storage, its runs in one MLflow
    experiment, one metric. Returns, per architecture, whether Tune's state is there to resume."""
    restorable = {arch: _can_restore(f"{root}/{req.name}-{arch}") for arch in archs}
    experiment = client.get_experiment_by_name(req.name)
    require_not_deleted(client, uri, experiment=experiment, what=f"sweep {req.name!r}",
                        hint=", or choose another --name (MLflow keeps a deleted experiment's name)")
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
    searched = sorted({metric_of(p.data.params) for p in parents} - {metric})
    if searched:
        raise SweepExists(f"sweep {req.name!r} maximises {searched[0]}, not {metric}: resume it with --metric "
                          f"{searched[0]} (or the config file it started with), or start a sweep of another --name")
    if req.resume and not any(restorable.values()) and not parents:
        raise SweepExists(f"--resume: there is no sweep {req.name!r} to resume (nothing under {root}, nothing in "
                          f"MLflow at {uri}); leave out --resume to start it")
    require_finished_searches(req, parents, archs)
    return restorable


def _slot_pool(sweep: str, slots: int, archs: list[str]):
    try:
        return create_pool(sweep, slots or len(archs), archs)
    except ValueError as e:  # Ray: the name is taken
        raise SweepExists(f"a sweep named {sweep!r} is already running on this Ray cluster ({e}); wait for it, "
                          f"or choose another --name") from None


def _can_restore(path: str) -> bool:
    return tune.Tuner.can_restore(path)


def _parent_run(client, experiment_id: str, req: SweepRequest, settings: SweepSettings, search: ArchSearch,
                root: str) -> str:
    arch, base = search.arch, search.base
    parent_id, created = find_or_create_run(client, experiment_id, {SWEEP_TAG: req.name, KIND_TAG: "search",
                                                                    ARCH_TAG: arch}, run_name=f"{arch}-search")
    if created:
        client.log_batch(parent_id, params=param_entities({
            **{f"space.{k}": f"{kind}{args}" for k, (kind, args) in search.space.searched.items()},
            **{f"base.{k}": v for k, v in base.to_dict().items()}, **vars(settings),
            "data": str(Path(req.data_root).resolve()), "workers_per_trial": req.workers_per_trial,
            "gpus_per_worker": req.gpus_per_worker, "sampler_seed": sampler_seed(settings.seed, arch),
            "sampler_startup_trials": settings.sampler_args.get("n_startup_trials", startup_trials(settings.trials)),
            "storage": root}))
    client.update_run(parent_id, status="RUNNING")
    parent = client.get_run(parent_id)
    for tag in (STOP_TAG, ERROR_TAG):  # stopped or failed before: it goes on now
        if tag in parent.data.tags:
            client.delete_tag(parent_id, tag)
    if not parent.inputs.dataset_inputs:
        # Here, before the searches start: MLflow adds the dataset to the experiment on its first
        # use, and two searches' first trials doing it at once clashed (a search failed).
        record_dataset(client, parent_id, req.data_root)
    return parent_id


def _show_finished_trials(view: SweepView, client, experiment_id: str, sweep: str, metric: str) -> None:
    """A resumed sweep's view starts from the trials that ended before (from MLflow)."""
    ended = client.search_runs([experiment_id], max_results=10000, order_by=["attributes.start_time ASC"],
                               filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'trial' and "
                                             f"attributes.status != 'RUNNING' and tags.`{STATE_TAG}` != 'interrupted'")
    for run in ended:
        if run.data.tags.get(ARCH_TAG) in view.archs:
            view.ended_before(run.data.tags[ARCH_TAG], run.data.tags[TRIAL_TAG], run.data.metrics.get(objective(metric)),
                              int(run.data.metrics.get("best_epoch", 0)))


def _attached(req: SweepRequest) -> bool:
    return sizing.attached(req.address)
