"""Every tag name the project writes to MLflow and reads back, and the forms of the values that
are more than a word (one place, so that writers and readers agree)."""
import json

ARCH_TAG = "arch"  # the architecture, on every run of a sweep and of `captune train`
SWEEP_TAG = "captune.sweep"  # the sweep's name, on every run of it
KIND_TAG = "captune.kind"  # search (an architecture's parent run), trial, control, replicate, compare
TRIAL_TAG = "captune.trial_id"  # a trial run's Tune trial id
OPTUNA_TRIAL_TAG = "captune.optuna_trial"  # a trial run's Optuna trial number (in its search's study)
STATE_TAG = "captune.end_state"  # how a trial ended (captune.search.objective)
NODE_TAG = "captune.node_id"  # the Ray node that ran the trial (its last epoch, after a restart)
SEED_TAG = "captune.seed"  # a rerun's training seed
RERUN_KEY_TAG = "captune.rerun_key"  # a rerun's identity (kind, configuration, data): found again by it
RESUMED_TAG = "captune.resumed_from_epoch"  # a rerun that went on after a stop: the epoch it went on from
ERROR_TAG = "captune.error"  # why a run failed (a trial, a rerun, a `captune train` job)
STOP_TAG = "captune.stop_reason"  # a run stopped by Ctrl-C or SIGTERM: which
MODEL_EPOCH_TAG = "captune.model_epoch"  # `captune train`: the epoch of the model logged to the run
EPOCHS_RUN_TAG = "captune.epochs_run"  # a trial run's epochs (also the metric epochs_run)
RESTARTS_TAG = "captune.restarts"  # a trial run: how often Tune restarted it
LAST_RESTART_TAG = "captune.last_restart_reason"  # ... and why, the last time
BEST_TRIAL_TAG = "captune.best_trial"  # on a search's parent: the Tune trial id of its best trial
TRIALS_TAG = "captune.trials"  # on a search's parent: its trials
ADDED_TRIALS_TAG = "captune.trials_added"  # ... how many `--resume --more-trials` added, in all
FAILED_TRIALS_TAG = "captune.failed_trials"  # ... and how many of them failed or diverged
CONCURRENT_TAG = "captune.concurrent_trials"  # on a search's parent: its share of the trial slots
SLOTS_TAG = "captune.sweep_slots"  # on a search's parent: the slots the sweep's searches share
COMPARE_KEY_TAG = "captune.compare_key"  # a comparison run's settings (models, data, split, seeds, resamples)
CONTROL_VERDICT_TAG = "captune.control_verdict"  # on a search's parent: does the champion beat its control (words)
CONTROL_ERROR_TAG = "captune.control_error"  # on a search's parent: why its control run failed
IMPORTANCE_NOTE_TAG = "captune.importance_note"  # on a search's parent: why no importance was logged
IMPORTANCE_BASIS_TAG = "captune.importance_basis"  # on a search's parent: what the importances explain
IMPORTANCE_PREFIX = "importance_"  # a search parent's metric per searched parameter
FIGURES_NOTE_TAG = "captune.figures_note"  # on a champion trial's run: why its figures were not made
DECODING_NOTE_TAG = "captune.decoding_note"  # ... why its decoding search was not made (it captions at beam 3)
DECODING_TAG = "captune.decoding"  # on a search's parent: its champion's decoding, chosen on the validation split (words)
CHART_NOTE_PREFIX = "captune.chart_note."  # + a chart's file name: why that chart was not made
CONTROLLED = ("bleu4", "cider")  # the scores a search parent's control metrics are kept in (captune.search.control)
CONTROL_FIELDS = ("control", "control_test", "test", "gap", "gap_low", "gap_high")
CHAMPION_TAG = "captune.champion"  # on a search's parent: its registered best trial, models:/<name>/<version>
CHAMPION_PROMOTED_TAG = "captune.champion_promoted"  # "true": it took the champion alias; "false": it did not
PREVIOUS_CHAMPION_TAG = "captune.previous_champion"  # when it did not: the champion that stayed (models:/...)
PREVIOUS_CHAMPION_SCORE_TAG = "captune.previous_champion_score"  # ... and its validation score in the sweep's metric
PREVIOUS_CHAMPION_BLEU4_TAG = "captune.previous_champion_bleu4"  # (what sweeps recorded before the metric was chosen)
CHAMPION_TRIAL_TAG = "captune.is_champion"  # "true" on the trial whose best epoch is its search's champion
SEED_CHOICE_TAG = "captune.seed_choice"  # on a search's parent: its champion chosen over seeds, in words
SEED_SUMMARY_TAG = "captune.seed_choice_summary"  # ... the same in one clause, for the verdict
SEED_CHOICE_ERROR_TAG = "captune.seed_choice_error"  # ... or why it could not be (the top trial stands)
SEED_GROUP_TAG = "captune.seed_group"  # on a trial retrained over seeds: chosen, tied (within seed noise) or behind
SEED_MEAN_METRIC = "seed_mean"  # ... its new seeds' mean best validation score in the sweep's metric, and the
SEED_LOW_METRIC, SEED_HIGH_METRIC = "seed_mean_low", "seed_mean_high"  # 95% interval of that mean
CHECKPOINT_TAG = "captune.checkpoint"  # on a trial run: where its best epoch's checkpoint is kept (a path or a URI)
# how fast a trial's model is (captune.search.speed): on its run, the machine it was measured on,
# the tuned decoding it was measured at, and which Pareto fronts it is on ("greedy", "tuned", both, "-")
SPEED_MACHINE_TAG = "captune.speed_machine"
TUNED_DECODING_TAG = "captune.tuned_decoding"
FRONT_TAG = "captune.front"
SPEED_NOTE_TAG = "captune.speed_note"  # on a search's parent: why its trials' speed was not measured
FAST_TAG = "captune.fast"  # on a search's parent: its @fast model, in words
FAST_MODEL_TAG = "captune.fast_model"  # ... that model, models:/<name>/<version>
# ... and the latency per image (batch 1, p50) of the champion at its decoding and of @fast at its own
CHAMPION_LATENCY_METRIC, FAST_LATENCY_METRIC = "champion_latency_p50_ms", "fast_latency_p50_ms"
FAST_WITHIN_TAG = "captune.fast_within"  # on a sweep's experiment: its --fast-within, kept for --resume
# ... and its metrics (captune.trainables.speed.measure): per decoding ("greedy", "tuned") each figure
SPEED_FIGURES = ("latency_p50_ms", "latency_p90_ms", "throughput_b32")


def speed_metric(figure: str, decoding: str) -> str:
    """A trial run's speed figure at a decoding ("latency_p50_ms_greedy")."""
    return f"{figure}_{decoding}"


def p50_metric(decoding: str) -> str:
    """Its batch-1 latency's median at a decoding, what the Pareto fronts and @fast read."""
    return speed_metric("latency_p50_ms", decoding)


SPEED_METRICS = ("params", "checkpoint_mb", *(speed_metric(figure, decoding) for decoding in ("greedy", "tuned")
                                             for figure in SPEED_FIGURES))


def tuned_metric(metric: str) -> str:
    """A trial run's validation score in the sweep's metric at its architecture's tuned decoding
    ("tuned_bleu4"; its objective, best_bleu4, is at the training's validation decoding)."""
    return f"tuned_{metric}"


NOTE_TAG = "mlflow.note.content"  # MLflow's description of an experiment or run (shown in the UI)


def tags_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter for the runs that carry every one of `tags`."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def trial_run_name(arch: str, config: dict, rank: int | None = None, state: str | None = None) -> str:
    """A trial run's name a person reads: "cnn-lstm lr=2.0e-03 hidden=256 vthr=2"; after the search,
    its rank first and, when it did not finish, its end state next, where the runs table's narrow
    name column still shows it: "#3 [early-stopped] cnn-lstm lr=...")."""
    parts = [arch]
    for key, short in (("lr", "lr"), ("hidden_size", "hidden"), ("vocab_threshold", "vthr")):
        if key in config:
            value = config[key]
            parts.append(f"{short}={value:.1e}" if isinstance(value, float) else f"{short}={value}")
    if state and state != "finished":
        parts.insert(0, f"[{state}]")
    if rank is not None:
        parts.insert(0, f"#{rank}")
    return " ".join(parts)


def champion_tags(record: dict) -> dict[str, str]:
    """A search parent's tags for its registered best trial (captune.search.registry.claim_alias's record), each short
    enough to read whole in the MLflow UI."""
    tags = {CHAMPION_TAG: f"models:/{record['name']}/{record['version']}",
            CHAMPION_PROMOTED_TAG: str(record["promoted"]).lower()}
    if record.get("decoding"):
        tags[DECODING_TAG] = record["decoding"]
    if record["previous"]:
        tags[PREVIOUS_CHAMPION_TAG] = f"models:/{record['name']}/{record['previous']['version']}"
        tags[PREVIOUS_CHAMPION_SCORE_TAG] = f"{record['previous']['score']:.6f}"
    return tags


def champion_record(tags: dict[str, str], score: float, metric: str = "bleu4") -> dict | None:
    """claim_alias's record back from a parent's tags (None if it registered none); `score`: the
    parent's best validation score in the sweep's `metric`."""
    if CHAMPION_TAG not in tags:
        return None
    if tags[CHAMPION_TAG].startswith("{"):  # a sweep recorded before 2026-12-03 kept the record as JSON
        old = json.loads(tags[CHAMPION_TAG])
        previous = old["previous"] and {"version": old["previous"]["version"], "score": old["previous"]["bleu4"]}
        return {"name": old["name"], "version": old["version"], "metric": "bleu4", "score": old["bleu4"],
                "previous": previous, "promoted": old["promoted"]}
    name, version = tags[CHAMPION_TAG].removeprefix("models:/").rsplit("/", 1)
    previous_score = tags.get(PREVIOUS_CHAMPION_SCORE_TAG, tags.get(PREVIOUS_CHAMPION_BLEU4_TAG))
    previous = ({"version": tags[PREVIOUS_CHAMPION_TAG].rsplit("/", 1)[1],
                 "score": float(previous_score)} if PREVIOUS_CHAMPION_TAG in tags else None)
    return {"name": name, "version": version, "metric": metric, "score": score, "previous": previous,
            "promoted": tags[CHAMPION_PROMOTED_TAG] == "true"}


def control_metrics(score: str) -> tuple[str, ...]:
    """A search parent's metrics from its image-blind control, in one score (CONTROL_FIELDS in
    order): the control's best validation score, its test score, the champion's test score, and
    the champion's test gap over the control with its 95% interval. BLEU-4's keep the names they
    had before CIDEr-D: control_bleu4, control_test_bleu4, test_bleu4, control_gap, ..._low, ..._high."""
    gap = "control_gap" if score == "bleu4" else f"control_{score}_gap"
    return f"control_{score}", f"control_test_{score}", f"test_{score}", gap, f"{gap}_low", f"{gap}_high"


def control_record(tags: dict[str, str], metrics: dict[str, float], metric: str) -> dict | None:
    """A search parent's control as recorded: {"metric": the sweep's, "scores": {score: {field:
    value}} for each score recorded, "verdict"}; None when none was (or not in `metric`)."""
    scores = {s: dict(zip(CONTROL_FIELDS, (metrics[k] for k in control_metrics(s)))) for s in CONTROLLED
              if all(k in metrics for k in control_metrics(s))}
    if metric not in scores:
        return None
    return {"metric": metric, "scores": scores, "verdict": control_verdict(tags, metrics, metric)}


def control_verdict(tags: dict[str, str], metrics: dict[str, float], metric: str = "bleu4") -> dict:
    """A search parent's verdict on its image-blind control, in the sweep's `metric`: {"clear": the
    champion's gap over it is above zero at the 95% level, "text": the verdict in words}."""
    text = tags.get(CONTROL_VERDICT_TAG, "")
    if text.startswith("{"):  # a sweep recorded before 2026-12-03 kept it as JSON
        return json.loads(text)
    return {"clear": metrics.get(control_metrics(metric)[4], 0.0) > 0, "text": text}


SEEDS_TAG = "captune.seeds"  # on a sweep's experiment: its --seeds (what `--resume` without --seeds compares with)
TOP_TAG = "captune.top"  # ... and its --top (how many configurations per search are retrained over the seeds)
EPOCHS_TAG = "captune.epochs"  # a `captune train` run's epochs asked for: a tag, not a param, as --resume may raise it
