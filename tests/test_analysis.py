"""Parameter importances of a search, from a real Optuna study, logged to a real MLflow store."""
import math
import random

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from mlflow import MlflowClient
from search.analysis import MIN_TRIALS, at_epoch_study, log_search_analysis

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


def test_importances_and_charts_are_logged_on_the_parent_run(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    rng = random.Random(0)
    trials = []
    for i in range(8):  # lr decides the score, hidden size barely
        lr, hidden = 10 ** rng.uniform(-4, -1), rng.randint(32, 512)
        score = 0.1 + 0.1 * (math.log10(lr) + 4) + hidden * 1e-5
        trials.append(({"lr": lr, "hidden_size": hidden}, {1: score / 2, 2: score},
                       TrialState.COMPLETE if i % 2 else TrialState.PRUNED))
    study_with(storage, trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
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


def test_too_few_trials_say_how_many_are_needed(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study_with(storage, [({"lr": 0.01, "hidden_size": 64}, {1: 0.1, 2: 0.2}, TrialState.COMPLETE)] * 2)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    assert log_search_analysis(client, parent, storage, "s-cnn-lstm", ["lr", "hidden_size"], at_epoch=2) == {}
    note = client.get_run(parent).data.tags["captune.importance_note"]
    assert note == f"needs at least {MIN_TRIALS} trials that reached epoch 2; this search has 2"
