"""A search's strategy: the Optuna sampler that draws its configurations and, if asked, the ASHA
scheduler that stops poor trials early, built from the sweep file's settings. The one place that
builds them, for a sweep (captune.search.search_task) and for the replay that chose their defaults
on recorded learning curves (benchmarks/search_replay.py, docs/SEARCH.md): Optuna's
GP sampler training every trial to the end found the best configuration soonest, at 2, 4 and 16
trials at a time, ahead of TPE and of any ASHA or Hyperband stopping.

Ray's `OptunaSearch(seed=...)` would build `TPESampler(seed=...)` with Optuna's default of 10
random draws before TPE acts: in a search of 6 or 12 trials TPE would never, or once, act.
"""
from __future__ import annotations

import inspect
import warnings

import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.stopper import Stopper

from captune.trainables.catalog import OUT_OF_TIME

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler,
            "random": optuna.samplers.RandomSampler}
EARLY_STOPPING = ("none", "asha")  # every trial trained to max_epochs, or ASHA's stops


# Each sampler's arguments when a sweep file gives none (docs/SEARCH.md).
# Optuna 5's TPE is multivariate, with a constant liar for concurrent trials, already.
DEFAULT_SAMPLER_ARGS = {"tpe": {}, "gp": {}, "random": {}}


def startup_trials(trials: int) -> int:
    """Random draws before the GP's (or TPE's) model acts, when the sweep file does not say: a third
    of the search's trials, at least 3 (the preset, enqueued first, counts as one) and at most
    Optuna's 10. Optuna's fixed 10 left the model nothing to do in a search of 6 or 12 trials; on the
    recorded curves 10 did as well as fewer in searches of 50-100 trials, and 3 beat 10 in one of 6."""
    return min(10, max(3, trials // 3))


class SamplerError(ValueError):
    """The sweep file's sampler settings name an argument the sampler has not, or a bad value."""


def make_sampler(kind: str, seed: int, args: dict | None = None, trials: int | None = None) -> optuna.samplers.BaseSampler:
    """Optuna's sampler `kind` ("tpe", "gp", "random") with keyword arguments `args` (the sweep
    file's `sampler_args`) and the search's seed; a model-based sampler of a search of `trials`
    trials starts after `startup_trials(trials)` random draws unless `args` say otherwise."""
    if kind not in SAMPLERS:
        raise SamplerError(f"sampler {kind!r} is not one of {', '.join(SAMPLERS)}")
    args = dict(args or {})
    if trials is not None and kind != "random":
        args.setdefault("n_startup_trials", startup_trials(trials))
    known = [p for p in inspect.signature(SAMPLERS[kind]).parameters if p != "seed"]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise SamplerError(f"{kind} takes no argument {', '.join(map(repr, unknown))} (the seed is the sweep's); "
                           f"it takes {', '.join(known) or 'none'}")
    with warnings.catch_warnings():  # multivariate, group, constant_liar and GP are "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return SAMPLERS[kind](seed=seed, **args)
        except (TypeError, ValueError) as e:
            raise SamplerError(f"{kind} refused {args}: {e}") from None


def sampler_line(settings) -> str:
    """How a search of these SweepSettings draws its trials, in words, for the console."""
    if settings.sampler == "random":
        return "every trial a random draw after the preset"
    startup = settings.sampler_args.get("n_startup_trials", startup_trials(settings.trials))
    proposed = max(0, settings.trials - startup)
    name = "TPE" if settings.sampler == "tpe" else "the GP sampler"
    if not proposed:
        return f"{name} never proposes a trial: all {settings.trials} are the preset and random draws " \
               f"(it starts after {startup}; more trials let it act)"
    return f"{name} proposes {proposed} after the preset and {startup - 1} random draw(s)"


def stopping_line(settings) -> str:
    """How a search of these SweepSettings ends its trials, in words, for the console."""
    if settings.early_stopping == "none":
        return "every trial trained to the end"
    return f"ASHA stops poor trials from epoch {settings.grace_period} (keeps the best 1/{settings.reduction_factor})"


def scheduler_for(settings) -> ASHAScheduler | None:
    """The Tune scheduler of a search of these SweepSettings: None (Tune's FIFO, every trial to
    max_epochs) unless the sweep file asks for ASHA."""
    if settings.early_stopping == "none":
        return None
    return make_scheduler(settings.max_epochs, settings.grace_period, settings.reduction_factor)


def analysis_epoch(settings) -> int:
    """The epoch the parameter importances look at: ASHA's grace period, which every trial reaches,
    or the last epoch when every trial is trained to the end."""
    return settings.grace_period if settings.early_stopping == "asha" else settings.max_epochs


def make_scheduler(max_epochs: int, grace_period: int, reduction_factor: int) -> ASHAScheduler:
    """ASHA over the epochs: a trial reaching epoch grace * rf**k is stopped when its running best
    is below the best 1/rf of those that reached that epoch before it (one bracket)."""
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace_period,
                         reduction_factor=reduction_factor)


class OutOfTime(Stopper):
    """The time budget's stopper (captune.search.budget): Tune stops a trial whose epoch report
    says the budget is spent (the trial adds the flag itself, so its last result tells every
    reader why it stopped). It holds no state: Tune pickles it into its snapshot."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return bool(result.get(OUT_OF_TIME))

    def stop_all(self) -> bool:
        return False
