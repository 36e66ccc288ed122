"""What a finished sweep says when nothing could be learned, when trials tie, and when one of its
searches fails: each in words that say what happened and what to do."""
import json

import pytest

from captune.cli import main
from captune.infra.mlflow_names import ARCH_TAG, ERROR_TAG, KIND_TAG, STATE_TAG, SWEEP_TAG
from captune.search.request import SweepRequest
from mlflow import MlflowClient
from tests.test_sweep import sweep_yaml, trial_runs


def sweep(synth_dir, tmp_path, tracking_uri, name, space, trials=2) -> list[str]:
    config = sweep_yaml(tmp_path / f"{name}.yaml", trials=trials, epochs=1, space=space, max_concurrent=1)
    return ["sweep", "--data", str(synth_dir), "--name", name, "--arch", "cnn-lstm", "--config", str(config),
            "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]


def test_a_sweep_whose_every_trial_diverges_says_so_and_what_to_change(ray_cluster, synth_dir, tmp_path,
                                                                      tracking_uri, capsys):
    # (D17) It ended "no trial finished an epoch" beside "diverged after 1 epoch(s)", then exit 2
    # with "no registered champion yet: let its sweep finish", of a sweep that had finished.
    space = {"lr": 1.0e30, "hidden_size": {"choice": [32, 256]}}
    assert main(sweep(synth_dir, tmp_path, tracking_uri, "d17", space)) == 1
    out, err = capsys.readouterr()
    assert "[cnn-lstm] no usable model: of 2 trial(s), 2 diverged (the training loss became NaN or infinite: " \
           "lower the learning rate" in out
    assert "no comparison: no search registered a model" in out
    assert "no trial finished an epoch" not in out + err and "no registered champion yet" not in out + err
    (parent,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("d17").experiment_id],
        filter_string="tags.`captune.kind` = 'search'")
    assert parent.info.status == "FAILED" and "No usable model: of 2 trial(s), 2 diverged" in \
           parent.data.tags["mlflow.note.content"]


def test_tied_trials_one_order_everywhere_and_a_resume_registers_nothing_new(ray_cluster, synth_dir, tmp_path,
                                                                             tracking_uri, capsys):
    # (D24) An untrainable learning rate: every trial scores BLEU-4 0 at its one epoch, a tie. The
    # champion was the first trial Tune listed, the leaderboard's #1 the last run started, and a
    # resume registered a second version from another of the tied trials.
    space = {"lr": 1.0e-9, "hidden_size": {"choice": [32, 256]}, "vocab_threshold": {"int": [1, 2]}}
    args = sweep(synth_dir, tmp_path, tracking_uri, "d24", space, trials=3)
    assert main(args) == 0
    client = MlflowClient(tracking_uri)
    assert {r.data.metrics["best_bleu4"] for r in trial_runs(client, "d24")} == {0.0}  # all tied
    capsys.readouterr()
    assert main(["leaderboard", "d24", "--json", "--tracking-uri", tracking_uri]) == 0
    board = json.loads(capsys.readouterr().out)
    (version,) = client.search_model_versions("name = 'captune-cnn-lstm'")
    assert board["trials"][0]["trial_id"] == version.tags["trial_id"]
    first = [r for r in trial_runs(client, "d24") if r.data.tags["captune.trial_id"] == version.tags["trial_id"]][0]
    assert first.info.run_name.startswith("#1 ") and first.data.tags.get("captune.is_champion") == "true"
    assert main([*args, "--resume"]) == 0
    assert [v.version for v in client.search_model_versions("name = 'captune-cnn-lstm'")] == [version.version]


def test_a_failed_search_leaves_nothing_running_and_says_how_to_go_on(tmp_path, tracking_uri):
    # A search task that raised (D1's race did): its traceback, then one line saying what failed
    # and the command that goes on; the runs it left RUNNING end FAILED with the reason.
    from captune.search.sweep import SweepFailed, _search_failed

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("f1")
    tags = {SWEEP_TAG: "f1", ARCH_TAG: "resnet-gru"}
    parent = client.create_run(experiment, tags={**tags, KIND_TAG: "search"}).info.run_id
    trial = client.create_run(experiment, tags={**tags, KIND_TAG: "trial", STATE_TAG: "running"}).info.run_id
    other = client.create_run(experiment, tags={SWEEP_TAG: "f1", ARCH_TAG: "cnn-lstm", KIND_TAG: "trial"}).info.run_id
    req = SweepRequest(name="f1", data_root="/data/x", seeds=2, tracking_uri=tracking_uri)
    with pytest.raises(SweepFailed) as failed:
        _search_failed(client, experiment, req, {"resnet-gru": RuntimeError("IntegrityError: UNIQUE constraint")})
    text = str(failed.value)
    assert "the resnet-gru search failed: IntegrityError: UNIQUE constraint" in text
    assert "captune sweep --name f1 --data /data/x --resume" in text and "--seeds 2" in text
    assert failed.value.exit_code == 1
    for run_id in (parent, trial):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "the resnet-gru search failed" in run.data.tags[ERROR_TAG]
    assert client.get_run(trial).data.tags[STATE_TAG] == "interrupted"
    assert client.get_run(other).info.status == "RUNNING"  # the other search's runs are its own
