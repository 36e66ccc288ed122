"""`captune compare`: a sweep's champions on the test split, greedy and beam 3, in every score
(BLEU-1..4, CIDEr-D, ROUGE-L), each against its image-blind control, and against each other with
a paired bootstrap over the test images in BLEU-4 and in CIDEr-D; with `seeds`, each champion's
configuration retrained with new seeds (the variation a seed alone makes) and the bootstraps
over the pooled replicates. The verdict is the sweep's metric's. Recorded in the sweep's
`comparison` run."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
from mlflow import MlflowClient

from captune.infra import sizing
from captune.infra.mlflow_logging import find_or_create_run, metric_entities, optional_step, param_entities
from captune.infra.mlflow_names import (ARCH_TAG, BEST_TRIAL_TAG, CHAMPION_LATENCY_METRIC, CHART_NOTE_PREFIX,
                                        COMPARE_KEY_TAG, CONTROLLED, FAST_LATENCY_METRIC, FAST_MODEL_TAG, KIND_TAG,
                                        NOTE_TAG, SEED_CHOICE_TAG, SEED_SUMMARY_TAG, SWEEP_TAG, champion_record,
                                        control_record)
from captune.infra.mlflow_relay import start_relay
from captune.infra.mlflow_store import configure
from captune.infra.raycluster import init_ray
from captune.search.bootstrap import RESAMPLES, paired_bootstrap, require_resamples
from captune.search.compare_chart import draw_comparison
from captune.search.convergence import CONVERGENCE_TAG, with_noise
from captune.search.leaderboard import find_sweep
from captune.search.objective import DEFAULT_METRIC, metric_of, objective
from captune.search.request import storage_root
from captune.search.rerun_job import replicate_jobs
from captune.search.tradeoff import alias_lines, served
from captune.search.reruns import run_reruns
from captune.trainables import WORKER_PRELOAD
from captune.trainables.catalog import SCORE_LABELS, SCORES
from captune.trainables.config import ConfigError
from captune.trainables.evaluation import caption_split
from captune.trainables.inference import decoding_of
from captune.trainables.metrics import CaptionScorer, corpus_scores
from captune.trainables.model_source import load_captioner

BOOTSTRAPPED = CONTROLLED  # the scores compared by paired bootstrap: BLEU-4 and CIDEr-D


def compare(name: str, data_root: str | None = None, tracking_uri: str | None = None,
            beams: tuple[int, ...] = (1, 3), split: str = "test", skip_bad: bool = False, seeds: int = 0,
            resamples: int = RESAMPLES, bootstrap_seed: int = 0, address: str | None = None) -> dict:
    """The champions are the models this sweep registered (not whichever holds the alias now). A
    champion trained with skip_bad (its search's setting) is evaluated with it too: the real
    Flickr8k token file names an image that does not exist."""
    require_resamples(resamples)  # before any champion loads or replicate trains
    uri = configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = find_sweep(client, uri, name)
    parents = _parents(client, experiment.experiment_id, name)
    metric = metric_of(parents[0].data.params) if parents else DEFAULT_METRIC
    results: dict = {"sweep": name, "split": split, "metric": metric, "models": {}, "bootstrap": None,
                     "replicates": None}
    statistics, references, champions, scorers = {}, {}, {}, {}
    for parent in parents:
        arch, tags = parent.data.tags[ARCH_TAG], parent.data.tags
        champion = champion_record(tags, parent.data.metrics.get(objective(metric), 0.0), metric)
        if champion is None:
            continue
        model_uri = f"models:/{champion['name']}/{champion['version']}"
        root = data_root or parent.data.params.get("data")
        if root is None:
            raise ConfigError(f"sweep {name!r}: the {arch} search records no dataset; pass --data")
        loaded = load_captioner(model_uri, uri)
        skip = skip_bad or bool(loaded.payload.get("train_config", {}).get("skip_bad", False))
        tuned = decoding_of(loaded, otherwise=None)  # chosen on the validation split as it was registered
        captions, refs = caption_split(loaded, root, split, beams + ((tuned,) if tuned else ()), skip_bad=skip)
        champions[arch] = (parent, loaded, root)
        key = json.dumps(refs)  # the two champions are scored by one scorer when their images agree
        if key not in scorers:
            scorers[key] = CaptionScorer(refs)
        scorer = scorers[key]
        stats = {beam: scorer.statistics(captions[beam]) for beam in beams}
        statistics[arch], references[arch] = stats[1], refs
        m = parent.data.metrics
        results["models"][arch] = {
            "version": champion["version"], "model": model_uri, "data": str(root), "images": len(refs),
            "val": {k: m[f"best_{k}"] for k in SCORES if f"best_{k}" in m},  # the search's best epoch
            **{f"beam{k}": corpus_scores(stats[k]) for k in beams},
            **({"tuned": {"decoding": tuned.text(), **corpus_scores(scorer.statistics(captions[tuned]))}}
               if tuned else {}),
            "control": control_record(tags, m, metric), "chosen_over_seeds": tags.get(SEED_SUMMARY_TAG)}
        fast = _fast(parent, model_uri, uri, root, split, skip, scorer)
        if fast:  # @fast beside it; when @fast is the champion, its scores are the champion's at its decoding
            results["models"][arch]["fast"] = fast if "decoding" in fast else {**fast, **served(results["models"][arch])}
    if not results["models"]:
        raise ConfigError(f"sweep {name!r} has no registered champion yet: let its sweep finish (or --resume it)")
    archs = list(results["models"])
    if len(archs) == 2:
        if references[archs[0]] != references[archs[1]]:
            raise ConfigError(f"sweep {name!r}: the champions were tested on different images (their data or split "
                              f"differ); pass --data to test both on one dataset")
        results["bootstrap"] = _bootstraps(statistics[archs[0]], statistics[archs[1]], (archs[0], archs[1]),
                                           resamples, bootstrap_seed)
    if seeds:
        results["replicates"] = _replicates(client, experiment.experiment_id, name, champions, seeds, uri, address,
                                            resamples, bootstrap_seed)
        results["convergence"] = _convergence(client, champions, results["replicates"], metric)
    results["verdict"] = _verdict(results)
    _log(client, experiment.experiment_id, name, results, beams, resamples, bootstrap_seed, seeds)
    return results


def _fast(parent, champion_uri: str, uri: str, root, split: str, skip: bool, scorer) -> dict:
    """The search's @fast model (captune.search.speed), to set beside its champion: its model,
    latency and the champion's, and (unless it is the champion) its decoding and scores on the
    split at it; {} if none was chosen."""
    tags, m = parent.data.tags, parent.data.metrics
    if FAST_MODEL_TAG not in tags or FAST_LATENCY_METRIC not in m:
        return {}
    model = tags[FAST_MODEL_TAG]
    fast = {"model": model, "version": model.rsplit("/", 1)[1], "latency_p50_ms": m[FAST_LATENCY_METRIC],
            "champion_latency_p50_ms": m.get(CHAMPION_LATENCY_METRIC), "same": model == champion_uri}
    if fast["same"]:
        return fast
    loaded = load_captioner(model, uri)
    decoding = decoding_of(loaded)
    captions, _ = caption_split(loaded, root, split, (decoding,), skip_bad=skip)
    return {**fast, "decoding": decoding.text(), **corpus_scores(scorer.statistics(captions[decoding]))}


def _bootstraps(stats_a, stats_b, names: tuple[str, str], resamples: int, seed: int) -> dict[str, dict]:
    """The paired bootstrap of a against b in each of BOOTSTRAPPED, on the same resamples."""
    return {score: paired_bootstrap(stats_a, stats_b, names, resamples, seed, metric=score).to_dict()
            for score in BOOTSTRAPPED}


def _parents(client, experiment_id: str, name: str) -> list:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                                                             f"tags.`{KIND_TAG}` = 'search'")
    return sorted(runs, key=lambda r: r.data.tags[ARCH_TAG])


def _replicates(client, experiment_id: str, name: str, champions: dict, seeds: int, uri: str, address: str | None,
                resamples: int, bootstrap_seed: int) -> dict:
    """Each champion's configuration trained with `seeds` new seeds (the champion's seed + 1 ..
    + seeds: its own score is picked as the best of a search, so it is left out), all on the
    cluster's trial slots at once; per architecture each test score's mean and standard
    deviation, and the paired bootstraps of the pooled replicates (their statistics added image
    by image)."""
    init_ray(address, preload=WORKER_PRELOAD)
    relay = start_relay(uri)  # the replicates may train on any node: they record through this node
    gpus = max(float(parent.data.params.get("gpus_per_worker", 0)) for parent, _, _ in champions.values())
    cpus = sizing.cpus_per_worker(address, gpus)
    jobs = []
    for arch, (parent, loaded, root) in champions.items():
        # (the champion's own replicates when the sweep chose it over seeds: reused)
        jobs += replicate_jobs(loaded.payload["train_config"], seeds,
                               f"{arch}-{parent.data.tags.get(BEST_TRIAL_TAG, 'champion')}", data_root=str(root),
                               relay=relay, storage=parent.data.params.get("storage") or storage_root(None),
                               experiment_id=experiment_id, parent_run_id=parent.info.run_id, sweep=name,
                               use_gpu=gpus > 0, threads=cpus,
                               echo_epochs=False)  # each run's epochs are in MLflow; the console stays short
    concurrent = sizing.concurrent_trials(address, 1, gpus, cpus)

    def announce(to_train: int, reused: int) -> None:
        print(f"replicates: {len(jobs)} runs ({seeds} new seeds per champion): {to_train} to train, {concurrent} at a "
              f"time; {reused} trained before, reused", file=sys.stderr, flush=True)

    try:
        done = run_reruns(client, jobs, concurrent, cpus, gpus, announce)
    finally:
        ray.kill(relay)
    out: dict = {"seeds": seeds, "architectures": {}}
    pooled = {}
    for arch in champions:
        mine = [(job, r) for job, r in zip(jobs, done) if job.config["arch"] == arch]
        test = np.array([[r["test"][k] for k in SCORES] for _, r in mine])  # (seeds, scores)
        out["architectures"][arch] = {
            "seeds": [job.config["seed"] for job, _ in mine], "runs": [r["run_id"] for _, r in mine],
            "val": [r["val"] for _, r in mine],
            **{f"test_{k}": {"mean": float(test[:, i].mean()), "std": float(test[:, i].std(ddof=1)) if seeds > 1 else 0.0,
                             "values": test[:, i].tolist()} for i, k in enumerate(SCORES)}}
        pooled[arch] = np.sum([np.asarray(r["statistics"]) for _, r in mine], axis=0)
    if len(pooled) == 2:
        a, b = pooled
        out["bootstrap"] = _bootstraps(pooled[a], pooled[b], (a, b), resamples, bootstrap_seed)
    return out


def _convergence(client, champions: dict, replicates: dict, metric: str) -> dict[str, str]:
    """Each search's convergence statement again (captune.search.convergence), now against the
    seed noise its champion's replicates measured: the standard deviation of their best
    validation scores (the search's objective); a search whose champion the sweep chose over
    seeds set it against the noise pooled over its top configurations then."""
    said = {}
    for arch, (parent, _, _) in champions.items():
        if SEED_CHOICE_TAG in parent.data.tags:  # measured on every configuration the sweep retrained: it stands
            said[arch] = parent.data.tags.get(CONVERGENCE_TAG)
            continue
        values = [v[objective(metric)] for v in replicates["architectures"][arch]["val"] if objective(metric) in v]
        with optional_step("the convergence estimate", client, parent.info.run_id, CONVERGENCE_TAG):
            words = with_noise(client, client.get_run(parent.info.run_id), values)
            if words:
                said[arch] = words
    return said


def _verdict(results: dict) -> str:
    """In the sweep's metric: the pooled replicates' bootstrap when there is one, else the champions'."""
    boot = (results["replicates"] or {}).get("bootstrap") or results["bootstrap"]
    if boot is None:
        return "one architecture only: nothing to compare"
    basis = (f"over {results['replicates']['seeds']} seed replicates each" if results["replicates"] else
             "champions only; --seeds K adds the variation of training seeds")
    chosen = "".join(f"; {arch}: {m['chosen_over_seeds']}" for arch, m in results["models"].items()
                     if m.get("chosen_over_seeds"))
    return f"{boot[results['metric']]['verdict']}; {basis}{chosen}"


def format_comparison(results: dict) -> str:
    models, metric = results["models"], results.get("metric", DEFAULT_METRIC)
    archs = list(models)
    col = lambda values: "".join(f"{v:>14}" for v in values)  # noqa: E731
    val = lambda a: models[a]["val"].get(metric)  # noqa: E731
    over_seeds = all(models[a].get("chosen_over_seeds") for a in archs)
    chosen = f"mean validation {SCORE_LABELS[metric]} over new seeds" if over_seeds else \
        f"validation {SCORE_LABELS[metric]}"
    lines = [f"champions of sweep {results['sweep']} on the {results['split']} split "
             f"({models[archs[0]]['images']:,} images), chosen by {chosen}: " +
             ", ".join(f"{a} v{models[a]['version']} (validation best {val(a):.4f})" if val(a) is not None else
                       f"{a} v{models[a]['version']}" for a in archs),
             f"{'':<18}" + col(archs)]
    for beam in [k for k in models[archs[0]] if k.startswith("beam")]:
        for k in SCORES:
            label = f"{SCORE_LABELS[k]} {'greedy' if beam == 'beam1' else beam.replace('beam', 'beam ')}"
            lines.append(f"{label:<18}" + col(f"{models[a][beam][k]:.4f}" for a in archs))
    if all("tuned" in models[a] for a in archs):  # each champion's decoding, chosen on the validation split
        for k in SCORES:
            lines.append(f"{SCORE_LABELS[k] + ' tuned':<18}" + col(f"{models[a]['tuned'][k]:.4f}" for a in archs))
        lines.append("tuned decoding: " + "; ".join(f"{a} {models[a]['tuned']['decoding']}" for a in archs))
    if any("fast" in models[a] for a in archs):  # the two aliases side by side, each at its own decoding
        lines += alias_lines(models, archs, metric, col)
    controls = {a: models[a]["control"] for a in archs}
    if any(controls.values()):
        for score in CONTROLLED:
            c = {a: (r or {}).get("scores", {}).get(score) for a, r in controls.items()}
            lines.append(f"{f'control {SCORE_LABELS[score]}':<18}" + col(f"{x['control_test']:.4f}" if x else "-"
                                                                          for x in c.values()))
            lines.append(f"{'  champ - control':<18}" + col(f"{x['gap']:+.4f}" if x else "-" for x in c.values()))
            lines.append(f"{'  95% interval':<18}" + col(f"{x['gap_low']:+.3f},{x['gap_high']:+.3f}" if x else "-"
                                                          for x in c.values()))
        for a, c in controls.items():
            if c and not c["verdict"].get("clear"):
                lines.append(f"WARNING: {c['verdict']['text']}: the {a} champion does not clearly beat a model "
                             f"that never saw its images")
    for boot in (results["bootstrap"] or {}).values():
        lines.append(_bootstrap_line("paired bootstrap, champions (greedy)", boot))
    reps = results["replicates"]
    if reps:
        lines.append(f"seed replicates ({reps['seeds']} new seeds per champion), test split, greedy: mean ± sd")
        for k in SCORES:
            lines.append(f"{SCORE_LABELS[k]:<18}" + col(
                f"{reps['architectures'][a][f'test_{k}']['mean']:.4f}±{reps['architectures'][a][f'test_{k}']['std']:.4f}"
                for a in archs))
        for boot in (reps.get("bootstrap") or {}).values():
            lines.append(_bootstrap_line("paired bootstrap, pooled replicates", boot))
    for arch, words in (results.get("convergence") or {}).items():
        lines.append(f"[{arch}] {words}")
    lines.append(f"verdict ({SCORE_LABELS[metric]}, the sweep's metric): {results['verdict']}")
    return "\n".join(lines)


def _bootstrap_line(what: str, b: dict) -> str:
    return (f"{what}: {b['a']} - {b['b']} {SCORE_LABELS[b['metric']]} {b['difference']:+.4f}, {b['level']:.0%} "
            f"interval [{b['low']:+.4f}, {b['high']:+.4f}] over {b['resamples']:,} resamples (seed {b['seed']}); "
            f"wins {b['a']} {b['a_wins']:.1%}, {b['b']} {b['b_wins']:.1%}")


def _log(client, experiment_id: str, name: str, results: dict, beams, resamples: int, bootstrap_seed: int,
         seeds: int) -> None:

    models = results["models"]
    params = {"split": results["split"], "resamples": resamples, "bootstrap_seed": bootstrap_seed, "seeds": seeds,
              **{f"{a}.model": m["model"] for a, m in models.items()},
              **{f"{a}.data": m["data"] for a, m in models.items()}}
    # One run per distinct comparison (MLflow params are fixed once logged): repeating one updates it.
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    run_id, created = find_or_create_run(client, experiment_id, {SWEEP_TAG: name, KIND_TAG: "compare",
                                                                 COMPARE_KEY_TAG: key},
                                         run_name=f"comparison-seeds{seeds}" if seeds else "comparison")
    if created:
        client.log_batch(run_id, params=param_entities(params))
    metrics = {f"{a}.beam{k}.{score}": m[f"beam{k}"][score] for a, m in models.items() for k in beams for score in SCORES}
    metrics.update({f"{a}.tuned.{score}": m["tuned"][score] for a, m in models.items() if "tuned" in m
                    for score in SCORES})
    metrics.update({f"{a}.fast.{score}": m["fast"][score] for a, m in models.items() if "fast" in m
                    for score in SCORES if score in m["fast"]})
    # validation beside test: the split the search ranked by, and the one it never saw
    metrics.update({f"{a}.val_best_{score}": v for a, m in models.items() for score, v in m["val"].items()})
    for prefix, boots in (("", results["bootstrap"]), ("replicates.", (results["replicates"] or {}).get("bootstrap"))):
        for score, boot in (boots or {}).items():
            metrics.update({f"{prefix}{score}_difference": boot["difference"],
                            f"{prefix}{score}_difference_low": boot["low"],
                            f"{prefix}{score}_difference_high": boot["high"]})
    for a, rep in ((results["replicates"] or {}).get("architectures") or {}).items():
        metrics.update({f"{a}.replicates.test_{k}.{s}": rep[f"test_{k}"][s] for k in SCORES for s in ("mean", "std")})
    client.log_batch(run_id, metrics=metric_entities(metrics))
    with tempfile.TemporaryDirectory(prefix="captune-compare-") as tmp:
        (Path(tmp) / "comparison.json").write_text(json.dumps(results, indent=2))
        with optional_step("the comparison chart", client, run_id, f"{CHART_NOTE_PREFIX}comparison.png"):
            draw_comparison(results, name, Path(tmp) / "comparison.png")
        client.log_artifacts(run_id, tmp)
    client.set_tag(run_id, NOTE_TAG, results["verdict"])
    client.set_terminated(run_id, "FINISHED")
