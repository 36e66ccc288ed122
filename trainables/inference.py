"""Captioning with a trained model: validation captions and new images (evaluation on a dataset's
split is in captune.trainables.evaluation)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from captune.data.images import read_image
from captune.data.vocab import Vocabulary
from captune.trainables.catalog import CAPTION_BEAM
from captune.trainables.checkpoint import Loaded
from captune.trainables.decoding import Decoding
from captune.trainables.models import Captioner


@torch.no_grad()
def generate_captions(model: Captioner, inputs: np.ndarray, rows: np.ndarray, vocab: Vocabulary,
                      max_len: int, beam: int, *, encode: bool, device: torch.device, rank: int = 0,
                      world_size: int = 1, batch_size: int = 256, alpha: float = 0.0) -> list[str]:
    """Free-running captions of inputs[rows] (pixels if `encode`, else features); `alpha`: the
    length penalty's (captune.trainables.decoding). With several ranks, each captions an
    interleaved share and all exchange them, so all return the full list."""
    model.eval()
    mine = np.arange(rank, len(rows), world_size)
    hyps = []
    for start in range(0, len(mine), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[rows[mine[start:start + batch_size]]])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = model.encoder(x) if encode else x.float()
            ids = model.caption(feats, vocab.start_id, vocab.end_id, max_len, beam, alpha)
        hyps += [vocab.to_text(seq) for seq in ids.tolist()]
    if world_size == 1:
        return hyps
    shares: list = [None] * world_size
    dist.all_gather_object(shares, hyps)
    out = [""] * len(rows)
    for r, share in enumerate(shares):
        out[r::world_size] = share
    return out


def decoding_of(loaded: Loaded, otherwise: Decoding = Decoding(beam=CAPTION_BEAM)) -> Decoding:
    """How the model captions by default: the decoding chosen for it on the validation split and
    stored with it when it was registered (captune.search.decoding_search), else `otherwise`."""
    stored = loaded.payload.get("decoding")
    return Decoding(**stored) if stored else otherwise


def image_size_of(loaded: Loaded) -> int:
    return int(loaded.payload.get("train_config", {}).get("image_size", 224))


def max_len_of(loaded: Loaded) -> int:
    return int(loaded.payload.get("train_config", {}).get("max_len", 30))


def caption_images(loaded: Loaded, paths: list[str | Path], decoding: int | Decoding = 1,
                   device: torch.device | None = None) -> list[str]:
    """One caption per image file (any size, JPEG or PNG), prepared as in training."""
    size = image_size_of(loaded)
    return caption_pixels(loaded, np.stack([read_image(p, size) for p in paths]), decoding, device)


def caption_pixels(loaded: Loaded, pixels: np.ndarray, decoding: int | Decoding = 1,
                   device: torch.device | None = None) -> list[str]:
    """One caption per image of `pixels` (N, 3, S, S) uint8, S the model's image size, by
    `decoding` (a beam width, or a Decoding; its words at most the training setting unless it
    says)."""
    how, device = Decoding.of(decoding), device or torch.device("cpu")
    model = loaded.model.to(device)
    return generate_captions(model, pixels, np.arange(len(pixels)), loaded.vocab,
                             how.max_len or max_len_of(loaded), how.beam, encode=True, device=device, alpha=how.alpha)
