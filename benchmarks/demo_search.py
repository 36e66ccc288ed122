"""The demo's search, before and after its defaults were chosen on recorded learning curves: the
same `make demo` sweep (both architectures, controls, 2 seed replicates) with each sweep file and
several sweep seeds, side by side on one machine; the champions' validation best and test scores.

    python benchmarks/demo_search.py --before benchmarks/sweeps/demo-before-n.yaml --after search/demo.yaml

The sweeps alternate (before, after, before, ...) so that a machine slowing down costs both alike;
the built-in dataset's caches are made first, outside the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ARCHS = ("cnn-lstm", "resnet-gru")


def with_seed(sweep_file: Path, seed: int, folder: Path) -> Path:
    doc = yaml.safe_load(sweep_file.read_text())
    doc["sweep"]["seed"] = seed
    out = folder / f"{sweep_file.stem}-seed{seed}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def run_sweep(captune: str, data: Path, sweep_file: Path, name: str, folder: Path, uri: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([captune, "sweep", "--data", str(data), "--name", name, "--config", str(sweep_file),
                           "--seeds", "2", "--storage", str(folder / "tune"), "--tracking-uri", uri],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    (folder / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"sweep {name} failed (exit {done.returncode}); its output: {folder / f'{name}.log'}")
    return wall


def champions(uri: str, name: str) -> dict:
    """{arch: {"val": validation best BLEU-4, "test": test BLEU-4 greedy, "test_cider": ...,
    "replicates": mean test BLEU-4 of the 2 seed replicates}} from the sweep's comparison run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    run = client.search_runs([exp.experiment_id], "tags.`captune.kind` = 'compare'")[0]
    m = run.data.metrics
    return {a: {"val": m[f"{a}.val_best_bleu4"], "test": m[f"{a}.beam1.bleu4"], "test_cider": m[f"{a}.beam1.cider"],
                "replicates": m.get(f"{a}.replicates.test_bleu4.mean")} for a in ARCHS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", default=Path("search/demo.yaml"), type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folder", type=Path, default=None, help="default: a new temporary folder")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="captune-demo-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CAPTUNE_CACHE_DIR"] = str(folder / "cache")
    captune = str(Path(sys.executable).with_name("captune"))
    data = folder / "synth"
    subprocess.run([captune, "data", "synth", "--out", str(data)], check=True, capture_output=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # the caches (decoded pixels, both encoders' features) before any timing
    for arch in ARCHS:
        subprocess.run([captune, "train", "--data", str(data), "--arch", arch, "--epochs", "1", "--out",
                        str(folder / f"warm-{arch}"), "--tracking-uri", uri], check=True, capture_output=True)
    results = []
    for seed in args.seeds:
        for label, sweep_file in (("before", args.before), ("after", args.after)):
            name = f"{label}-seed{seed}"
            wall = run_sweep(captune, data, with_seed(sweep_file, seed, folder), name, folder, uri)
            results.append({"label": label, "seed": seed, "wall_s": wall, "champions": champions(uri, name)})
            c = results[-1]["champions"]
            print(f"{name}: {wall:.0f} s; " + "; ".join(
                f"{a} val {c[a]['val']:.4f} test {c[a]['test']:.4f}" for a in ARCHS), flush=True)
    (folder / "demo_search.json").write_text(json.dumps(results, indent=2))
    print(f"\nper sweep file, mean over sweep seeds {args.seeds} (files in {folder}):")
    for label in ("before", "after"):
        rs = [r for r in results if r["label"] == label]
        walls = [r["wall_s"] for r in rs]
        line = f"{label:<7} wall {statistics.mean(walls):.0f} s"
        for a in ARCHS:
            val = statistics.mean(r["champions"][a]["val"] for r in rs)
            test = statistics.mean(r["champions"][a]["test"] for r in rs)
            line += f" | {a}: val {val:.4f}, test {test:.4f}"
        print(line)
    before = statistics.mean(r["wall_s"] for r in results if r["label"] == "before")
    after = statistics.mean(r["wall_s"] for r in results if r["label"] == "after")
    print(f"demo search wall time, after / before: {after / before:.2f}")


if __name__ == "__main__":
    main()
