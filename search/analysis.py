"""Which hyperparameters mattered in a search, from its Optuna study, logged on the search's
parent run: `importance_<param>` metrics (Optuna's fANOVA importances, seeded) and three charts
under `search_analysis/` (importances, optimization history, parallel coordinates).

What they explain: each trial's objective (its best validation score in the sweep's metric) by one
epoch every trial reaches (captune.search.strategy.analysis_epoch): the last when every trial is
trained to the end, ASHA's grace period when ASHA stops trials. Finished trials alone would then be
few (ASHA stops about half) and chosen by how they began; a stopped trial's final value is a
truncated score. At one epoch for all, every trial counts and each counts alike. With fewer than MIN_TRIALS
such trials an importance says nothing: none is logged, and the tag `captune.importance_note` says
how many it needs.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import matplotlib
import optuna
from optuna.trial import TrialState

from captune.infra.mlflow_logging import metric_entities, optional_step
from captune.infra.mlflow_names import CHART_NOTE_PREFIX, IMPORTANCE_BASIS_TAG, IMPORTANCE_NOTE_TAG, IMPORTANCE_PREFIX
from captune.search.objective import DEFAULT_METRIC
from captune.trainables.catalog import SCORE_LABELS

# matplotlib is imported where a figure is drawn, after its Agg backend is chosen.

matplotlib.use("Agg")  # a Ray worker has no display

MIN_TRIALS = 5


def log_search_analysis(client, parent_id: str, storage_url: str, study_name: str, params: list[str],
                        at_epoch: int, metric: str = DEFAULT_METRIC) -> dict:
    """The importances logged (none when too few trials reached `at_epoch` or they all scored
    alike), as {param: importance}. Optional: whatever fails here is recorded on the parent as
    `captune.importance_note` and the search's end goes on."""
    with optional_step("the search's analysis", client, parent_id, IMPORTANCE_NOTE_TAG):
        return _analyse(client, parent_id, storage_url, study_name, params, at_epoch, metric)
    return {}


def _analyse(client, parent_id: str, storage_url: str, study_name: str, params: list[str], at_epoch: int,
             metric: str) -> dict:
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    at = at_epoch_study(study, at_epoch)
    target = f"best validation {SCORE_LABELS[metric]} by epoch {at_epoch}"
    values = {t.value for t in at.trials}
    importances: dict = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="captune-analysis-") as tmp:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        charts = []
        if at.trials:
            charts.append(("optimization_history.png", lambda: optuna.visualization.matplotlib.plot_optimization_history(
                at, target_name=target)))
        if len(at.trials) >= 2 and params:
            charts.append(("parallel_coordinates.png", lambda: optuna.visualization.matplotlib.plot_parallel_coordinate(
                at, params=params, target_name=target)))
        if len(at.trials) < MIN_TRIALS or not params:
            client.set_tag(parent_id, IMPORTANCE_NOTE_TAG, f"needs at least {MIN_TRIALS} trials that reached epoch "
                                                           f"{at_epoch}; this search has {len(at.trials)}")
        elif len(values) == 1:  # fANOVA cannot split a constant (it raises): nothing to explain
            client.set_tag(parent_id, IMPORTANCE_NOTE_TAG, f"all {len(at.trials)} trials that reached epoch {at_epoch} "
                                                           f"scored the same ({values.pop():.4f}): no parameter made a "
                                                           f"difference to explain")
        else:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            with optional_step("the importances", client, parent_id, IMPORTANCE_NOTE_TAG):
                importances = optuna.importance.get_param_importances(at, evaluator=evaluator, params=params)
                logged = {f"{IMPORTANCE_PREFIX}{k}": v for k, v in importances.items()}
                client.log_batch(parent_id, metrics=metric_entities(logged))
                client.set_tag(parent_id, IMPORTANCE_BASIS_TAG,
                               f"fANOVA over {len(at.trials)} trials, explaining the {target}")
                charts.append(("importances.png", lambda: optuna.visualization.matplotlib.plot_param_importances(
                    at, evaluator=evaluator, params=params, target_name=target)))
        for name, draw in charts:  # each chart on its own: one that cannot be drawn leaves the others
            with optional_step(f"the chart {name}", client, parent_id, f"{CHART_NOTE_PREFIX}{name}"):
                _save(draw(), Path(tmp) / name, f"search {study_name}, {len(at.trials)} trials")
        if any(Path(tmp).iterdir()):
            client.log_artifacts(parent_id, tmp, "search_analysis")
    return importances


def at_epoch_study(study: optuna.Study, epoch: int) -> optuna.Study:
    """An in-memory study holding each trial of `study` that reached `epoch` (finished or stopped
    by ASHA later), valued by its intermediate value there: its objective by that epoch."""
    at = optuna.create_study(direction=study.direction)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if epoch in t.intermediate_values:
            at.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                   value=t.intermediate_values[epoch]))
    return at


def _save(ax, path: Path, subtitle: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(f"{ax.get_title()}: {subtitle}")
    figure = ax.figure
    figure.set_size_inches(9, 5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
