"""A learning-curve table: configurations drawn quasi-randomly from a sweep file's search space,
each trained to the last epoch, with every epoch's validation and test scores and wall time.

    python benchmarks/curves.py                       # benchmarks/curves/synth.jsonl.gz, about 40 min on 2 cores
    python benchmarks/curves.py --data FLICKR8K_DIR --epochs 12 --configs 256 --out benchmarks/curves/flickr8k.jsonl.gz

The search strategies of benchmarks/search_replay.py are replayed on it with a simulated clock.

A row holds, per epoch: validation BLEU-4 and CIDEr-D (what a sweep sees), the test split's (what
the configuration a strategy picks really scores), and the epoch's seconds of training plus
validation (what a sweep's clock spends; the test pass is the table's own cost, not counted). A
configuration whose loss became NaN keeps the epochs before and the epoch it diverged in.

The default size fits about an hour on 2 cores: 128 configurations per architecture (a power of
two: the Sobol draw's balanced size) from search/spaces.yaml's space, 6 epochs (search/demo.yaml's
max_epochs, where the real sweeps that check the replay run), on the built-in dataset's scenes
with 800 training images (a third of the built-in 2,400: each epoch a third as long) and 500
validation and 500 test images (more than the built-in 300, because a split's noise is what
decides whether "within 0.005 BLEU-4 of the best" names a region of the space or one lucky
configuration: on 100 images the same model's BLEU-4 differs by about 0.025 between two splits).
Fewer training images take the optimiser fewer steps per epoch, so every curve is lower at a given
epoch and a higher learning rate is favoured. How much of the landscape survives was measured
against the full built-in dataset (3,000 images, 2,400 training) on the draw's first 16
configurations per architecture (`--data` a `captune data synth` folder, `--configs 16`, then
`--compare`): Spearman 0.44 (cnn-lstm) and 0.53 (resnet-gru) between their best validation
BLEU-4. Only part of the ranking carries over: the replay's figures are about this reduced
problem, a landscape of the same kind (crossing curves, one corner of the space best), not a
stand-in for the full dataset's.

The build is resumable: finished configurations are appended to OUT.partial as they come, and a
second run of the same command trains only what is missing, then writes OUT. --configs may grow
(the draw is a prefix of one Sobol sequence).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import qmc

ROOT = Path(__file__).resolve().parent.parent


def draw_configs(space, n: int, seed: int = 0) -> list[dict]:
    """n points of a SearchSpace's searched keys, scrambled Sobol (balanced for n a power of 2)."""
    keys = list(space.searched)
    with warnings.catch_warnings():  # any prefix of the sequence is still evenly spread, if less exactly
        warnings.filterwarnings("ignore", "The balance properties", UserWarning)
        units = qmc.Sobol(d=len(keys), scramble=True, seed=seed).random(n)  # (n, D) in [0, 1)
    return [{key: _from_unit(*space.searched[key], u) for key, u in zip(keys, row)} for row in units]


def _from_unit(kind: str, args: list, u: float):
    if kind == "loguniform":
        return float(f"{math.exp(math.log(args[0]) + u * (math.log(args[1]) - math.log(args[0]))):.6g}")
    if kind == "uniform":
        return float(f"{args[0] + u * (args[1] - args[0]):.6g}")
    if kind == "int":
        return int(args[0] + min(int(u * (args[1] - args[0] + 1)), args[1] - args[0]))
    return args[min(int(u * len(args)), len(args) - 1)]


# --- one configuration, in a worker process ---------------------------------------------------

_data = {}  # the prepared dataset, once per worker process


def train_config(task: dict) -> dict:
    """Train one configuration to the last epoch; the row of the table."""
    import torch
    from captune.data.prepare import prepare_data
    from captune.trainables.checkpoint import load_checkpoint
    from captune.trainables.config import compose, preset_layers
    from captune.trainables.evaluation import caption_split
    from captune.trainables.reporting import Reporter
    from captune.trainables.loop import Diverged, WorkerContext, train
    from captune.trainables.metrics import CaptionScorer

    torch.set_num_threads(1)  # as a sweep trial has here: one core per trial
    cfg = compose(task["arch"], preset_layers(task["data"], task["arch"]) + [
        ("sweep file (fixed keys)", task["fixed"]), ("configuration", task["config"]),
        ("table", {"epochs": task["epochs"], "seed": task["seed"], "cache_dir": task["cache_dir"]})])
    key = (task["data"], cfg.image_size)
    if key not in _data:
        _data[key] = prepare_data(task["data"], cfg.image_size, cfg.cache_path(), seed=cfg.split_seed, progress=False)
    data = _data[key]
    test_scorer = CaptionScorer(data.captions("test"))
    epochs = []

    def report(metrics: dict, checkpoint_dir) -> None:
        loaded = load_checkpoint(checkpoint_dir, arch=cfg.arch)
        hyps, _ = caption_split(loaded, task["data"], "test", (1,), cfg.cache_path(), data=data)
        test = test_scorer.scores(hyps[1])
        epochs.append({"epoch": metrics["epoch"], "val_bleu4": round(metrics["bleu4"], 6),
                       "val_cider": round(metrics["cider"], 6),
                       "seconds": round(metrics["epoch_seconds"] + metrics["val_seconds"], 4),
                       "test_bleu4": round(test["bleu4"], 6), "test_cider": round(test["cider"], 6)})

    started = time.perf_counter()
    diverged = None
    try:
        train(cfg, task["data"], WorkerContext(reporter=Reporter(sink=report), echo=lambda line: None), data=data)
    except Diverged as e:
        diverged = e.epoch
    return {"arch": task["arch"], "id": task["id"], "config": task["config"], "epochs": epochs,
            "diverged_in_epoch": diverged, "setup_seconds": round(time.perf_counter() - started
                                                                  - sum(e["seconds"] for e in epochs), 3)}


# --- the table ----------------------------------------------------------------------------------

def read_table(path: str | Path) -> tuple[dict, list[dict]]:
    """(metadata, rows) of a finished table (OUT) or of a build in progress (OUT.partial); a line
    cut short by a killed build is left out."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    meta, rows = {}, []
    with opener(path, "rt") as f:
        for line in f:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "meta" in item:
                meta = item["meta"]
            else:
                rows.append(item)
    return meta, rows


def build(args: argparse.Namespace) -> Path:
    from captune.search.space import load_spaces

    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    data = Path(args.data) if args.data else ensure_synth(tuple(args.synth_split))
    settings, spaces = load_spaces(args.space)
    archs = args.arch or list(spaces)
    meta = {"command": " ".join(["python", "benchmarks/curves.py", *sys.argv[1:]]),
            "data": str(data.relative_to(ROOT) if data.is_relative_to(ROOT) else data), "images": count_images(data), "space_file": str(args.space or "search/spaces.yaml"),
            "spaces": {a: spaces[a].searched for a in archs}, "fixed": {a: spaces[a].fixed for a in archs},
            "epochs": args.epochs, "configs": args.configs, "seed": args.seed, "train_seed": 0,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.processes} processes of 1 torch thread",
            "started": time.strftime("%Y-%m-%d %H:%M")}
    done = set()
    if partial.exists():
        old_meta, rows = read_table(partial)
        same = ("data", "spaces", "fixed", "epochs", "seed")  # --configs may grow or shrink: a Sobol prefix
        if {k: old_meta.get(k) for k in same} != {k: json.loads(json.dumps(meta[k])) for k in same}:
            sys.exit(f"{partial} was built with other settings ({old_meta.get('command')}); "
                     f"delete it or give another --out")
        done = {(r["arch"], r["id"]) for r in rows if r["id"] < args.configs}
        meta = {**old_meta, "command": meta["command"], "configs": args.configs}
    else:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"meta": meta}) + "\n")
    tasks = []
    for arch in archs:
        for i, config in enumerate(draw_configs(spaces[arch], args.configs, args.seed)):
            if (arch, i) not in done:
                tasks.append({"arch": arch, "id": i, "config": config, "fixed": spaces[arch].fixed, "data": str(data),
                              "epochs": args.epochs, "seed": 0, "cache_dir": str(args.cache_dir)})
    tasks.sort(key=lambda t: (t["id"], t["arch"]))  # both architectures advance together
    print(f"{len(done)} configuration(s) already in {partial}; {len(tasks)} to train on {args.processes} "
          f"process(es)", flush=True)
    started, n = time.perf_counter(), 0
    with mp.get_context("spawn").Pool(args.processes, maxtasksperchild=32) as pool, open(partial, "a") as f:
        for row in pool.imap_unordered(train_config, tasks):
            f.write(json.dumps(row) + "\n")
            f.flush()
            n += 1
            if n % 10 == 0 or n == len(tasks):
                rate = (time.perf_counter() - started) / n
                print(f"  {n}/{len(tasks)}  {rate:.1f} s per configuration, about "
                      f"{rate * (len(tasks) - n) / 60:.0f} min left", flush=True)
        pool.close()  # workers end on their own (leaving the block would kill them mid-message)
        pool.join()
    rows = [r for r in read_table(partial)[1] if r["id"] < args.configs and r["arch"] in archs]
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M")
    rows.sort(key=lambda r: (r["arch"], r["id"]))
    with gzip.open(out, "wt") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    partial.unlink()
    print(f"table: {len(rows)} configurations in {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return out


def compare(small: str | Path, large: str | Path) -> None:
    """How well a table at a reduced size ranks configurations like one at full size: the Spearman
    correlation of the best validation BLEU-4 of the configurations both hold (the same Sobol
    draw), per architecture."""
    from scipy.stats import spearmanr

    rows = [{(r["arch"], r["id"]): r for r in read_table(t)[1]} for t in (small, large)]
    for arch in sorted({a for a, _ in rows[1]}):
        common = sorted(i for a, i in rows[1] if a == arch and (a, i) in rows[0])
        best = [[max(e["val_bleu4"] for e in t[(arch, i)]["epochs"]) for i in common] for t in rows]
        rho = spearmanr(best[0], best[1]).statistic
        print(f"{arch}: {len(common)} configurations in both; Spearman of their best validation BLEU-4 {rho:.2f}; "
              f"mean {np.mean(best[0]):.4f} against {np.mean(best[1]):.4f}")


def ensure_synth(split: tuple[int, int, int]) -> Path:
    """The built-in dataset with (train, validation, test) images, written once under runs/: the
    scenes of `captune data synth` in the original Flickr8k layout, whose split files fix the split's
    sizes (the Kaggle layout's seeded draw takes 10 % each for validation and test)."""
    import csv
    import random
    import shutil

    from captune.data.layouts import SPLIT_FILES
    from captune.data.synth import write_synthetic

    folder = ROOT / "runs" / f"curves-synth-{'-'.join(map(str, split))}"
    if (folder / "Flickr8k.token.txt").exists():
        return folder
    kaggle = write_synthetic(folder.with_name(folder.name + "-kaggle"), images=sum(split))
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    with open(kaggle / "captions.txt", newline="") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})
    for name in images:
        target = folder / "Images" / name
        if not target.exists():
            os.link(kaggle / "Images" / name, target)
    seen: dict[str, int] = {}
    with open(folder / "Flickr8k.token.txt", "w") as f:
        for r in rows:
            n = seen[r["image"]] = seen.get(r["image"], -1) + 1
            f.write(f"{r['image']}#{n}\t{r['caption']}\n")
    random.Random(0).shuffle(images)
    bounds = {"train": (0, split[0]), "val": (split[0], split[0] + split[1]), "test": (split[0] + split[1], sum(split))}
    for name, (lo, hi) in bounds.items():
        (folder / SPLIT_FILES[name]).write_text("".join(f"{i}\n" for i in sorted(images[lo:hi])))
    shutil.copy(kaggle / "captune.yaml", folder / "captune.yaml")
    return folder


def count_images(data: Path) -> int:
    images = data / "Images"
    return sum(1 for _ in images.iterdir()) if images.is_dir() else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/curves/synth.jsonl.gz", help="the table to write (.jsonl.gz)")
    p.add_argument("--data", help="a dataset folder (default: the built-in dataset at --synth-images images)")
    p.add_argument("--synth-split", type=int, nargs=3, default=[800, 500, 500], metavar=("TRAIN", "VAL", "TEST"),
                   help="images of the built-in dataset per split, when no --data")
    p.add_argument("--space", help="sweep file whose search spaces are drawn from (default search/spaces.yaml)")
    p.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    p.add_argument("--configs", type=int, default=128, help="configurations per architecture")
    p.add_argument("--epochs", type=int, default=6, help="epochs each configuration trains")
    p.add_argument("--seed", type=int, default=0, help="the Sobol draw's scramble")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "curves-cache"))
    p.add_argument("--compare", nargs=2, metavar=("SMALL", "LARGE"),
                   help="instead: how two finished tables of the same draw rank their common configurations")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    build(args)


if __name__ == "__main__":
    main()
