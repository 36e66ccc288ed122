"""The leaderboard of a sweep, read back from MLflow (the same ordering the UI and REST API use)."""
from __future__ import annotations

from search.mlflow_trials import KIND_TAG, STATE_TAG, TRIAL_TAG
from trainables.config import ConfigError

PARAM_COLUMNS = ("lr", "hidden_size", "vocab_threshold", "embed_size", "dropout", "batch_size")


def leaderboard(name: str, tracking_uri: str | None = None, limit: int = 1000) -> list[dict]:
    """Every trial of sweep `name`, best validation bleu4 first (trials with none come last)."""
    from mlflow import MlflowClient

    from captune import tracking

    uri = tracking.configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError(f"no sweep named {name!r} in the MLflow store {uri}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'trial'",
                              order_by=["metrics.bleu4 DESC"], max_results=limit)
    rows = []
    for run in runs:
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        rows.append({
            "rank": len(rows) + 1, "run_id": run.info.run_id, "trial_id": t.get(TRIAL_TAG), "arch": p.get("arch"),
            **{f"bleu{n}": m.get(f"bleu{n}") for n in range(1, 5)},
            **{k: _number(p.get(k)) for k in PARAM_COLUMNS},
            "epochs": int(t.get("captune.epochs_run", 0)) or None, "end_state": t.get(STATE_TAG),
            "error": t.get("captune.error"),
        })
    return rows


def format_leaderboard(rows: list[dict], top: int | None = None) -> str:
    head = f"{'#':>3} {'arch':<10} {'bleu4':>6} {'bleu1':>6} {'lr':>9} {'hidden':>6} {'vthr':>4} {'emb':>4} " \
           f"{'drop':>5} {'batch':>5} {'ep':>3}  {'state':<13} trial"
    lines = [head]
    for r in rows[:top]:
        b4, b1 = (f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("bleu4", "bleu1"))
        lines.append(f"{r['rank']:>3} {r['arch'] or '-':<10} {b4:>6} {b1:>6} {_fmt(r['lr'], '.2e'):>9} "
                     f"{_fmt(r['hidden_size']):>6} {_fmt(r['vocab_threshold']):>4} {_fmt(r['embed_size']):>4} "
                     f"{_fmt(r['dropout'], '.2f'):>5} {_fmt(r['batch_size']):>5} {_fmt(r['epochs']):>3}  "
                     f"{r['end_state'] or '-':<13} {r['trial_id']}")
        if r["error"]:
            lines.append(f"      error: {r['error'][:150]}")
    return "\n".join(lines)


def _number(text):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
