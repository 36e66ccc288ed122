"""What a sweep optimises and how a trial ended, stated once for Tune, ASHA, Optuna, MLflow, the
leaderboard and the registry.

A sweep optimises one validation score, its metric: BLEU-4 (`bleu4`, the default) or CIDEr-D
(`cider`), chosen by `captune sweep --metric` or the sweep file's `sweep: metric:`. A trial's
value is its best validation score of that metric over the epochs it ran (`best_<metric>`,
reported every epoch by the training loop with `best_epoch` and that epoch's other scores), and
the checkpoint registered for a champion is that epoch's. A trial ends in one of five states:

| state           | when                                           | Optuna   | MLflow status |
|-----------------|------------------------------------------------|----------|---------------|
| `finished`      | it ran every epoch                             | COMPLETE | FINISHED      |
| `early-stopped` | ASHA stopped it before the last epoch          | PRUNED   | FINISHED      |
| `out-of-time`   | the sweep's time budget ran out (at an epoch)  | PRUNED   | FINISHED      |
| `diverged`      | its loss became NaN or infinite                | FAIL     | FAILED        |
| `failed`        | it raised (after Tune's restarts)              | FAIL     | FAILED        |
"""
from __future__ import annotations

import hashlib

from captune.infra.mlflow_names import OPTUNA_TRIAL_TAG, STATE_TAG
from captune.trainables.catalog import OUT_OF_TIME as OUT_OF_TIME_FLAG

DEFAULT_METRIC, MODE = "bleu4", "max"


def metric_of(params: dict[str, str]) -> str:
    """The metric a sweep's search run records as its parameter `metric` (a sweep recorded
    before the metric could be chosen maximised BLEU-4)."""
    return params.get("metric", DEFAULT_METRIC)


def objective(metric: str) -> str:
    """What Tune, ASHA and Optuna see of a trial, and what ranks trials: the running best of one
    epoch's validation `metric` ("best_bleu4", "best_cider")."""
    return f"best_{metric}"


FINISHED, EARLY_STOPPED, OUT_OF_TIME, DIVERGED, FAILED = "finished", "early-stopped", "out-of-time", "diverged", "failed"
USABLE = (FINISHED, EARLY_STOPPED, OUT_OF_TIME)  # a trial with real scores and its best epoch's checkpoint


def end_state(last_result: dict | None, max_epochs: int, errored: bool) -> str:
    """How a trial ended, from its last reported result."""
    last = last_result or {}
    if errored or not last:
        return FAILED
    if last.get("diverged_reason"):
        return DIVERGED
    if int(last.get("epoch", 0)) >= max_epochs:
        return FINISHED
    return OUT_OF_TIME if last.get(OUT_OF_TIME_FLAG) else EARLY_STOPPED


def sampler_seed(sweep_seed: int, arch: str) -> int:
    """Each architecture's search draws its own configurations: a seed derived from the sweep's
    seed and the architecture, the same on every run and independent of which architectures run."""
    return int.from_bytes(hashlib.sha256(f"{sweep_seed}/{arch}".encode()).digest()[:4], "big")


def trial_order(run, metric: str) -> tuple:
    """The one order of a sweep's trial runs (MLflow runs), used by the leaderboard, the ranks in
    the runs' names and the champion: usable trials (finished or early-stopped) first, best
    objective first; a tie goes to the trial that reached its score in fewer epochs, then to the
    earlier trial (its Optuna number, else when its run started)."""
    metrics, tags = run.data.metrics, run.data.tags
    score = metrics.get(objective(metric))
    usable = tags.get(STATE_TAG) in USABLE and score is not None
    number = tags.get(OPTUNA_TRIAL_TAG)
    return (not usable, -(score if score is not None else float("-inf")), metrics.get("best_epoch", float("inf")),
            int(number) if number is not None and number.isdigit() else float("inf"), run.info.start_time or 0)
