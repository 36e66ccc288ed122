"""Contract tests: each checks, in well under a second and without a sweep, one assumption captune
makes about a library's private behaviour (docs/ARCHITECTURE.md, "Library internals"), so that an
upgrade that breaks it fails here first, by name, before any end-to-end test."""
from __future__ import annotations

import optuna
import pytest
from ray import tune


@pytest.fixture()
def optuna_search(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = OptunaSearch(points_to_evaluate=[{"lr": 0.002}], sampler=optuna.samplers.RandomSampler(seed=0),
                          storage=optuna.storages.RDBStorage(storage), study_name="contract")
    return search, storage


def test_ray_optuna_search_private_attributes_captune_searcher_relies_on(optuna_search, tmp_path):
    # captune.search.searcher.ResumableOptunaSearch reads and writes these (Ray 2.60).
    search, storage = optuna_search
    assert search._space is None and search._points_to_evaluate == [{"lr": 0.002}]
    assert search._study_name == "contract" and search._storage is not None
    assert isinstance(search._completed_trials, set)
    # set_search_properties creates the study and enqueues the points to evaluate into it
    assert search.set_search_properties("score", "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    assert isinstance(search._ot_study, optuna.Study)
    config = search.suggest("t1")
    assert config == {"lr": 0.002}  # the enqueued point first
    trial = search._ot_trials["t1"]
    assert isinstance(trial, optuna.Trial) and isinstance(trial._trial_id, int)
    frozen = search._ot_study._storage.get_trial(trial._trial_id)
    assert frozen.state == optuna.trial.TrialState.RUNNING and frozen._trial_id == trial._trial_id
    # save and restore carry the Tune trial -> Optuna trial map
    search.save(str(tmp_path / "searcher.pkl"))
    from ray.tune.search.optuna import OptunaSearch

    again = OptunaSearch(sampler=optuna.samplers.RandomSampler(seed=0))
    again.restore(str(tmp_path / "searcher.pkl"))
    assert set(again._ot_trials) == {"t1"} and again._ot_trials["t1"]._trial_id == trial._trial_id


def test_ray_optuna_search_loads_an_existing_study_of_its_name(optuna_search):
    # `captune sweep --resume --more-trials` starts a new Tune run whose OptunaSearch names the
    # search's study: Ray 2.60 creates it with load_if_exists=True, so the study goes on (its
    # trials told to the sampler, numbers continuing) instead of failing or starting over.
    from ray.tune.search.optuna import OptunaSearch

    first, storage = optuna_search
    first.set_search_properties("score", "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    first.suggest("t1")
    first.on_trial_complete("t1", {"score": 0.5})
    more = OptunaSearch(sampler=optuna.samplers.RandomSampler(seed=1), storage=optuna.storages.RDBStorage(storage),
                        study_name="contract")
    assert more.set_search_properties("score", "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    assert len(more._ot_study.trials) == 1 and more._ot_study.trials[0].value == 0.5
    more.suggest("t2")
    assert more._ot_trials["t2"].number == 1


def test_ray_asha_bracket_rule_the_replay_mirrors():
    # benchmarks/search_replay.py's AshaRule restates ray.tune.schedulers.async_hyperband._Bracket
    # (rungs at grace * rf**k, the cut the (1 - 1/rf) nanpercentile of the scores recorded before,
    # a trial recorded once per rung): the same events must get the same decisions.
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from search_replay import AshaRule

    rng = np.random.default_rng(0)
    for grace, rf, max_t in ((1, 2, 8), (2, 2, 6), (1, 3, 9), (3, 2, 12)):
        ray_bracket, ours = _Bracket(grace, max_t, rf, 0), AshaRule(grace, max_t, rf)
        alive = {i: 0 for i in range(24)}
        while alive:
            trial = int(rng.choice(list(alive)))
            alive[trial] += 1
            t, score = alive[trial], float(rng.random())
            theirs = ray_bracket.on_result(SimpleNamespace(trial_id=str(trial)), t, score) == TrialScheduler.STOP
            assert ours._on_result(str(trial), t, score) == theirs, (grace, rf, max_t, trial, t)
            if theirs or t >= max_t:
                del alive[trial]


def test_ray_concurrency_limiter_state_shared_slots_relies_on(optuna_search):
    # captune.search.slots.SharedSlots subclasses ConcurrencyLimiter: it reads `live_trials` and
    # `max_concurrent`, and saves its own fields by copying `__dict__` as ConcurrencyLimiter's
    # get_state does (less `searcher`), set_state putting them back (Ray 2.60).
    from ray.tune.search import ConcurrencyLimiter

    search, _ = optuna_search
    limiter = ConcurrencyLimiter(search, max_concurrent=1)
    assert limiter.searcher is search and limiter.max_concurrent == 1
    assert limiter.set_search_properties("score", "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    assert limiter.suggest("t1") is not None and limiter.live_trials == {"t1"}
    assert limiter.suggest("t2") is None  # full: refused, as SharedSlots refuses before taking a slot
    limiter.extra = "kept"
    state = limiter.get_state()
    assert "searcher" not in state and state["extra"] == "kept" and state["live_trials"] == {"t1"}
    fresh = ConcurrencyLimiter(search, max_concurrent=5)
    fresh.set_state(state)
    assert fresh.extra == "kept" and fresh.max_concurrent == 1 and fresh.searcher is search


def test_ray_train_switches_captune_sets():
    # captune.trainables.ray_train sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (the controller sees a
    # stop within 0.5 s) and RAY_TRAIN_ENABLE_PRINT_PATCH=0 (rank 0's epoch line printed once): Ray
    # Train 2.60 reads them by these names (the controller the first, the print patch the second),
    # and carries both from the driver to the controller and its workers.
    import inspect

    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller import controller
    from ray.train.v2._internal.logging import patch_print

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert constants.ENABLE_PRINT_PATCH_ENV_VAR == "RAY_TRAIN_ENABLE_PRINT_PATCH"
    assert "os.getenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR" in inspect.getsource(controller)
    assert "ENABLE_PRINT_PATCH_ENV_VAR" in inspect.getsource(patch_print)
    assert {constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR, constants.ENABLE_PRINT_PATCH_ENV_VAR} <= constants.ENV_VARS_TO_PROPAGATE


def test_atexit_run_exitfuncs_the_fork_server_calls():
    # A forked worker ends with os._exit (never returning into the server's loop), so it runs the
    # worker's atexit handlers itself through CPython's private atexit._run_exitfuncs.
    import atexit
    import subprocess
    import sys

    code = ("import atexit, os; atexit.register(print, 'handler ran', flush=True); "
            "atexit._run_exitfuncs(); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "handler ran\n" and callable(atexit._run_exitfuncs)


def test_optuna_regret_bound_evaluator_the_convergence_statement_relies_on():
    # Optuna 5.0 deprecates optuna.terminator but keeps RegretBoundEvaluator(top_trials_ratio,
    # min_n_trials, seed).evaluate(trials, direction): captune.search.convergence's one use.
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optuna.terminator import RegretBoundEvaluator
    assert {"min_n_trials", "seed"} <= set(inspect.signature(RegretBoundEvaluator).parameters)
    assert list(inspect.signature(RegretBoundEvaluator.evaluate).parameters)[1:] == ["trials", "study_direction"]
    assert optuna.study.StudyDirection.MAXIMIZE
