"""Inputs a hostile probe found accepted or answered with a traceback: each is refused in one line
naming the value at fault and the rule it breaks, before anything is written (exit 2)."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from captune.cli import main
from tests.conftest import tiny_overrides


def refused(capsys, argv: list[str]) -> str:
    """The error line of a command the parser refuses (argparse exits 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# --- sweep names (D9, D15) ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../esc", "", "a b/c", "-dash", "a..b", "x" * 101, "it's"])
def test_a_sweep_name_outside_the_rule_is_refused_before_anything_else(name, tmp_path, capsys):
    # `--set` of an unknown key would be refused too: the name is checked first, and nothing is
    # written anywhere (the name becomes the results' and the Optuna study's paths)
    storage, work = tmp_path / "a" / "b" / "S", tmp_path / "a"
    code = main(["sweep", "--data", str(tmp_path / "data"), f"--name={name}", "--storage", str(storage),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "no_such_key=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"--name {name!r} cannot name a sweep" in err, err
    assert "letters, digits, '.', '_' and '-', starting with a letter or a digit, at most 100 characters" in err
    assert "Traceback" not in err and "did not answer" not in err
    assert not work.exists() and not (tmp_path / "mlflow.db").exists()
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_name_rule_is_in_help_and_good_names_pass(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "starting with a letter or a digit, at most 100 characters, no '..'" in " ".join(capsys.readouterr().out.split())
    from captune.search.request import name_fault

    for good in ("captune-sweep", "s1", "Flickr8k_v2.1", "x" * 100):
        assert name_fault(good) is None, good


def test_leaderboard_of_a_name_no_sweep_can_have_says_the_rule(tmp_path, capsys):
    assert main(["leaderboard", "../../esc", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err
    assert "no sweep named '../../esc'" in err and "cannot name a sweep: a sweep name is letters, digits" in err


# --- the bootstrap's seed and resamples (D16, D6) -------------------------------------------------------

def test_a_negative_bootstrap_seed_is_refused_by_the_parser(capsys):
    err = refused(capsys, ["compare", "s1", "--bootstrap-seed", "-1"])
    assert "--bootstrap-seed: must be at least 0, got -1" in err and "Traceback" not in err


@pytest.mark.parametrize("resamples", ["1", "199"])
def test_too_few_resamples_for_a_95_percent_interval_are_refused(resamples, capsys):
    err = refused(capsys, ["compare", "s1", "--resamples", resamples])
    assert f"needs at least 200 resamples (at least 5 beyond each end of it), got {resamples}" in err


def test_the_bootstrap_itself_refuses_too_few_resamples_and_the_parser_agrees():
    from captune.infra.errors import UserError
    from captune.search.bootstrap import paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (40, 14)).astype(float)
    b = rng.integers(0, 5, (40, 14)).astype(float)
    with pytest.raises(UserError, match=r"--resamples 1: a 95% bootstrap interval needs at least 200 resamples"):
        paired_bootstrap(a, b, resamples=1)  # (the control and `sweep --seeds` call it with the default)
    result = paired_bootstrap(a, b, resamples=200, metric="cider")
    assert result.low <= result.difference <= result.high
    from captune.cli import MIN_RESAMPLES
    from captune.search.bootstrap import min_resamples

    assert MIN_RESAMPLES == min_resamples() == 200 and min_resamples(0.9) == 100


# --- deleted MLflow experiments and runs (D10, D14, D26) ------------------------------------------------

def deleted_sweep(uri: str, name: str) -> str:
    """A sweep's experiment with its parent run, then deleted (as in the MLflow UI); its id."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    client.create_run(experiment_id, tags={"captune.sweep": name, "captune.kind": "search", "arch": "cnn-lstm"})
    client.delete_experiment(experiment_id)
    return experiment_id


def run_in_shell(command: str) -> None:
    """`command` as a user in this environment (its venv's `mlflow` on the PATH) would run it."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PATH": path, "MLFLOW_DISABLE_TELEMETRY": "true"})


def restore_command(err: str, what: str) -> str:
    commands = re.findall(r"`([^`]*mlflow [^`]*restore[^`]*)`", err)
    assert len(commands) == 1 and what in commands[0], err
    return commands[0]


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_deleted_sweep_is_named_with_its_restore_command(synth_dir, tmp_path, capsys, tracking_uri):
    uri = tracking_uri
    experiment_id = deleted_sweep(uri, "gone")
    said = f"MLflow experiment 'gone' (id {experiment_id}) was deleted in the store {uri}"
    storage = tmp_path / "tune"
    for argv in (["leaderboard", "gone"], ["compare", "gone"],
                 ["sweep", "--data", str(synth_dir), "--name", "gone", "--storage", str(storage), "--resume"],
                 ["sweep", "--data", str(synth_dir), "--name", "gone", "--storage", str(storage)]):
        assert main([*argv, "--tracking-uri", uri]) == 2, argv
        captured = capsys.readouterr()
        assert said in captured.err and captured.out == "", (argv, captured)
        command = restore_command(captured.err, f"experiments restore --experiment-id {experiment_id}")
    # nothing written: no Tune folder, no new experiment, the deleted one as it was
    client = MlflowClient(uri)
    assert not storage.exists() and [e.name for e in client.search_experiments()] == ["Default"]
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    # the command given restores it, as printed
    run_in_shell(command)
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"
    assert main(["leaderboard", "gone", "--tracking-uri", uri]) == 0


def train_folder(out, uri: str, data, experiment: str = "captune-train") -> str:
    """A `captune train` output folder whose run was stopped, its MLflow run since deleted; its id."""
    from captune.trainables.config import compose

    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(experiment))
    client.set_terminated(run.info.run_id, "KILLED")
    out.mkdir()
    cfg = compose("cnn-lstm", [("test", tiny_overrides("cnn-lstm"))])
    (out / "run.json").write_text(json.dumps({
        "config": cfg.to_dict(), "data": str(Path(data).resolve()), "workers": 1, "gpu": False, "tracking_uri": uri,
        "experiment": experiment, "run_id": run.info.run_id, "status": "KILLED"}))
    client.delete_run(run.info.run_id)
    return run.info.run_id


def test_a_deleted_train_run_is_named_with_its_restore_command(ray_cluster, synth_dir, tmp_path, capsys, tracking_uri):
    uri, out = tracking_uri, tmp_path / "run"
    run_id = train_folder(out, uri, synth_dir)
    before = (out / "run.json").read_text()
    for argv in (["record", str(out)], ["train", "--resume", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"MLflow run {run_id} (experiment 'captune-train') was deleted in the store {uri}" in err, err
        command = restore_command(err, f"runs restore --run-id {run_id}")
        assert f"captune record {out}" in err and "Traceback" not in err
    assert (out / "run.json").read_text() == before and sorted(p.name for p in out.iterdir()) == ["run.json"]
    run_in_shell(command)
    assert MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "active"


def test_a_new_train_run_into_a_deleted_experiment_is_refused_before_training(ray_cluster, synth_dir, tmp_path,
                                                                             capsys, tracking_uri):
    uri = tracking_uri
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("old")
    client.delete_experiment(experiment_id)
    out = tmp_path / "run"
    assert main(["train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--out", str(out), "--tracking-uri", uri,
                 "--experiment", "old"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow experiment 'old' (id {experiment_id}) was deleted in the store {uri}" in err, err
    restore_command(err, f"experiments restore --experiment-id {experiment_id}")
    assert "another --experiment" in err and not (out / "run.json").exists()


# --- train --resume --epochs (D25) ------------------------------------------------------------------

def test_resume_refuses_fewer_epochs_and_the_run_records_the_epochs_asked(ray_cluster, synth_dir, tmp_path, capsys,
                                                                          tracking_uri):
    uri, out = tracking_uri, tmp_path / "r1"
    sets = [f"--set={k}={v}" for k, v in tiny_overrides("cnn-lstm").items() if k != "epochs"]
    assert main(["train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--epochs", "3", "--out", str(out),
                 "--tracking-uri", uri, *sets]) == 0
    capsys.readouterr()
    state = (out / "run.json").read_text()
    for epochs in ("2", "3"):  # not above the 3 trained: refused, naming both, run.json untouched
        assert main(["train", "--resume", str(out), "--epochs", epochs]) == 2
        err = capsys.readouterr().err
        assert f"--epochs {epochs}, but 3 epoch(s) are already trained there; give --epochs above 3" in err, err
        assert (out / "run.json").read_text() == state
    assert main(["train", "--resume", str(out)]) == 2  # its own 3 again: nothing to train
    assert "already trained" in capsys.readouterr().err
    client = MlflowClient(uri)
    run_id = json.loads(state)["run_id"]
    run = client.get_run(run_id)
    assert "epochs" not in run.data.params and run.data.tags["captune.epochs"] == "3"
    assert main(["train", "--resume", str(out), "--epochs", "5"]) == 0
    run = client.get_run(run_id)
    assert run.data.tags["captune.epochs"] == "5" and "epochs" not in run.data.params
    assert json.loads((out / "run.json").read_text())["config"]["epochs"] == 5
    assert [m.step for m in client.get_metric_history(run_id, "bleu4")] == [1, 2, 3, 4, 5]


# --- a sweep's seed replicates on resume (D2) -------------------------------------------------------

def test_the_resume_command_carries_the_seeds():
    from captune.search.request import SweepRequest, resume_command

    words = shlex.split(resume_command(SweepRequest(name="s", data_root="d", seeds=2, resume=True)))
    assert words[words.index("--seeds") + 1] == "2" and "--top" not in words  # (the default top)
    assert "--seeds" not in resume_command(SweepRequest(name="s", data_root="d", seeds=0))
    words = shlex.split(resume_command(SweepRequest(name="s", data_root="d", seeds=2, top=5, resume=True)))
    assert words[words.index("--top") + 1] == "5"


def test_a_sweep_remembers_its_seeds_and_resume_uses_them(synth_dir, tmp_path, tracking_uri):
    # A sweep started with --seeds 2 --top 2 records them as its MLflow records open; its --resume
    # without them goes on with 2 and 2, and prints them in its resume command; given on resume, they win.
    from captune.search.request import SweepRequest, plan, resume_command, storage_root
    from captune.search.sweep import open_sweep_records

    uri, storage = tracking_uri, str(tmp_path / "tune")

    def sweep(**how) -> SweepRequest:
        req = SweepRequest(name="seeded", data_root=str(synth_dir), archs=["cnn-lstm"], storage=storage,
                           tracking_uri=uri, **how)
        settings, searches = plan(req)
        open_sweep_records(req, settings, searches, storage_root(storage))
        return req

    started = sweep(seeds=2, top=2)
    assert started.seeds == 2 and started.top == 2
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("seeded").tags["captune.seeds"] == "2"
    assert client.get_experiment_by_name("seeded").tags["captune.top"] == "2"
    resumed = sweep(resume=True)
    assert resumed.seeds == 2 and resumed.top == 2 and "--seeds 2 --top 2" in resume_command(resumed)
    assert sweep(resume=True, top=3).top == 3 and sweep(resume=True).top == 3  # given on resume, it wins
    assert sweep(resume=True, seeds=0).seeds == 0 and client.get_experiment_by_name("seeded").tags["captune.seeds"] == "0"
    assert sweep(resume=True).seeds == 0
