"""Optuna under Tune, made safe to resume after the sweep driver was killed.

The Optuna study lives in its own database and is always current; Tune's experiment snapshot,
which holds the searcher's map of Tune trials to Optuna trials, is saved every second or so. A
driver killed between the two leaves the snapshot behind the study: a trial the study has
closed may run again, and a trial the study handed out may be unknown to Tune.
"""
from __future__ import annotations

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    def _closed_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._closed_in_study(trial_id):  # a closed trial rerun after a resume: told already
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._closed_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

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
