"""A fresh sweep of both architectures, at the moment its two searches start their first trials
at once on a new experiment (D1): both record their trial runs, every time."""
import multiprocessing
import os
import time
from types import SimpleNamespace

import pytest
from captune.search.request import SweepRequest, plan
from mlflow import MlflowClient
from tests.test_sweep import sweep_yaml

ROUNDS = int(os.environ.get("CAPTUNE_RACE_ROUNDS", "20"))


def _first_trial(tracking_uri: str, sweep: str, experiment_id: str, parent_id: str, arch: str, base: dict,
                 data_root: str, start: float) -> str:
    """In a process of its own, as a search task is: its MLflow callback records its first trial
    (the trial's run, its params, the dataset as its input, its link to Optuna) at `start`."""
    from captune.search.mlflow_trials import MlflowTrials

    trials = MlflowTrials(tracking_uri, experiment_id, parent_id, sweep, arch, base, 2, data_root)
    trial = SimpleNamespace(trial_id=f"{arch}_00000", config={"lr": 0.002, "hidden_size": 32})
    while time.time() < start:
        pass
    try:
        trials.on_trial_start(0, [trial], trial)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_two_searches_start_their_first_trials_together_on_a_new_experiment(synth_dir, tmp_path):
    from captune.search.sweep import open_sweep_records

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = str(sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=2))
    settings, searches = plan(SweepRequest(name="race", data_root=str(synth_dir), config_file=config))
    client, outcomes = MlflowClient(uri), []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for n in range(ROUNDS):  # a new sweep each round: a new experiment, without its dataset yet
            req = SweepRequest(name=f"race{n}", data_root=str(synth_dir), config_file=config, tracking_uri=uri)
            # what the driver records before the searches start
            experiment_id, parents = open_sweep_records(req, settings, searches, str(tmp_path / "tune"))
            start = time.time() + 0.3
            outcomes.append(pool.starmap(_first_trial, [
                (uri, req.name, experiment_id, parents[s.arch], s.arch, s.base.to_dict(), str(synth_dir), start)
                for s in searches]))
            runs = client.search_runs([experiment_id], filter_string="tags.`captune.kind` = 'trial'")
            assert all(len(client.get_run(r.info.run_id).inputs.dataset_inputs) == 1 for r in runs), n
    assert outcomes == [["ok", "ok"]] * ROUNDS, [o for o in outcomes if o != ["ok", "ok"]]


def _record_dataset(tracking_uri: str, run_id: str, data_root: str, start: float) -> str:
    from mlflow import MlflowClient

    from captune.infra.mlflow_store import record_dataset

    client = MlflowClient(tracking_uri)
    client.get_run(run_id)  # (connected before the start)
    while time.time() < start:
        pass
    try:
        record_dataset(client, run_id, data_root)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_two_runs_record_the_same_new_dataset_at_once(synth_dir, tmp_path):
    # The write that raced: MLflow adds a dataset to an experiment on its first use, so two
    # processes recording it at the same moment both try to add it (UNIQUE constraint failed).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, outcomes = MlflowClient(uri), []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for n in range(ROUNDS):
            experiment_id = client.create_experiment(f"new{n}")
            runs = [client.create_run(experiment_id).info.run_id for _ in range(2)]
            start = time.time() + 0.3
            outcomes.append(pool.starmap(_record_dataset, [(uri, run, str(synth_dir), start) for run in runs]))
            assert all(len(client.get_run(run).inputs.dataset_inputs) == 1 for run in runs), n
    assert outcomes == [["ok", "ok"]] * ROUNDS, [o for o in outcomes if o != ["ok", "ok"]]
