"""`captune compare`: both champions on the test split, greedy and beam 3, side by side."""
from __future__ import annotations

import tempfile
from pathlib import Path

from search.mlflow_trials import KIND_TAG, SWEEP_TAG, find_or_create_run
from search.registry import ALIAS, model_name
from trainables.config import ConfigError
from trainables.catalog import ARCHS


def compare(name: str, data_root: str | None = None, tracking_uri: str | None = None,
            beams: tuple[int, ...] = (1, 3), split: str = "test", skip_bad: bool = False) -> dict:
    """A champion trained with skip_bad (its search's setting) is evaluated with it too: the
    real Flickr8k token file names an image that does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from captune import tracking
    from trainables.inference import evaluate_beams

    uri = tracking.configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError(f"no sweep named {name!r} in the MLflow store {uri}")
    results: dict = {"sweep": name, "split": split, "models": {}}
    for arch in ARCHS:
        try:
            version = client.get_model_version_by_alias(model_name(arch), ALIAS)
        except MlflowException:
            continue
        root = data_root or _sweep_data(client, experiment.experiment_id, name, arch)
        loaded = tracking.load_captioner(f"models:/{model_name(arch)}@{ALIAS}", uri)
        skip = skip_bad or bool(loaded.payload.get("train_config", {}).get("skip_bad", False))
        scores = evaluate_beams(loaded, root, split=split, beams=beams, skip_bad=skip)
        results["models"][arch] = {"version": version.version, "data": root, **{
            f"beam{k}": {key: v for key, v in scores[k].items() if key.startswith("bleu")} for k in beams}}
    if not results["models"]:
        raise ConfigError(f"no champion is registered yet ({', '.join(model_name(a) for a in ARCHS)}): run a sweep first")
    _log_chart(client, experiment.experiment_id, name, results, beams)
    return results


def format_comparison(results: dict) -> str:
    models = results["models"]
    archs = list(models)
    versions = ", ".join(f"{a} v{models[a]['version']}" for a in archs)
    lines = [f"champions on the {results['split']} split ({versions})",
             f"{'':<14}" + "".join(f"{a:>14}" for a in archs)]
    beams = [k for k in models[archs[0]] if k.startswith("beam")]
    for beam in beams:
        for n in range(1, 5):
            label = f"BLEU-{n} {'greedy' if beam == 'beam1' else beam.replace('beam', 'beam ')}"
            lines.append(f"{label:<14}" + "".join(f"{models[a][beam][f'bleu{n}']:>14.4f}" for a in archs))
    return "\n".join(lines)


def _sweep_data(client, experiment_id: str, name: str, arch: str) -> str:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                              f"tags.`{KIND_TAG}` = 'search' and tags.arch = '{arch}'", max_results=1)
    if not runs or "data" not in runs[0].data.params:
        raise ConfigError(f"sweep {name!r} has no {arch} search recorded; pass --data")
    return runs[0].data.params["data"]


def _log_chart(client, experiment_id: str, name: str, results: dict, beams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = [(arch, k) for arch in models for k in beams]
    width = 0.8 / len(bars)
    for i, (arch, k) in enumerate(bars):
        values = [models[arch][f"beam{k}"][f"bleu{n}"] for n in range(1, 5)]
        ax.bar([n + i * width for n in range(4)], values, width,
               label=f"{arch} ({'greedy' if k == 1 else f'beam {k}'})")
    ax.set_xticks([n + 0.4 - width / 2 for n in range(4)], [f"BLEU-{n}" for n in range(1, 5)])
    ax.set(ylim=(0, 1), ylabel=f"{results['split']} split", title=f"sweep {name}: champions compared")
    ax.legend(fontsize=8)
    fig.tight_layout()
    run_id, _ = find_or_create_run(client, experiment_id, {SWEEP_TAG: name, KIND_TAG: "compare"},
                                   run_name="comparison")
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "comparison.png", dpi=100)
        import json

        (Path(tmp) / "comparison.json").write_text(json.dumps(results, indent=2))
        client.log_artifacts(run_id, tmp)
    plt.close(fig)
    for arch, scores in models.items():
        for k in beams:
            client.log_metric(run_id, f"{arch}.beam{k}.bleu4", scores[f"beam{k}"]["bleu4"])
    client.set_terminated(run_id, "FINISHED")
