"""Frozen-encoder features, computed once per (encoder, weights, image size, image list)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captune.data.cache import EntryNotThere, cached_array, nonfinite_rows
from captune.data.prepare import PreparedData, prepare_data
from captune.infra.errors import UserError
from captune.trainables.config import TrainConfig
from captune.trainables.encoders import ImageEncoder, build_encoder, weights_enum

ENCODE_BATCH = 128  # images per encoder call


def weights_id(encoder: str, pretrained: bool, seed: int) -> str:
    # A random-init encoder's weights follow from the seed (and the torch version's init code).
    return weights_enum(encoder).name if pretrained else f"random-seed{seed}-torch{torch.__version__}"


class EarlyFeatures:
    """Features of images as they are decoded (an `on_batch` hook of `prepare_data`), computed on
    the device the pixels were decoded on, before the pixel cache is even complete: a first build
    then decodes and encodes in one pass, as a plain torchvision loop would, instead of reading
    1.2 GB of 224 px Flickr8k pixels back to encode them."""

    def __init__(self, encoder: ImageEncoder, device: torch.device):
        self.encoder, self.device = for_inference(encoder, device), device
        self.rows: list[np.ndarray] = []
        self.parts: list[torch.Tensor] = []  # kept where they were computed: one copy to the host at the end
        self.failed: Exception | None = None

    def __call__(self, rows: np.ndarray, pixels: torch.Tensor) -> None:
        if self.failed is not None:
            return
        try:
            self.parts.append(encode_pixels(self.encoder, pixels, self.device))
        except Exception as e:  # e.g. out of GPU memory beside the decoder's buffers
            # Raising here would throw away the pixel cache being built. The images not encoded
            # yet are encoded from it afterwards, where a lasting fault shows again.
            self.failed = e
            warnings.warn(f"encoding images as they are decoded failed ({type(e).__name__}: {e}); "
                          f"the rest are encoded from the pixel cache once it is complete", stacklevel=2)
            return
        self.rows.append(rows)

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, their features) of every image seen; None if none was."""
        if not self.rows:
            return None
        return np.concatenate(self.rows), torch.cat(self.parts).cpu().numpy()


def features_key(encoder: str, weights: str, pixels_key: dict) -> dict:
    """What a frozen encoder's features depend on: the cache key of this path and of the Ray Data
    job's shared features alike (captune.trainables.feature_job), so that a trial finds either."""
    return {"encoder": encoder, "weights": weights, "pixels": pixels_key}


class FeatureError(UserError, ValueError):
    """A frozen encoder gave features that are not finite numbers, or a dataset read from a feature
    set's manifest has no valid features to read."""


def require_finite(features: np.ndarray, images: list[str], encoder: str, weights: str) -> None:
    """Refuse features holding NaN or infinite values, naming the encoder and the images: written
    to the cache, they would make every trial that reads them diverge, whatever its settings."""
    bad = nonfinite_rows(features)
    if len(bad):
        names = ", ".join(images[i] for i in bad[:5]) + (f" and {len(bad) - 5:,} more" if len(bad) > 5 else "")
        raise FeatureError(f"the {encoder} encoder ({weights} weights) gave NaN or infinite features for "
                           f"{len(bad):,} of {len(images):,} images ({names}); nothing was written. Its weights "
                           f"are damaged (a pretrained file in torch's cache, ~/.cache/torch), or it cannot take "
                           f"these images")


def encoder_features(encoder: ImageEncoder, name: str, weights: str, data: PreparedData,
                     cache_dir: Path, device: torch.device, progress: bool = True,
                     early: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N, F) float32 features of every image in `data`, memory-mapped from the shared cache.
    When the cache is built here, rows in `early` (EarlyFeatures.result) are taken from it and
    only the others are encoded from the pixel cache."""
    key = features_key(name, weights, data.pixels_key)
    n = len(data.images)

    def build(out: np.ndarray) -> dict:
        todo = np.ones(n, dtype=bool)
        if early is not None:
            rows, feats = early
            out[rows] = feats
            todo[rows] = False
        todo = np.flatnonzero(todo)  # images not seen early: all of them on a pixel-cache hit
        batches = encoded_rows(for_inference(encoder, device), data.pixels, todo, device)
        for rows, feats in tqdm(batches, total=-(-len(todo) // ENCODE_BATCH), desc=f"encoding images with {name}",
                                disable=None if progress and len(todo) else True, leave=False):
            out[rows] = feats
        require_finite(out, data.images, name, weights)
        return {}

    try:
        # a dataset read from a feature set's manifest holds no pixels: its features must be there
        features, _ = cached_array(cache_dir, f"features-{name}", key, (n, encoder.out_features), "float32",
                                   build if data.pixels is not None else None)
    except EntryNotThere as e:
        raise FeatureError(f"no valid {name} features for the images this dataset was prepared with ({e}); "
                           f"build them again with `captune features`") from None
    return features


def frozen_features(cfg: TrainConfig, data: PreparedData, cache_dir: Path, device: torch.device,
                    progress: bool = True) -> np.ndarray:
    """The features `train` would compute for cfg's frozen encoder, built ahead of the trials (a
    sweep's driver does this once, with all its cores)."""
    return encoder_features(frozen_encoder(cfg, device), cfg.encoder,
                            weights_id(cfg.encoder, cfg.pretrained, cfg.seed), data, cache_dir, device,
                            progress=progress)


def prepare_with_features(data_root: str | Path, cfg: TrainConfig, cache_dir: Path, device: torch.device,
                          progress: bool = True) -> tuple[PreparedData, np.ndarray]:
    """`prepare_data` then `frozen_features`, in one pass over the images when the pixel cache is
    built here: each decoded batch is encoded while it is still on the device (EarlyFeatures)."""
    encoder = frozen_encoder(cfg, device)
    early = EarlyFeatures(encoder, device)
    data = prepare_data(data_root, cfg.image_size, cache_dir, skip_bad=cfg.skip_bad, seed=cfg.split_seed,
                        progress=progress, on_batch=early)
    features = encoder_features(encoder, cfg.encoder, weights_id(cfg.encoder, cfg.pretrained, cfg.seed), data,
                                cache_dir, device, progress=progress, early=early.result())
    return data, features


def frozen_encoder(cfg: TrainConfig, device: torch.device) -> ImageEncoder:
    """cfg's frozen encoder: built from its name, pretrained flag and seed, it has the weights
    `train`'s model gets (ModelConfig.encoder_seed)."""
    return build_encoder(cfg.encoder, cfg.pretrained, cfg.seed).requires_grad_(False).to(device)


def for_inference(encoder: ImageEncoder, device: torch.device) -> ImageEncoder:
    # channels_last lets cuDNN use tensor-core convolutions under bf16, and oneDNN's CPU
    # convolutions are faster on it too (benchmarks/RESULTS.md, section 1)
    return encoder.eval().to(device, memory_format=torch.channels_last)


def encoded_rows(encoder: ImageEncoder, pixels: np.ndarray, rows: np.ndarray,
                 device: torch.device) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, their features (B, F) float32 on the host) of pixels[rows], a batch at a time, so a
    memory-mapped pixel cache is never read whole; the encoder as for `encode_pixels`."""
    for start in range(0, len(rows), ENCODE_BATCH):
        batch = rows[start:start + ENCODE_BATCH]
        # a fancy index of the read-only memory map is a writable copy, which torch wants
        yield batch, encode_pixels(encoder, torch.from_numpy(pixels[batch]), device).cpu().numpy()


@torch.no_grad()
def encode_pixels(encoder: ImageEncoder, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Features (B, F) float32, on `device`, of uint8 pixels (B, 3, S, S) from anywhere, by an
    encoder in eval mode on `device`."""
    parts = []
    for start in range(0, len(pixels), ENCODE_BATCH):
        x = pixels[start:start + ENCODE_BATCH].to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            parts.append(encoder(x).float())
    return torch.cat(parts)
