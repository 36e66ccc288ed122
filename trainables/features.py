"""Frozen-encoder features, computed once per (encoder, weights, image size, image list)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.cache import cached_array
from data.prepare import PreparedData
from trainables.config import TrainConfig
from trainables.encoders import ImageEncoder, build_encoder, weights_enum


def weights_id(encoder: str, pretrained: bool, seed: int) -> str:
    # A random-init encoder's weights follow from the seed (and the torch version's init code).
    return weights_enum(encoder).name if pretrained else f"random-seed{seed}-torch{torch.__version__}"


def encoder_features(encoder: ImageEncoder, name: str, weights: str, data: PreparedData,
                     cache_dir: Path, device: torch.device, batch_size: int = 128,
                     progress: bool = True) -> np.ndarray:
    """(N, F) float32 features of every image in `data`, memory-mapped from the shared cache."""
    key = {"encoder": name, "weights": weights, "pixels": data.pixels_key}
    n = len(data.images)

    @torch.no_grad()
    def build(out: np.ndarray) -> dict:
        encoder.eval()
        # channels_last lets cuDNN use tensor-core convolutions under bf16, and oneDNN's CPU
        # convolutions are faster on it too (measured here at 64 px, 2 threads: vgg-small 1.6x,
        # resnet18 1.2-1.5x; features equal to 1e-5)
        fmt = torch.channels_last
        encoder.to(memory_format=fmt)
        for start in tqdm(range(0, n, batch_size), desc=f"encoding images with {name}", disable=not progress,
                          leave=False):
            # a slice of the read-only memory map: copy it, torch wants writable memory
            pixels = torch.from_numpy(np.array(data.pixels[start:start + batch_size])).to(device, memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out[start:start + batch_size] = encoder(pixels).float().cpu().numpy()
        return {}

    features, _ = cached_array(cache_dir, f"features-{name}", key, (n, encoder.out_features), "float32", build)
    return features


def frozen_features(cfg: TrainConfig, data: PreparedData, cache_dir: Path, device: torch.device,
                    progress: bool = True) -> np.ndarray:
    """The features `train` would compute for cfg's frozen encoder, built ahead of the trials (a
    sweep's driver does this once, with all its cores): the encoder built from cfg's name,
    pretrained flag and seed has the weights `train`'s model gets (ModelConfig.encoder_seed)."""
    encoder = build_encoder(cfg.encoder, cfg.pretrained, cfg.seed).requires_grad_(False).to(device)
    return encoder_features(encoder, cfg.encoder, weights_id(cfg.encoder, cfg.pretrained, cfg.seed), data,
                            cache_dir, device, progress=progress)
