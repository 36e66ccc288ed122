"""A sweep's time budget, its growth (`--resume --more-trials`) and a warm start from another
sweep (`--warm-start`): with the real local Ray cluster, Optuna and MLflow on tiny generated data."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from captune.cli import main
from captune.search.budget import out_of_time, parse_duration, set_deadline
from captune.search.objective import EARLY_STOPPED, FINISHED, OUT_OF_TIME, end_state
from captune.search.request import SweepRequest, plan
from captune.trainables.config import ConfigError
from captune.trainables.reporting import Reporter
from mlflow import MlflowClient
from tests.conftest import attached
from tests.test_sweep import assert_study_matches_mlflow, sweep_yaml, trial_runs


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("6h", 21600), ("1h30m", 5400), ("2d", 172800),
                                           ("45", 45), ("0.5m", 30), (" 2 m ", 120), (120, 120)])
def test_a_budget_is_read_in_the_units_people_write(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "3 minutes", "m3", "-5m", "0", "0s", "1h-5m"])
def test_a_budget_that_is_not_a_duration_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="--time-budget"):
        parse_duration(text)


def test_the_budget_is_checked_where_it_is_written(tmp_path, synth_dir, capsys):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=1)
    doc = yaml.safe_load(config.read_text())
    doc["sweep"]["time_budget"] = "an hour"
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'sweep.yaml'} \[sweep\]: time_budget 'an hour'"):
        plan(SweepRequest(name="b", data_root=str(synth_dir), config_file=str(config)))
    doc["sweep"]["time_budget"] = "1h30m"
    config.write_text(yaml.safe_dump(doc))
    settings, _ = plan(SweepRequest(name="b", data_root=str(synth_dir), config_file=str(config)))
    assert settings.time_budget == 5400
    settings, _ = plan(SweepRequest(name="b", data_root=str(synth_dir), config_file=str(config), time_budget=60))
    assert settings.time_budget == 60  # --time-budget wins over the file
    with pytest.raises(SystemExit):
        main(["sweep", "--data", str(synth_dir), "--time-budget", "later"])
    assert "argument --time-budget: 'later': give a duration such as 90s" in capsys.readouterr().err


def test_more_trials_are_added_to_a_sweep_that_ran_only(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="--more-trials 4: it adds trials to a sweep that has run; give --resume"):
        plan(SweepRequest(name="b", data_root=str(synth_dir), more_trials=4))


def test_a_report_after_the_deadline_says_so_and_the_trial_ends_out_of_time():
    seen = []
    reporter = Reporter(sink=lambda metrics, _: seen.append(metrics), deadline=time.time() + 3600)
    reporter.report({"epoch": 1, "bleu4": 0.1}, None)
    reporter.deadline = time.time() - 1
    reporter.report({"epoch": 2, "bleu4": 0.2}, None)
    assert "out_of_time" not in seen[0] and seen[1]["out_of_time"] == 1.0
    assert end_state(seen[1], max_epochs=5, errored=False) == OUT_OF_TIME
    assert end_state(seen[0], max_epochs=5, errored=False) == EARLY_STOPPED  # stopped by ASHA
    assert end_state({**seen[1], "epoch": 5}, max_epochs=5, errored=False) == FINISHED  # its last epoch anyway
    set_deadline(time.time() - 1)
    try:
        assert out_of_time()
        set_deadline(time.time() + 60)
        assert not out_of_time()
    finally:
        set_deadline(None)
    assert not out_of_time()


def test_a_budget_stops_the_search_at_an_epoch_boundary_and_starts_no_trial_after_it(ray_cluster, synth_dir, tmp_path,
                                                                                      tracking_uri, capsys):
    # Trials of up to 2000 epochs (a fraction of a second each), one at a time, 12 s of budget: the
    # first trial is stopped at the epoch that ends after the deadline; the second never starts.
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=2000, max_concurrent=1, early_stopping="none")
    t0 = time.time()
    assert main(["sweep", "--data", str(synth_dir), "--name", "bud", "--arch", "cnn-lstm", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control",
                 "--time-budget", "12s"]) == 0
    out = capsys.readouterr().out
    assert "time budget 12s: no trial starts after" in out and "the comparison on the test split" in out
    client = MlflowClient(tracking_uri)
    (run,) = trial_runs(client, "bud")
    assert run.data.tags["captune.end_state"] == "out-of-time" and run.info.status == "FINISHED", run.data.tags
    epochs = client.get_metric_history(run.info.run_id, "bleu4")
    ends = sorted(m.timestamp / 1000 for m in epochs)
    per_epoch = (ends[-1] - ends[0]) / max(1, len(ends) - 1)
    print(f"{len(ends)} epochs of {per_epoch:.2f}s; the last ended {ends[-1] - t0:.1f}s after the command started")
    # within the budget and one epoch (the budget counts from after the sweep's checks, a few seconds in)
    assert 1 <= len(ends) < 2000 and ends[-1] <= t0 + 12 + 10 + per_epoch
    assert "trial 1 (" in out and "out-of-time after" in out
    (search,) = client.search_runs([client.get_experiment_by_name("bud").experiment_id],
                                   filter_string="tags.`captune.kind` = 'search'")
    assert search.info.status == "FINISHED" and float(search.data.params["time_budget"]) == 12
    assert client.get_model_version_by_alias("captune-cnn-lstm", "champion").run_id == run.info.run_id
    [trial] = assert_study_matches_mlflow(client, "bud", "cnn-lstm", tmp_path / "tune")
    assert trial.state == optuna.trial.TrialState.PRUNED


def test_more_trials_grow_a_finished_sweep_and_a_new_sweep_warm_starts_from_it(ray_cluster, synth_dir, tmp_path, tracking_uri,
                                                              capsys):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=1, early_stopping="none")
    args = ["sweep", "--data", str(synth_dir), "--name", "grow", "--arch", "cnn-lstm", "--config", str(config),
            "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]
    assert main(args) == 0
    client = MlflowClient(tracking_uri)
    before = {r.info.run_id: r.info.end_time for r in trial_runs(client, "grow")}
    capsys.readouterr()
    assert main([*args, "--resume", "--more-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 more trials, the sampler told the study's 2 earlier ones" in out, out[-3000:]
    runs = trial_runs(client, "grow")
    assert len(runs) == 4 and all(r.info.end_time == before[r.info.run_id] for r in runs if r.info.run_id in before)
    study = assert_study_matches_mlflow(client, "grow", "cnn-lstm", tmp_path / "tune")
    assert [t.number for t in study] == [0, 1, 2, 3]  # one study, its numbers going on
    assert sum(t.params == study[0].params for t in study) == 1  # the preset was not enqueued again
    (search,) = client.search_runs([client.get_experiment_by_name("grow").experiment_id],
                                   filter_string="tags.`captune.kind` = 'search'")
    assert search.data.tags["captune.trials_added"] == "2" and search.data.tags["captune.trials"] == "4"
    assert search.info.status == "FINISHED" and (tmp_path / "tune" / "grow-cnn-lstm-more1").is_dir()
    # ranked over the whole search, the earlier trials among the later ones
    assert sorted(r.info.run_name.split()[0] for r in runs) == ["#1", "#2", "#3", "#4"], [r.info.run_name for r in runs]
    # A plain --resume of the grown sweep trains nothing; a second growth is the search's third part.
    assert main([*args, "--resume"]) == 0
    assert len(trial_runs(client, "grow")) == 4
    assert main([*args, "--resume", "--more-trials", "1"]) == 0
    assert len(trial_runs(client, "grow")) == 5 and (tmp_path / "tune" / "grow-cnn-lstm-more2").is_dir()
    assert [t.number for t in optuna.load_study(study_name="grow-cnn-lstm",
                                                storage=f"sqlite:///{tmp_path / 'tune' / 'grow-optuna.db'}").trials] \
        == [0, 1, 2, 3, 4]

    # A new sweep warm-started from it, over a narrower space: the earlier trials with hidden size
    # 32 are left out, vocab_threshold (fixed here) dropped from the others; the sampler is told
    # them, its own first trial is still the preset, and nothing of "grow" is trained or recorded.
    narrower = {"lr": {"loguniform": [0.001, 0.01]}, "hidden_size": {"choice": [256, 512]}}
    warm_config = sweep_yaml(tmp_path / "warm.yaml", trials=2, epochs=1, space=narrower, early_stopping="none")
    source = optuna.load_study(study_name="grow-cnn-lstm", storage=f"sqlite:///{tmp_path / 'tune' / 'grow-optuna.db'}")
    usable = [t for t in source.trials if t.params["hidden_size"] == 256]
    warm_args = ["sweep", "--data", str(synth_dir), "--name", "warm", "--arch", "cnn-lstm", "--config", str(warm_config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]
    capsys.readouterr()
    assert main([*warm_args, "--warm-start", "grow"]) == 0
    out = capsys.readouterr().out
    said = (f"warm start: {len(usable)} trial(s) of sweep 'grow' told to the sampler; left out: "
            f"{5 - len(usable)} with hidden_size outside this space")
    assert said in out, out[-3000:]
    study = optuna.load_study(study_name="warm-cnn-lstm", storage=f"sqlite:///{tmp_path / 'tune' / 'warm-optuna.db'}")
    told = [t for t in study.trials if "captune_warm_start" in t.user_attrs]
    own = [t for t in study.trials if "captune_warm_start" not in t.user_attrs]
    assert [t.user_attrs["captune_warm_start"] for t in told] == [f"grow#{t.number}" for t in usable]
    assert all(set(t.params) == {"lr", "hidden_size"} for t in study.trials)
    assert [t.value for t in told] == [t.value for t in usable] and len(own) == 2
    assert own[0].params == {"lr": 0.002, "hidden_size": 256}  # the preset, still its first trial
    assert len(trial_runs(client, "warm")) == 2 and len(trial_runs(client, "grow")) == 5
    (parent,) = client.search_runs([client.get_experiment_by_name("warm").experiment_id],
                                   filter_string="tags.`captune.kind` = 'search'")
    assert parent.data.tags["captune.warm_start"] == said
    assert_study_matches_mlflow(client, "warm", "cnn-lstm", tmp_path / "tune")
    # values of another metric are not this search's: refused before anything starts
    assert main([*warm_args[:4], "warm2", *warm_args[5:], "--warm-start", "grow", "--metric", "cider"]) == 2
    assert "--warm-start grow: sweep 'grow' maximised bleu4, this one cider" in capsys.readouterr().err
    assert client.get_experiment_by_name("warm2") is None


def test_a_warm_start_that_cannot_be_used_is_refused_before_anything_starts(synth_dir, tmp_path, tracking_uri, capsys):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=1)
    args = ["sweep", "--data", str(synth_dir), "--name", "w2", "--arch", "cnn-lstm", "--config", str(config),
            "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]
    assert main([*args, "--warm-start", "nowhere"]) == 2
    assert "--warm-start nowhere: there is no sweep 'nowhere' in this MLflow store" in capsys.readouterr().err
    assert main([*args, "--warm-start", "w2"]) == 2
    assert "--warm-start w2: it starts a new sweep from another sweep's trials; name another sweep" in \
        capsys.readouterr().err
    assert main([*args, "--warm-start", "../x"]) == 2
    assert "--warm-start '../x' cannot name a sweep" in capsys.readouterr().err
    assert MlflowClient(tracking_uri).get_experiment_by_name("w2") is None and not (tmp_path / "tune").exists()


def test_a_growth_stopped_by_ctrl_c_goes_on_with_the_plain_resume_it_prints(ray_cluster, synth_dir, tmp_path,
                                                                           tracking_uri):
    # Ctrl-C while `--resume --more-trials 2` trains: the command printed at the stop has no
    # --more-trials (it would add 2 more), and it finishes the growth, nothing trained twice.
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=30, early_stopping="none", max_concurrent=1)
    args = ["sweep", "--data", str(synth_dir), "--name", "gs", "--arch", "cnn-lstm", "--config", str(config),
            "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]
    assert main(args) == 0
    client = MlflowClient(tracking_uri)
    (first,) = trial_runs(client, "gs")
    log = tmp_path / "grow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "captune.cli", *args, "--resume", "--more-trials", "2"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **attached(ray_cluster)})
    deadline = time.monotonic() + 150
    while not [r for r in trial_runs(client, "gs") if r.info.run_id != first.info.run_id
               and client.get_metric_history(r.info.run_id, "bleu4")]:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 130
    text = log.read_text()
    (printed,) = [line[line.index("captune sweep"):] for line in text.splitlines() if "To go on" in line]
    assert "--resume" in printed and "--more-trials" not in printed, printed
    assert main(args + ["--resume"]) == 0
    runs = trial_runs(client, "gs")
    assert len(runs) == 3 and all(r.data.tags["captune.end_state"] == "finished" for r in runs)
    assert len(client.get_metric_history(first.info.run_id, "bleu4")) == 30  # the first trial: not trained again
    study = assert_study_matches_mlflow(client, "gs", "cnn-lstm", tmp_path / "tune")
    assert [t.number for t in study if t.state == optuna.trial.TrialState.COMPLETE] == [0, 1, 2]
    (search,) = client.search_runs([client.get_experiment_by_name("gs").experiment_id],
                                   filter_string="tags.`captune.kind` = 'search'")
    assert search.data.tags["captune.trials_added"] == "2" and search.info.status == "FINISHED"
