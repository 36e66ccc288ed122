"""The leaderboard of a sweep, read back from MLflow: per architecture, its trials by their
objective (the best validation score in the sweep's metric, ties broken as for the champion:
captune.search.objective.trial_order) with their best epoch's BLEU-4, CIDEr-D and ROUGE-L, the floor its
image-blind control sets, and which hyperparameters mattered."""
from __future__ import annotations

from mlflow import MlflowClient

from captune.infra.mlflow_names import (ARCH_TAG, BEST_TRIAL_TAG, CONTROL_ERROR_TAG, DECODING_TAG, EPOCHS_RUN_TAG,
                                ERROR_TAG, FAST_MODEL_TAG, FAST_TAG, FRONT_TAG, IMPORTANCE_BASIS_TAG,
                                IMPORTANCE_NOTE_TAG, IMPORTANCE_PREFIX, KIND_TAG, SEED_CHOICE_ERROR_TAG,
                                SEED_CHOICE_TAG, SEED_GROUP_TAG, SEED_MEAN_METRIC, SPEED_METRICS, SPEED_NOTE_TAG,
                                STATE_TAG, SWEEP_TAG, TRIAL_TAG, TUNED_DECODING_TAG, control_record, p50_metric,
                                tuned_metric)
from captune.infra.mlflow_store import configure, require_not_deleted
from captune.search.convergence import CONVERGENCE_TAG
from captune.search.objective import DEFAULT_METRIC, metric_of, objective, trial_order
from captune.search.request import name_fault
from captune.trainables.catalog import HEADLINE, SCORE_LABELS
from captune.trainables.config import ConfigError

PARAM_COLUMNS = ("lr", "hidden_size", "vocab_threshold", "embed_size", "dropout", "batch_size")


def leaderboard(name: str, tracking_uri: str | None = None, limit: int = 1000) -> dict:
    """{"sweep", "metric": what it maximises, "trials": every trial, best first by it (trials with no
    score last), "searches": per architecture its best, control and importances}."""
    uri = configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = find_sweep(client, uri, name)
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`{KIND_TAG}` = 'search' and tags.`{SWEEP_TAG}` = '{name}'")
    metric = metric_of(parents[0].data.params) if parents else DEFAULT_METRIC
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'trial'",
                              max_results=max(limit, 10000))
    runs = sorted(runs, key=lambda run: trial_order(run, metric))[:limit]  # the champion's order, ties included
    rows = []
    for run in runs:
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        rows.append({
            "rank": len(rows) + 1, "run_id": run.info.run_id, "trial_id": t.get(TRIAL_TAG), "arch": p.get("arch"),
            **{objective(k): m.get(objective(k)) for k in HEADLINE}, "best_epoch": _int(m.get("best_epoch")),
            **{k: _number(p.get(k)) for k in PARAM_COLUMNS},
            "epochs": int(t.get(EPOCHS_RUN_TAG, 0)) or None, "end_state": t.get(STATE_TAG),
            "error": t.get(ERROR_TAG),
            # retrained over new seeds to choose the champion (captune.search.seed_choice): mean, group
            "seed_mean": m.get(SEED_MEAN_METRIC), "seed_group": t.get(SEED_GROUP_TAG),
            # how fast its model is, greedy and at the tuned decoding, and its fronts (captune.search.speed)
            "tuned_score": m.get(tuned_metric(metric)), "tuned_decoding": t.get(TUNED_DECODING_TAG),
            **{k: m.get(k) for k in SPEED_METRICS}, "front": t.get(FRONT_TAG),
        })
    return {"sweep": name, "metric": metric, "trials": rows,
            "searches": {r.data.tags[ARCH_TAG]: _search(r, metric) for r in parents}}


def find_sweep(client, uri: str, name: str):
    """The sweep's MLflow experiment; a sweep that is not there (or deleted) is refused, naming the
    store (and, for a name no sweep can have, the rule for names)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        fault = name_fault(name)
        raise ConfigError(f"no sweep named {name!r} in the MLflow store {uri}" + (f" ({fault})" if fault else ""))
    require_not_deleted(client, uri, experiment=experiment, what=f"sweep {name!r}")
    return experiment


def _search(run, metric: str) -> dict:
    m, t = run.data.metrics, run.data.tags
    control = control_record(t, m, metric)
    return {"run_id": run.info.run_id, objective(metric): m.get(objective(metric)), "best_trial": t.get(BEST_TRIAL_TAG),
            "control": control, "control_error": None if control else t.get(CONTROL_ERROR_TAG),
            "importances": dict(sorted(((k.removeprefix(IMPORTANCE_PREFIX), v) for k, v in m.items() if k.startswith(IMPORTANCE_PREFIX)),
                                       key=lambda kv: -kv[1])),
            "importance_basis": t.get(IMPORTANCE_BASIS_TAG), "importance_note": t.get(IMPORTANCE_NOTE_TAG),
            "convergence": t.get(CONVERGENCE_TAG), "seed_choice": t.get(SEED_CHOICE_TAG), "decoding": t.get(DECODING_TAG),
            "seed_choice_error": t.get(SEED_CHOICE_ERROR_TAG), "fast": t.get(FAST_TAG),
            "fast_model": t.get(FAST_MODEL_TAG), "speed_note": t.get(SPEED_NOTE_TAG)}


def format_leaderboard(board: dict, top: int | None = None) -> str:
    metric = board.get("metric", DEFAULT_METRIC)
    shown = [metric] + [k for k in HEADLINE if k != metric]
    head = (f"{'#':>3} " + " ".join(f"{SCORE_LABELS[k]:>8}" for k in shown) +
            f" {'@ep':>3} {'epochs':>6} {'lr':>9} {'hidden':>6} {'vthr':>4} {'emb':>4} {'drop':>5} {'batch':>5}  "
            f"{'state':<13} {'over seeds':<15} {'tuned':>6} {'ms g/t':>11} {'front':<12} trial")
    lines = []
    archs = sorted({r["arch"] for r in board["trials"] if r["arch"]} | set(board["searches"]))
    for arch in archs:
        rows = [r for r in board["trials"] if r["arch"] == arch][:top]
        lines += [f"{arch}: trials by best validation {SCORE_LABELS[metric]} (the other scores: that epoch's)", head]
        for i, r in enumerate(rows, 1):
            lines.append(f"{i:>3} " + " ".join(f"{_fmt(r[objective(k)], '.4f'):>8}" for k in shown) +
                         f" {_fmt(r['best_epoch']):>3} {_fmt(r['epochs']):>6} "
                         f"{_fmt(r['lr'], '.2e'):>9} {_fmt(r['hidden_size']):>6} {_fmt(r['vocab_threshold']):>4} "
                         f"{_fmt(r['embed_size']):>4} {_fmt(r['dropout'], '.2f'):>5} {_fmt(r['batch_size']):>5}  "
                         f"{r['end_state'] or '-':<13} {_seeds(r):<15} {_fmt(r['tuned_score'], '.4f'):>6} "
                         f"{_speed(r):>11} {r['front'] or '-':<12} {r['trial_id']}")
            if r["error"]:
                lines.append(f"      error: {r['error'][:150]}")
        search = board["searches"].get(arch)
        if search:
            lines += _floor_lines(search, metric) + _importance_lines(search)
            lines += _seed_lines(search)
            if search["decoding"]:
                lines.append(f"    champion's {search['decoding']}")
            lines += _fast_lines(search, rows)
            lines.append(f"    convergence: {search['convergence'] or 'not estimated'}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _floor_lines(search: dict, metric: str) -> list[str]:
    c = search["control"]
    if c is None and search["control_error"]:
        return [f"    floor: WARNING: the image-blind control failed ({search['control_error'][:150]})"]
    if c is None:
        return ["    floor: no image-blind control was run (--no-control, or the search has no champion yet)"]
    lines = ["    floor (image-blind control, same configuration):"]
    for score in [metric] + [s for s in c["scores"] if s != metric]:
        x = c["scores"][score]
        lines.append(f"      {SCORE_LABELS[score]:<8} {x['control']:.4f} validation, {x['control_test']:.4f} test; "
                     f"champion {x['test']:.4f} test, gap {x['gap']:+.4f} [{x['gap_low']:+.4f}, {x['gap_high']:+.4f}]")
    if not c["verdict"].get("clear"):
        lines.append(f"    WARNING: {c['verdict'].get('text')}: the champion does not clearly beat a model that "
                     f"never saw its images")
    return lines


def _seed_lines(search: dict) -> list[str]:
    if search["seed_choice"]:
        return [f"    champion over seeds: {search['seed_choice']}"]
    if search["seed_choice_error"]:
        return [f"    champion over seeds: WARNING: failed ({search['seed_choice_error'][:150]}); the top trial is the "
                f"champion"]
    return []


def _importance_lines(search: dict) -> list[str]:
    if search["importances"]:
        return [f"    importance ({search['importance_basis']}):",
                "      " + ", ".join(f"{k} {v:.2f}" for k, v in search["importances"].items())]
    return [f"    importance: {search['importance_note'] or 'not computed'}"]


def _fast_lines(search: dict, rows: list[dict]) -> list[str]:
    """The speed columns' key, and @fast (captune.search.tradeoff)."""
    if search["speed_note"]:
        return [f"    speed: WARNING: {search['speed_note'][:200]}"]
    if not any(r[p50_metric("greedy")] is not None for r in rows):
        return []
    tuned = next((r["tuned_decoding"] for r in rows if r["tuned_decoding"]), "the champion's")
    return [f"    speed: tuned = validation score at the tuned decoding ({tuned}); ms g/t = latency per image, batch 1, "
            f"p50, greedy / tuned; front = on the Pareto front of score against that latency",
            f"    {search['fast'] or '@fast: not chosen'}"]


def _speed(row: dict) -> str:
    greedy, tuned = row[p50_metric("greedy")], row[p50_metric("tuned")]
    return "-" if greedy is None else f"{greedy:.1f}/{_fmt(tuned, '.1f')}"


def _seeds(row: dict) -> str:
    """A trial retrained over new seeds: its mean and group ("0.5312 chosen"); "-" for the others."""
    return "-" if row["seed_mean"] is None else f"{row['seed_mean']:.4f} {row['seed_group'] or ''}".rstrip()


def _int(value):
    return None if value is None else int(value)


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
