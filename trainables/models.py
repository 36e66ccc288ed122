"""The two captioners. Model code only: no data loading, no training.

Both share `Captioner`, which owns caption generation through three hooks: `start` (state from image
features), `step` (one word) and `forward` (teacher forcing over whole captions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from captune.trainables.catalog import ARCHS
from captune.trainables.decoding import generate
from captune.trainables.encoders import build_encoder

State = tuple[torch.Tensor, ...]  # recurrent state; every tensor has the batch on dim 1


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    encoder: str
    pretrained: bool = False
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.3
    encoder_seed: int = 0  # draws a random-init encoder's weights (pretrained=False)

    def to_dict(self) -> dict:
        return asdict(self)


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder, cfg.pretrained, cfg.encoder_seed)
        # Image features arrive at any scale (a random or ImageNet encoder, frozen or not):
        # normalising them lets the decoder use them from the first steps on.
        self.feat_norm = nn.BatchNorm1d(self.encoder.out_features)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def start(self, feats: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def teacher_forced(self, feats: torch.Tensor, captions: torch.Tensor,
                       lengths: list[int] | None = None) -> torch.Tensor:
        """Decoder outputs reading captions[:, :-1], one caption per row of feats: (C, T-1, H), or
        with `lengths` the (N, H) outputs of real words only (see `forward`)."""
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, captions: torch.Tensor,
                lengths: list[int] | None = None) -> torch.Tensor:
        """Teacher forcing: logits (C, T-1, V) predicting captions[:, 1:]. With `lengths`, each
        caption's token count (longest first), only the logits of the N words to predict, (N, V),
        in the order of `packed(captions[:, 1:], lengths, 1).data`. The recurrent layer then runs
        over real words only: padding is about half of a Flickr8k batch, and full-vocabulary logits
        of padding would be most of a training step's memory."""
        return self.head(self.outputs(feats, captions, lengths))

    def outputs(self, feats: torch.Tensor, captions: torch.Tensor,
                lengths: list[int] | None = None) -> torch.Tensor:
        """What `forward` feeds the output layer `head` (training computes its loss from these)."""
        return self.drop(self.teacher_forced(feats, captions, lengths))

    @staticmethod
    def reorder(state: State, index: torch.Tensor) -> State:
        return tuple(s.index_select(1, index) for s in state)

    @torch.no_grad()
    def caption(self, feats: torch.Tensor, start_id: int, end_id: int, max_len: int,
                beam: int = 1, alpha: float = 0.0) -> torch.Tensor:
        """Token ids (B, <=max_len) by beam search; beam=1 is greedy search; `alpha`: the length penalty's."""
        return generate(self, feats, start_id, end_id, max_len, beam, alpha)


class CnnLstm(Captioner):
    """Show and Tell: the projected image feature is the LSTM's first input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.project = nn.Linear(self.encoder.out_features, cfg.embed_size)
        self.lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)

    def start(self, feats: torch.Tensor) -> State:
        image = self.project(self.feat_norm(feats)).unsqueeze(1)  # (B, 1, E)
        _, state = self.lstm(image)
        return state

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return self.head(self.drop(out[:, 0])), state

    def teacher_forced(self, feats: torch.Tensor, captions: torch.Tensor,
                       lengths: list[int] | None = None) -> torch.Tensor:
        image = self.project(self.feat_norm(feats)).unsqueeze(1)  # (C, 1, E)
        words = self.drop(self.embed(captions[:, :-1]))  # (C, T-1, E)
        inputs = torch.cat([image, words], dim=1)  # (C, T, E)
        if lengths is None:
            return self.lstm(inputs)[0][:, 1:]  # (C, T-1, H)
        out, _ = self.lstm(packed(inputs, lengths))  # the image and each caption's words but its last
        return out.data[len(lengths):]  # (N, H): the first time step (the image's) of every caption dropped


class ResnetGru(Captioner):
    """The pooled image feature initialises the GRU's hidden state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.init_hidden = nn.Linear(self.encoder.out_features, cfg.hidden_size * cfg.num_layers)
        self.gru = nn.GRU(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)

    def start(self, feats: torch.Tensor) -> State:
        h = torch.tanh(self.init_hidden(self.feat_norm(feats)))  # (B, L*H)
        h = h.view(feats.size(0), self.cfg.num_layers, self.cfg.hidden_size).transpose(0, 1)
        return (h.contiguous(),)  # (L, B, H)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, h = self.gru(self.embed(tokens).unsqueeze(1), state[0])  # (B, 1, H)
        return self.head(self.drop(out[:, 0])), (h,)

    def teacher_forced(self, feats: torch.Tensor, captions: torch.Tensor,
                       lengths: list[int] | None = None) -> torch.Tensor:
        words = self.drop(self.embed(captions[:, :-1]))  # (C, T-1, E)
        hidden = self.start(feats)[0]  # (L, C, H)
        if lengths is None:
            return self.gru(words, hidden)[0]  # (C, T-1, H)
        return self.gru(packed(words, lengths, 1), hidden)[0].data  # (N, H)


def packed(seq: torch.Tensor, lengths: list[int], drop_last: int = 0) -> nn.utils.rnn.PackedSequence:
    """seq (C, T, ...) packed to lengths[i] - drop_last steps per row, rows already longest first.
    Its .data holds the real steps only, time step by time step."""
    return nn.utils.rnn.pack_padded_sequence(seq, [n - drop_last for n in lengths], batch_first=True)


def build_model(cfg: ModelConfig) -> Captioner:
    if cfg.arch == "cnn-lstm":
        return CnnLstm(cfg)
    if cfg.arch == "resnet-gru":
        return ResnetGru(cfg)
    raise ValueError(f"unknown arch {cfg.arch!r}: choose one of {ARCHS}")
