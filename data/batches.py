"""Training batches: images (or their cached features) with all of their captions.

A batch holds B images and every caption of each, so an encoder that is being trained runs once
per image however many captions it has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from captune.data.text import tokenize
from captune.data.vocab import Vocabulary


@dataclass
class CaptionTable:
    """Encoded captions of a list of images, stored flat: image i owns rows offsets[i]:offsets[i+1]."""
    tokens: torch.Tensor  # (num_captions, max_len + 2) long, padded with <pad>
    offsets: np.ndarray  # (num_images + 1,) int64

    @classmethod
    def build(cls, captions: list[list[str]], vocab: Vocabulary, max_len: int) -> "CaptionTable":
        encoded = [vocab.to_ids(tokenize(c), max_len) for caps in captions for c in caps]
        tokens = torch.full((len(encoded), max(map(len, encoded), default=2)), vocab.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            tokens[row, :len(ids)] = torch.tensor(ids)
        offsets = np.zeros(len(captions) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in captions], out=offsets[1:])
        return cls(tokens, offsets)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, 3, S, S) uint8 pixels, or (B, F) cached features
    captions: torch.Tensor  # (C, T) long, <start> ... <end> <pad>..., longest first
    image_of_caption: torch.Tensor  # (C,) long: which of the B inputs each caption describes
    lengths: list[int]  # (C,) tokens of each caption, <start> and <end> included, non-increasing


class ImageBatches:
    """One pass over a split, shared across distributed ranks by a DistributedSampler."""

    def __init__(self, inputs: np.ndarray, rows: np.ndarray, table: CaptionTable, batch_size: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.inputs, self.rows, self.table, self.batch_size = inputs, rows, table, batch_size
        self.sampler = DistributedSampler(range(len(rows)), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, images: np.ndarray) -> Batch:
        rows = self.rows[images]
        inputs = torch.from_numpy(np.ascontiguousarray(self.inputs[np.sort(rows)]))
        inputs = inputs[torch.from_numpy(np.argsort(np.argsort(rows)))]  # memmap reads in file order
        lo, hi = self.table.offsets[images], self.table.offsets[images + 1]
        caption_rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        owner = np.repeat(np.arange(len(images)), hi - lo)
        # Longest caption first, as the models' packed sequences want them; a plain list, which
        # DDP leaves on the host (pack_padded_sequence takes lengths there).
        tokens = self.table.tokens[caption_rows]  # (C, max_len + 2)
        lengths = (tokens != 0).sum(1).numpy()
        order = np.argsort(-lengths, kind="stable")
        captions = tokens[order, :int(lengths.max())]  # (C, T): no all-pad columns
        return Batch(inputs, captions, torch.from_numpy(owner[order]), lengths[order].tolist())
