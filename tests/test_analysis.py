"""Parameter importances of a search, from a real Optuna study, logged to a real MLflow store."""
import math
import random

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from captune.search.analysis import MIN_TRIALS, at_epoch_study, log_search_analysis
from mlflow import MlflowClient

SPACE = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "hidden_size": IntDistribution(32, 512)}


def study_with(storage: str, trials: list[tuple[dict, dict, TrialState]]) -> optuna.Study:
    study = optuna.create_study(study_name="s-cnn-lstm", storage=storage, direction="maximize")
    for params, intermediate, state in trials:
        value = max(intermediate.values()) if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(params=params, distributions=SPACE, intermediate_values=intermediate,
                                     state=state, value=value))
    return study


def test_every_trial_that_reached_the_epoch_counts_at_that_epoch(tmp_path):
    study = study_with(f"sqlite:///{tmp_path / 'o.db'}", [
        ({"lr": 0.01, "hidden_size": 256}, {1: 0.1, 2: 0.3, 3: 0.5, 4: 0.6}, TrialState.COMPLETE),
        ({"lr": 0.0001, "hidden_size": 32}, {1: 0.0, 2: 0.05}, TrialState.PRUNED),  # stopped at the rung
        ({"lr": 0.05, "hidden_size": 64}, {1: 0.2}, TrialState.FAIL),  # diverged: not a data point
        ({"lr": 0.001, "hidden_size": 128}, {1: 0.1}, TrialState.PRUNED),  # never reached epoch 2
    ])
    at = at_epoch_study(study, 2)
    assert [(t.params, t.value) for t in at.trials] == [({"lr": 0.01, "hidden_size": 256}, 0.3),
                                                         ({"lr": 0.0001, "hidden_size": 32}, 0.05)]


@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_importances_and_charts_are_logged_on_the_parent_run(tmp_path, new_store):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    rng = random.Random(0)
    trials = []
    for i in range(8):  # lr decides the score, hidden size barely
        lr, hidden = 10 ** rng.uniform(-4, -1), rng.randint(32, 512)
        score = 0.1 + 0.1 * (math.log10(lr) + 4) + hidden * 1e-5
        trials.append(({"lr": lr, "hidden_size": hidden}, {1: score / 2, 2: score},
                       TrialState.COMPLETE if i % 2 else TrialState.PRUNED))
    study_with(storage, trials)
    client = MlflowClient(new_store(tmp_path / 'm.db'))
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    importances = log_search_analysis(client, parent, storage, "s-cnn-lstm", ["lr", "hidden_size"], at_epoch=2)
    assert importances["lr"] > importances["hidden_size"] and abs(sum(importances.values()) - 1) < 1e-6
    run = client.get_run(parent)
    assert run.data.metrics["importance_lr"] == importances["lr"]
    assert "over 8 trials" in run.data.tags["captune.importance_basis"]
    assert {a.path for a in client.list_artifacts(parent, "search_analysis")} == {
        "search_analysis/importances.png", "search_analysis/optimization_history.png",
        "search_analysis/parallel_coordinates.png"}
    # the same study gives the same importances (seeded fANOVA)
    assert log_search_analysis(client, parent, storage, "s-cnn-lstm", ["lr", "hidden_size"], at_epoch=2) == importances


def test_too_few_trials_say_how_many_are_needed(tmp_path, new_store):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study_with(storage, [({"lr": 0.01, "hidden_size": 64}, {1: 0.1, 2: 0.2}, TrialState.COMPLETE)] * 2)
    client = MlflowClient(new_store(tmp_path / 'm.db'))
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    assert log_search_analysis(client, parent, storage, "s-cnn-lstm", ["lr", "hidden_size"], at_epoch=2) == {}
    note = client.get_run(parent).data.tags["captune.importance_note"]
    assert note == f"needs at least {MIN_TRIALS} trials that reached epoch 2; this search has 2"


DEGENERATE = {  # each study an analysis cannot explain, and what the parent run then says
    "all equal": ([({"lr": 10 ** -(1 + i / 4), "hidden_size": 32 + 40 * i}, {1: 0.25, 2: 0.25}, TrialState.COMPLETE)
                   for i in range(6)], "all 6 trials that reached epoch 2 scored the same (0.2500): no parameter made a difference to explain"),
    "one trial": ([({"lr": 0.01, "hidden_size": 64}, {1: 0.1, 2: 0.2}, TrialState.COMPLETE)],
                  "needs at least 5 trials that reached epoch 2; this search has 1"),
    "all failed": ([({"lr": 0.05 + i / 100, "hidden_size": 64}, {1: 0.0}, TrialState.FAIL) for i in range(6)],
                   "needs at least 5 trials that reached epoch 2; this search has 0"),
    "all pruned at the same value": ([({"lr": 10 ** -(1 + i / 4), "hidden_size": 32 + 40 * i}, {1: 0.0, 2: 0.0},
                                       TrialState.PRUNED) for i in range(6)],
                                     "all 6 trials that reached epoch 2 scored the same (0.0000): no parameter made a difference to explain"),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_a_degenerate_study_is_noted_not_raised(tmp_path, case, new_store):
    # With a grace epoch of 1 on tiny data every trial scored 0 there: fANOVA raised "zero total
    # variance" and the search ended with neither control nor comparison.
    trials, note = DEGENERATE[case]
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study_with(storage, trials)
    # (a store file of its own per case: MLflow keeps a store open by its URI, and pytest may
    # give the next case the folder of one that passed)
    client = MlflowClient(new_store(tmp_path / (case.replace(' ', '-') + '.db')))
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    assert log_search_analysis(client, parent, storage, "s-cnn-lstm", ["lr", "hidden_size"], at_epoch=2) == {}
    assert client.get_run(parent).data.tags["captune.importance_note"] == note


def test_whatever_else_fails_in_the_analysis_is_noted_and_the_caller_goes_on(tmp_path, new_store):
    client = MlflowClient(new_store(tmp_path / 'm.db'))
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    # a study that is not there (its database lost): the analysis cannot be made
    assert log_search_analysis(client, parent, f"sqlite:///{tmp_path / 'gone.db'}", "s-cnn-lstm", ["lr"],
                               at_epoch=2) == {}
    note = client.get_run(parent).data.tags["captune.importance_note"]
    assert note.startswith("the search's analysis not made: KeyError")
