"""Target 1: one training epoch reading cached frozen-encoder features, against the same epoch
recomputing the frozen encoder on every batch (same model, data, image size, batch order).

    python benchmarks/feature_cache.py [--encoder resnet50] [--image-size 224] [--images 320]

Prints the two epoch times, the one-off cost of building the cache, and the ratio last.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from captune.data.batches import CaptionTable, ImageBatches
from captune.data.prepare import prepare_data
from captune.data.synth import write_synthetic
from captune.trainables.config import TrainConfig
from captune.trainables.features import encoder_features, weights_id
from captune.trainables.loop import TeacherForcing, WorkerContext, _train_epoch
from captune.trainables.models import ModelConfig, build_model


def timed_epoch(model, inputs, encode: bool, data, vocab, cfg: TrainConfig) -> float:
    batches = ImageBatches(inputs, data.rows("train"), CaptionTable.build(data.captions("train"), vocab, cfg.max_len),
                           cfg.batch_size, 0, 1, shuffle=True, seed=cfg.seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    t0 = time.perf_counter()
    _train_epoch(TeacherForcing(model, encode=encode), model, batches, optimizer, cfg, WorkerContext(), epoch=0)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet-gru")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=320, help="built-in dataset images (80%% train)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = write_synthetic(Path(tmp) / "data", images=args.images, seed=0), Path(tmp) / "cache"
        cfg = TrainConfig(arch=args.arch, encoder=args.encoder, pretrained=False, fine_tune=False,
                          image_size=args.image_size, embed_size=128, hidden_size=256, batch_size=64, vocab_threshold=2)
        data = prepare_data(root, cfg.image_size, cache, progress=False)
        vocab = data.vocabulary(cfg.vocab_threshold)
        torch.manual_seed(0)
        model = build_model(ModelConfig(cfg.arch, len(vocab), cfg.encoder, False, cfg.embed_size, cfg.hidden_size,
                                        cfg.num_layers, cfg.dropout))
        model.encoder.requires_grad_(False)
        t0 = time.perf_counter()
        features = encoder_features(model.encoder, cfg.encoder, weights_id(cfg.encoder, False, 0), data, cache,
                                    torch.device("cpu"), progress=False)
        build = time.perf_counter() - t0
        state = {k: v.clone() for k, v in model.state_dict().items()}
        cached = timed_epoch(model, features, False, data, vocab, cfg)
        model.load_state_dict(state)
        recomputed = timed_epoch(model, data.pixels, True, data, vocab, cfg)
    n = len(data.rows("train"))
    print(f"machine: {torch.get_num_threads()} torch threads, CPU; {args.arch}, encoder {args.encoder} "
          f"(frozen), {args.image_size}px, {n} training images, {n * 5} captions, batch {cfg.batch_size} images")
    print(f"cache build (once per encoder/weights/size/image list): {build:.2f} s")
    print(f"epoch reading the cache: {cached:.2f} s")
    print(f"epoch recomputing the encoder per batch: {recomputed:.2f} s")
    print(f"feature_cache_speedup: {recomputed / cached:.1f} x")


if __name__ == "__main__":
    main()
