"""`captune sweep --warm-start OTHER`: a new sweep's searches start from what an earlier sweep's
trials of the same architecture found. Each of OTHER's scored trials (finished, or stopped with
its epochs' values) is added to the new search's Optuna study before its first trial, so the
sampler is told them as if they had run here; nothing is trained again, and they are not the new
sweep's trials (no Tune trial, no MLflow run, not on its leaderboard).

A parameter the new space does not search is dropped from the trial; one it searches but the
earlier trial did not is the value the earlier sweep fixed for it (its search run's `base.<key>`).
A trial with a value outside the new space is left out, and the sweep says how many and why.
The sweeps must maximise the same metric: their values are scores of one kind.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial
from ray.tune.search.optuna import OptunaSearch

from captune.infra.errors import UserError
from captune.infra.mlflow_names import ARCH_TAG, KIND_TAG, SWEEP_TAG
from captune.search.objective import metric_of
from captune.search.request import ArchSearch, SearchJob, optuna_url

WARM_ATTR = "captune_warm_start"  # on a study trial added from another sweep: that sweep's name and trial number
WARM_TAG = "captune.warm_start"  # on a search's parent run: what it was told, in words


class WarmStartError(UserError, ValueError):
    """The sweep to warm-start from cannot be used (missing, another metric)."""


def warm_trials(client, other: str, search: ArchSearch, metric: str) -> tuple[list, str]:
    """The study trials to add for `search` from sweep `other`, and a line saying what was used."""
    arch = search.arch
    experiment = client.get_experiment_by_name(other)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise WarmStartError(f"--warm-start {other}: there is no sweep {other!r} in this MLflow store")
    parents = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{other}' and tags.`{KIND_TAG}` = 'search' and tags.`{ARCH_TAG}` = '{arch}'"))
    if not parents:
        return [], f"warm start: sweep {other!r} has no {arch} search; this search starts cold"
    params = parents[0].data.params
    if metric_of(params) != metric:
        raise WarmStartError(f"--warm-start {other}: sweep {other!r} maximised {metric_of(params)}, this one {metric}: "
                             f"its trials' values are not this search's; warm-start from a sweep of the same metric")
    root = params["storage"]
    if "://" not in root and not (Path(root) / f"{other}-optuna.db").is_file():
        return [], f"warm start: sweep {other!r}'s Optuna study is not in {root} (moved?); this search starts cold"
    try:
        source = optuna.load_study(study_name=f"{other}-{arch}", storage=optuna_url(root, other))
    except KeyError:  # (Optuna's error for a study name its database does not hold)
        return [], f"warm start: sweep {other!r} has no {arch} study in {root}; this search starts cold"
    distributions = OptunaSearch.convert_search_space(search.space.to_tune())
    fixed = {key[len("base."):]: value for key, value in params.items() if key.startswith("base.")}
    added, outside = [], {}
    for trial in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if not trial.intermediate_values and trial.value is None:
            continue
        values, fault = _in_space(trial.params, fixed, distributions)
        if fault:
            outside[fault] = outside.get(fault, 0) + 1
            continue
        added.append(create_trial(state=trial.state, value=trial.value if trial.state == TrialState.COMPLETE else None,
                                  params=values, distributions=distributions,
                                  intermediate_values=dict(trial.intermediate_values),
                                  user_attrs={WARM_ATTR: f"{other}#{trial.number}"}))
    said = f"warm start: {len(added)} trial(s) of sweep {other!r} told to the sampler"
    if outside:
        said += "; left out: " + ", ".join(f"{n} with {why}" for why, n in sorted(outside.items()))
    return added, said


def _in_space(params: dict, fixed: dict, distributions: dict) -> tuple[dict, str | None]:
    """An earlier trial's values of the new space's keys (its sweep's fixed value where it did not
    search one), or why it cannot be told to this search (the first value outside the space)."""
    values = {}
    for key, distribution in distributions.items():
        value = params[key] if key in params else _typed(fixed[key], distribution) if key in fixed else None
        if value is None:
            return {}, f"no value of {key}"
        try:  # Optuna's own check of a value against a distribution
            create_trial(params={key: value}, distributions={key: distribution}, value=0.0)
        except ValueError:
            return {}, f"{key} outside this space"
        values[key] = value
    return values, None


def _typed(text: str, distribution):
    """A parameter MLflow recorded as text, as the distribution's type."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return next((c for c in distribution.choices if str(c) == text), None)
    try:
        return int(text) if isinstance(distribution, optuna.distributions.IntDistribution) else float(text)
    except ValueError:
        return None


def tell_study(client, job: SearchJob, trials: list, said: str) -> None:
    """Create a new search's study holding `trials` (from warm_trials), before its searcher loads
    it; say so on its parent run and the console. A study that exists has been told already."""
    url = optuna_url(job.root, job.req.name)
    if job.experiment in optuna.get_all_study_names(url):
        return
    optuna.create_study(study_name=job.experiment, storage=url, direction="maximize").add_trials(trials)
    client.set_tag(job.parent_run_id, WARM_TAG, said)
    print(f"[{job.search.arch}] {said}", flush=True)
