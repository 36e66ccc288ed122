"""Target 2: how much of a sweep's wall time goes to anything but training and validation, and
how long a trial takes from its start to its first training step.

    python benchmarks/light_trials.py [--trials 6] [--epochs 12] [--data DIR]
    python benchmarks/light_trials.py --sweep NAME --tracking-uri URI --wall SECONDS   # one that ran

Runs `captune sweep` (both architectures, the built-in dataset unless --data, a fresh feature
cache and MLflow store) and reads the answer back from MLflow: each trial run's start time, the
time of its first reported epoch, and the seconds that epoch spent training and validating.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="per architecture (search/spaces.yaml: 24)")
    parser.add_argument("--epochs", type=int, default=None, help="default: search/spaces.yaml's max_epochs")
    parser.add_argument("--data", default=None, help="default: a fresh copy of the built-in dataset")
    parser.add_argument("--sweep", help="measure a sweep that already ran (e.g. `make demo`'s) instead of running one")
    parser.add_argument("--tracking-uri", help="with --sweep: its MLflow store")
    parser.add_argument("--wall", type=float, help="with --sweep: its command's wall time in seconds")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.sweep:
        if not (args.tracking_uri and args.wall):
            parser.error("--sweep needs --tracking-uri and --wall")
        return report(args.tracking_uri, args.sweep, args.wall)
    tmp = Path(tempfile.mkdtemp(prefix="captune-bench-"))
    os.environ["CAPTUNE_CACHE_DIR"] = str(tmp / "cache")  # nothing cached from earlier runs
    from captune.cli import main as captune
    from captune.data.synth import write_synthetic

    data = args.data or str(write_synthetic(tmp / "synth"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    t0 = time.time()
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    if captune(["sweep", "--data", data, "--name", "bench", "--trials", str(args.trials), *epochs,
                "--storage", str(tmp / "sweeps"), "--tracking-uri", uri]) != 0:
        raise SystemExit("the sweep failed")
    wall = time.time() - t0
    print(f"data {data}; results kept in {tmp}")
    report(uri, "bench", wall)


def report(uri: str, name: str, wall: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    busy, first_step, setup, slots, shared = 0.0, [], [], 0, 0
    for run in runs:
        if run.data.tags.get("captune.kind") == "search":  # the searches run side by side
            slots += int(run.data.tags["captune.concurrent_trials"])  # a fixed number each
            shared = int(run.data.tags.get("captune.sweep_slots", 0))  # or a pool of them (captune.search.slots)
        if run.data.tags.get("captune.kind") not in ("trial", "control"):
            continue
        history = {k: {m.step: m for m in client.get_metric_history(run.info.run_id, k)}
                   for k in ("epoch_seconds", "val_seconds", "bleu4", "setup_seconds")}
        busy += sum(m.value for k in ("epoch_seconds", "val_seconds") for m in history[k].values())
        if run.data.tags["captune.kind"] == "control":  # training too, but not a trial's start-up
            continue
        # first result's arrival at the driver minus that epoch's own work: an upper bound on the
        # time from the trial's start to its first step (it also holds saving the checkpoint)
        first = history["bleu4"][1].timestamp / 1000 - run.info.start_time / 1000
        first_step.append(first - history["epoch_seconds"][1].value - history["val_seconds"][1].value)
        setup.append(history["setup_seconds"][1].value)
    slots = shared or slots
    share = 1 - busy / (wall * slots)
    print(f"machine: {os.cpu_count()} cores, CPU only; sweep {name}: {len(first_step)} trials, {slots} at a time")
    print(f"trial start -> first training step (s): min {min(first_step):.2f}  median "
          f"{statistics.median(first_step):.2f}  max {max(first_step):.2f}")
    print(f"  of which inside the trial function (data, model, cache): median {statistics.median(setup):.2f} s")
    print(f"sweep wall time {wall:.0f} s (Ray start, data and feature cache, trials, champions, controls, test-split "
          f"comparison); training+validation {busy:.0f} trial-seconds (controls included) on {slots} slots")
    print(f"sweep_time_outside_training: {100 * share:.1f} %")


if __name__ == "__main__":
    main()
