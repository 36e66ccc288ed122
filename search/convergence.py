"""Whether a search has converged: how much more trials could still gain, set against how much the
score moves from one seed to the next.

The gain is bounded by Optuna's regret bound (`optuna.terminator.RegretBoundEvaluator`, Makarova
et al. 2022, "Automatic termination for hyperparameter optimization"): a GP fitted to the
study's finished trials bounds how far the best configuration not yet tried could lie above the
best found. Optuna 5.0 marks its terminator module deprecated, but keeps it, and no other
maintained library offers the bound; its use sits here alone. With fewer than 3 finished trials
there is nothing to fit.

The seed noise is the standard deviation of the search's objective over seeds of one
configuration: pooled over the top configurations the sweep retrained to choose its champion
(captune.search.seed_choice, `--seeds K`, K >= 2), or the champion's seed replicates alone
(`captune compare --seeds K` after a sweep without seeds). A bound within that noise
says more trials are unlikely to find a configuration that is better by more than a reseed moves
it; above it, more trials may still pay.

Estimated as each search ends (with the noise its choice over seeds measured, else the noise the
sweep measured before, if any), and again by `captune compare --seeds K` when the sweep did not
choose over seeds, once the replicates have measured the noise.
On the search's parent run: the metrics `regret_bound`, `regret_bound_trials` and `seed_noise`,
the tag `captune.convergence` in words, also the last paragraph of its description (the UI shows
a tag's value cut to a few words); the leaderboard and the console say the same words.
"""
from __future__ import annotations

import math
import statistics
import warnings

from captune.infra.mlflow_logging import metric_entities
from captune.infra.mlflow_names import NOTE_TAG

MIN_TRIALS = 3  # finished trials the bound's GP needs
NOTE_HEAD = "**Converged?**"  # the paragraph of the search run's description that says it
CONVERGENCE_TAG = "captune.convergence"
MORE_TAG = "captune.more_trials_command"  # the command that adds trials to the search, for the words
BOUND_METRIC, TRIALS_METRIC, NOISE_METRIC = "regret_bound", "regret_bound_trials", "seed_noise"


def regret_bound(trials: list, seed: int) -> float | None:
    """The regret bound over a study's finished trials (None below MIN_TRIALS)."""
    import optuna
    from optuna.study import StudyDirection

    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if len(finished) < MIN_TRIALS:
        return None
    with warnings.catch_warnings():  # its deprecation and "experimental" warnings: known, see the module
        warnings.simplefilter("ignore")
        from optuna.terminator import RegretBoundEvaluator

        bound = RegretBoundEvaluator(min_n_trials=MIN_TRIALS, seed=seed).evaluate(finished, StudyDirection.MAXIMIZE)
    return max(0.0, float(bound)) if math.isfinite(bound) else None


def seed_noise(scores: list[float]) -> float | None:
    """The standard deviation of one configuration's scores over seeds (None with fewer than 2)."""
    return statistics.stdev(scores) if len(scores) >= 2 else None


def statement(bound: float | None, noise: float | None, finished: int, more: str, seeds: int = 0,
              configurations: int = 1) -> str:
    """The verdict in words; `more`: the command that adds trials; `seeds`: how many the noise is
    over (of how many `configurations`, pooled)."""
    over = f" over {seeds} seeds" if seeds else ""
    if seeds and configurations > 1:
        over += f" of {configurations} configurations"
    if bound is None:
        return f"convergence not estimated: {finished} finished trial(s), the regret bound needs {MIN_TRIALS}"
    if noise is None:
        return (f"more trials may gain up to {bound:.4f} (regret bound over {finished} trials); the seed noise is not "
                f"measured yet (`--seeds 2` measures it)")
    if bound <= noise:
        return (f"converged: more trials unlikely to gain more than the seed noise (<= {bound:.4f} vs "
                f"±{noise:.4f}{over}; bound over {finished} trials)")
    return f"not converged: more trials may gain up to {bound:.4f} (seed noise ±{noise:.4f}{over}); `{more}`"


def record(client, parent_id: str, bound: float | None, noise: float | None, finished: int, more: str,
           seeds: int = 0, configurations: int = 1) -> str:
    """The statement on the search's parent run (its metrics and tags); returned."""
    said = statement(bound, noise, finished, more, seeds, configurations)
    values = {BOUND_METRIC: bound, TRIALS_METRIC: finished, NOISE_METRIC: noise}
    client.log_batch(parent_id, metrics=metric_entities({k: v for k, v in values.items() if v is not None}))
    client.set_tag(parent_id, CONVERGENCE_TAG, said)
    client.set_tag(parent_id, MORE_TAG, more)
    # and in the run's description, where the UI shows it whole (a tag's value is cut to a few words)
    note = client.get_run(parent_id).data.tags.get(NOTE_TAG, "").split(NOTE_HEAD)[0].rstrip()
    client.set_tag(parent_id, NOTE_TAG, f"{note}\n\n{NOTE_HEAD} {said}".lstrip())
    return said


def with_noise(client, parent, scores: list[float]) -> str | None:
    """The statement of a search already estimated (its parent run, from the search's end) again,
    now with the seed noise its champion's replicates measured (`scores`: their objective); None if it
    was never estimated."""
    tags, metrics = parent.data.tags, parent.data.metrics
    if CONVERGENCE_TAG not in tags:
        return None
    return record(client, parent.info.run_id, metrics.get(BOUND_METRIC), seed_noise(scores),
                  int(metrics.get(TRIALS_METRIC, 0)), tags.get(MORE_TAG, "captune sweep ... --resume --more-trials N"),
                  len(scores))
