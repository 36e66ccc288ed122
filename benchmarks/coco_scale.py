"""COCO at scale on this machine, against Flickr8k at the same code.

    python benchmarks/coco_scale.py [--flickr ../shared/data/flickr8k] [--work DIR] [--keep]

The stand-in: Karpathy's `dataset_coco.json` shape (123,287 entries with `filepath` train2014 /
val2014, Karpathy's split: 82,783 train + 30,504 restval / 5,000 val / 5,000 test, 616,767
captions, 5 per image and 6 for the first 332), its captions the real Flickr8k captions taken in
turn under new ids, its images 300 generated scenes hard-linked round-robin under the 123,287
names. Flickr8k is the real caption and split files in the original layout (as
`flickr8k_scale.py` builds it). A third dataset, "coco-100k", is the stand-in's first 20,000 train
images (100,000 captions) with 1,000 val and 1,000 test images: the epoch and the driver's
preparation are timed on it, as on all of COCO they would take an hour here.

Each figure comes from a process of its own (peak memory = that process's maximum RSS):
`captune data check`; reading the corpus and building the vocabulary at threshold 5; the sweep
driver's preparation at the built-in preset (pixels at 64 px, resnet18 features in the same pass,
then vgg-small features from the pixel cache), per 10,000 images, and the caches' size on disk;
one resnet-gru training epoch at the preset, per 100,000 captions. The last line is the ratio of
COCO's `data check` time to Flickr8k's over the ratio of their captions (1.0 = linear growth).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flickr8k_scale import PRESET, build_dataset

ROOT = Path(__file__).resolve().parents[1]
COCO_SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}  # Karpathy's split of COCO 2014
COCO_CAPTIONS = 616_767
SMALL_SPLITS = {"train": 20_000, "val": 1_000, "test": 1_000}


def build_coco(flickr: Path, out: Path, scenes: list[Path], splits: dict[str, int], total: int) -> Path:
    from captune.data.text import tokenize

    lines = (flickr / "Flickr8k.token.txt").read_text().splitlines()
    captions = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    images = sum(splits.values())
    extra = total - 5 * images  # images that get a sixth caption, as some of COCO's have
    entries, n = [], 0
    for split, count in splits.items():
        for _ in range(count):
            i = len(entries)
            folder = "train2014" if split == "train" else "val2014"
            raws = [captions[(n + j) % len(captions)] for j in range(6 if i < extra else 5)]
            n += len(raws)
            entries.append({"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "imgid": i,
                            "cocoid": i, "split": split,
                            "sentences": [{"raw": r, "tokens": tokenize(r), "imgid": i} for r in raws]})
    for folder in ("train2014", "val2014"):
        (out / folder).mkdir(parents=True)
    for i, entry in enumerate(entries):
        (out / entry["filepath"] / entry["filename"]).hardlink_to(scenes[i % len(scenes)])
    (out / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    return out


# --- one measurement per process ------------------------------------------------------------------

def load_and_vocabulary(root: str) -> dict:
    from captune.data.layouts import load_corpus
    from captune.data.text import word_counts
    from captune.data.vocab import Vocabulary

    base = _rss_mb()
    t0 = time.perf_counter()
    corpus = load_corpus(root)
    t1 = time.perf_counter()
    vocab = Vocabulary.from_counts(word_counts(c for im in corpus.splits["train"] for c in corpus.captions[im]), 5)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "vocab_s": t2 - t1, "vocab": len(vocab), "captions": corpus.num_captions(),
            "images": len(corpus.captions), "errors": len(corpus.errors),
            "memory_mb": _peak_mb() - base, "json_mb": corpus.caption_file.stat().st_size / 2**20}


def preparation(root: str, cache: str) -> dict:
    import torch

    from captune.trainables.config import TrainConfig
    from captune.trainables.features import prepare_with_features

    torch.set_num_threads(os.cpu_count())
    out = {}
    for arch, encoder in (("resnet-gru", "resnet18"), ("cnn-lstm", "vgg-small")):  # as a sweep's driver does
        cfg = TrainConfig(arch=arch, encoder=encoder, **PRESET)
        t0 = time.perf_counter()
        data, _ = prepare_with_features(root, cfg, Path(cache), torch.device("cpu"), progress=False)
        out[f"{encoder}_s"] = time.perf_counter() - t0
    out["images"] = len(data.images)
    out["cache_mb"] = {p.name: p.stat().st_size / 2**20 for p in Path(cache).rglob("*.npy")}
    return out


def epoch(root: str, cache: str) -> dict:
    import torch

    torch.set_num_threads(1)  # as a sweep trial has here
    from captune.trainables.config import TrainConfig
    from captune.trainables.loop import WorkerContext, train

    cfg = TrainConfig(arch="resnet-gru", encoder="resnet18", epochs=1, cache_dir=cache, **PRESET)
    metrics = train(cfg, root, WorkerContext())
    return {"epoch_s": metrics["epoch_seconds"], "val_s": metrics["val_seconds"],
            "setup_s": metrics["setup_seconds"], "memory_mb": _peak_mb()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(pid: int | str = "self") -> float:
    """The process's peak RSS: VmHWM, which starts afresh at exec (getrusage's ru_maxrss would
    carry the forking parent's peak into a child)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


MEASURES = {"load": load_and_vocabulary, "prep": preparation, "epoch": epoch}


def run(measure: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", measure, *args], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{measure} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_check(root: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `captune data check ROOT --json`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "captune.cli", "data", "check", str(root), "--json"],
                                 stdout=stdout, stderr=subprocess.DEVNULL, cwd=ROOT)
        peak = 0.0
        while child.poll() is None:
            try:
                peak = _peak_mb(child.pid)  # a high-water mark: the last reading before the end holds it
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        stdout.seek(0)
        report = json.loads(stdout.read())
    errors = [p for p in report["problems"] if p["severity"] == "error"]
    if errors and root.name != "flickr8k":  # Flickr8k's token file names one image it lacks
        raise SystemExit(f"{root}: {errors[:3]}")
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--work", help="where the datasets and caches go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (about 2.5 GB)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(MEASURES[args.one[0]](*args.one[1:])))
        return
    flickr = Path(args.flickr)
    if not (flickr / "Flickr8k.token.txt").is_file():
        raise SystemExit(f"{flickr}: no Flickr8k.token.txt there; pass --flickr DIR (the real caption files)")
    work = Path(args.work or tempfile.mkdtemp(prefix="captune-coco-"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    t0 = time.perf_counter()
    f8k = build_dataset(flickr, work / "flickr8k")
    scenes = sorted((work / "flickr8k" / "_scenes" / "Images").iterdir())
    coco = build_coco(flickr, work / "coco", scenes, COCO_SPLITS, COCO_CAPTIONS)
    small = build_coco(flickr, work / "coco-100k", scenes, SMALL_SPLITS, 5 * sum(SMALL_SPLITS.values()))
    print(f"machine: {os.cpu_count()} cores, CPU only; datasets built in {time.perf_counter() - t0:.0f} s under {work}")
    figures = {}
    for name, root in (("flickr8k", f8k), ("coco", coco)):
        check_s, check_mb = data_check(root)
        loaded = run("load", str(root))
        figures[name] = {"check_s": check_s, "check_mb": check_mb, **loaded}
        print(f"{name:9s} {loaded['images']:,} images, {loaded['captions']:,} captions "
              f"(caption file {loaded['json_mb']:.0f} MB): data check {check_s:.1f} s, peak {check_mb:.0f} MB; "
              f"corpus read {loaded['load_s']:.2f} s, vocabulary (threshold 5, {loaded['vocab']:,} words) "
              f"{loaded['vocab_s']:.2f} s, both holding {loaded['memory_mb']:.0f} MB")
    for name, root in (("flickr8k", f8k), ("coco-100k", small)):
        cache = work / f"cache-{name}"
        prep = run("prep", str(root), str(cache))
        per10k = 10_000 / prep["images"]
        sizes = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(prep["cache_mb"].items()))
        trained = run("epoch", str(root), str(cache))
        captions = 5 * SMALL_SPLITS["train"] if name != "flickr8k" else 30_000
        figures.setdefault(name, {}).update(prep_per_10k_s=(prep["resnet18_s"] + prep["vgg-small_s"]) * per10k,
                             epoch_per_100k_s=trained["epoch_s"] * 100_000 / captions)
        print(f"{name:9s} preparation per 10,000 images: {prep['resnet18_s'] * per10k:.1f} s (pixels + resnet18) "
              f"+ {prep['vgg-small_s'] * per10k:.1f} s (vgg-small); caches for {prep['images']:,} images: {sizes}; "
              f"resnet-gru epoch {trained['epoch_s']:.1f} s = {figures[name]['epoch_per_100k_s']:.1f} s per "
              f"100,000 captions (validation {trained['val_s']:.1f} s, peak {trained['memory_mb']:.0f} MB)")
    f, c = figures["flickr8k"], figures["coco"]
    grow = c["captions"] / f["captions"]
    print(f"COCO / Flickr8k: captions x{grow:.1f}; data check time x{c['check_s'] / f['check_s']:.1f}, "
          f"its memory x{c['check_mb'] / f['check_mb']:.1f}; corpus read x{c['load_s'] / f['load_s']:.1f}, "
          f"vocabulary x{c['vocab_s'] / f['vocab_s']:.1f}, their memory x{c['memory_mb'] / f['memory_mb']:.1f}; "
          f"preparation per 10k images x{figures['coco-100k']['prep_per_10k_s'] / f['prep_per_10k_s']:.2f}, "
          f"epoch per 100k captions x{figures['coco-100k']['epoch_per_100k_s'] / f['epoch_per_100k_s']:.2f}")
    print(f"data_check_growth_per_caption: {c['check_s'] / f['check_s'] / grow:.2f} x")
    if not args.keep and not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
