"""Sweeps on tiny generated data, with the real local Ray cluster, Optuna and MLflow."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from captune.cli import main
from captune.tracking import load_captioner
from tests.conftest import tiny_overrides

# The built-in dataset's preset (lr 0.002, hidden 256, threshold 2) is the default point: inside.
SEARCHED = {"lr": {"loguniform": [0.001, 0.01]}, "hidden_size": {"choice": [32, 256]},
            "vocab_threshold": {"int": [1, 2]}}


def sweep_yaml(path: Path, trials: int, epochs: int, space: dict | None = None, **settings) -> Path:
    doc = {"sweep": {"trials": trials, "max_epochs": epochs, "grace_period": 1, "reduction_factor": 2, "seed": 0,
                     **settings}}
    for arch in ("cnn-lstm", "resnet-gru"):
        fixed = {k: v for k, v in tiny_overrides(arch).items() if k not in ("epochs",) and k not in (space or SEARCHED)}
        doc[arch] = {**fixed, **(space or SEARCHED)}
    path.write_text(yaml.safe_dump(doc))
    return path


def trial_runs(client, name):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'trial'", max_results=1000)


def test_sweep_both_archs_records_runs_registers_champions(ray_cluster, synth_dir, tmp_path, tracking_uri, capsys):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=3, epochs=2)
    assert main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "BLEU-4 beam 3" in out and "MLflow UI" in out

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("s1")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'search'")
    assert sorted(r.data.tags["arch"] for r in parents) == ["cnn-lstm", "resnet-gru"]
    trials = trial_runs(client, "s1")
    assert len(trials) == 6 and len({r.data.tags["captune.trial_id"] for r in trials}) == 6
    by_parent = {p.info.run_id: p.data.tags["arch"] for p in parents}
    for run in trials:
        assert by_parent[run.data.tags["mlflow.parentRunId"]] == run.data.params["arch"]
        assert run.data.tags["captune.end_state"] in ("finished", "early-stopped")
        assert {"lr", "hidden_size", "vocab_threshold", "embed_size"} <= set(run.data.params)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")]
        assert steps == list(range(1, len(steps) + 1)) and steps
    # the searches split the slots, one per core: never more trials at once than cores
    assert all(int(p.data.tags["captune.concurrent_trials"]) == min(3, max(1, os.cpu_count() // 2)) for p in parents)
    assert all(p.data.tags["captune.sweep_slots"] == str(max(2, os.cpu_count())) for p in parents)  # search.slots
    spans = [(r.info.start_time, max(m.timestamp for m in client.get_metric_history(r.info.run_id, "bleu4")))
             for r in trials]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= os.cpu_count()
    # each search evaluates the default configuration (the preset) as one of its trials
    for arch in by_parent.values():
        assert any((float(r.data.params["lr"]), r.data.params["hidden_size"], r.data.params["vocab_threshold"])
                   == (0.002, "256", "2") for r in trials if r.data.params["arch"] == arch), arch

    # the leaderboard is MLflow's own ordering by metrics.bleu4
    capsys.readouterr()
    assert main(["leaderboard", "s1", "--json", "--tracking-uri", tracking_uri]) == 0
    board = json.loads(capsys.readouterr().out)
    ordered = client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'trial'",
                                 order_by=["metrics.bleu4 DESC"])
    assert [r["run_id"] for r in board] == [r.info.run_id for r in ordered]
    assert board[0]["bleu4"] >= board[-1]["bleu4"]

    # both champions are registered, load by name and caption an image
    image = next((synth_dir / "Images").iterdir())
    for arch in ("cnn-lstm", "resnet-gru"):
        version = client.get_model_version_by_alias(f"captune-{arch}", "champion")
        assert float(version.tags["bleu4"]) == max(r.data.metrics["bleu4"] for r in trials if r.data.params["arch"] == arch)
        arts = {a.path for a in client.list_artifacts(version.run_id, "champion")}
        assert {"champion/vocab.json", "champion/config.json", "champion/learning_curves.png",
                "champion/val_examples.png"} <= arts
        champion = load_captioner(f"models:/captune-{arch}@champion", tracking_uri)
        assert champion.model.cfg.arch == arch  # the searches ran side by side, each its own architecture
        assert main(["caption", f"models:/captune-{arch}@champion", str(image), "--tracking-uri", tracking_uri]) == 0
        assert str(image) in capsys.readouterr().out
    # a rerun under the same name is refused unless resumed
    assert main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]) == 2
    assert "continue it with --resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synth_300(tmp_path_factory) -> Path:
    """Enough validation images (30) for BLEU-4 to tell a model that learns from one that does not:
    on 6, a learning model's BLEU-4 is still 0 at some epochs (no 4-gram matched at all)."""
    from data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth300"), images=300, seed=1)


def test_asha_stops_poor_trials_and_diverged_trials_are_recorded(ray_cluster, synth_300, tmp_path, tracking_uri):
    # lr 1e-7 learns nothing (ASHA stops it at the first rung, epoch 2); lr 1e30 diverges (the trial
    # fails). At lr 0.002 this model's BLEU-4 after 2 epochs was 0.12-0.31 over seeds 0-3.
    space = {"lr": {"choice": [0.002, 1.0e-7, 1.0e30]}, "fine_tune": False, "batch_size": 8,
             "hidden_size": 128, "embed_size": 64}
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=5, epochs=4, space=space, max_concurrent=1, seed=3,
                        grace_period=2)
    assert main(["sweep", "--data", str(synth_300), "--name", "s2", "--arch", "cnn-lstm", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]) == 0
    runs = trial_runs(MlflowClient(tracking_uri), "s2")
    assert len(runs) == 5
    state = {}
    for run in runs:
        state.setdefault(float(run.data.params["lr"]), set()).add(run.data.tags["captune.end_state"])
    assert state[0.002] == {"finished"}
    assert state[1e-7] == {"early-stopped"}
    assert state[1e30] == {"diverged"}  # stopped at once, not retried, the sweep went on
    diverged = [r for r in runs if r.data.tags["captune.end_state"] == "diverged"]
    assert all(r.info.status == "FAILED" and "training diverged" in r.data.tags["captune.error"] and
               r.data.metrics["bleu4"] == 0.0 and "captune.restarts" not in r.data.tags for r in diverged)


def test_killed_sweep_resumes_without_repeating_trials(ray_cluster, synth_dir, tmp_path, tracking_uri):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=3, epochs=2, max_concurrent=1)
    args = [sys.executable, "-m", "captune.cli", "sweep", "--data", str(synth_dir), "--name", "s3", "--arch",
            "resnet-gru", "--config", str(config), "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = MlflowClient(tracking_uri)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill the driver once one trial has ended and another has begun
        time.sleep(2)
        exp = client.get_experiment_by_name("s3")
        if exp is None:
            continue
        states = [r.data.tags.get("captune.end_state") for r in trial_runs(client, "s3")]
        if states.count("finished") + states.count("early-stopped") >= 1 and len(states) >= 2:
            break
    else:
        pytest.fail("the sweep did not get through a trial in time: " + (tmp_path / "first.log").read_text()[-2000:])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3)
    # the killed driver took its own local Ray cluster with it; resume on the session's
    assert main(args[3:] + ["--resume"]) == 0

    runs = trial_runs(client, "s3")
    done = [r.data.tags["captune.trial_id"] for r in runs if r.data.tags["captune.end_state"] != "interrupted"]
    assert len(done) == 3 == len(set(done))
    assert all(r.data.tags["captune.end_state"] in ("finished", "early-stopped") for r in runs
               if r.data.tags["captune.trial_id"] in done)
    # A trial started in the second before the kill, after Tune's last snapshot, is closed in both
    # Optuna (failed) and MLflow (interrupted); usually there is none.
    interrupted = len(runs) - len(done)
    study = optuna.load_study(study_name="s3-resnet-gru", storage=f"sqlite:///{tmp_path / 'tune' / 's3-optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 3
    assert states.count(optuna.trial.TrialState.FAIL) >= interrupted
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == \
               list(range(1, int(run.data.tags.get("captune.epochs_run", 0)) + 1)) or \
               run.data.tags["captune.end_state"] == "interrupted"  # each epoch logged once
    tune_trials = {p.name for p in (tmp_path / "tune" / "s3-resnet-gru").iterdir() if p.is_dir()}
    assert 3 <= len(tune_trials) <= 3 + interrupted


def test_multi_worker_trials_run_ddp_through_torchtrainer(ray_cluster, synth_dir, tmp_path, tracking_uri):
    # Two workers per trial: each trial is a Ray Train TorchTrainer run reporting through
    # TuneReportCallback; its checkpoint (in the Train run's storage) becomes the champion.
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=1)
    assert main(["sweep", "--data", str(synth_dir), "--name", "s4", "--arch", "cnn-lstm", "--config", str(config),
                 "--workers-per-trial", "2", "--storage", str(tmp_path / "tune"),
                 "--tracking-uri", tracking_uri]) == 0
    client = MlflowClient(tracking_uri)
    runs = trial_runs(client, "s4")
    assert len(runs) == 1 and runs[0].data.tags["captune.end_state"] == "finished"
    train_runs = sorted(p.name for p in (tmp_path / "tune" / "s4-cnn-lstm-train").iterdir())
    assert train_runs == sorted(f"trial-{r.data.tags['captune.trial_id']}" for r in runs)
    version = client.get_model_version_by_alias("captune-cnn-lstm", "champion")
    assert version.run_id in {r.info.run_id for r in runs}
