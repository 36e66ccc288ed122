"""Caption generation, written once: batched beam search, where a beam of 1 is greedy search."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from captune.trainables.catalog import MAX_BEAM


class Decoder(Protocol):
    """What decoding needs of a model (captune.trainables.models.Captioner's hooks)."""

    def start(self, feats: torch.Tensor) -> Any: ...  # the decoder's state, one per image
    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...  # logits (B, V), new state
    def reorder(self, state: Any, index: torch.Tensor) -> Any: ...  # the state of the hypotheses kept


@torch.no_grad()
def generate(model: Decoder, feats: torch.Tensor, start_id: int, end_id: int,
             max_len: int, beam: int = 1) -> torch.Tensor:
    """Most likely captions (B, <=max_len) of token ids, each ending at its first `end_id`.

    Hypotheses are ranked by total log-probability. A finished hypothesis only extends with
    `end_id` at no cost, so it keeps its score while the others grow.
    """
    if not 1 <= beam <= MAX_BEAM or max_len < 1:
        raise ValueError(f"beam must be in 1..{MAX_BEAM} and max_len >= 1, got beam={beam}, max_len={max_len}")
    batch, device = feats.size(0), feats.device
    rows = torch.arange(batch, device=device).repeat_interleave(beam)  # hypothesis -> image
    state = model.reorder(model.start(feats), rows)
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * beam,), start_id, dtype=torch.long, device=device)
    history = torch.empty(batch * beam, 0, dtype=torch.long, device=device)
    done = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logits, state = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*k, V)
        logp[done] = float("-inf")
        logp[done, end_id] = 0.0
        vocab = logp.size(1)
        total = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
        scores, best = total.topk(beam, dim=1)  # (B, k)
        origin = (best // vocab + torch.arange(batch, device=device).unsqueeze(1) * beam).view(-1)
        tokens = (best % vocab).view(-1)
        state = model.reorder(state, origin)
        history = torch.cat([history[origin], tokens.unsqueeze(1)], dim=1)  # (B*k, t)
        done = done[origin] | (tokens == end_id)
        if done.all():
            break
    winner = scores.argmax(dim=1) + torch.arange(batch, device=device) * beam
    return history[winner]
