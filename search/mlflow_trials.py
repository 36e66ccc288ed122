"""MLflow bookkeeping of a sweep, done on the driver: a parent run per architecture search and a
child run per trial, found again by tag after a resume so that no trial is recorded twice."""
from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from captune.raycluster import root_cause

TRIAL_TAG, SWEEP_TAG, KIND_TAG, STATE_TAG = "captune.trial_id", "captune.sweep", "captune.kind", "captune.end_state"
NODE_TAG = "captune.node_id"  # the Ray node that ran the trial (its last epoch, after a restart)
LOGGED = ("loss", "bleu1", "bleu2", "bleu3", "bleu4", "epoch_seconds", "val_seconds", "setup_seconds",
          "vocab_size")


def find_or_create_run(client: MlflowClient, experiment_id: str, tags: dict[str, str], run_name: str,
                       extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The run carrying all `tags`, or a new one with them. Returns (run_id, created)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id, False
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **(extra_tags or {})})
    return run.info.run_id, True


class MlflowTrials(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, arch: str,
                 base: dict, max_epochs: int):
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.sweep, self.arch, self.base, self.max_epochs = sweep, arch, base, max_epochs
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.last_epoch: dict[str, int] = {}  # the last epoch logged to the trial's run

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state, for `--resume`.
        return {**self.__dict__, "_client": None}

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            run_id, created = find_or_create_run(
                self.client, self.experiment_id,
                {TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep, "arch": self.arch},
                run_name=f"{self.arch}-{trial.trial_id}",
                extra_tags={"mlflow.parentRunId": self.parent_run_id, KIND_TAG: "trial", STATE_TAG: "running"})
            if created:
                params = {**self.base, **trial.config, "arch": self.arch}
                self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
            else:  # found again after a resume: epochs logged before it are not logged twice
                history = self.client.get_metric_history(run_id, "bleu4")
                self.last_epoch[trial.trial_id] = max((m.step for m in history), default=0)
            self.runs[trial.trial_id] = run_id
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.client.set_tag(run_id, STATE_TAG, "running")
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id, step = self._run(trial), int(result.get("epoch", 0))
        if step <= self.last_epoch.get(trial.trial_id, 0):
            return  # a trial rerun from an older checkpoint than its run has seen
        self.last_epoch[trial.trial_id] = step
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in LOGGED if k in result]
        tags = [RunTag(NODE_TAG, str(result["node_id"]))] if "node_id" in result else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        epoch = self.last_epoch.get(trial.trial_id) or _last_epoch(trial)
        state = "finished" if epoch >= self.max_epochs else "early-stopped"
        self.client.set_tag(run_id, STATE_TAG, state)
        self.client.set_tag(run_id, "captune.epochs_run", str(epoch))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        reason = _error_text(trial)
        self.client.set_tag(run_id, STATE_TAG, "failed")
        self.client.set_tag(run_id, "captune.error", root_cause(Exception(reason))[:5000])
        self.client.set_terminated(run_id, "FAILED")


def _last_epoch(trial) -> int:
    return int((trial.last_result or {}).get("epoch", 0))


def _error_text(trial) -> str:
    try:
        path = trial.error_file
        if path:
            with open(path) as f:
                return f.read()
    except OSError:
        pass
    return str(trial.get_error() or "unknown error")
