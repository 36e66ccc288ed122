"""Target 3: Flickr8k at real scale: the real caption files and splits (40,455 captions, the real
vocabulary) with generated stand-in images under the real names.

    python benchmarks/flickr8k_scale.py [--flickr ../shared/data/flickr8k] [--only trial|sweep]

Per architecture (the built-in preset's frozen encoders at 64 px, one thread as a trial has here):
seconds per training epoch, evaluation time on the 1,000 validation images (greedy and beam 3) and
the trial's peak memory; then what the per-epoch validation pass costs with BLEU only and with
every score (BLEU-1..4, CIDEr-D, ROUGE-L, references prepared once per run, as the training loop
scores them), and the share the two new metrics add to the pass. Then the whole sweep's memory
(proportional set size of every process of the driver and its local Ray cluster, sampled) with 2
and then 4 concurrent trials, the caches already built, each run --repeats times; the last line is
what each extra trial adds to the mean peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")
PRESET = {"pretrained": False, "fine_tune": False, "image_size": 64, "embed_size": 128, "hidden_size": 256,
          "vocab_threshold": 5, "lr": 0.002, "batch_size": 64, "skip_bad": True}
ENCODER = {"cnn-lstm": "vgg-small", "resnet-gru": "resnet18"}


def build_dataset(flickr: Path, out: Path) -> Path:
    """The original layout: real text files, 300 distinct generated scenes linked round-robin
    under the 8,091 real image names."""
    from captune.data.synth import write_synthetic

    (out / "Flickr8k_text").mkdir(parents=True)
    for name in TEXT_FILES:
        shutil.copy(flickr / name, out / "Flickr8k_text" / name)
    scenes = sorted((write_synthetic(out / "_scenes", images=300) / "Images").iterdir())
    images = out / "Flicker8k_Dataset"
    images.mkdir()
    names = sorted({ln.split("#")[0] for ln in (flickr / "Flickr8k.token.txt").read_text().splitlines() if ln})
    for i, name in enumerate(n for n in names if n.endswith(".jpg")):
        (images / name).hardlink_to(scenes[i % len(scenes)])
    return out


def one_trial(arch: str, root: str) -> None:
    """Child process: one epoch as a sweep trial runs it, then validation-split evaluation."""
    import torch

    torch.set_num_threads(1)
    from captune.trainables.checkpoint import load_checkpoint
    from captune.trainables.config import TrainConfig
    from captune.trainables.evaluation import evaluate_split
    from captune.trainables.reporting import Reporter
    from captune.trainables.loop import WorkerContext, train

    cfg = TrainConfig(arch=arch, encoder=ENCODER[arch], epochs=1, **PRESET)
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "model.pt"

        def keep(metrics, checkpoint_dir):
            if checkpoint_dir is not None:
                shutil.copy(Path(checkpoint_dir) / "model.pt", saved)

        metrics = train(cfg, root, WorkerContext(reporter=Reporter(sink=keep)))
        loaded = load_checkpoint(saved)
    timings = {}
    for beam in (1, 3):
        t0 = time.perf_counter()
        evaluate_split(loaded, root, "val", beam=beam, skip_bad=True)
        timings[f"eval_beam{beam}"] = time.perf_counter() - t0
    print(json.dumps({"epoch_seconds": metrics["epoch_seconds"], "vocab_size": metrics["vocab_size"],
                      "val_seconds": metrics["val_seconds"], **validation_pass(loaded, root),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **timings}))


def validation_pass(loaded, root: str, repeats: int = 5) -> dict:
    """The training loop's validation pass, timed in its parts (the fastest of `repeats` each):
    greedy captions of the validation images from cached features, then BLEU alone (`bleu`, as
    the loop scored before CIDEr-D) or every score (`CaptionScorer.scores`, its references
    prepared once per run, which is timed apart)."""
    import numpy as np
    import torch

    from captune.data.cache import default_cache_dir
    from captune.data.prepare import prepare_data
    from captune.trainables.evaluation import caption_split
    from captune.trainables.features import encoder_features, weights_id
    from captune.trainables.inference import generate_captions, max_len_of
    from captune.data.text import tokenize
    from captune.trainables.coco_scores import CiderD, RougeL
    from captune.trainables.metrics import CaptionScorer, bleu

    captions, refs = caption_split(loaded, root, "val", (1,), skip_bad=True)  # (and the cached features, warm)
    cfg, cache = loaded.payload["train_config"], default_cache_dir()
    data = prepare_data(root, cfg["image_size"], cache, skip_bad=True, progress=False)
    model = loaded.model.eval()
    cpu = torch.device("cpu")
    feats = np.asarray(encoder_features(model.encoder, cfg["encoder"], weights_id(cfg["encoder"], cfg["pretrained"],
                                                                                    cfg["seed"]), data, cache, cpu)
                       [data.rows("val")])

    def fastest(step) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return min(times)

    hyps = generate_captions(model, feats, np.arange(len(refs)), loaded.vocab, max_len_of(loaded), 1, encode=False,
                             device=cpu)
    assert hyps == captions[1]
    t0 = time.perf_counter()
    scorer = CaptionScorer(refs)
    setup = time.perf_counter() - t0
    joined = [[" ".join(tokenize(r)) for r in rs] for rs in refs]
    cider, rouge, tokens = CiderD(joined), RougeL(joined), [" ".join(tokenize(h)) for h in hyps]
    return {"val_images": len(refs), "setup_s": setup,
            "new_s": fastest(lambda: (cider.scores(tokens), rouge.scores(tokens))),
            "captions_s": fastest(lambda: generate_captions(model, feats, np.arange(len(refs)), loaded.vocab,
                                                            max_len_of(loaded), 1, encode=False, device=cpu)),
            "bleu_s": fastest(lambda: bleu(hyps, refs)), "all_s": fastest(lambda: scorer.scores(hyps))}


def warm_caches(root: Path) -> None:
    """Decode the images and encode them with the sweep's frozen resnet18 now, as the per-arch runs
    do in a full run: the sweeps' peaks are then their trials', not the driver's one-off cache build."""
    import torch

    from captune.trainables.config import TrainConfig
    from captune.trainables.features import prepare_with_features

    cfg = TrainConfig(arch="resnet-gru", encoder="resnet18", **PRESET)
    prepare_with_features(root, cfg, cfg.cache_path(), torch.device("cpu"), progress=False)


def sweep_memory(root: Path, work: Path, concurrent: int, run: int) -> float:
    """Peak summed PSS (MB) of `captune sweep` and its local Ray cluster, `concurrent` trials."""
    config = work / f"sweep{concurrent}.yaml"
    space = {**PRESET, "encoder": "resnet18", "val_images": 100, "lr": {"loguniform": [1e-4, 3e-3]}}
    config.write_text(yaml.safe_dump({"sweep": {"trials": concurrent, "max_epochs": 1, "grace_period": 1,
                                                "max_concurrent": concurrent}, "resnet-gru": space}))
    command = [sys.executable, "-m", "captune.cli", "sweep", "--data", str(root), "--name", f"mem{concurrent}-{run}",
               "--arch", "resnet-gru", "--config", str(config), "--storage", str(work / "sweeps"),
               "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    log = work / f"sweep{concurrent}-{run}.log"
    started = time.time()
    driver = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    peak = 0.0
    while driver.poll() is None:
        total = 0
        for p in _sweep_processes(driver.pid, started):
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total / 2**20)
        time.sleep(0.5)
    if driver.returncode != 0:
        raise SystemExit(f"sweep with {concurrent} concurrent trials failed: {' '.join(command)}\n"
                         f"{log.read_text()[-3000:]}\n(whole log: {log})")
    return peak


def _sweep_processes(driver: int, started: float) -> set[psutil.Process]:
    """The driver and all its descendants, plus the fork server the sweep's first worker started
    (it leaves the driver's process tree when that worker ends) and the workers forked from it."""
    roots = [psutil.Process(driver)]
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if "captune.infra.forkserver" in (p.info["cmdline"] or []) and (p.info["create_time"] or 0) >= started - 1:
            roots.append(p)
    found = set()
    for root in roots:
        try:
            found.update([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--only", choices=("trial", "sweep"),
                        help="only the per-architecture trial figures, or only the sweep memory")
    parser.add_argument("--repeats", type=int, default=2,
                        help="sweeps per concurrency; their peaks are averaged (one run's peak varies by ±100 MB)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (data, caches, sweep logs: about 340 MB); a failure keeps it anyway")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_trial(args.one, args.root)
    flickr = Path(args.flickr)
    if not (flickr / "Flickr8k.token.txt").is_file():
        raise SystemExit(f"{flickr}: no Flickr8k.token.txt there; pass --flickr DIR (the real caption files)")
    work = Path(tempfile.mkdtemp(prefix="captune-f8k-"))
    os.environ["CAPTUNE_CACHE_DIR"] = str(work / "cache")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = build_dataset(flickr, work / "flickr8k")
    print(f"machine: {os.cpu_count()} cores, CPU only; data {root} (original layout, real captions)")
    measure(args, root, work)
    if not args.keep:
        shutil.rmtree(work)


def measure(args, root: Path, work: Path) -> None:
    for arch in ENCODER if args.only != "sweep" else ():
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--one", arch, "--root", str(root)], capture_output=True,
                             text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{arch:10s} ({ENCODER[arch]}, vocab {r['vocab_size']}): epoch {r['epoch_seconds']:.1f} s, "
              f"val scores greedy {r['eval_beam1']:.1f} s, beam 3 {r['eval_beam3']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB  (process total {time.perf_counter() - t0:.0f} s, caches included)")
        before, after = r["captions_s"] + r["bleu_s"], r["captions_s"] + r["all_s"]
        print(f"{'':10s} validation pass, {r['val_images']:,} images greedy (fastest of 5): captions "
              f"{r['captions_s']:.2f} s + BLEU alone, as scored before {r['bleu_s']:.2f} s = {before:.2f} s; "
              f"captions + every score {r['all_s']:.2f} s = {after:.2f} s, {100 * (after - before) / before:+.1f} % "
              f"(the loop's own, epoch 1: {r['val_seconds']:.2f} s); references prepared once per run "
              f"{r['setup_s']:.2f} s")
        print(f"{'':10s} of which CIDEr-D and ROUGE-L themselves {r['new_s']:.3f} s: the pass without them "
              f"{after - r['new_s']:.2f} s")
        print(f"metrics_added_to_validation_{arch}: {100 * r['new_s'] / (after - r['new_s']):.1f} %")
    if args.only == "trial":
        return
    warm_caches(root)
    peaks = {n: [sweep_memory(root, work, n, run) for run in range(args.repeats)] for n in (2, 4)}
    mem = {n: sum(p) / len(p) for n, p in peaks.items()}
    print("sweep memory (peak PSS, driver + local Ray): " + ", ".join(
        f"{n} trials {mem[n]:.0f} MB (runs: {', '.join(f'{p:.0f}' for p in peaks[n])})" for n in (2, 4)))
    print(f"memory_per_extra_trial: {(mem[4] - mem[2]) / 2:.0f} MB")


if __name__ == "__main__":
    main()
