"""Optuna under Tune: told what really happened to each trial, and safe to resume after the sweep
driver was killed.

Ray's OptunaSearch tells the study COMPLETE with the last result for every trial that reported a
metric, so a trial ASHA stopped at epoch 3 reached TPE as a finished one. Here each trial is told
its end state (captune.search.objective): finished -> COMPLETE with its best BLEU-4; stopped by ASHA ->
PRUNED, its value the best BLEU-4 it reached (Optuna takes the last intermediate value, and the
intermediate value of epoch e is the best BLEU-4 up to e); diverged or failed -> FAIL.

The Optuna study lives in its own database and is always current; Tune's experiment snapshot,
which holds the searcher's map of Tune trials to Optuna trials, is saved every second or so. A
driver killed between the two leaves the snapshot behind the study: a trial the study has closed
may run again, and a trial the study handed out may be unknown to Tune.

Relies on OptunaSearch's private attributes (Ray 2.60): `_ot_trials` (Tune trial id -> optuna
Trial), `_ot_study`, `_points_to_evaluate`, `_study_name`, `_storage`, `_space`, `_completed_trials`,
and on `set_search_properties` enqueueing `_points_to_evaluate` into the study (again, on a
restore). The first test to break on an upgrade:
tests/test_contracts.py::test_ray_optuna_search_private_attributes_captune_searcher_relies_on.
"""
from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from captune.search.budget import out_of_time
from captune.search.objective import DIVERGED, EARLY_STOPPED, FAILED, FINISHED, OUT_OF_TIME, end_state, objective
from captune.search.warm_start import WARM_ATTR

OPTUNA_STATE = {FINISHED: TrialState.COMPLETE, EARLY_STOPPED: TrialState.PRUNED, OUT_OF_TIME: TrialState.PRUNED,
                DIVERGED: TrialState.FAIL, FAILED: TrialState.FAIL}
TRIAL_ATTR = "tune_trial_id"  # user attribute linking an Optuna trial to its Tune trial (and MLflow run)


class ResumableOptunaSearch(OptunaSearch):
    score = "bleu4"  # (a searcher pickled before the metric could be chosen searched BLEU-4)

    def __init__(self, *, max_epochs: int, score: str, **kwargs):
        """`score`: the sweep's metric ("bleu4", "cider"); Tune's metric is its objective, `target`."""
        super().__init__(**kwargs)
        self.max_epochs, self.score = max_epochs, score

    @property
    def target(self) -> str:
        return objective(self.score)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        # On `--resume` Tune sets the search properties again, and OptunaSearch would enqueue the
        # default configuration a second time: a study that exists already had its points.
        if not self._space and self._study_has_own_trials():
            self._points_to_evaluate = []
        done = super().set_search_properties(metric, mode, config, **spec)
        if done and self._ot_study is not None:
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still in 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self.target])  # Optuna Dashboard says best_bleu4, not "Objective 0"
        return done

    def _study_has_own_trials(self) -> bool:
        """The study holds trials of this search (not only another sweep's, told by --warm-start)."""
        if self._storage is None or self._study_name not in optuna.get_all_study_names(self._storage):
            return False
        study = optuna.load_study(study_name=self._study_name, storage=self._storage)
        return any(WARM_ATTR not in t.user_attrs for t in study.get_trials(deepcopy=False))

    def suggest(self, trial_id: str) -> dict | str | None:
        if out_of_time():  # the sweep's time budget is spent: no trial starts (captune.search.budget)
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if config is not None:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ATTR, trial_id)
        return config

    def _frozen(self, trial_id: str):
        """The study's current record of a trial (None for one this searcher never asked for)."""
        ot_trial = self._ot_trials.get(trial_id)
        return None if ot_trial is None else self._ot_study._storage.get_trial(ot_trial._trial_id)

    def _closed_in_study(self, trial_id: str) -> bool:
        frozen = self._frozen(trial_id)
        return frozen is not None and frozen.state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._closed_in_study(trial_id):  # closed: told already, before a resume
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        """The objective so far as the intermediate value of its epoch (Tune's training_iteration
        restarts its count when a trial is restored, the epoch does not), once per epoch."""
        if self.target not in result or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        if epoch in self._frozen(trial_id).intermediate_values:
            return
        self._ot_trials[trial_id].report(float(result[self.target]), epoch)
        self._ot_trials[trial_id].set_user_attr(f"{self.score}_epoch{epoch}", float(result[self.score]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        if self._closed_in_study(trial_id):
            return
        state = end_state(result, self.max_epochs, error)
        if result and state != FAILED:  # the result ASHA stopped a trial on reaches only this call
            self._report(trial_id, result)
        ot_state = OPTUNA_STATE[state]
        self._ot_trials[trial_id].set_user_attr("end_state", state)
        value = float(result[self.target]) if ot_state == TrialState.COMPLETE else None
        self._ot_study.tell(self._ot_trials[trial_id], value, state=ot_state)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Trials the study handed out after the snapshot was taken: no Tune trial will ever report
        # them. Close them as failed, so the study holds no trial that stays running forever.
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._ot_study._storage.set_trial_user_attr(frozen._trial_id, "captune_orphaned",
                                                            "asked just before the sweep driver died")
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
