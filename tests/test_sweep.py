"""Sweeps on tiny generated data, with the real local Ray cluster, Optuna and MLflow."""
import json
import math
import os
import re
import statistics
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from captune.cli import main
from captune.infra.mlflow_names import SPEED_METRICS, champion_record
from captune.search.slots import pool_name
from captune.trainables.model_source import load_captioner
from mlflow import MlflowClient
from tests.conftest import attached, tiny_overrides

# The built-in dataset's preset (lr 0.002, hidden 256, threshold 2) is the default point: inside.
SEARCHED = {"lr": {"loguniform": [0.001, 0.01]}, "hidden_size": {"choice": [32, 256]},
            "vocab_threshold": {"int": [1, 2]}}


def sweep_yaml(path: Path, trials: int, epochs: int, space: dict | None = None, **settings) -> Path:
    # TPE and ASHA unless a test says otherwise: the paths of a trial stopped early and told to Optuna
    # as pruned are these tests' (the shipped default, GP with full training, is the shared sweep's)
    doc = {"sweep": {"trials": trials, "max_epochs": epochs, "sampler": "tpe", "early_stopping": "asha",
                     "grace_period": 1, "reduction_factor": 2, "seed": 0, **settings}}
    for arch in ("cnn-lstm", "resnet-gru"):
        fixed = {k: v for k, v in tiny_overrides(arch).items() if k not in ("epochs",) and k not in (space or SEARCHED)}
        doc[arch] = {**fixed, **(space or SEARCHED)}
    path.write_text(yaml.safe_dump(doc))
    return path


def trial_runs(client, name):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'trial'", max_results=1000)


END_TO_OPTUNA = {"finished": "COMPLETE", "early-stopped": "PRUNED", "out-of-time": "PRUNED", "diverged": "FAIL",
                 "failed": "FAIL", "interrupted": "FAIL"}


def assert_study_matches_mlflow(client, name: str, arch: str, tune_root: Path, metric: str = "bleu4") -> list:
    """Trial by trial, the Optuna study holds what Tune and MLflow say happened: each trial once, in
    the state of its end, valued by its best validation score in the sweep's metric (a pruned one,
    by its best so far)."""
    study = optuna.load_study(study_name=f"{name}-{arch}", storage=f"sqlite:///{tune_root / f'{name}-optuna.db'}")
    runs = {r.data.tags["captune.trial_id"]: r for r in trial_runs(client, name) if r.data.params["arch"] == arch}
    linked = [t for t in study.trials if "tune_trial_id" in t.user_attrs]
    assert sorted(t.user_attrs["tune_trial_id"] for t in linked) == sorted(runs)  # each Tune trial once
    for t in study.trials:
        if "captune_warm_start" in t.user_attrs:  # another sweep's, told by --warm-start: no run here
            continue
        assert t.state != optuna.trial.TrialState.WAITING and t.state != optuna.trial.TrialState.RUNNING
        if t not in linked:  # asked by a driver that died before Tune saved the trial
            assert t.state == optuna.trial.TrialState.FAIL and "captune_orphaned" in t.user_attrs
            continue
        run = runs[t.user_attrs["tune_trial_id"]]
        end = run.data.tags["captune.end_state"]
        assert t.state.name == END_TO_OPTUNA[end], (t.number, t.state, end)
        per_epoch = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        if end in ("finished", "early-stopped", "out-of-time"):
            best = max(per_epoch.values())
            assert t.value == pytest.approx(best) and run.data.metrics[f"best_{metric}"] == pytest.approx(best)
            assert sorted(t.intermediate_values) == sorted(per_epoch)  # one intermediate value per epoch
            assert max(t.intermediate_values.values()) == pytest.approx(best)
    return study.trials


# --- the shared sweep "s1" (tests/conftest.py: finished_sweep), read by named tests -----------------

@pytest.fixture(scope="module")
def s1(finished_sweep) -> SimpleNamespace:
    """What the finished sweep recorded: its client, experiment, search runs and trial runs."""
    client = MlflowClient(finished_sweep.tracking_uri)
    exp = client.get_experiment_by_name("s1")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'search'")
    return SimpleNamespace(client=client, exp=exp, parents=parents, trials=trial_runs(client, "s1"),
                           by_parent={p.info.run_id: p.data.tags["arch"] for p in parents}, **vars(finished_sweep))


def test_the_sweep_console_shows_its_progress_leaderboard_and_the_view_link(s1):
    out = s1.out
    assert "leaderboard" in out and "BLEU-4 beam 3" in out and "CIDEr-D beam 3" in out and "MLflow UI" in out
    assert "trials by best validation CIDEr-D" in out and "best validation CIDEr-D" in out
    # the sweep's view: its lines, then the address of its leaderboard in the MLflow UI
    assert "[cnn-lstm] trial 1 (" in out and "sweep s1: cnn-lstm 3/3 done" in out
    assert "viewStateShareKey=" in out.strip().splitlines()[-1]


def test_each_architecture_has_a_search_run_with_its_trials_under_it(s1):
    assert sorted(s1.by_parent.values()) == ["cnn-lstm", "resnet-gru"]
    assert len(s1.trials) == 6 and len({r.data.tags["captune.trial_id"] for r in s1.trials}) == 6
    for run in s1.trials:
        assert s1.by_parent[run.data.tags["mlflow.parentRunId"]] == run.data.params["arch"]
        assert run.data.tags["captune.end_state"] in ("finished", "early-stopped")
        assert {"lr", "hidden_size", "vocab_threshold", "embed_size"} <= set(run.data.params)
        assert run.data.metrics["epochs_run"] == int(run.data.tags["captune.epochs_run"])
    assert "captune leaderboard" in s1.client.get_experiment(s1.exp.experiment_id).tags["mlflow.note.content"]


def test_every_trial_run_holds_every_score_every_epoch_and_its_best_epochs_scores(s1, synth_dir):
    client = s1.client
    for run in s1.trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")]
        assert steps == list(range(1, len(steps) + 1)) and steps
        for score in ("cider", "rouge_l", "bleu1"):  # every score, every epoch
            assert [m.step for m in client.get_metric_history(run.info.run_id, score)] == steps
        # the best epoch by CIDEr-D, and that epoch's other scores
        cider = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "cider")}
        bleu4 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bleu4")}
        best_epoch = int(run.data.metrics["best_epoch"])
        assert cider[best_epoch] == max(cider.values()) == run.data.metrics["best_cider"]
        assert run.data.metrics["best_bleu4"] == bleu4[best_epoch]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "vocab_size")] == [1]  # constants once
        (used,) = client.get_run(run.info.run_id).inputs.dataset_inputs  # the runs table's Dataset column
        assert used.dataset.name == synth_dir.name and json.loads(used.dataset.source)["uri"] == str(synth_dir.resolve())
        # the machine's system metrics, sampled while the trial trained
        assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"), run.info.run_name


def test_an_epoch_is_recorded_under_the_same_names_whoever_trained_it(s1):
    # a trial's epochs reach MLflow from the sweep's driver, a control's from its Ray task: one list of names
    # (captune.trainables.reporting.mlflow_epoch), at step = epoch
    from captune.trainables.reporting import mlflow_epoch

    def per_epoch(run) -> set[str]:
        # (not the system metrics, a rerun's test scores, a retrained trial's mean over seeds, or a trial's speed)
        return {k for k in run.data.metrics if not k.startswith(("system/", "test_", "seed_mean", "tuned_"))
                and k != "epochs_run" and k not in SPEED_METRICS}

    (control,) = [r for r in s1.client.search_runs([s1.exp.experiment_id],
                                                   filter_string="tags.`captune.kind` = 'control'")
                  if s1.by_parent[r.data.tags["mlflow.parentRunId"]] == "cnn-lstm"]
    trial = next(r for r in s1.trials if r.data.params["arch"] == "cnn-lstm")
    history = {m.step for m in s1.client.get_metric_history(control.info.run_id, "bleu4")}
    assert per_epoch(trial) == per_epoch(control) == set(mlflow_epoch(dict.fromkeys(per_epoch(trial), 0.0), first=True))
    assert history == set(range(1, len(history) + 1)) and history
    assert [m.step for m in s1.client.get_metric_history(control.info.run_id, "vocab_size")] == [1]


def test_trial_runs_are_ranked_by_name_and_the_champion_trial_is_tagged_and_linked(s1):
    for arch in s1.by_parent.values():
        mine = sorted((r for r in s1.trials if r.data.params["arch"] == arch), key=lambda r: r.info.run_name)
        assert [r.info.run_name.split()[0] for r in mine] == ["#1", "#2", "#3"]  # ranked by best CIDEr-D
        scores = [r.data.metrics["best_cider"] for r in mine]
        assert scores == sorted(scores, reverse=True) and f"#1 {arch} lr=" in mine[0].info.run_name
        champions = [r for r in mine if r.data.tags.get("captune.is_champion") == "true"]
        assert len(champions) == 1 and champions[0].data.tags["captune.seed_group"] == "chosen"  # over seeds
        assert "champion trial" in champions[0].data.tags["mlflow.note.content"]
        # early-stopped trials say so right after their rank, where a narrow name column still shows it
        for run in mine:
            stopped = run.data.tags["captune.end_state"] == "early-stopped"
            assert (run.info.run_name.split()[1] == "[early-stopped]") == stopped, run.info.run_name
    assert all("Best: trial" in p.data.tags["mlflow.note.content"] for p in s1.parents)
    # the link to the champion trial opens its page on the runs side of the UI, not among GenAI pages
    assert all(f"/runs/{c.info.run_id}?workflowType=machine_learning)" in p.data.tags["mlflow.note.content"]
               for p in s1.parents for c in s1.trials
               if c.data.tags.get("captune.is_champion") and c.data.tags["mlflow.parentRunId"] == p.info.run_id)


def test_the_searches_split_the_slots_never_more_trials_at_once_than_cores(s1):
    assert all(int(p.data.tags["captune.concurrent_trials"]) == min(3, max(1, os.cpu_count() // 2))
               for p in s1.parents)
    assert all(p.data.tags["captune.sweep_slots"] == str(max(2, os.cpu_count())) for p in s1.parents)
    spans = [(r.info.start_time, max(m.timestamp for m in s1.client.get_metric_history(r.info.run_id, "bleu4")))
             for r in s1.trials]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= os.cpu_count()


def test_each_search_tries_the_preset_and_draws_its_own_configurations(s1):
    for arch in s1.by_parent.values():
        assert any((float(r.data.params["lr"]), r.data.params["hidden_size"], r.data.params["vocab_threshold"])
                   == (0.002, "256", "2") for r in s1.trials if r.data.params["arch"] == arch), arch
    drawn = {arch: [(r.data.params["lr"], r.data.params["hidden_size"]) for r in
                    sorted(s1.trials, key=lambda r: r.info.start_time) if r.data.params["arch"] == arch][1:]
             for arch in s1.by_parent.values()}
    assert drawn["cnn-lstm"] != drawn["resnet-gru"]
    assert len({p.data.params["sampler_seed"] for p in s1.parents}) == 2


def test_the_optuna_study_holds_what_mlflow_holds_and_they_name_each_other(s1):
    for arch in s1.by_parent.values():
        study_trials = assert_study_matches_mlflow(s1.client, "s1", arch, s1.folder / "tune", "cider")
        # each Optuna trial names its MLflow run (Optuna Dashboard shows these), and the run its number
        runs = {r.info.run_id: r for r in s1.trials}
        for t in study_trials:
            run = runs[t.user_attrs["mlflow_run_id"]]
            assert run.data.tags["captune.trial_id"] == t.user_attrs["tune_trial_id"]
            assert run.data.tags["captune.optuna_trial"] == str(t.number)
            assert t.user_attrs["mlflow_run_name"] in run.info.run_name  # rank and end state are added later
            assert t.user_attrs["mlflow_experiment_id"] == s1.exp.experiment_id


def test_the_leaderboard_orders_trials_by_the_objective_and_shows_each_control(s1, capsys):
    # ties as captune.search.objective.trial_order says
    capsys.readouterr()
    assert main(["leaderboard", "s1", "--json", "--tracking-uri", s1.tracking_uri]) == 0
    board = json.loads(capsys.readouterr().out)
    ordered = s1.client.search_runs([s1.exp.experiment_id], filter_string="tags.`captune.kind` = 'trial'",
                                    order_by=["metrics.best_cider DESC"])
    assert board["metric"] == "cider" and [r["best_cider"] for r in board["trials"]] == \
           [r.data.metrics["best_cider"] for r in ordered]
    assert board["trials"][0]["best_cider"] >= board["trials"][-1]["best_cider"]
    assert all(r["best_bleu4"] is not None and r["best_rouge_l"] is not None for r in board["trials"])
    assert main(["leaderboard", "s1", "--tracking-uri", s1.tracking_uri]) == 0
    text = capsys.readouterr().out
    assert text.count("floor (image-blind control") == 2 and "importance:" in text
    assert text.count("trials by best validation CIDEr-D") == 2


def test_each_champion_is_measured_against_its_image_blind_control(s1):
    controls = s1.client.search_runs([s1.exp.experiment_id], filter_string="tags.`captune.kind` = 'control'")
    assert sorted(s1.by_parent[r.data.tags["mlflow.parentRunId"]] for r in controls) == ["cnn-lstm", "resnet-gru"]
    for run in controls:
        assert run.info.status == "FINISHED" and run.data.params["image_blind"] == "True"
        parent = s1.client.get_run(run.data.tags["mlflow.parentRunId"])
        for score, gap in (("bleu4", "control_gap"), ("cider", "control_cider_gap")):  # in both, as recorded
            assert parent.data.metrics[f"control_{score}"] == pytest.approx(run.data.metrics[f"best_{score}"])
            assert parent.data.metrics[f"control_test_{score}"] == pytest.approx(run.data.metrics[f"test_{score}"])
            low, high = parent.data.metrics[f"{gap}_low"], parent.data.metrics[f"{gap}_high"]
            assert low <= parent.data.metrics[gap] <= high
        verdict = parent.data.tags["captune.control_verdict"]
        assert f"the {parent.data.tags['arch']} champion" in verdict and "CIDEr-D" in verdict  # in words, its metric
        champion = champion_record(parent.data.tags, parent.data.metrics["best_cider"], "cider")
        assert parent.data.tags["captune.champion"] == f"models:/captune-{parent.data.tags['arch']}/{champion['version']}"
        best_trial = [r for r in s1.trials if r.data.tags["captune.trial_id"] == parent.data.tags["captune.best_trial"]][0]
        assert {k: v for k, v in run.data.params.items() if k not in ("image_blind", "data")} == \
               {k: best_trial.data.params[k] for k in run.data.params if k not in ("image_blind", "data")}
        assert champion["version"]


def test_both_champions_are_registered_at_their_best_epoch_and_caption_an_image(s1, synth_dir, capsys):
    image = next((synth_dir / "Images").iterdir())
    for arch in ("cnn-lstm", "resnet-gru"):
        version = s1.client.get_model_version_by_alias(f"captune-{arch}", "champion")
        mine = [r for r in s1.trials if r.data.params["arch"] == arch]
        (parent,) = [p for p in s1.parents if p.data.tags["arch"] == arch]
        assert version.tags["trial_id"] == parent.data.tags["captune.best_trial"]  # the one chosen over seeds
        best = [r for r in mine if r.data.tags["captune.trial_id"] == version.tags["trial_id"]][0]
        assert float(version.tags["cider"]) == best.data.metrics["best_cider"]
        assert version.tags["metric"] == "cider" and {"bleu4", "rouge_l"} <= set(version.tags)
        # the registered checkpoint is its trial's best epoch's
        assert int(version.tags["epoch"]) == int(best.data.metrics["best_epoch"])
        assert load_captioner(f"models:/captune-{arch}/{version.version}", s1.tracking_uri).payload["epoch"] == \
               int(best.data.metrics["best_epoch"])
        arts = {a.path for a in s1.client.list_artifacts(version.run_id, "champion")}
        assert {"champion/vocab.json", "champion/config.json", "champion/val_scores.json",
                "champion/learning_curves.png", "champion/val_examples.png"} <= arts
        champion = load_captioner(f"models:/captune-{arch}@champion", s1.tracking_uri)
        assert champion.model.cfg.arch == arch  # the searches ran side by side, each its own architecture
        assert main(["caption", f"models:/captune-{arch}@champion", str(image), "--tracking-uri", s1.tracking_uri]) == 0
        assert str(image) in capsys.readouterr().out


def _replicates(s1) -> list:
    return s1.client.search_runs([s1.exp.experiment_id], filter_string="tags.`captune.kind` = 'replicate'")


def _pooled_sd(groups: list[list[float]]) -> float:
    return math.sqrt(sum((v - statistics.mean(g)) ** 2 for g in groups for v in g) / sum(len(g) - 1 for g in groups))


def test_each_champion_is_the_best_mean_of_its_top_configurations_over_new_seeds(s1, capsys):
    replicates = _replicates(s1)
    for parent in s1.parents:
        arch, tags = parent.data.tags["arch"], parent.data.tags
        retrained = sorted((r for r in s1.trials if r.data.params["arch"] == arch and "captune.seed_group" in r.data.tags),
                           key=lambda r: r.info.run_name)
        assert [r.info.run_name.split()[0] for r in retrained] == ["#1", "#2"]  # the top 2 by the search
        groups = []
        for run in retrained:  # each retrained with the same 2 new seeds, its mean and interval on its run
            mine = [r for r in replicates if r.info.run_name.startswith(f"{arch}-{run.data.tags['captune.trial_id']}-seed")]
            assert sorted(r.data.tags["captune.seed"] for r in mine) == ["1", "2"], [r.info.run_name for r in mine]
            assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
                       for r in mine)
            assert all(r.data.params[k] == run.data.params[k] for r in mine for k in ("lr", "hidden_size", "dropout"))
            groups.append([r.data.metrics["best_cider"] for r in mine])  # validation: the test split is not looked at
            m = run.data.metrics
            assert m["seed_mean"] == pytest.approx(statistics.mean(groups[-1]))
            assert m["seed_mean_low"] < m["seed_mean"] < m["seed_mean_high"]
        (chosen,) = [r for r in retrained if r.data.tags["captune.seed_group"] == "chosen"]
        assert chosen.data.metrics["seed_mean"] == max(r.data.metrics["seed_mean"] for r in retrained)
        assert tags["captune.best_trial"] == chosen.data.tags["captune.trial_id"]  # registered, controlled
        other = next(r for r in retrained if r is not chosen)
        overlap = other.data.metrics["seed_mean_high"] >= chosen.data.metrics["seed_mean_low"]
        assert other.data.tags["captune.seed_group"] == ("tied" if overlap else "behind")
        # the seed noise pooled over both configurations, which the convergence statement is set against
        assert parent.data.metrics["seed_noise"] == pytest.approx(_pooled_sd(groups))
        assert "over 2 seeds of 2 configurations" in tags["captune.convergence"]
        said = tags["captune.seed_choice"]
        assert f"from the top 2: {chosen.info.run_name.split()[0]} ({arch} lr=" in said
        assert ("2 configurations tied within seed noise" in said) == overlap
        assert f"[{arch}] {said}" in s1.out and f"{arch}: {tags['captune.seed_choice_summary']}" in s1.out  # (the verdict)
    capsys.readouterr()
    assert main(["leaderboard", "s1", "--tracking-uri", s1.tracking_uri]) == 0
    text = capsys.readouterr().out
    assert text.count("    champion over seeds: ") == 2 and " over seeds " in text
    assert len(re.findall(r" \d\.\d{4} chosen +\S.* [0-9a-f]{8}$", text, re.M)) == 2  # the column, on its trial's row


def test_each_champion_captions_by_the_decoding_chosen_for_it_on_the_validation_split(s1, capsys):
    from captune.search.decoding_search import grid

    for parent in s1.parents:
        arch, said = parent.data.tags["arch"], parent.data.tags["captune.decoding"]
        version = s1.client.get_model_version_by_alias(f"captune-{arch}", "champion")
        tags = version.tags
        assert said.startswith(f"decoding: {tags['decoding']}, validation CIDEr-D {float(tags['decoding_val_cider']):.4f} "
                               f"({float(tags['decoding_val_gain']):+.4f} over beam 3 without length penalty; the best "
                               f"of {len(grid(30))} decodings on the validation split)")
        # the grid holds greedy search, by which the trial's epochs were scored: the choice is no worse
        assert float(tags["decoding_val_cider"]) >= float(tags["cider"]) - 1e-9
        assert f"[{arch}] champion's {said}" in s1.out
    capsys.readouterr()
    assert main(["leaderboard", "s1", "--tracking-uri", s1.tracking_uri]) == 0
    assert capsys.readouterr().out.count("    champion's decoding: ") == 2


def test_every_trial_is_measured_for_speed_and_each_search_has_its_fronts_and_fast_model(s1, capsys):
    from captune.search.tradeoff import MIN_SPEEDUP, Model, front

    for parent in s1.parents:
        arch, tags, m = parent.data.tags["arch"], parent.data.tags, parent.data.metrics
        champion = s1.client.get_model_version_by_alias(f"captune-{arch}", "champion")
        runs = [s1.client.get_run(r.info.run_id) for r in s1.trials if r.data.params["arch"] == arch]
        assert len(runs) == 3
        models = []
        for run in runs:  # each finished trial: its size, latency and throughput, greedy and tuned, on its run
            rm, rt = run.data.metrics, run.data.tags
            assert Path(rt["captune.checkpoint"], "model.pt").is_file()
            assert rm["params"] > 1000 and 0.01 < rm["checkpoint_mb"] < 1000  # (fine-tuned: the encoder, Adam moments)
            for d in ("greedy", "tuned"):
                assert 0 < rm[f"latency_p50_ms_{d}"] <= rm[f"latency_p90_ms_{d}"] < 2000
                assert rm[f"throughput_b32_{d}"] > 1
            assert rt["captune.tuned_decoding"] == champion.tags["decoding"]
            assert "1 torch thread" in rt["captune.speed_machine"]
            rank = int(run.info.run_name.split()[0][1:])
            models += [Model(rank, run.info.run_id, rt["captune.trial_id"], "greedy", rm["best_cider"],
                             rm["latency_p50_ms_greedy"]),
                       Model(rank, run.info.run_id, rt["captune.trial_id"], "tuned", rm["tuned_cider"],
                             rm["latency_p50_ms_tuned"])]
        # the champion's trial at the tuned decoding scores what the decoding search found for it
        mine = next(r for r in runs if r.data.tags["captune.trial_id"] == champion.tags["trial_id"])
        assert mine.data.metrics["tuned_cider"] == pytest.approx(float(champion.tags["decoding_val_cider"]), abs=1e-6)
        # each run's front tag says which fronts of the measured points it is on
        for run in runs:
            on = [d for d in ("greedy", "tuned") if run.info.run_id in {x.run_id for x in front([x for x in models if x.decoding == d])}]
            assert run.data.tags["captune.front"] == ("+".join(on) or "-")
        # @fast: registered, aliased, within the seed noise of the champion and at least MIN_SPEEDUP as fast, or it
        fast = s1.client.get_model_version_by_alias(f"captune-{arch}", "fast")
        assert tags["captune.fast_model"] == f"models:/captune-{arch}/{fast.version}"
        assert m["champion_latency_p50_ms"] == mine.data.metrics["latency_p50_ms_tuned"]
        if str(fast.version) == str(champion.version):
            assert tags["captune.fast"].startswith("@fast is the champion")
        else:
            assert fast.tags["role"] == "fast" and m["fast_latency_p50_ms"] * MIN_SPEEDUP <= m["champion_latency_p50_ms"]
            assert float(fast.tags["cider"]) >= float(champion.tags["decoding_val_cider"]) - m["seed_noise"] - 1e-6
        assert "pareto.png" in {a.path.rsplit("/", 1)[-1] for a in s1.client.list_artifacts(parent.info.run_id, "tradeoff")}
        assert f"[{arch}] {tags['captune.fast']}" in s1.out
        # served by its alias, at its stored decoding
        loaded = load_captioner(f"models:/captune-{arch}@fast", s1.tracking_uri)
        assert loaded.payload["decoding"]["beam"] == int(fast.tags["decoding_beam"])
    capsys.readouterr()
    assert main(["leaderboard", "s1", "--tracking-uri", s1.tracking_uri]) == 0
    text = capsys.readouterr().out
    assert text.count("    speed: tuned = validation score at the tuned decoding") == 2 and "ms g/t" in text
    assert len(re.findall(r" \d+\.\d/\d+\.\d (greedy|tuned|greedy\+tuned|-) +[0-9a-f]{8}$", text, re.M)) == 6


def test_compare_reuses_the_sweeps_replicates_of_each_champion_and_records_them(s1, capsys):
    client, exp = s1.client, s1.exp
    before = {r.info.run_id for r in _replicates(s1)}
    capsys.readouterr()
    assert main(["compare", "s1", "--seeds", "2", "--resamples", "200", "--json", "--tracking-uri", s1.tracking_uri]) == 0
    first = json.loads(capsys.readouterr().out)
    assert {r.info.run_id for r in _replicates(s1)} == before  # the champions' were trained by the sweep's choice
    reps = first["replicates"]["architectures"]
    for parent in s1.parents:
        arch = parent.data.tags["arch"]
        runs = [client.get_run(run_id) for run_id in reps[arch]["runs"]]
        assert {r.info.run_name for r in runs} == {f"{arch}-{parent.data.tags['captune.best_trial']}-seed{k}" for k in (1, 2)}
        assert sorted(reps[arch]["test_bleu4"]["values"]) == pytest.approx(sorted(r.data.metrics["test_bleu4"] for r in runs))
        assert set(first["models"][arch]["control"]["scores"]) == {"bleu4", "cider"}
        assert set(first["models"][arch]["beam1"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
        # the convergence statement stands as the sweep's choice set it (noise pooled over its configurations)
        assert first["convergence"][arch] == parent.data.tags["captune.convergence"]
        assert first["models"][arch]["chosen_over_seeds"] == parent.data.tags["captune.seed_choice_summary"]
        # the test split scored once more, with the decoding chosen for the champion on the validation split
        version = client.get_model_version_by_alias(f"captune-{arch}", "champion")
        assert first["models"][arch]["tuned"]["decoding"] == version.tags["decoding"]
        assert set(first["models"][arch]["tuned"]) == {"decoding", "bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
        # @fast beside it, on the same split at its own decoding (the champion's scores when it is the champion)
        fast = first["models"][arch]["fast"]
        assert fast["model"] == parent.data.tags["captune.fast_model"] and fast["latency_p50_ms"] > 0
        assert fast["same"] == (fast["version"] == str(version.version))
        if fast["same"]:
            assert fast["cider"] == first["models"][arch]["tuned"]["cider"]
        else:
            assert {"decoding", "bleu4", "cider"} <= set(fast)
    for boots in (first["bootstrap"], first["replicates"]["bootstrap"]):
        assert set(boots) == {"bleu4", "cider"}
        for boot in boots.values():
            assert boot["resamples"] == 200 and boot["low"] <= boot["difference"] <= boot["high"]
    assert first["metric"] == "cider" and "CIDEr-D" in first["verdict"] and "cnn-lstm: " in first["verdict"]
    comparison = client.search_runs([exp.experiment_id], filter_string="tags.`captune.kind` = 'compare' and "
                                                                         "params.resamples = '200'")[0]
    assert {"comparison.json", "comparison.png"} <= {a.path for a in client.list_artifacts(comparison.info.run_id)}
    assert comparison.data.params["seeds"] == "2" and "cnn-lstm.model" in comparison.data.params
    assert {"replicates.bleu4_difference_low", "replicates.cider_difference_low", "cider_difference"} <= \
           set(comparison.data.metrics)
    assert {"cnn-lstm.val_best_cider", "resnet-gru.val_best_bleu4", "cnn-lstm.beam3.bleu4", "cnn-lstm.beam3.cider",
            "resnet-gru.beam1.rouge_l"} <= set(comparison.data.metrics)
    assert main(["compare", "s1", "--seeds", "2", "--resamples", "200", "--json", "--tracking-uri", s1.tracking_uri]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {r.info.run_id for r in _replicates(s1)} == before
    assert again["replicates"] == first["replicates"] and again["bootstrap"] == first["bootstrap"]
    # the sweep's own comparison and this one are two runs, each with its settings
    assert sorted(r.data.params["resamples"] for r in client.search_runs(
        [exp.experiment_id], filter_string="tags.`captune.kind` = 'compare'")) == ["1000", "200"]


def test_each_search_says_whether_more_trials_could_still_gain(s1, capsys):
    # As each search ends: Optuna's regret bound over its 3 finished trials against the seed noise
    # its choice over seeds measured, the command that adds trials.
    for parent in s1.parents:
        arch, tags, metrics = parent.data.tags["arch"], parent.data.tags, parent.data.metrics
        assert metrics["regret_bound_trials"] == 3 and metrics["regret_bound"] >= 0
        bound, noise = metrics["regret_bound"], metrics["seed_noise"]
        assert tags["captune.convergence"].startswith(
            f"converged: more trials unlikely to gain more than the seed noise (<= {bound:.4f} vs ±{noise:.4f} over 2 "
            f"seeds of 2 configurations" if bound <= noise else
            f"not converged: more trials may gain up to {bound:.4f} (seed noise ±{noise:.4f} over 2 seeds of 2 "
            f"configurations); `captune sweep --name s1 ")
        assert f"[{arch}] {tags['captune.convergence']}" in s1.out
        assert tags["mlflow.note.content"].endswith(f"\n\n**Converged?** {tags['captune.convergence']}")
        assert tags["mlflow.note.content"].startswith(f"**{arch}** search of sweep `s1`")
        more = tags["captune.more_trials_command"]
        assert more.startswith("captune sweep --name s1 --data ") and " --resume " in more
        assert more.endswith(" --more-trials 3")
    assert main(["leaderboard", "s1", "--tracking-uri", s1.tracking_uri]) == 0
    assert capsys.readouterr().out.count("    convergence: ") == 2


def test_a_finished_sweeps_name_is_refused_unless_resumed_with_its_metric_and_storage(s1, synth_dir, capsys):
    tmp_path, tracking_uri, config = s1.folder, s1.tracking_uri, s1.config
    capsys.readouterr()
    # a rerun under the same name is refused unless resumed
    assert main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri]) == 2
    assert "continue it with --resume" in capsys.readouterr().err
    # a resume goes on maximising what the sweep maximised: another metric is refused before anything runs
    assert main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config), "--storage",
                 str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--resume"]) == 2
    assert "sweep 's1' maximises cider, not bleu4: resume it with --metric cider" in capsys.readouterr().err
    # a name means one sweep: not the same name in another storage, not --resume of one that never ran
    for extra in ([], ["--resume"]):
        assert main(["sweep", "--data", str(synth_dir), "--name", "s1", "--config", str(config), "--storage",
                     str(tmp_path / "elsewhere"), "--tracking-uri", tracking_uri, *extra]) == 2
        assert f"already exists with its results in {tmp_path / 'tune'}" in capsys.readouterr().err
    assert main(["sweep", "--data", str(synth_dir), "--name", "never-ran", "--config", str(config), "--storage",
                 str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--resume"]) == 2
    assert "there is no sweep 'never-ran' to resume" in capsys.readouterr().err
    assert s1.client.get_experiment_by_name("never-ran") is None and not (tmp_path / "elsewhere").exists()


@pytest.fixture(scope="module")
def synth_300(tmp_path_factory) -> Path:
    """Enough validation images (30) for BLEU-4 to tell a model that learns from one that does not:
    on 6, a learning model's BLEU-4 is still 0 at some epochs (no 4-gram matched at all)."""
    from captune.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth300"), images=300, seed=1)


def test_asha_stops_poor_trials_and_diverged_trials_are_recorded(ray_cluster, synth_300, tmp_path, tracking_uri):
    # lr 1e-7 learns nothing (ASHA stops it at the first rung, epoch 2); lr 1e30 diverges (the trial
    # fails). At lr 0.002 this model's BLEU-4 after 2 epochs was 0.12-0.31 over seeds 0-3.
    space = {"lr": {"choice": [0.002, 1.0e-7, 1.0e30]}, "fine_tune": False, "batch_size": 8,
             "hidden_size": 128, "embed_size": 64}
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=5, epochs=4, space=space, max_concurrent=1, seed=3,
                        grace_period=2)
    assert main(["sweep", "--data", str(synth_300), "--name", "s2", "--arch", "cnn-lstm", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]) == 0
    client = MlflowClient(tracking_uri)
    runs = trial_runs(client, "s2")
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
    # Optuna learnt what happened: COMPLETE, PRUNED (with its epochs' values) and FAIL, trial by trial
    states = [t.state.name for t in assert_study_matches_mlflow(client, "s2", "cnn-lstm", tmp_path / "tune")]
    assert {"COMPLETE", "PRUNED", "FAIL"} <= set(states)
    # no control was asked for: none ran
    assert not client.search_runs([client.get_experiment_by_name("s2").experiment_id],
                                  filter_string="tags.`captune.kind` = 'control'")


def test_sweep_stopped_at_three_points_resumes_without_repeating_or_losing_anything(ray_cluster, synth_dir, tmp_path,
                                                                                     tracking_uri):
    # One sweep, stopped three times and resumed each time: by Ctrl-C (SIGINT to the process group,
    # as a terminal sends it) while its first trial trains; by SIGTERM to the driver (as a job
    # scheduler sends it) between trials; by SIGKILL once its last trial has started. Each stop
    # keeps every finished epoch, leaves no MLflow run RUNNING (but after SIGKILL, which allows
    # no clean-up; the resume closes those) and says how to go on.
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=3, epochs=4, max_concurrent=1)
    args = [sys.executable, "-m", "captune.cli", "sweep", "--data", str(synth_dir), "--name", "s3", "--arch",
            "resnet-gru", "--config", str(config), "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri,
            "--no-control"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **attached(ray_cluster)}
    client = MlflowClient(tracking_uri)

    def epochs_of(run) -> int:
        return len(client.get_metric_history(run.info.run_id, "bleu4"))

    points = [  # (when to stop, how), each checked on the sweep's MLflow runs
        (lambda runs: any(epochs_of(r) >= 1 and r.info.status == "RUNNING" for r in runs), "SIGINT to the group"),
        (lambda runs: len(runs) >= 2 and any(r.info.status == "FINISHED" for r in runs), "SIGTERM to the driver"),
        (lambda runs: len(runs) >= 3, "SIGKILL"),
    ]
    for n, (ready, how) in enumerate(points):
        log_path = tmp_path / f"run{n}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(args + (["--resume"] if n else []), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        deadline = time.time() + 240
        while not (client.get_experiment_by_name("s3") and ready(trial_runs(client, "s3"))):
            assert time.time() < deadline and proc.poll() is None, f"{how}: not reached: " + log_path.read_text()[-3000:]
            time.sleep(0.3)
        finished_epochs = {r.data.tags["captune.trial_id"]: epochs_of(r) for r in trial_runs(client, "s3")}
        {"SIGINT to the group": lambda: os.killpg(proc.pid, signal.SIGINT),
         "SIGTERM to the driver": lambda: os.kill(proc.pid, signal.SIGTERM),
         "SIGKILL": lambda: os.killpg(proc.pid, signal.SIGKILL)}[how]()
        asked = time.monotonic()
        code = proc.wait(60)
        print(f"{how}: the sweep stopped {time.monotonic() - asked:.1f}s later")
        text = log_path.read_text()
        if how == "SIGKILL":
            assert code == -signal.SIGKILL
            deadline = time.time() + 60
            while time.time() < deadline:  # Ray ends a dead driver's actors (its slot pool among them)
                try:
                    ray_cluster.get_actor(pool_name("s3"))
                except ValueError:
                    break
                time.sleep(0.5)
            break
        assert code == 130 and "Traceback" not in text and "SIGABRT" not in text, text[-3000:]
        assert "captune sweep --name s3" in text and "--resume" in text  # how to go on
        # the console shows the sweep's view, not Ray Tune's boxes (captune.search.progress)
        assert "[resnet-gru] trial 1 (" in text and "Configuration for experiment" not in text, text[-3000:]
        assert "TensorBoard" not in text and "epoch 1/4" not in text
        runs = client.search_runs([client.get_experiment_by_name("s3").experiment_id], filter_string="tags.`captune.sweep` = 's3'")
        assert not [r for r in runs if r.info.status == "RUNNING"]
        stopped = [r for r in runs if r.info.status == "KILLED"]
        assert stopped and all(r.data.tags["captune.stop_reason"] == ("SIGINT (Ctrl-C)" if n == 0 else "SIGTERM")
                               for r in stopped)
        for trial_id, epochs in finished_epochs.items():  # nothing reported is lost
            (run,) = [r for r in trial_runs(client, "s3") if r.data.tags["captune.trial_id"] == trial_id]
            assert epochs_of(run) >= epochs
    assert main(args[3:] + ["--resume"]) == 0

    runs = trial_runs(client, "s3")
    done = [r.data.tags["captune.trial_id"] for r in runs if r.data.tags["captune.end_state"] != "interrupted"]
    assert len(done) == 3 == len(set(done))
    assert all(r.data.tags["captune.end_state"] in ("finished", "early-stopped") for r in runs
               if r.data.tags["captune.trial_id"] in done)
    assert all(r.info.status in ("FINISHED", "KILLED") and "captune.stop_reason" not in r.data.tags for r in runs
               if r.data.tags["captune.trial_id"] in done)  # reopened, then ended as they did
    # A trial started in the second before the kill, after Tune's last snapshot, is closed in both
    # Optuna (failed) and MLflow (interrupted); usually there is none.
    interrupted = len(runs) - len(done)
    study = assert_study_matches_mlflow(client, "s3", "resnet-gru", tmp_path / "tune")
    states = [t.state for t in study]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 3
    assert states.count(optuna.trial.TrialState.FAIL) >= interrupted
    # the default configuration was evaluated once, not enqueued again by a resume
    default = {"lr": 0.002, "hidden_size": 256, "vocab_threshold": 2}
    assert sum(t.params == default for t in study) == 1
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == \
               list(range(1, int(run.data.tags.get("captune.epochs_run", 0)) + 1)) or \
               run.data.tags["captune.end_state"] == "interrupted"  # each epoch logged once
    (parent,) = client.search_runs([client.get_experiment_by_name("s3").experiment_id],
                                   filter_string="tags.`captune.kind` = 'search'")
    assert parent.info.status == "FINISHED" and "captune.stop_reason" not in parent.data.tags
    tune_trials = {p.name for p in (tmp_path / "tune" / "s3-resnet-gru").iterdir() if p.is_dir()}
    assert 3 <= len(tune_trials) <= 3 + interrupted


def test_multi_worker_trials_run_ddp_through_torchtrainer(ray_cluster, synth_dir, tmp_path, tracking_uri):
    # Two workers per trial: each trial is a Ray Train TorchTrainer run reporting through
    # TuneReportCallback; its checkpoint (in the Train run's storage) becomes the champion.
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=1)
    assert main(["sweep", "--data", str(synth_dir), "--name", "s4", "--arch", "cnn-lstm", "--config", str(config),
                 "--workers-per-trial", "2", "--storage", str(tmp_path / "tune"),
                 "--tracking-uri", tracking_uri, "--no-control"]) == 0
    client = MlflowClient(tracking_uri)
    runs = trial_runs(client, "s4")
    assert len(runs) == 1 and runs[0].data.tags["captune.end_state"] == "finished"
    # one worker per machine (here, one machine) logs its system metrics to the trial's run
    assert client.get_metric_history(runs[0].info.run_id, "system/cpu_utilization_percentage")
    train_runs = sorted(p.name for p in (tmp_path / "tune" / "s4-cnn-lstm-train").iterdir())
    assert train_runs == sorted(f"trial-{r.data.tags['captune.trial_id']}" for r in runs)
    version = client.get_model_version_by_alias("captune-cnn-lstm", "champion")
    assert version.run_id in {r.info.run_id for r in runs}


def test_the_trial_entry_preloads_the_training_code_in_an_actor_only(ray_cluster):
    # Tune hands a trainable to the trial actor as the actor is created, before the first trial:
    # captune.search.trial._Entry, rebuilt there by Ray, imports the training code then; rebuilt where no
    # actor runs (the search task; here a plain interpreter), it loads no torch.
    import ray

    from captune.search.trial import _Entry
    from captune.trainables import WORKER_PRELOAD

    # The fork server preloads captune.trainables.loop into every worker: what _Entry's import shows
    # in an actor is ray_train, which neither the server nor loop imports.
    assert "captune.trainables.ray_train" not in WORKER_PRELOAD
    code = "import sys, captune.trainables.loop; print('captune.trainables.ray_train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

    @ray.remote(num_cpus=0)
    class TrialLike:
        def holds(self, entry) -> bool:  # Ray rebuilt `entry` in this actor's process
            return type(entry).__name__ == "_Entry" and "captune.trainables.ray_train" in sys.modules

    assert ray.get(TrialLike.remote().holds.remote(_Entry()))
    code = ("import sys; from captune.search.trial import _entry; _entry(); "
            "print('torch' in sys.modules or 'captune.trainables.loop' in sys.modules)")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "False"
