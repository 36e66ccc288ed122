"""Fresh sweeps, again and again: each a new `captune sweep` process of both architectures on a new
SQLite store (a new experiment, as `make demo` starts), counted clean when it exits 0 with every
trial recorded. The acceptance run of issue M's D1 (a fresh two-architecture sweep died about one
time in four when its searches' first trials recorded the dataset at once).

    python benchmarks/fresh_sweeps.py --runs 20 [--images 300] [--trials 2] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from mlflow import MlflowClient

    from captune.data.synth import write_synthetic

    with tempfile.TemporaryDirectory(prefix="captune-fresh-") as tmp:
        data = write_synthetic(Path(tmp) / "synth", images=args.images, seed=0)
        space = yaml.safe_load((ROOT / "search" / "demo.yaml").read_text())
        space["sweep"].update(trials=args.trials, max_epochs=args.epochs, grace_period=1)
        config = Path(tmp) / "sweep.yaml"
        config.write_text(yaml.safe_dump(space))
        clean, seconds = 0, []
        for n in range(args.runs):
            folder = Path(tmp) / f"run{n}"
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "captune.cli", "sweep", "--data", str(data), "--name",
                                   f"fresh{n}", "--config", str(config), "--storage", str(folder / "tune"),
                                   "--tracking-uri", uri, "--no-control"], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "CAPTUNE_CACHE_DIR": str(Path(tmp) / "cache")})
            seconds.append(time.perf_counter() - t0)
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(f"fresh{n}")
            trials = client.search_runs([experiment.experiment_id], filter_string="tags.`captune.kind` = 'trial'",
                                        max_results=1000) if experiment else []
            ok = done.returncode == 0 and len(trials) == 2 * args.trials and \
                all(r.info.status in ("FINISHED",) for r in trials)
            clean += ok
            said = "clean" if ok else f"NOT CLEAN (exit {done.returncode}): {(done.stderr or done.stdout)[-600:]}"
            print(f"sweep {n + 1}/{args.runs}: {seconds[-1]:.0f}s, {len(trials)} trial runs, {said}", flush=True)
        print(f"{clean} of {args.runs} fresh sweeps clean; {sum(seconds) / len(seconds):.0f}s each on average")
        return 0 if clean == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
