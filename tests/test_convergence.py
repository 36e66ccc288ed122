"""captune.search.convergence: Optuna's regret bound against the seed noise, in words."""
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from captune.search.convergence import regret_bound, seed_noise, statement

MORE = "captune sweep --name s --data d --resume --more-trials 6"


def trials(values: list[float]) -> list:
    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    return [create_trial(params={"lr": 10 ** (-4 + 3 * i / max(1, len(values) - 1))}, distributions=space, value=v,
                         state=TrialState.COMPLETE) for i, v in enumerate(values)]


def test_the_bound_needs_three_finished_trials_and_is_a_non_negative_score_gain():
    assert regret_bound(trials([0.1, 0.2]), seed=0) is None
    pruned = [create_trial(params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                           state=TrialState.PRUNED, intermediate_values={1: 0.3})] * 3
    assert regret_bound(trials([0.1, 0.2]) + pruned, seed=0) is None  # only finished trials count
    bound = regret_bound(trials([0.10, 0.30, 0.45, 0.50, 0.52, 0.51]), seed=0)
    assert bound is not None and 0 <= bound < 1
    assert regret_bound(trials([0.10, 0.30, 0.45, 0.50, 0.52, 0.51]), seed=0) == bound  # seeded: the same again


def test_the_seed_noise_is_the_standard_deviation_over_seeds():
    assert seed_noise([0.5]) is None and seed_noise([]) is None
    assert seed_noise([0.50, 0.54]) == pytest.approx(0.028284, abs=1e-6)


@pytest.mark.parametrize("bound, noise, words", [
    (None, None, "convergence not estimated: 2 finished trial(s), the regret bound needs 3"),
    (0.05, None, "more trials may gain up to 0.0500 (regret bound over 2 trials); the seed noise is not measured yet"),
    (0.004, 0.03, "converged: more trials unlikely to gain more than the seed noise (<= 0.0040 vs ±0.0300 over 3 "
                  "seeds; bound over 2 trials)"),
    (0.05, 0.03, f"not converged: more trials may gain up to 0.0500 (seed noise ±0.0300 over 3 seeds); `{MORE}`"),
])
def test_the_statement_sets_the_bound_against_the_noise(bound, noise, words):
    assert statement(bound, noise, 2, MORE, seeds=3 if noise else 0).startswith(words)
