"""`captune compare`: a sweep's champions on the test split, greedy and beam 3, each against its
image-blind control, and against each other with a paired bootstrap over the test images; with
`seeds`, each champion's configuration retrained with new seeds (the variation a seed alone
makes) and the bootstrap over the pooled replicates. Recorded in the sweep's `comparison` run."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from infra import sizing
from infra.mlflow_logging import metric_entities, param_entities
from infra.mlflow_names import (ARCH_TAG, COMPARE_KEY_TAG, CONTROL_METRICS, KIND_TAG, NOTE_TAG, SWEEP_TAG,
                                champion_record, control_verdict)
from infra.mlflow_store import configure
from infra.raycluster import init_ray
from search.bootstrap import RESAMPLES, paired_bootstrap
from search.mlflow_trials import find_or_create_run
from search.objective import METRIC
from search.reruns import RerunJob, run_reruns
from trainables.config import ConfigError, split_seed_of
from trainables.evaluation import caption_split
from trainables.model_source import load_captioner
from trainables.metrics import bleu, bleu_statistics

# matplotlib is imported where a figure is drawn, after its Agg backend is chosen.

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4")


def compare(name: str, data_root: str | None = None, tracking_uri: str | None = None,
            beams: tuple[int, ...] = (1, 3), split: str = "test", skip_bad: bool = False, seeds: int = 0,
            resamples: int = RESAMPLES, bootstrap_seed: int = 0, address: str | None = None) -> dict:
    """The champions are the models this sweep registered (not whichever holds the alias now). A
    champion trained with skip_bad (its search's setting) is evaluated with it too: the real
    Flickr8k token file names an image that does not exist."""
    uri = configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError(f"no sweep named {name!r} in the MLflow store {uri}")
    results: dict = {"sweep": name, "split": split, "models": {}, "bootstrap": None, "replicates": None}
    statistics, references, champions = {}, {}, {}
    for parent in _parents(client, experiment.experiment_id, name):
        arch, tags = parent.data.tags[ARCH_TAG], parent.data.tags
        champion = champion_record(tags, parent.data.metrics.get(METRIC, 0.0))
        if champion is None:
            continue
        model_uri = f"models:/{champion['name']}/{champion['version']}"
        root = data_root or parent.data.params.get("data")
        if root is None:
            raise ConfigError(f"sweep {name!r}: the {arch} search records no dataset; pass --data")
        loaded = load_captioner(model_uri, uri)
        skip = skip_bad or bool(loaded.payload.get("train_config", {}).get("skip_bad", False))
        captions, refs = caption_split(loaded, root, split, beams, skip_bad=skip)
        champions[arch] = (parent, loaded, root)
        statistics[arch], references[arch] = bleu_statistics(captions[1], refs), refs
        m = parent.data.metrics
        results["models"][arch] = {
            "version": champion["version"], "model": model_uri, "data": str(root), "images": len(refs),
            "val_bleu4": m.get(METRIC), **{f"beam{k}": bleu(captions[k], refs) for k in beams},
            "control": ({**{k: m[k] for k in CONTROL_METRICS}, "verdict": control_verdict(tags, m)}
                        if all(k in m for k in CONTROL_METRICS) else None)}
    if not results["models"]:
        raise ConfigError(f"sweep {name!r} has no registered champion yet: let its sweep finish (or --resume it)")
    archs = list(results["models"])
    if len(archs) == 2:
        if references[archs[0]] != references[archs[1]]:
            raise ConfigError(f"sweep {name!r}: the champions were tested on different images (their data or split "
                              f"differ); pass --data to test both on one dataset")
        results["bootstrap"] = paired_bootstrap(statistics[archs[0]], statistics[archs[1]], (archs[0], archs[1]),
                                                resamples, bootstrap_seed).to_dict()
    if seeds:
        results["replicates"] = _replicates(client, experiment.experiment_id, name, champions, seeds, uri, address,
                                            resamples, bootstrap_seed)
    results["verdict"] = _verdict(results)
    _log(client, experiment.experiment_id, name, results, beams, resamples, bootstrap_seed, seeds)
    return results


def _parents(client, experiment_id: str, name: str) -> list:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                                                             f"tags.`{KIND_TAG}` = 'search'")
    return sorted(runs, key=lambda r: r.data.tags[ARCH_TAG])


def _replicates(client, experiment_id: str, name: str, champions: dict, seeds: int, uri: str, address: str | None,
                resamples: int, bootstrap_seed: int) -> dict:
    """Each champion's configuration trained with `seeds` new seeds (the champion's seed + 1 ..
    + seeds: its own score is picked as the best of a search, so it is left out), all on the
    cluster's trial slots at once; per architecture the test BLEU mean and standard deviation,
    and the paired bootstrap of the pooled replicates (their counts added image by image)."""
    init_ray(address)
    gpus = max(float(parent.data.params.get("gpus_per_worker", 0)) for parent, _, _ in champions.values())
    cpus = sizing.cpus_per_worker(address, gpus)
    jobs = []
    for arch, (parent, loaded, root) in champions.items():
        config = dict(loaded.payload["train_config"])
        config["split_seed"] = split_seed_of(config)  # a checkpoint from before split_seed drew it from seed
        for seed in range(int(config["seed"]) + 1, int(config["seed"]) + 1 + seeds):
            jobs.append(RerunJob(kind="replicate", config={**config, "seed": seed}, data_root=str(root),
                                 tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent.info.run_id,
                                 sweep=name, run_name=f"{arch}-seed{seed}", use_gpu=gpus > 0, threads=cpus,
                                 echo_epochs=False))  # each run's epochs are in MLflow; the console stays short
    concurrent = sizing.concurrent_trials(address, 1, gpus, cpus)
    print(f"replicates: {len(jobs)} runs ({seeds} new seeds per champion), {concurrent} at a time", file=sys.stderr,
          flush=True)
    done = run_reruns(client, jobs, concurrent, cpus, gpus)
    out: dict = {"seeds": seeds, "architectures": {}}
    pooled = {}
    for arch in champions:
        mine = [(job, r) for job, r in zip(jobs, done) if job.config["arch"] == arch]
        test = np.array([[r["test"][k] for k in KEYS] for _, r in mine])  # (seeds, 4)
        out["architectures"][arch] = {
            "seeds": [job.config["seed"] for job, _ in mine], "runs": [r["run_id"] for _, r in mine],
            "val_bleu4": [r["val"]["best_bleu4"] for _, r in mine],
            **{f"test_{k}": {"mean": float(test[:, i].mean()), "std": float(test[:, i].std(ddof=1)) if seeds > 1 else 0.0,
                             "values": test[:, i].tolist()} for i, k in enumerate(KEYS)}}
        pooled[arch] = np.sum([np.asarray(r["statistics"]) for _, r in mine], axis=0)
    if len(pooled) == 2:
        a, b = pooled
        out["bootstrap"] = paired_bootstrap(pooled[a], pooled[b], (a, b), resamples, bootstrap_seed).to_dict()
    return out


def _verdict(results: dict) -> str:
    boot = (results["replicates"] or {}).get("bootstrap") or results["bootstrap"]
    if boot is None:
        return "one architecture only: nothing to compare"
    basis = (f"over {results['replicates']['seeds']} seed replicates each" if results["replicates"] else
             "champions only; --seeds K adds the variation of training seeds")
    return f"{boot['verdict']}; {basis}"


def format_comparison(results: dict) -> str:
    models = results["models"]
    archs = list(models)
    col = lambda values: "".join(f"{v:>14}" for v in values)  # noqa: E731
    lines = [f"champions of sweep {results['sweep']} on the {results['split']} split "
             f"({models[archs[0]]['images']:,} images): " +
             ", ".join(f"{a} v{models[a]['version']} (validation best BLEU-4 {models[a]['val_bleu4']:.4f})" for a in archs),
             f"{'':<16}" + col(archs)]
    for beam in [k for k in models[archs[0]] if k.startswith("beam")]:
        for n in range(1, 5):
            label = f"BLEU-{n} {'greedy' if beam == 'beam1' else beam.replace('beam', 'beam ')}"
            lines.append(f"{label:<16}" + col(f"{models[a][beam][f'bleu{n}']:.4f}" for a in archs))
    controls = {a: models[a]["control"] for a in archs}
    if any(controls.values()):
        lines.append(f"{'control BLEU-4':<16}" + col(f"{c['control_test_bleu4']:.4f}" if c else "-" for c in controls.values()))
        lines.append(f"{'champ - control':<16}" + col(f"{c['control_gap']:+.4f}" if c else "-" for c in controls.values()))
        lines.append(f"{'  95% interval':<16}" + col(f"{c['control_gap_low']:+.3f},{c['control_gap_high']:+.3f}"
                                                       if c else "-" for c in controls.values()))
        for a, c in controls.items():
            if c and not c["verdict"].get("clear"):
                lines.append(f"WARNING: {c['verdict']['text']}: the {a} champion does not clearly beat a model "
                             f"that never saw its images")
    if results["bootstrap"]:
        lines.append(_bootstrap_line("paired bootstrap, champions (greedy)", results["bootstrap"]))
    reps = results["replicates"]
    if reps:
        lines.append(f"seed replicates ({reps['seeds']} new seeds per champion), test split, greedy: mean ± sd")
        for n in range(1, 5):
            lines.append(f"{f'BLEU-{n}':<16}" + col(
                f"{reps['architectures'][a][f'test_bleu{n}']['mean']:.4f}±{reps['architectures'][a][f'test_bleu{n}']['std']:.4f}"
                for a in archs))
        if reps.get("bootstrap"):
            lines.append(_bootstrap_line("paired bootstrap, pooled replicates", reps["bootstrap"]))
    lines.append(f"verdict: {results['verdict']}")
    return "\n".join(lines)


def _bootstrap_line(what: str, b: dict) -> str:
    return (f"{what}: {b['a']} - {b['b']} BLEU-4 {b['difference']:+.4f}, {b['level']:.0%} interval "
            f"[{b['low']:+.4f}, {b['high']:+.4f}] over {b['resamples']:,} resamples (seed {b['seed']}); "
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
    metrics = {f"{a}.beam{k}.{key}": m[f"beam{k}"][key] for a, m in models.items() for k in beams for key in KEYS}
    # validation beside test: the split the search ranked by, and the one it never saw
    metrics.update({f"{a}.val_best_bleu4": m["val_bleu4"] for a, m in models.items() if m.get("val_bleu4") is not None})
    for prefix, boot in (("", results["bootstrap"]), ("replicates.", (results["replicates"] or {}).get("bootstrap"))):
        if boot:
            metrics.update({f"{prefix}bleu4_difference": boot["difference"], f"{prefix}bleu4_difference_low": boot["low"],
                            f"{prefix}bleu4_difference_high": boot["high"]})
    for a, rep in ((results["replicates"] or {}).get("architectures") or {}).items():
        metrics.update({f"{a}.replicates.test_{k}.{s}": rep[f"test_{k}"][s] for k in KEYS for s in ("mean", "std")})
    client.log_batch(run_id, metrics=metric_entities(metrics))
    with tempfile.TemporaryDirectory(prefix="captune-compare-") as tmp:
        (Path(tmp) / "comparison.json").write_text(json.dumps(results, indent=2))
        _chart(results, name, Path(tmp) / "comparison.png")
        client.log_artifacts(run_id, tmp)
    client.set_tag(run_id, NOTE_TAG, results["verdict"])
    client.set_terminated(run_id, "FINISHED")


def _chart(results: dict, name: str, path: Path) -> None:
    """Test BLEU-1..4 per architecture (one colour each): the champion (greedy), the seed
    replicates' mean with their standard deviation as error bars, and the image-blind control's
    BLEU-4 as a dashed floor over that architecture's BLEU-4 bars; the verdict below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, reps = results["models"], (results["replicates"] or {}).get("architectures") or {}
    bars = [(a, what) for a in models for what in ("champion", "replicates") if what == "champion" or a in reps]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (arch, what) in enumerate(bars):
        colour = f"C{list(models).index(arch)}"
        x = [n + i * width for n in range(4)]
        if what == "champion":
            ax.bar(x, [models[arch]["beam1"][k] for k in KEYS], width, color=colour, label=f"{arch} champion")
        else:
            ax.bar(x, [reps[arch][f"test_{k}"]["mean"] for k in KEYS], width, color=colour, alpha=0.5, hatch="//",
                   capsize=3, yerr=[reps[arch][f"test_{k}"]["std"] for k in KEYS],
                   label=f"{arch}, {len(reps[arch]['seeds'])} new seeds (mean ± sd)")
    for arch, m in models.items():
        if m.get("control"):
            mine = [i for i, (a, _) in enumerate(bars) if a == arch]
            ax.hlines(m["control"]["control_test_bleu4"], 3 + mine[0] * width - width / 2,
                      3 + mine[-1] * width + width / 2, colors=f"C{list(models).index(arch)}", linestyles="dashed",
                      linewidth=2, zorder=3, label=f"{arch} image-blind control (BLEU-4)")
    ax.set_xticks([n + (len(bars) - 1) * width / 2 for n in range(4)], [f"BLEU-{n}" for n in range(1, 5)])
    ax.set(ylim=(0, 1.22), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel=f"{results['split']} split, greedy search",
           title=f"sweep {name}: champions compared")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.text(0.01, 0.01, textwrap.fill(f"verdict: {results['verdict']}", 140), fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
