"""Caption generation, written once: batched beam search, where a beam of 1 is greedy search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from captune.trainables.catalog import MAX_ALPHA, MAX_BEAM


@dataclass(frozen=True)
class Decoding:
    """How captions are generated from a trained model: the beam width (1 = greedy), the length
    penalty's alpha (0 = by total log-probability) and the most words (None: the model's
    training setting)."""
    beam: int = 1
    alpha: float = 0.0
    max_len: int | None = None

    @classmethod
    def of(cls, value: "int | Decoding") -> "Decoding":
        """A beam width (the plain decoding at it) or a Decoding."""
        return value if isinstance(value, Decoding) else cls(beam=int(value))

    def text(self) -> str:
        words = ["greedy" if self.beam == 1 else f"beam {self.beam}"]
        if self.alpha:
            words.append(f"length penalty {self.alpha:g}")
        if self.max_len:
            words.append(f"at most {self.max_len} words")
        return ", ".join(words)


class Decoder(Protocol):
    """What decoding needs of a model (captune.trainables.models.Captioner's hooks)."""

    def start(self, feats: torch.Tensor) -> Any: ...  # the decoder's state, one per image
    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...  # logits (B, V), new state
    def reorder(self, state: Any, index: torch.Tensor) -> Any: ...  # the state of the hypotheses kept


def length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's length penalty, ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14): a hypothesis's
    log-probability is divided by it. alpha = 0 ranks by total log-probability, which favours
    short captions (every word costs probability); larger alpha favours longer ones."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def generate(model: Decoder, feats: torch.Tensor, start_id: int, end_id: int,
             max_len: int, beam: int = 1, alpha: float = 0.0) -> torch.Tensor:
    """Most likely captions (B, <=max_len) of token ids, each ending at its first `end_id`.

    Hypotheses are ranked by total log-probability divided by the length penalty (alpha = 0:
    by total log-probability), their length counting the end token. A finished hypothesis only
    extends with `end_id` at no cost and keeps its length, so it keeps its score while the others
    grow.
    """
    if not 1 <= beam <= MAX_BEAM or max_len < 1 or not 0.0 <= alpha <= MAX_ALPHA:
        raise ValueError(f"beam must be in 1..{MAX_BEAM}, max_len >= 1 and alpha in 0..{MAX_ALPHA}, got "
                         f"beam={beam}, max_len={max_len}, alpha={alpha}")
    batch, device = feats.size(0), feats.device
    rows = torch.arange(batch, device=device).repeat_interleave(beam)  # hypothesis -> image
    state = model.reorder(model.start(feats), rows)
    scores = torch.full((batch, beam), float("-inf"), device=device)  # total log-probabilities
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * beam,), start_id, dtype=torch.long, device=device)
    history = torch.empty(batch * beam, 0, dtype=torch.long, device=device)
    done = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * beam, dtype=torch.long, device=device)
    for _ in range(max_len):
        logits, state = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*k, V)
        logp[done] = float("-inf")
        logp[done, end_id] = 0.0
        vocab = logp.size(1)
        total = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
        grown = (lengths + (~done).long()).view(batch, beam, 1).expand(batch, beam, vocab).reshape(batch, beam * vocab)
        ranked = total / length_penalty(grown, alpha) if alpha else total
        _, best = ranked.topk(beam, dim=1)  # (B, k)
        scores, lengths = total.gather(1, best), grown.gather(1, best).view(-1)
        origin = (best // vocab + torch.arange(batch, device=device).unsqueeze(1) * beam).view(-1)
        tokens = (best % vocab).view(-1)
        state = model.reorder(state, origin)
        history = torch.cat([history[origin], tokens.unsqueeze(1)], dim=1)  # (B*k, t)
        done = done[origin] | (tokens == end_id)
        if done.all():
            break
    final = scores / length_penalty(lengths.view(batch, beam), alpha) if alpha else scores
    winner = final.argmax(dim=1) + torch.arange(batch, device=device) * beam
    return history[winner]
