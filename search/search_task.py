"""One architecture's search, in the Ray task the sweep driver starts for it: a Ray Tune run of
an Optuna sampler over the trials (captune.search.strategy: the GP by default, every trial trained
to the end, or ASHA stopping poor ones), recorded in MLflow, then its champion registered and its
image-blind control trained. torch stays out of this process until the champion is registered."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import optuna
import ray
from mlflow.entities import RunTag
from optuna.storages import RDBStorage
from ray import tune
from ray.tune import Checkpoint

from captune.infra.mlflow_logging import metric_entities, optional_step, unavailable
from captune.infra.mlflow_names import (ARCH_TAG, BEST_TRIAL_TAG, CHAMPION_TAG, CHAMPION_TRIAL_TAG, CHECKPOINT_TAG,
                                CONCURRENT_TAG, FAILED_TRIALS_TAG, NOTE_TAG, SEED_CHOICE_ERROR_TAG, SLOTS_TAG,
                                SWEEP_TAG, TRIAL_TAG, TRIALS_TAG, champion_record, champion_tags)
from captune.infra.mlflow_store import TrackingUnavailable, configure
from captune.infra.raycluster import root_cause
from captune.search.analysis import log_search_analysis
from captune.search.budget import set_deadline
from captune.search.convergence import CONVERGENCE_TAG, NOISE_METRIC, regret_bound
from captune.search.convergence import record as record_convergence
from captune.search.growth import earlier_results
from captune.search.mlflow_trials import MlflowTrials, rank_trial_runs, ranked_trial_runs
from captune.search.mlflow_view import run_path
from captune.search.objective import MODE, end_state, objective, sampler_seed
from captune.search.progress import ProgressEvents, held_back, note, quiet_libraries
from captune.search.request import ArchOutcome, SearchJob, optuna_url, resume_command
from captune.search.searcher import ResumableOptunaSearch
from captune.search.strategy import OutOfTime, analysis_epoch, make_sampler, sampler_line, scheduler_for, stopping_line
from captune.search.slots import SharedSlots, pool_name
from captune.search.trial import TrialSetup, trial_trainable
from captune.trainables.catalog import SCORE_LABELS, SCORES


def run_search(job: SearchJob) -> ArchOutcome:
    """One architecture's Tune search (a Ray task): Optuna, ASHA, MLflow, then its champion."""
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
    set_deadline(job.deadline)  # read by the searcher (Tune restores it from its snapshot: not handed it)
    if not req.verbose:
        quiet_libraries()
    arch = search.arch
    configure(job.tracking_uri)  # this process's mlflow library (registration uses it)
    client = mlflow.MlflowClient(job.tracking_uri)
    use_gpu = req.gpus_per_worker > 0
    setup = TrialSetup(base=job.trial_base(), data_root=str(Path(req.data_root).resolve()),
                       train_storage=f"{job.path}-train", workers=req.workers_per_trial, use_gpu=use_gpu,
                       gpus_per_worker=req.gpus_per_worker or 1.0, cpus_per_worker=job.cpus,
                       echo_epochs=req.verbose, relay=job.relay, experiment_id=job.experiment_id,
                       run_tags=((SWEEP_TAG, req.name), (ARCH_TAG, arch)), feature_set=job.feature_set,
                       deadline=job.deadline)
    trainable = trial_trainable(setup)
    progress = ProgressEvents(req.name, arch, list(search.space.searched), settings.max_epochs, settings.metric)
    if job.restore:
        progress.note(f"resuming {job.tune_path}")
        tuner = tune.Tuner.restore(job.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=search.space.to_tune())
    else:
        # A part after the first (--more-trials) loads the same study: its sampler is told every
        # earlier trial, the preset is not enqueued again (the study has it), and its seed is the
        # part's own, or a random sampler would draw the first part's configurations again. (Ray's
        # OptunaSearch loads an existing study of its name: tests/test_contracts.py says so first.)
        seed = sampler_seed(settings.seed, arch if not job.part else f"{arch}+{job.part}")
        searcher = ResumableOptunaSearch(max_epochs=settings.max_epochs, score=settings.metric,
                                         points_to_evaluate=[search.default_point],
                                         sampler=make_sampler(settings.sampler, seed, settings.sampler_args,
                                                              settings.trials),
                                         storage=RDBStorage(optuna_url(job.root, req.name)),
                                         study_name=job.experiment)
        scheduler = scheduler_for(settings)
        client.set_tag(job.parent_run_id, CONCURRENT_TAG, str(job.concurrent))
        limit = None
        if job.slots:
            client.set_tag(job.parent_run_id, SLOTS_TAG, str(job.slots))
            searcher = SharedSlots(searcher, req.name, arch, min(job.slots, job.trials), job.trials)
            at_once = f"{job.concurrent} at a time, more when the other searches leave slots free"
        else:
            limit, at_once = job.concurrent, f"up to {job.concurrent} at a time"
        if job.part:  # the sampler's start-up draws were the first run's
            told = len(optuna.load_study(study_name=job.experiment, storage=optuna_url(job.root, req.name)).trials)
            drawn = f"{job.trials} more trials, the sampler told the study's {told} earlier ones, {at_once}, " \
                    f"{settings.max_epochs} epochs at most"
        else:
            drawn = f"{job.trials} trials, {at_once}, {settings.max_epochs} epochs at most; {sampler_line(settings)}"
        progress.note(f"{drawn}; {stopping_line(settings)}; results in {job.tune_path}")
        tuner = tune.Tuner(
            trainable, param_space=search.space.to_tune(),
            tune_config=tune.TuneConfig(metric=objective(settings.metric), mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=job.trials, max_concurrent_trials=limit,
                                        # a reused actor (in-process trials) starts a trial in well
                                        # under a second; a DDP trial's actor is still tearing its
                                        # worker group down when the next one starts
                                        reuse_actors=setup.in_process),
            run_config=tune.RunConfig(
                name=job.tune_name, storage_path=job.root,
                stop=OutOfTime(),  # a trial whose epoch report says the time budget is spent stops there
                # a trial resumes from its last epoch and is registered by its best: Tune keeps
                # those two (the latest always); others are only disk (a fine-tuned ResNet-18's is
                # 138 MB with Adam's moments)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=settings.metric,
                                                        checkpoint_score_order=MODE),
                callbacks=[MlflowTrials(job.tracking_uri, job.experiment_id, job.parent_run_id, req.name, arch,
                                        setup.base, settings.max_epochs, setup.data_root,
                                        optuna_study=(optuna_url(job.root, req.name), job.experiment)), progress],
                verbose=None if req.verbose else 0,  # the driver shows progress (captune.search.progress)
                failure_config=tune.FailureConfig(max_failures=settings.max_failures, fail_fast=False)),
        )
    try:
        grid = tuner.fit()
    finally:  # ended or failed: its slots go to the other searches
        ray.get_actor(pool_name(req.name)).satisfied.remote(arch)
    try:
        results = [*earlier_results(job, trainable), *grid]  # the search's every trial, over its parts
        outcome = _finish(client, results, job)
        if req.control and outcome.champion:
            from captune.search.control import run_control  # (its scoring loads nltk: only when there is a champion)

            outcome.control = run_control(client, job, outcome)
        client.set_terminated(job.parent_run_id, "FINISHED" if outcome.best else "FAILED")
        return outcome
    except Exception as e:
        if not unavailable(e):
            raise
        raise TrackingUnavailable(
            f"MLflow at {job.tracking_uri} did not answer ({type(e).__name__}) when the {arch} search ended. Its "
            f"trials are done and kept in {job.tune_path}; once the server answers, `{resume_command(req)}` writes what "
            f"is missing and registers the champions without training again.") from None


def _finish(client, grid, job: SearchJob) -> ArchOutcome:
    # registration reads the checkpoint with torch: loaded here, as the search ends, not at the task's start
    from captune.search.registry import promote

    search, parent_id, req, settings = job.search, job.parent_run_id, job.req, job.settings
    metric, target = settings.metric, objective(settings.metric)
    scored = {r.metrics["trial_id"]: r for r in grid
              if r.error is None and r.metrics and target in r.metrics and not _diverged(r)}
    errors = sum(r.error is not None or _diverged(r) for r in grid)
    why = [r.metrics.get("diverged_reason") if _diverged(r) else root_cause(r.error) for r in grid
           if r.error is not None or _diverged(r)]
    outcome = ArchOutcome(search.arch, parent_id, None, len(grid), errors, states=_states(grid, settings.max_epochs),
                          first_error=why[0] if why else None)
    parent = client.get_run(parent_id)
    experiment_id, tags = parent.info.experiment_id, parent.data.tags
    ranked = ranked_trial_runs(client, experiment_id, req.name, search.arch, metric)
    candidates = [run for run in ranked if run.data.tags.get(TRIAL_TAG) in scored]  # the leaderboard's order
    _tag_checkpoints(client, candidates, scored)
    if candidates:
        champion_run = candidates[0]
        registered = next((r for r in candidates if r.data.tags[TRIAL_TAG] == tags.get(BEST_TRIAL_TAG)), None)
        if CHAMPION_TAG in tags and registered is not None and \
                registered.data.metrics.get(target, 0.0) >= champion_run.data.metrics.get(target, 0.0):
            champion_run = registered  # registered before (a resumed sweep): nothing better since, nothing new
        if req.seeds:  # the best mean over new seeds, not the best single trial (chosen alike on a resume)
            outcome.choice = _choice(client, job, candidates, scored)
            if outcome.choice:
                champion_run = next(r for r in candidates if r.info.run_id == outcome.choice.chosen.run_id)
        trial_id = champion_run.data.tags[TRIAL_TAG]
        top = scored[trial_id]
        outcome.best = {"trial_id": trial_id, "run_id": champion_run.info.run_id,
                        "metric": metric, "score": float(top.metrics[target]), "epoch": int(top.metrics["best_epoch"]),
                        "scores": {k: float(top.metrics[f"best_{k}"]) for k in SCORES if f"best_{k}" in top.metrics},
                        "config": top.config}
        if tags.get(BEST_TRIAL_TAG) == trial_id and CHAMPION_TAG in tags:
            # a resumed sweep whose search had already ended: registered before, not again
            outcome.champion = champion_record(tags, outcome.best["score"], metric)
        elif outcome.best["run_id"]:
            with _best_checkpoint(top).as_directory() as folder, held_back(not req.verbose):
                # (the checkpoint is downloaded when the storage is remote)
                outcome.champion = promote(client, search.arch, {**outcome.best, "checkpoint": Path(folder) / "model.pt"},
                                           req.data_root, job.feature_set)
            client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in champion_tags(outcome.champion).items()])
        # the best trial's best epoch, every score (the objective among them), on the search's run
        client.log_batch(parent_id, metrics=metric_entities({f"best_{k}": v for k, v in outcome.best["scores"].items()}))
        client.set_tag(parent_id, BEST_TRIAL_TAG, trial_id)
    client.set_tag(parent_id, TRIALS_TAG, str(len(grid)))
    client.set_tag(parent_id, FAILED_TRIALS_TAG, str(errors))
    rank_trial_runs(client, ranked, search.arch, req.name, (outcome.best or {}).get("run_id"), metric)
    client.set_tag(parent_id, NOTE_TAG, _search_note(outcome, experiment_id, req.name))
    # (the study's URL as the driver worked it out: this task may run where CAPTUNE_STORAGE is not set)
    study_url = optuna_url(job.root, req.name)
    log_search_analysis(client, parent_id, study_url, job.experiment,
                        list(search.space.searched), at_epoch=analysis_epoch(settings), metric=metric)
    outcome.convergence = _convergence(client, job, outcome.choice)
    return outcome


def _choice(client, job: SearchJob, candidates: list, scored: dict):
    """The champion chosen over seeds (captune.search.seed_choice); None, the reason on the parent
    run and the console, if its replicates failed: the top trial stands, and `--resume` tries again."""
    from captune.search.seed_choice import choose_over_seeds

    try:
        return choose_over_seeds(client, job, candidates, scored)
    except Exception as e:
        if unavailable(e):
            raise
        reason = root_cause(e)
        client.set_tag(job.parent_run_id, SEED_CHOICE_ERROR_TAG, reason[:5000])
        note(job.req.name, job.search.arch, f"WARNING: the choice over seeds failed ({reason}); the top trial is the "
                                            f"champion. `captune sweep --resume` tries again.")
        return None


def _convergence(client, job: SearchJob, choice) -> str | None:
    """Whether more trials could still gain (captune.search.convergence), on the parent run; set
    against the seed noise the choice over seeds measured, else the one this sweep measured before
    (a grown sweep), if any. An optional step."""
    req, settings, parent_id = job.req, job.settings, job.parent_run_id
    with optional_step("the convergence estimate", client, parent_id, CONVERGENCE_TAG):
        trials = optuna.load_study(study_name=job.experiment, storage=optuna_url(job.root, req.name)).get_trials(
            deepcopy=False)
        finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        more = f"{resume_command(req)} --more-trials {settings.trials}"
        bound = regret_bound(trials, sampler_seed(settings.seed, job.search.arch))
        if choice and choice.noise is not None:
            return record_convergence(client, parent_id, bound, choice.noise, finished, more, len(choice.seeds),
                                      len(choice.candidates))
        return record_convergence(client, parent_id, bound, client.get_run(parent_id).data.metrics.get(NOISE_METRIC),
                                  finished, more)
    return client.get_run(parent_id).data.tags.get(CONVERGENCE_TAG)


def _search_note(outcome: ArchOutcome, experiment_id: str, sweep: str) -> str:
    """The parent run's description in the MLflow UI (markdown)."""
    head = f"**{outcome.arch}** search of sweep `{sweep}`: {outcome.trials} trials, {outcome.errors} failed."
    if not outcome.best:
        why = outcome.no_model_text()
        return f"{head} {why[0].upper()}{why[1:]}."
    best, champion = outcome.best, outcome.champion or {}
    registered = (f" Registered as `{champion['name']}` version {champion['version']}"
                  + (", now the champion." if champion.get("promoted") else ", not the champion (the current one "
                     "scores higher on the same validation split).")) if champion else ""
    return (f"{head}\n\nBest: trial `{best['trial_id']}`, best validation {SCORE_LABELS[best['metric']]} "
            f"**{best['score']:.4f}** at epoch "
            f"{best['epoch']} ([its run]({run_path(experiment_id, best['run_id'])}), tagged "
            f"`{CHAMPION_TRIAL_TAG}`; the model and its figures are in that run's artifacts).{registered}\n\n"
            f"The leaderboard: this experiment's saved view \"captune leaderboard\" (the views menu at the top of "
            f"the runs page).")


def _states(grid, max_epochs: int) -> dict[str, int]:
    """How the search's trials ended: {end state: count} (captune.search.objective)."""
    states: dict[str, int] = {}
    for result in grid:
        state = end_state(result.metrics, max_epochs, errored=result.error is not None)
        states[state] = states.get(state, 0) + 1
    return states


def _diverged(result) -> bool:
    """A trial that diverged reports scores of 0 with the reason (captune.search.trial): not a candidate."""
    return bool((result.metrics or {}).get("diverged_reason"))


def _tag_checkpoints(client, runs: list, scored: dict) -> None:
    """Each scored trial's run names its best epoch's checkpoint (a path, or a URI when the storage
    is remote): what captune.search.speed measures once every search has ended. A trial whose
    checkpoint was not kept is left untagged (not measured, said then): the speed is optional, the
    search's results are not."""
    for run in runs:
        try:
            checkpoint = _best_checkpoint(scored[run.data.tags[TRIAL_TAG]])
        except RuntimeError:
            continue
        kind = checkpoint.filesystem.type_name
        where = checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
        if run.data.tags.get(CHECKPOINT_TAG) != where:
            client.set_tag(run.info.run_id, CHECKPOINT_TAG, where)


def _best_checkpoint(result):
    """The checkpoint of a trial's best epoch (`best_epoch`): for an in-process trial, one Tune
    kept by its validation metric (beside the latest); for a DDP trial, the Train run's, whose path
    TuneReportCallback reported with that epoch (on the same filesystem as Tune's storage)."""
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
