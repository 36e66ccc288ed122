"""How fast each finished trial's model is, and the quality-for-speed trade-off it leaves
(captune.search.tradeoff): run once every search of a sweep has ended (nothing else trains then),
by the sweep (a Ray task of its own on the driver's node) or by `captune speed`.

Per trial, from its best epoch's checkpoint (its run's `captune.checkpoint`): its parameters and
checkpoint size, its latency per image at batch 1 (p50, p90) and throughput at batch 32, greedy
and at its architecture's tuned decoding (the champion's), on the first 32 validation images, one
core and one torch thread (captune.trainables.speed); and its validation score at the tuned
decoding. Then per architecture: the Pareto fronts (a tag on each trial run), the chart on the
parent run, and the @fast model registered and aliased. A trial measured before at the same tuned
decoding is not measured again (`again` does)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray.tune import Checkpoint

from captune.data.images import read_image
from captune.data.layouts import load_corpus
from captune.infra.mlflow_logging import metric_entities, optional_step, unavailable
from captune.infra.mlflow_names import (ARCH_TAG, CHAMPION_LATENCY_METRIC, CHART_NOTE_PREFIX, CHECKPOINT_TAG,
                                        FAST_LATENCY_METRIC, FAST_MODEL_TAG, FAST_TAG, FAST_WITHIN_TAG, FRONT_TAG,
                                        KIND_TAG, SPEED_MACHINE_TAG, SPEED_NOTE_TAG, STATE_TAG, SWEEP_TAG, TRIAL_TAG,
                                        TUNED_DECODING_TAG, champion_record, p50_metric, tuned_metric)
from captune.infra.mlflow_store import configure
from captune.infra.raycluster import root_cause
from captune.search.convergence import NOISE_METRIC
from captune.search.decoding_search import BASELINE, decoding_from_tags, validation_scores
from captune.search.leaderboard import find_sweep
from captune.search.mlflow_trials import ranked_trial_runs
from captune.search.objective import USABLE, metric_of, objective
from captune.search.progress import held_back
from captune.search.registry import model_name, register_fast
from captune.search.tradeoff import DECODINGS, FastChoice, Model, choose_fast, draw_fronts, front
from captune.trainables.checkpoint import load_checkpoint
from captune.trainables.config import split_seed_of
from captune.trainables.decoding import Decoding
from captune.trainables.inference import image_size_of
from captune.trainables.speed import BATCH, Subject, machine, measure, pinned

MEASURED = p50_metric("greedy")  # a trial run with it was measured
AT_ONCE = 32  # trials loaded and timed together at most (each holds its model in memory meanwhile)


def measure_after_searches(req, uri: str, here, feature_sets: dict[str, str | None]) -> None:
    """The sweep's step once nothing trains any more (captune.search.sweep): measure_sweep in a Ray
    task of its own on the driver's node (`here`), whose process ends with it (it pins that process
    to one core). A failure is said and the sweep keeps its results; Ctrl-C says how to go on.
    `req`: the captune.search.request.SweepRequest."""
    print("\nmeasuring each trial's latency and size (one core, one torch thread) ...", flush=True)
    task = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(_speed_task).options(scheduling_strategy=here)
    ref = task.remote(req.name, uri, str(Path(req.data_root).resolve()), feature_sets, req.fast_within,
                      not req.verbose)
    try:
        print("\n".join(ray.get(ref)), flush=True)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        print(f"\ncaptune: the searches are done; `captune speed {req.name}` measures the trials' speed and "
              f"chooses @fast", file=sys.stderr, flush=True)
        raise
    except Exception as e:
        if unavailable(e):
            raise
        print(f"WARNING: the trials' speed was not measured ({root_cause(e)}); the sweep's results are kept: "
              f"`captune speed {req.name}` measures it", flush=True)


def _speed_task(sweep: str, uri: str, data_root: str, feature_sets: dict, within: float | None,
                quiet: bool) -> list[str]:
    with held_back(quiet):  # (MLflow's lines as it registers @fast)
        return measure_sweep(sweep, uri, data_root, feature_sets, within)


def measure_sweep(sweep: str, tracking_uri: str | None = None, data_root: str | None = None,
                  feature_sets: dict[str, str | None] | None = None, within: float | None = None,
                  again: bool = False) -> list[str]:
    """Measure a sweep's trials and choose each architecture's @fast; returns what to print. The
    trials of every architecture are timed together, taking turns (captune.trainables.speed), so
    that what the machine does meanwhile slows them alike. Each architecture is an optional step:
    what fails is noted on its parent run (`captune.speed_note`) and the others go on."""
    uri = configure(tracking_uri)
    client = MlflowClient(uri)
    experiment = find_sweep(client, uri, sweep)
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`{KIND_TAG}` = 'search' and tags.`{SWEEP_TAG}` = '{sweep}'")
    if within is None and experiment.tags.get(FAST_WITHIN_TAG):  # the sweep's --fast-within
        within = float(experiment.tags[FAST_WITHIN_TAG])
    searches, lines = [], []
    for parent in parents:
        arch = parent.data.tags[ARCH_TAG]
        with _step(client, parent):
            search = _Search(client, experiment.experiment_id, sweep, parent,
                             data_root or parent.data.params.get("data"), (feature_sets or {}).get(arch), again)
            if search.record is None:
                lines.append(f"[{arch}] speed: not measured (no champion registered: its tuned decoding is what the "
                             f"trials are measured at)")
            else:
                search.load()
                searches.append(search)
    where = _time_together(client, searches)
    for search in searches:
        with _step(client, search.parent):
            lines += [f"[{search.arch}] {line}" for line in search.finish(where, within)]
    return lines


def _step(client, parent):
    return optional_step(f"the {parent.data.tags[ARCH_TAG]} trials' speed", client, parent.info.run_id,
                         SPEED_NOTE_TAG)


class _Search:
    """One architecture's search as its trials are measured: the champion's decoding (what each
    trial is measured at besides greedy), the trials to measure, then what they show."""

    def __init__(self, client, experiment_id: str, sweep: str, parent, data_root: str, feature_set: str | None,
                 again: bool):
        self.client, self.experiment_id, self.sweep, self.parent = client, experiment_id, sweep, parent
        self.arch, self.metric = parent.data.tags[ARCH_TAG], metric_of(parent.data.params)
        self.data_root, self.feature_set, self.again = data_root, feature_set, again
        self.record = champion_record(parent.data.tags, 0.0, self.metric)
        if self.record is None:
            return
        self.champion = client.get_model_version(self.record["name"], self.record["version"])
        self.tuned = decoding_from_tags(self.champion.tags) or BASELINE  # what the champion serves
        ranked = ranked_trial_runs(client, experiment_id, sweep, self.arch, self.metric)
        self.kept = [run for run in ranked if CHECKPOINT_TAG in run.data.tags]
        self.todo = [run for run in self.kept if again or MEASURED not in run.data.metrics
                     or run.data.tags.get(TUNED_DECODING_TAG) != self.tuned.text()]
        self.loaded, self.sizes, self.speed = {}, {}, {}

    def load(self) -> None:
        """Each trial to measure: its best epoch's checkpoint, loaded."""
        for run in self.todo:
            with Checkpoint(run.data.tags[CHECKPOINT_TAG]).as_directory() as folder:  # (downloaded if remote)
                path = Path(folder) / "model.pt"
                self.loaded[run.info.run_id] = load_checkpoint(path)
                self.sizes[run.info.run_id] = path.stat().st_size / 1e6

    def finish(self, where: str | None, within: float | None) -> list[str]:
        """Each timed trial's figures and its validation score at the tuned decoding on its run; then
        the fronts, @fast and the chart."""
        client, metric, tuned, scorers = self.client, self.metric, self.tuned, {}
        for run_id, model in self.loaded.items():
            score = validation_scores(model, self.data_root, [tuned], metric, self.feature_set, scorers)[tuned]
            client.log_batch(run_id, metrics=metric_entities({**self.speed[run_id], "checkpoint_mb": self.sizes[run_id],
                                                              tuned_metric(metric): score}),
                             tags=[RunTag(SPEED_MACHINE_TAG, where), RunTag(TUNED_DECODING_TAG, tuned.text())])
        ranked = ranked_trial_runs(client, self.experiment_id, self.sweep, self.arch, metric)  # with what was logged
        models = _models(ranked, metric)
        before = "again" if self.again else f"{len(self.kept) - len(self.todo)} measured before"
        unkept = sum(run.data.tags.get(STATE_TAG) in USABLE and CHECKPOINT_TAG not in run.data.tags for run in ranked)
        lines = [f"speed: {len(self.todo)} trial(s) measured" + (f" on {where}" if self.todo else "") +
                 f" ({before}" + (f"; {unkept} without a kept checkpoint, not measured" if unkept else "") +
                 f"); greedy and the tuned decoding ({tuned.text()})"]
        if not models:
            return lines
        fronts = {d: front([m for m in models if m.decoding == d]) for d in DECODINGS}
        for run in ranked:
            if MEASURED in run.data.metrics:
                on = [d for d in DECODINGS if any(m.run_id == run.info.run_id for m in fronts[d])]
                client.set_tag(run.info.run_id, FRONT_TAG, "+".join(on) or "-")
        lines += [f"Pareto front ({d}): " + ", ".join(f"#{m.rank} {m.p50_ms:.1f} ms {m.score:.4f}" for m in fronts[d])
                  for d in DECODINGS]
        champion = next((m for m in models if m.trial_id == self.champion.tags.get("trial_id")
                         and m.decoding == "tuned"), None)
        statement, choice = _fast(client, self.parent, models, champion, metric, within, self.record["version"],
                                  tuned)
        lines.append(statement)
        parent_id = self.parent.info.run_id
        with optional_step("the Pareto chart", client, parent_id, f"{CHART_NOTE_PREFIX}pareto.png"):
            with tempfile.TemporaryDirectory(prefix="captune-pareto-") as tmp:
                draw_fronts({self.arch: models}, {self.arch: champion} if champion else {},
                            {self.arch: choice} if choice else {}, metric, Path(tmp) / "pareto.png")
                client.log_artifacts(parent_id, tmp, "tradeoff")
        return lines


def _time_together(client, searches: list[_Search]) -> str | None:
    """Every loaded trial of every search timed together, AT_ONCE at a time, greedy and at its
    search's tuned decoding, on the validation images of its size, pinned to one core. Returns the
    machine in words. If the timing fails, each search's parent says why and it is left out."""
    timed = [(search, run_id) for search in searches for run_id in search.loaded]
    if not timed:
        return None
    try:
        images: dict[tuple, np.ndarray] = {}
        with pinned() as core:
            for start in range(0, len(timed), AT_ONCE):
                chunk = timed[start:start + AT_ONCE]
                subjects = {}
                for search, run_id in chunk:
                    model = search.loaded[run_id]
                    key = (search.data_root, image_size_of(model), split_seed_of(model.payload["train_config"]))
                    if key not in images:
                        images[key] = _validation_pixels(*key)
                    subjects[run_id] = Subject(model, images[key], {"greedy": Decoding(1), "tuned": search.tuned})
                figures = measure(subjects)
                for search, run_id in chunk:
                    search.speed[run_id] = figures[run_id]
        return machine(core)
    except Exception as e:
        for search in list(searches):
            with _step(client, search.parent):
                raise e
            searches.remove(search)
        return None


def _validation_pixels(data_root: str, size: int, split_seed: int) -> np.ndarray:
    """The first BATCH validation images (repeated if the split has fewer), `size` pixels square."""
    corpus = load_corpus(data_root, seed=split_seed)
    names = corpus.splits["val"][:BATCH]
    pixels = np.stack([read_image(corpus.image_path(n), size) for n in names])
    return np.concatenate([pixels] * -(-BATCH // len(pixels)))[:BATCH]


def _models(ranked: list, metric: str) -> list[Model]:
    """Each measured trial at greedy (its objective, when its validation captions were greedy, as
    by default) and at the tuned decoding."""
    out = []
    for rank, run in enumerate(ranked, 1):
        m = run.data.metrics
        if MEASURED not in m or objective(metric) not in m:
            continue
        common = dict(rank=rank, run_id=run.info.run_id, trial_id=run.data.tags.get(TRIAL_TAG, ""),
                      name=run.info.run_name or "")
        if run.data.params.get("val_beam", "1") == "1":  # (its objective is its greedy score)
            out.append(Model(decoding="greedy", score=m[objective(metric)], p50_ms=m[p50_metric("greedy")],
                             **common))
        if tuned_metric(metric) in m:
            out.append(Model(decoding="tuned", score=m[tuned_metric(metric)], p50_ms=m[p50_metric("tuned")],
                             **common))
    return out


def _fast(client, parent, models: list[Model], champion: Model | None, metric: str, within: float | None,
          champion_version: str, tuned: Decoding) -> tuple[str, FastChoice | None]:
    """The @fast choice, registered and aliased, on the parent run: (in words, the choice); or why
    there is none (in words, None)."""
    if champion is None:
        return "@fast: not chosen (the champion's trial was not measured)", None
    noise = parent.data.metrics.get(NOISE_METRIC)
    if within is None and noise is None:
        return ("@fast: not chosen: no seed noise was measured to say what is within reach of the champion "
                "(`--seeds 2` or more), and no --fast-within was given"), None
    choice = choose_fast(models, champion, metric, within if within is not None else noise,
                         "--fast-within" if within is not None else "the seed noise")
    chosen, arch = choice.chosen, parent.data.tags[ARCH_TAG]
    decoding = tuned if chosen.decoding == "tuned" else Decoding(1)
    tags = {"trial_id": chosen.trial_id, "metric": metric, metric: f"{chosen.score:.6f}",
            "latency_p50_ms": f"{chosen.p50_ms:.3f}"}
    if choice.is_champion():
        version, moved = register_fast(client, arch, chosen.run_id, None, decoding, tags, champion_version)
    else:
        run = client.get_run(chosen.run_id)
        with Checkpoint(run.data.tags[CHECKPOINT_TAG]).as_directory() as folder:
            version, moved = register_fast(client, arch, chosen.run_id, Path(folder) / "model.pt", decoding, tags,
                                           champion_version)
    statement = choice.statement() + f"; models:/{model_name(arch)}/{version}" + (
        "" if moved else " (alias not moved: the champion alias holds another sweep's model)")
    client.log_batch(parent.info.run_id, metrics=metric_entities({CHAMPION_LATENCY_METRIC: champion.p50_ms,
                                                                   FAST_LATENCY_METRIC: chosen.p50_ms}),
                     tags=[RunTag(FAST_TAG, statement[:5000]),
                           RunTag(FAST_MODEL_TAG, f"models:/{model_name(arch)}/{version}")])
    return statement, choice
