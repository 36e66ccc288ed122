"""Does `captune sweep --warm-start` find a cold sweep's best in fewer trials? Real sweeps on one
dataset: a source sweep, then for each of several sampler seeds a cold sweep and a sweep
warm-started from the source, the same space, trials and epochs. For each seed: the cold sweep's
best validation score, and the trial (in order of start, the preset first) at which each sweep
first reached it; the medians over the seeds.

    python benchmarks/warm_start.py --data datasets/synth            # 3 seeds, cnn-lstm, ~10 min on 2 cores
    python benchmarks/warm_start.py --data datasets/synth --seeds 0 1 2 3 4 --trials 8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import yaml

from captune.cli import main as captune

ROOT = Path(__file__).resolve().parents[1]


def sweep(name: str, data: str, config: Path, work: Path, trials: int, epochs: int, arch: str,
          warm: str | None = None) -> list[float]:
    """Run one sweep; its own trials' values (best validation score) in order of their number."""
    args = ["sweep", "--data", data, "--name", name, "--arch", arch, "--config", str(config), "--trials", str(trials),
            "--epochs", str(epochs), "--storage", str(work / "sweeps"), "--tracking-uri",
            f"sqlite:///{work / 'mlflow.db'}", "--no-control"] + (["--warm-start", warm] if warm else [])
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = captune(args)
    if code != 0:
        raise SystemExit(f"{name}: captune sweep exited {code}:\n{out.getvalue()[-3000:]}")
    study = optuna.load_study(study_name=f"{name}-{arch}", storage=f"sqlite:///{work / 'sweeps' / f'{name}-optuna.db'}")
    own = [t for t in study.trials if "captune_warm_start" not in t.user_attrs]
    told = len(study.trials) - len(own)
    print(f"  {name}: {len(own)} trials in {time.perf_counter() - t0:.0f}s" + (f", told {told} earlier" if warm else ""),
          flush=True)
    return [t.value if t.value is not None else float("-inf") for t in own]


def reached(values: list[float], target: float) -> int | None:
    """The 1-based trial at which `values` first reach `target` (None: never)."""
    return next((i + 1 for i, v in enumerate(values) if v >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="cnn-lstm")
    parser.add_argument("--config", default=str(ROOT / "search" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6, help="trials of each cold and warm sweep")
    parser.add_argument("--source-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="warm-start-"))
    base = yaml.safe_load(Path(args.config).read_text())

    def config(seed: int) -> Path:
        path = work / f"sweep-{seed}.yaml"
        path.write_text(yaml.safe_dump({**base, "sweep": {**base["sweep"], "seed": seed}}))
        return path

    print(f"source sweep: {args.source_trials} trials (seed 100); then per seed a cold and a warm sweep of "
          f"{args.trials} trials, {args.epochs} epochs, {args.arch}, {args.config}", flush=True)
    sweep("source", args.data, config(100), work, args.source_trials, args.epochs, args.arch)
    rows = []
    for seed in args.seeds:
        cold = sweep(f"cold-{seed}", args.data, config(seed), work, args.trials, args.epochs, args.arch)
        warm = sweep(f"warm-{seed}", args.data, config(seed), work, args.trials, args.epochs, args.arch, warm="source")
        target = max(cold)
        rows.append((seed, target, reached(cold, target), reached(warm, target), max(warm)))
    print(f"\n{'seed':>4} {'cold best':>9} {'cold reached it at':>18} {'warm reached it at':>18} {'warm best':>9}")
    for seed, target, at_cold, at_warm, warm_best in rows:
        print(f"{seed:>4} {target:9.4f} {f'trial {at_cold}':>18} {f'trial {at_warm}' if at_warm else 'never':>18} "
              f"{warm_best:9.4f}")
    never = args.trials + 1  # a sweep that never reached it counts as one trial past its end
    cold_median = statistics.median(r[2] for r in rows)
    warm_median = statistics.median(r[3] or never for r in rows)
    print(f"median trials to the cold sweep's best: cold {cold_median:g}, warm {warm_median:g}"
          f" ('never' counted as {never}); results in {work}")


if __name__ == "__main__":
    main()
