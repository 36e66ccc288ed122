"""Target 5: the training core and the feature extraction on a GPU, without Ray, at Flickr8k
scale, each against a plain-PyTorch loop doing the same work on the same card.

    python benchmarks/gpu_check.py [--flickr ../shared/data/flickr8k] [--json OUT.json]
    python benchmarks/gpu_check.py --limit 40 --device cpu     # smoke-test size, any machine

The real caption and split files, with generated JPEGs at Flickr8k's size (500x375) under the
8,091 real names.
1. Feature extraction, JPEG decoding included: the project's path (`prepare_with_features`: the
   caption files read and checked, nvJPEG decoding into the 224 px pixel cache, each batch encoded
   by ResNet-50 in bf16, channels_last, while still on the GPU) against plain torchvision
   (`decode_jpeg` on the GPU, resize, ResNet-50, features to host).
2. Training: epochs of each architecture at its default size (vgg16 / resnet50 features, embed
   256, hidden 512, the real vocabulary) on the 30,000 training captions, 255 captions a step,
   through `captune.trainables.loop.train`, against a plain loop with the same model and all data already
   on the GPU.
3. Where a training step's time goes: one 255-caption step of each architecture timed alone (the
   packed path `train` takes, and the padded path of the plain loop, each with and without bf16
   autocast), and with --profile DIR the top CUDA kernels of the packed step, written there.
The last line is the worst of the ratios (ours / plain); the goal is 1.5 at most.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from captune.data.batches import CaptionTable, ImageBatches
from captune.data.layouts import SPLIT_FILES, load_corpus
from captune.data.prepare import prepare_data
from captune.data.synth import draw, random_scene
from captune.trainables.config import TrainConfig
from captune.trainables.encoders import IMAGENET_MEAN, IMAGENET_STD
from captune.trainables.features import frozen_features, prepare_with_features
from captune.trainables.reporting import Reporter
from captune.trainables.loop import WorkerContext, train
from captune.trainables.loss import linear_cross_entropy
from captune.trainables.models import ModelConfig, build_model, packed

ROOT = Path(__file__).resolve().parents[1]
TOKENS = "Flickr8k.token.txt"
SIZE = 224
CAPTIONS_PER_STEP = 255  # 51 images with their 5 captions each


def _photo(args: tuple[int, str]) -> None:
    """A 500x375 JPEG with a photo's level of detail: a scene, upscaled, with sensor-like noise."""
    seed, path = args
    rng = random.Random(seed)
    image = draw(random_scene(rng), rng).resize((500, 375), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 6, (375, 500, 3))
    Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def build_dataset(flickr: Path, out: Path, limit: int, distinct: int = 500) -> Path:
    """Flickr8k's original layout with the real text files (the first `limit` images of each
    split when limit > 0) and `distinct` generated photos linked round-robin under the names."""
    text = out / "Flickr8k_text"
    text.mkdir(parents=True)
    keep = set()
    for name in SPLIT_FILES.values():
        keep |= set((flickr / name).read_text().split()[:limit or None])
    for name in (TOKENS, *SPLIT_FILES.values()):
        lines = [ln for ln in (flickr / name).read_text().splitlines()
                 if ln.strip() and (not limit or ln.split("#")[0].split()[0] in keep)]
        (text / name).write_text("\n".join(lines) + "\n")
    names = sorted({ln.split("#")[0] for ln in (text / TOKENS).read_text().splitlines() if ln.strip()})
    scenes = out / "_scenes"
    scenes.mkdir()
    sources = [scenes / f"{i}.jpg" for i in range(min(distinct, len(names)))]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_photo, enumerate(map(str, sources)), chunksize=16))
    images = out / "Flicker8k_Dataset"
    images.mkdir()
    for i, name in enumerate(names):
        (images / name).hardlink_to(sources[i % len(sources)])
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_features(paths: list[Path], device: torch.device, batch: int = 256) -> float:
    """Seconds for plain torchvision: read, decode on the device, resize, ResNet-50 in bf16."""
    model = torchvision.models.resnet50()
    model.fc = nn.Identity()
    model = model.eval().to(device, memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    out = []
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            files = [torchvision.io.read_file(str(p)) for p in paths[start:start + batch]]
            images = torchvision.io.decode_jpeg(files, mode=torchvision.io.ImageReadMode.RGB, device=device)
            x = torch.cat([nn.functional.interpolate(im[None].float(), size=(SIZE, SIZE), mode="bilinear",
                                                     antialias=True) for im in images])  # (B, 3, S, S)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(model(x).float().cpu())
    synchronize(device)
    return time.perf_counter() - t0


def our_features(root: Path, cache: Path, device: torch.device) -> float:
    """Seconds for the project's path: the dataset read and checked, every image decoded into the
    pixel cache and, batch by batch while still on the device, encoded by ResNet-50."""
    cfg = TrainConfig(arch="resnet-gru", encoder="resnet50", pretrained=False, image_size=SIZE, skip_bad=True)
    t0 = time.perf_counter()
    prepare_with_features(root, cfg, cache, device, progress=False)
    synchronize(device)
    return time.perf_counter() - t0


def our_training(cfg: TrainConfig, root: Path, device: torch.device) -> list[dict]:
    """Every epoch's metrics from the training core itself (captune.trainables.loop.train)."""
    history: list[dict] = []
    train(cfg, root, WorkerContext(device=device, reporter=Reporter(sink=lambda metrics, ckpt: history.append(metrics))))
    return history


def decoder_and_features(cfg: TrainConfig, root: Path, device: torch.device):
    """What the plain loops start from: the data, its vocabulary, the frozen encoder's features
    (N, F) and the model on `device` as `train` initialises it, its encoder dropped for them."""
    data = prepare_data(root, SIZE, cfg.cache_path(), skip_bad=True, progress=False)
    vocab = data.vocabulary(cfg.vocab_threshold)
    feats = frozen_features(cfg, data, cfg.cache_path(), device, progress=False)
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(cfg.arch, len(vocab), cfg.encoder, False, cfg.embed_size, cfg.hidden_size,
                                    cfg.num_layers, cfg.dropout))
    model.encoder = nn.Identity()
    return data, vocab, feats, model.to(device)


def plain_training(cfg: TrainConfig, root: Path, device: torch.device, epochs: int) -> tuple[list[float], int]:
    """Epoch seconds of a plain loop: same model and data, everything on the device beforehand,
    a batch padded to its longest caption, full-grid logits with ignore_index, fused Adam."""
    data, vocab, feats_all, model = decoder_and_features(cfg, root, device)
    feats = torch.from_numpy(np.array(feats_all[data.rows("train")])).to(device)  # (I, F)
    table = CaptionTable.build(data.captions("train"), vocab, cfg.max_len)
    captions = table.tokens.to(device)  # (C, T)
    owner = torch.from_numpy(np.repeat(np.arange(len(feats)), np.diff(table.offsets))).to(device)  # (C,)
    lengths = (table.tokens != vocab.pad_id).sum(1).numpy()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    times = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(captions))
        synchronize(device)
        t0 = time.perf_counter()
        for start in range(0, len(order), CAPTIONS_PER_STEP):
            rows = order[start:start + CAPTIONS_PER_STEP]
            width = int(lengths[rows].max())
            idx = torch.from_numpy(rows).to(device, non_blocking=True)
            caps = captions[idx, :width]  # (B, W)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(feats[owner[idx]], caps)  # (B, W-1, V)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), caps[:, 1:].flatten(),
                                               ignore_index=vocab.pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, int((lengths - 1).sum())


def step_times(cfg: TrainConfig, root: Path, device: torch.device, profile: Path | None,
               steps: int = 20) -> dict[str, float]:
    """Milliseconds per training step (forward and backward, no optimizer) of one batch of
    `cfg.batch_size` images, with and without bf16 autocast: the packed path `train` takes; the
    recurrent layer over the padded batch with the same loss on real words only; and the plain
    loop's padded path (full-grid logits). With `profile`, the packed step's top CUDA kernels go
    there."""
    data, vocab, feats, model = decoder_and_features(cfg, root, device)
    model.train()
    table = CaptionTable.build(data.captions("train"), vocab, cfg.max_len)
    batch = next(iter(ImageBatches(feats, data.rows("train"), table, cfg.batch_size, shuffle=True, seed=0)))
    image = batch.inputs.to(device).float()[batch.image_of_caption.to(device)]  # (C, F)
    caps = batch.captions.to(device)  # (C, T)
    targets = packed(batch.captions[:, 1:], batch.lengths, 1).data.to(device)  # (N,)

    def packed_step() -> torch.Tensor:
        hidden = model.outputs(image, caps, batch.lengths)  # (N, H)
        return linear_cross_entropy(hidden, model.head.weight, model.head.bias, targets)

    width = caps.shape[1] - 1
    # where each word to predict sits in a padded (C, T-1) grid, in packed order (host-side, as `targets`)
    real = packed(torch.arange(len(caps) * width).view(len(caps), width), batch.lengths, 1).data.to(device)

    def padded_rnn_step() -> torch.Tensor:  # the recurrent layer over padding too, the head on real words only
        hidden = model.drop(model.teacher_forced(image, caps)).flatten(0, 1)[real]  # (N, H)
        return linear_cross_entropy(hidden, model.head.weight, model.head.bias, targets)

    def padded_step() -> torch.Tensor:
        logits = model(image, caps)  # (C, T-1, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), caps[:, 1:].flatten(),
                                           ignore_index=vocab.pad_id)

    def timed(step, autocast: bool) -> float:
        def once():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = step()
            loss.backward()
        for _ in range(3):
            once()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            once()
        synchronize(device)
        return (time.perf_counter() - t0) / steps * 1000

    paths = {"packed": packed_step, "padded_rnn": padded_rnn_step, "padded": padded_step}
    model.eval()  # without dropout the three paths must give one loss, or they do not do the same work
    with torch.no_grad():
        losses = {name: float(step()) for name, step in paths.items()}
    if max(losses.values()) - min(losses.values()) > 1e-4 * abs(losses["packed"]):
        raise RuntimeError(f"the step paths disagree on the loss: {losses}")
    model.train()
    amp = device.type == "cuda"
    out = {f"{name}{'_bf16' if autocast else '_fp32'}_ms": timed(step, autocast)
           for name, step in paths.items() for autocast in dict.fromkeys((amp, False))}
    if profile is not None:
        from torch.profiler import ProfilerActivity
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            timed(packed_step, amp)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / f"{cfg.arch}-packed-step.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--limit", type=int, default=0, help="first N images of each split (0: all)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is a warm-up; the best of the rest counts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--profile", help="write each architecture's profiled training step to this folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; pass --device cpu for the smoke-test size")
    flickr = Path(args.flickr)
    if not (flickr / TOKENS).is_file():
        raise SystemExit(f"{flickr}: no {TOKENS} there; pass --flickr DIR (the real caption files)")
    work = Path(tempfile.mkdtemp(prefix="captune-gpu-"))
    os.environ["CAPTUNE_CACHE_DIR"] = str(work / "cache")
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"machine: {card}, {os.cpu_count()} CPU cores; torch {torch.__version__}, torchvision {torchvision.__version__}")
    t0 = time.perf_counter()
    root = build_dataset(flickr, work / "flickr8k", args.limit)
    paths = sorted((root / "Flicker8k_Dataset").iterdir())
    print(f"data: {len(paths)} JPEGs at 500x375 generated in {time.perf_counter() - t0:.0f} s")
    fig: dict = {"card": card, "images": len(paths), "torch": torch.__version__}

    plain_features(paths[:256], device)  # warm-up: CUDA context, nvJPEG, cuDNN
    t0 = time.perf_counter()
    load_corpus(root)
    fig["corpus_s"] = time.perf_counter() - t0  # also inside ours: reading and checking the caption files
    fig["ours_features_s"] = our_features(root, work / "cache", device)
    fig["plain_features_s"] = plain_features(paths, device)
    ours = fig["ours_features_s"]
    fig["features_ratio"] = ours / fig["plain_features_s"]
    print(f"features (decode + ResNet-50 bf16, {SIZE}px, {len(paths)} images): ours {ours:.2f} s "
          f"= {len(paths) / ours:.0f} img/s, of which reading the caption files {fig['corpus_s']:.2f} s; "
          f"plain {fig['plain_features_s']:.2f} s: ratio {fig['features_ratio']:.2f}")

    for arch, encoder in (("cnn-lstm", "vgg16"), ("resnet-gru", "resnet50")):
        cfg = TrainConfig(arch=arch, encoder=encoder, pretrained=False, image_size=SIZE, epochs=args.epochs,
                          batch_size=CAPTIONS_PER_STEP // 5, skip_bad=True, val_images=1000)
        history = our_training(cfg, root, device)
        plain, tokens = plain_training(cfg, root, device, args.epochs)
        best = min(h["epoch_seconds"] for h in history[1:] or history)
        base = min(plain[1:] or plain)
        steps = step_times(cfg, root, device, Path(args.profile) if args.profile else None)
        print(f"{arch:10s} one step of {CAPTIONS_PER_STEP} captions, forward + backward: " +
              ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in steps.items()))
        fig[arch] = {"epoch_s": [h["epoch_seconds"] for h in history], "plain_epoch_s": plain, "tokens": tokens,
                     "step_ms": steps,
                     "setup_s": history[0]["setup_seconds"], "val_greedy_s": history[-1]["val_seconds"],
                     "vocab": history[0]["vocab_size"], "bleu4": history[-1]["bleu4"], "ratio": best / base}
        print(f"{arch:10s} ({encoder} features, vocab {history[0]['vocab_size']}): epoch ours {best:.3f} s "
              f"({tokens / best / 1e6:.2f} M tokens/s), plain {base:.3f} s ({tokens / base / 1e6:.2f} M tokens/s): "
              f"ratio {best / base:.2f}; set-up {history[0]['setup_seconds']:.1f} s (features built), "
              f"greedy validation of the val split {history[-1]['val_seconds']:.2f} s")
    worst = max(fig["features_ratio"], fig["cnn-lstm"]["ratio"], fig["resnet-gru"]["ratio"])
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    print(f"gpu_check_worst_ratio: {worst:.2f} x")


if __name__ == "__main__":
    main()
