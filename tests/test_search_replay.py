"""The replay of search strategies (benchmarks/search_replay.py) stops the trials a real Ray sweep
stops on the same learning curves, and its clock and bookkeeping do what its figures assume."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import search_replay as sr  # noqa: E402

from captune.search.strategy import make_sampler, make_scheduler

EPOCHS, GRACE, RF = 8, 2, 2
SPACE = {"x": ("uniform", [0.0, 1.0])}


def crossing_curves(n: int, seed: int = 0) -> np.ndarray:
    """(n, EPOCHS) validation scores that rise at different speeds to different ends, so that
    curves cross and ASHA's early cuts are sometimes wrong; no two equal."""
    rng = np.random.default_rng(seed)
    end, speed = rng.uniform(0.2, 0.6, n), rng.uniform(0.2, 1.5, n)
    t = np.arange(1, EPOCHS + 1)
    return end[:, None] * (1 - np.exp(-speed[:, None] * t)) + rng.normal(0, 0.01, (n, EPOCHS))


def table(val: np.ndarray, seconds: np.ndarray | None = None) -> sr.ArchTable:
    n = len(val)
    return sr.ArchTable("cnn-lstm", SPACE, [{"x": i / (n - 1)} for i in range(n)], val, val - 0.01,
                        np.ones_like(val) if seconds is None else seconds, np.zeros(n, dtype=int), {"x": 0.0})


def ray_asha_sweep(ray, tmp_path: Path, val: np.ndarray, concurrent: int) -> tuple[dict, list]:
    """A real Tune run of the curves under captune's ASHA: {row: last epoch run}, and the order in
    which the scheduler saw the results [(row, epoch, score)]."""
    import time

    from ray import tune
    from ray.tune import Callback

    seen = []

    class Order(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append((trial.config["row"], result["epoch"], result["best_bleu4"]))

    def trainable(config):
        best = -math.inf
        for e in range(EPOCHS):
            best = max(best, float(val[config["row"], e]))
            time.sleep(0.02)
            tune.report({"epoch": e + 1, "best_bleu4": best})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space={"row": tune.grid_search(list(range(len(val))))},
        tune_config=tune.TuneConfig(metric="best_bleu4", mode="max", max_concurrent_trials=concurrent, reuse_actors=True,
                                    scheduler=make_scheduler(EPOCHS, GRACE, RF)),
        run_config=tune.RunConfig(name=f"asha{concurrent}", storage_path=str(tmp_path), callbacks=[Order()],
                                  verbose=0))
    results = tuner.fit()
    last = {r.config["row"]: int(r.metrics["epoch"]) for r in results}
    return last, seen


def test_replayed_asha_stops_the_trials_a_ray_sweep_stops(ray_cluster, tmp_path):
    val = crossing_curves(12)
    # one trial at a time: the replay's own clock gives the order, as Ray runs them
    ray_last, _ = ray_asha_sweep(ray_cluster, tmp_path, val, concurrent=1)
    tab = table(val)
    run = sr.replay(sr.Strategy("asha", "random", stopper="asha", grace=GRACE, rf=RF), tab, workers=1, seed=0,
                    horizon=math.inf, enqueued=[{"x": c["x"]} for c in tab.configs], trials=len(val))
    replay_last = {}
    for r in run["all_reports"]:
        replay_last[r.row] = r.epoch
    assert replay_last == ray_last
    assert 0 < sum(e < EPOCHS for e in ray_last.values()) < len(val)  # ASHA did stop some, not all
    # the curves cross: a trial stopped at the grace epoch would have beaten one that went on
    obj = tab.objective()
    stopped = [r for r, e in ray_last.items() if e == GRACE]
    assert any(obj[s, -1] > obj[k, -1] for s in stopped for k, e in ray_last.items() if e == EPOCHS)


def test_asha_rule_decides_as_ray_in_ray_arrival_order(ray_cluster, tmp_path):
    """Three trials at once: results arrive as Ray's threads run; fed in that order the rule
    stops exactly the trials Ray stopped, at the same epochs."""
    val = crossing_curves(14, seed=1)
    ray_last, seen = ray_asha_sweep(ray_cluster, tmp_path, val, concurrent=3)
    rule, last = sr.AshaRule(GRACE, EPOCHS, RF), {}
    stopped = set()
    for row, epoch, score in seen:
        assert row not in stopped  # Ray hands the scheduler nothing of a trial after stopping it
        last[row] = epoch
        if rule.stop(row, epoch, score):
            stopped.add(row)
            if epoch >= EPOCHS:
                rule.complete(row, epoch, score)
    assert last == ray_last
    assert len(stopped) == len(val)


def test_clock_runs_w_workers_and_counts_each_epochs_seconds():
    val = crossing_curves(6, seed=2)
    seconds = np.tile(np.arange(1, 7, dtype=float)[:, None], (1, EPOCHS))  # row i: i+1 s per epoch
    tab = table(val, seconds)
    points = [{"x": c["x"]} for c in tab.configs]
    run = sr.replay(sr.Strategy("full", "random"), tab, workers=2, seed=0, horizon=math.inf, enqueued=points,
                    trials=len(points))
    first = [r for r in run["all_reports"] if r.epoch == EPOCHS][:3]
    # rows 0 and 1 start at 0 on two workers; row 2 starts when row 0 ends (8 s + start)
    assert [(r.row, r.time) for r in first] == [(0, 1 + 8), (1, 1 + 16), (2, 9 + 1 + 24)]
    assert all(r.score == np.maximum.accumulate(val[r.row])[r.epoch - 1] for r in run["all_reports"])


def test_figures_pick_time_to_target_and_anytime():
    R = sr.Report
    reports = [R(5, 0, 3, 1, 0.30, 1), R(6, 1, 4, 1, 0.40, 1), R(9, 0, 3, 2, 0.40, 1), R(12, 1, 4, 2, 0.45, 2)]
    assert sr.time_to(reports, 0.40) == 6 and math.isinf(sr.time_to(reports, 0.5))
    # a tie at 0.40 goes to the trial that reached it in fewer epochs, then to the earlier trial
    assert sr.pick(reports, 10).row == 3
    assert sr.pick(reports, 20).row == 4 and sr.pick(reports, 1) is None
    assert sr.anytime(reports, np.array([0, 5, 7, 100])).tolist() == [-math.inf, 0.30, 0.40, 0.45]


def test_nearest_configuration_answers_a_proposal():
    tab = sr.ArchTable("cnn-lstm", {"lr": ("loguniform", [1e-4, 1e-2]), "h": ("choice", [128, 256, 512])},
                       [{"lr": 1e-4, "h": 128}, {"lr": 1e-3, "h": 512}, {"lr": 1e-2, "h": 256}],
                       np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 2)), np.zeros(3, dtype=int), {"lr": 1e-3, "h": 256})
    assert tab.nearest({"lr": 9e-4, "h": 512}) == 1  # 9e-4 is near 1e-3 on the log scale
    assert tab.nearest({"lr": 3e-3, "h": 256}) == 2
    assert tab.unit({"lr": 1e-3, "h": 256}) == pytest.approx([0.5, 0.5])


def test_sampler_settings_reach_optuna_and_bad_ones_are_named():
    import optuna

    sampler = make_sampler("tpe", 7, {"n_startup_trials": 3, "multivariate": True})
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", 0), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="'cmaes' is not one of tpe, gp, random"):
        make_sampler("cmaes", 0)
    with pytest.raises(ValueError, match="tpe takes no argument 'seed'"):
        make_sampler("tpe", 0, {"seed": 3})


def test_the_shipped_sweep_files_are_the_replays_winner_and_let_it_propose_half_their_trials_or_more():
    from captune.search.space import SweepSettings, load_spaces
    from captune.search.strategy import startup_trials

    root = Path(__file__).resolve().parent.parent / "search"
    for name in ("spaces.yaml", "demo.yaml"):
        settings = load_spaces(root / name)[0]
        startup = settings.sampler_args.get("n_startup_trials", startup_trials(settings.trials))
        assert (settings.sampler, settings.early_stopping) == ("gp", "none"), name  # "GP + preset (full training)"
        assert settings.trials - startup >= settings.trials / 2, name
    assert (SweepSettings().sampler, SweepSettings().early_stopping) == ("gp", "none")  # a file that does not say
    assert [startup_trials(n) for n in (1, 6, 12, 24, 30, 100)] == [3, 3, 4, 8, 10, 10]


def test_a_sweep_records_its_sampler_and_start_up(finished_sweep):
    from mlflow import MlflowClient

    client = MlflowClient(finished_sweep.tracking_uri)
    exp = client.get_experiment_by_name("s1")
    parents = client.search_runs([exp.experiment_id], "tags.`captune.kind` = 'search'")
    assert len(parents) == 2
    for run in parents:  # 3 trials: the preset, 1 random draw, then the GP proposes one; none stopped early
        assert run.data.params["sampler"] == "gp" and run.data.params["sampler_startup_trials"] == "2"
        assert run.data.params["early_stopping"] == "none"
    trials = client.search_runs([exp.experiment_id], "tags.`captune.kind` = 'trial'")
    assert len(trials) == 6 and {t.data.tags["captune.end_state"] for t in trials} == {"finished"}
    assert "the GP sampler proposes 1 after the preset and 1 random draw(s); every trial trained to the end" \
        in finished_sweep.out
