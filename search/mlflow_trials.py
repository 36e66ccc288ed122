"""MLflow bookkeeping of a sweep, done on the driver: a parent run per architecture search and a
child run per trial, found again by tag after a resume so that no trial is recorded twice.

Every record goes through an outbox: when the tracking server cannot be reached, the records wait
(in order, and in Tune's experiment snapshot, so a `--resume` still has them) while training goes
on, and are written once the server answers again. A record the store refuses (anything but an
outage, as captune.infra.mlflow_logging.unavailable tells them apart) fails the search at once.
"""
from __future__ import annotations

import os
import time

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState
from ray.tune import Callback

from captune.infra.mlflow_logging import find_or_create_run, unavailable
from captune.infra.mlflow_names import (ARCH_TAG, CHAMPION_TRIAL_TAG, EPOCHS_RUN_TAG, ERROR_TAG, KIND_TAG, LAST_RESTART_TAG,
                                NODE_TAG, NOTE_TAG, OPTUNA_TRIAL_TAG, RESTARTS_TAG, STATE_TAG, STOP_TAG, SWEEP_TAG,
                                TRIAL_TAG, trial_run_name)
from captune.infra.mlflow_store import record_dataset
from captune.infra.raycluster import root_cause
from captune.search.objective import DIVERGED, FAILED, end_state, objective, trial_order
from captune.search.searcher import TRIAL_ATTR
from captune.trainables.catalog import SCORE_LABELS
from captune.trainables.reporting import mlflow_epoch

RETRY_EVERY_S = 5.0


class MlflowTrials(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, arch: str,
                 base: dict, max_epochs: int, data_root: str | None = None,
                 optuna_study: tuple[str, str] | None = None):
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.sweep, self.arch, self.base, self.max_epochs = sweep, arch, base, max_epochs
        self.data_root = data_root
        self.optuna_study = optuna_study  # (storage URL, study name): each Optuna trial is linked to its run
        self._optuna_storage = None
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.last_epoch: dict[str, int] = {}  # the last epoch logged to the trial's run
        self.pending: list[tuple[str, str, dict]] = []  # (record kind, trial_id, payload), oldest first
        self.outage_since: float | None = None
        self.last_try = 0.0
        self.reconciled = False
        self.ended: set[str] = set()  # the trials whose end is recorded (or waiting in the outbox)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state, for `--resume`.
        return {**self.__dict__, "_client": None, "_optuna_storage": None}

    def __setstate__(self, state: dict) -> None:
        # (a callback pickled by an older captune lacks the attributes added since)
        self.__dict__.update({"data_root": None, "optuna_study": None, "ended": set(), **state})

    # Tune's events become records.
    def on_trial_start(self, iteration, trials, trial, **info):
        self._record("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = mlflow_epoch(result, first=True)  # (the constants dropped when written, unless first)
        self._record("result", trial, epoch=int(result.get("epoch", 0)), metrics=metrics,
                     node=str(result.get("node_id", "")))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record("restart", trial, reason=_error_text(trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._record("complete", trial, epoch=int(last.get("epoch", 0)), diverged=last.get("diverged_reason"),
                     state=end_state(last, self.max_epochs, errored=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record("error", trial, reason=_error_text(trial))

    def on_step_begin(self, iteration, trials, **info):
        if not self.reconciled and self._flush():
            self._mark_interrupted({t.trial_id for t in trials})
        elif self.pending and time.monotonic() - self.last_try >= RETRY_EVERY_S:
            self._flush()

    def on_experiment_end(self, trials, **info):
        # A trial Tune fails before it starts (an actor it could not reuse) reaches no callback:
        # recorded here, so that no failed trial is missing from MLflow.
        for trial in trials:
            if trial.status == "ERROR" and trial.trial_id not in self.ended:
                self._record("error", trial, reason=_error_text(trial))
        wait = float(os.environ.get("CAPTUNE_MLFLOW_WAIT_S", "120"))
        deadline = time.monotonic() + wait
        while not self._flush() and time.monotonic() < deadline:
            time.sleep(RETRY_EVERY_S)
        if self.pending:
            print(f"MLflow at {self.tracking_uri} still unreachable after {wait:.0f}s: {len(self.pending)} "
                  f"record(s) of the {self.arch} search are not written yet. They are kept with the sweep; "
                  f"`captune sweep --name {self.sweep} --resume` writes them once the server is back.", flush=True)

    # The outbox.
    def _record(self, kind: str, trial, **payload) -> None:
        self.pending.append((kind, trial.trial_id, {"config": dict(trial.config), **payload}))
        if kind in ("complete", "error"):
            self.ended.add(trial.trial_id)
        self._flush()

    def _flush(self) -> bool:
        """Write the waiting records in order; False when the server did not answer."""
        self.last_try = time.monotonic()
        while self.pending:
            kind, trial_id, payload = self.pending[0]
            try:
                self._write(kind, trial_id, payload)
            except Exception as e:
                if not unavailable(e):  # refused (a bad request, a bug here): loud, not retried forever
                    raise
                # the server is down, restarting or timing out, or SQLite is locked: keep the record
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    print(f"MLflow at {self.tracking_uri} unreachable ({type(e).__name__}); training goes on, "
                          f"records are held and written when it answers", flush=True)
                return False
            self.pending.pop(0)
        if self.outage_since is not None:
            print(f"MLflow reachable again after {time.monotonic() - self.outage_since:.0f}s; held records written",
                  flush=True)
            self.outage_since = None
        return True

    def _write(self, kind: str, trial_id: str, p: dict) -> None:
        run_id = self._run(trial_id, p["config"])
        client = self.client
        if kind == "start":  # also a trial going on after the sweep was stopped: reopened
            client.set_tag(run_id, STATE_TAG, "running")
            client.update_run(run_id, status="RUNNING")
            if STOP_TAG in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, STOP_TAG)
        elif kind == "result":
            if p["epoch"] <= self.last_epoch.get(trial_id, 0):
                return  # a trial rerun from an older checkpoint than its run has seen
            now = int(time.time() * 1000)
            first = self.last_epoch.get(trial_id, 0) == 0
            metrics = mlflow_epoch(p["metrics"], first)
            client.log_batch(run_id, metrics=[Metric(k, v, now, p["epoch"]) for k, v in metrics.items()],
                             tags=[RunTag(NODE_TAG, p["node"])] if p["node"] else [])
            self.last_epoch[trial_id] = p["epoch"]
        elif kind == "restart":
            restarts = int(client.get_run(run_id).data.tags.get(RESTARTS_TAG, "0")) + 1
            client.set_tag(run_id, RESTARTS_TAG, str(restarts))
            client.set_tag(run_id, LAST_RESTART_TAG, root_cause(Exception(p["reason"]))[:5000])
        elif kind == "complete":
            epoch = max(p["epoch"], self.last_epoch.get(trial_id, 0))
            client.set_tag(run_id, EPOCHS_RUN_TAG, str(epoch))
            client.log_metric(run_id, "epochs_run", epoch)
            if p["state"] == DIVERGED:
                self._end(run_id, DIVERGED, "FAILED", str(p["diverged"]))
            else:
                self._end(run_id, p["state"], "FINISHED")
        elif kind == "error":
            self._end(run_id, FAILED, "FAILED", root_cause(Exception(p["reason"])))

    def _end(self, run_id: str, state: str, status: str, error: str | None = None) -> None:
        """A trial run's end: its captune.end_state, the reason when it did not finish, its MLflow status."""
        self.client.set_tag(run_id, STATE_TAG, state)
        if error:
            self.client.set_tag(run_id, ERROR_TAG, error[:5000])
        self.client.set_terminated(run_id, status)

    def _run(self, trial_id: str, config: dict) -> str:
        """The trial's run, created, or found again after a resume or after a write that failed
        half-way (its setup is completed: each step below is skipped once done)."""
        if trial_id not in self.runs:
            run_id, created = find_or_create_run(
                self.client, self.experiment_id, {TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep, ARCH_TAG: self.arch},
                run_name=trial_run_name(self.arch, config),
                extra_tags={"mlflow.parentRunId": self.parent_run_id, KIND_TAG: "trial", STATE_TAG: "running"})
            run = None if created else self.client.get_run(run_id)
            if created or not run.data.params:
                params = {**self.base, **config, "arch": self.arch}
                self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
            if self.data_root and (created or not run.inputs.dataset_inputs):
                record_dataset(self.client, run_id, self.data_root)
            if created or OPTUNA_TRIAL_TAG not in run.data.tags:
                self._link_optuna_trial(trial_id, run_id, trial_run_name(self.arch, config))
            if not created:  # epochs logged before are not logged twice
                history = self.client.get_metric_history(run_id, "bleu4")
                self.last_epoch[trial_id] = max((m.step for m in history), default=0)
            self.runs[trial_id] = run_id
        return self.runs[trial_id]

    def _link_optuna_trial(self, trial_id: str, run_id: str, run_name: str) -> None:
        """The Optuna trial asked for `trial_id` names its MLflow run (Optuna Dashboard shows a
        trial's user attributes), and the run its Optuna trial's number. Linked while the Optuna
        trial runs: a finished one can no longer be changed (a record written after an outage)."""
        if not self.optuna_study:
            return
        url, study_name = self.optuna_study
        if self._optuna_storage is None:
            self._optuna_storage = optuna.storages.RDBStorage(url)
        storage = self._optuna_storage
        study_id = storage.get_study_id_from_name(study_name)
        for frozen in storage.get_all_trials(study_id, deepcopy=False):
            if frozen.user_attrs.get(TRIAL_ATTR) == trial_id:
                if frozen.state == TrialState.RUNNING:
                    optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
                    for key, value in (("mlflow_run_id", run_id), ("mlflow_run_name", run_name),
                                       ("mlflow_experiment_id", self.experiment_id)):
                        storage.set_trial_user_attr(optuna_id, key, value)
                self.client.set_tag(run_id, OPTUNA_TRIAL_TAG, str(frozen.number))
                return

    def _mark_interrupted(self, known: set[str]) -> None:
        """After a resume: a run whose trial Tune's last snapshot never held (the driver died in the
        second between that trial's start and the next snapshot) will never go on; say so."""
        self.reconciled = True
        runs = self.client.search_runs(
            [self.experiment_id], max_results=10000,
            filter_string=f"tags.`{SWEEP_TAG}` = '{self.sweep}' and tags.`{ARCH_TAG}` = '{self.arch}' and "
                          f"tags.`{KIND_TAG}` = 'trial' and tags.`{STATE_TAG}` = 'running'")
        for run in runs:
            if run.data.tags[TRIAL_TAG] not in known:
                self._end(run.info.run_id, "interrupted", "KILLED",
                          "the sweep driver was killed before Tune saved this trial; it was not resumed")


def _error_text(trial) -> str:
    try:
        path = trial.error_file
        if path:
            with open(path) as f:
                return f.read()
    except OSError:
        pass
    return str(trial.get_error() or "unknown error")


def ranked_trial_runs(client: MlflowClient, experiment_id: str, sweep: str, arch: str, metric: str) -> list:
    """A search's trial runs in the sweep's one order (captune.search.objective.trial_order), best first."""
    runs = client.search_runs([experiment_id], max_results=10000,
                              filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ARCH_TAG}` = '{arch}' and "
                                            f"tags.`{KIND_TAG}` = 'trial'")
    return sorted(runs, key=lambda run: trial_order(run, metric))


def rank_trial_runs(client: MlflowClient, runs: list, arch: str, sweep: str, champion_run_id: str | None,
                    metric: str) -> None:
    """After a search: each trial run of `runs` (ranked_trial_runs) renamed with its rank and, if
    it did not finish, its end state (trial_run_name); its champion tagged as such."""
    target = objective(metric)
    for rank, run in enumerate(runs, 1):
        name = trial_run_name(arch, {k: _number(v) for k, v in run.data.params.items()}, rank,
                              run.data.tags.get(STATE_TAG))
        if run.info.run_name != name:
            client.update_run(run.info.run_id, name=name)
        if run.info.run_id == champion_run_id:
            client.set_tag(run.info.run_id, CHAMPION_TRIAL_TAG, "true")
            client.set_tag(run.info.run_id, NOTE_TAG, (
                f"The champion trial of the **{arch}** search of sweep `{sweep}`: best validation "
                f"{SCORE_LABELS[metric]} {run.data.metrics.get(target, float('nan')):.4f} at epoch "
                f"{int(run.data.metrics.get('best_epoch', 0))}. That epoch's model is registered (Registered "
                f"models) and, with its vocabulary, configuration, learning curves and validation examples, "
                f"in Artifacts › champion."))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
