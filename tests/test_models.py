import math

import pytest
import torch

from captune.data.vocab import Vocabulary
from captune.trainables.checkpoint import CheckpointError, load_checkpoint, read_payload, save_checkpoint, without_optimizer
from captune.trainables.decoding import generate
from captune.trainables.encoders import build_encoder, weights_digest
from captune.trainables.models import ARCHS, ModelConfig, build_model, packed

ENCODER = {"cnn-lstm": "vgg-small", "resnet-gru": "resnet18"}


def tiny(arch: str, vocab_size: int = 12, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch, vocab_size, ENCODER[arch], embed_size=16, hidden_size=24, dropout=0.0, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes(arch):
    model = tiny(arch, num_layers=2).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    feats = model.encoder(images)
    assert feats.shape == (3, model.encoder.out_features)
    captions = torch.randint(0, 12, (3, 7))
    logits = model(feats, captions)
    assert logits.shape == (3, 6, 12)
    # Training runs the decoder over real words only (packed, longest caption first): the logits
    # it gets must be those of the padded run at the same places.
    lengths = [7, 5, 2]
    assert torch.allclose(model(feats, captions, lengths), packed(logits, lengths, 1).data, atol=1e-5)
    logits, state = model.step(captions[:, 0], model.start(feats))
    assert logits.shape == (3, 12) and all(s.shape[1] == 3 for s in state)
    out = model.caption(feats, start_id=1, end_id=2, max_len=5, beam=3)
    assert out.shape[0] == 3 and out.shape[1] <= 5


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_tiny_batch(arch):
    model = tiny(arch).train()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # a frozen encoder, as with the feature cache (fine-tuning: test_training)
        feats = model.encoder.eval()(images)
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 10, 11, 2], [1, 5, 4, 2, 0]])
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("encoder.")], lr=0.01)
    for _ in range(150):
        logits = model(feats, captions)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12), captions[:, 1:].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    out = model.caption(feats, start_id=1, end_id=2, max_len=6, beam=1)
    for row, target in zip(out.tolist(), captions.tolist()):
        assert row[: row.index(2) + 1] == target[1: target.index(2) + 1]


def _sequence_logprob(model, feats, seq, start_id=1):
    state, tok, total = model.start(feats), torch.tensor([start_id]), 0.0
    for t in seq:
        logits, state = model.step(tok, state)
        total += torch.log_softmax(logits, -1)[0, t].item()
        tok = torch.tensor([t])
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_beam_one_and_beam_scores_at_least_as_high(arch):
    model = tiny(arch).eval()
    feats = model.encoder(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    greedy = generate(model, feats, 1, 2, max_len=6, beam=1)
    # greedy: each token is the argmax given the previous ones
    state, tok = model.start(feats), torch.full((5,), 1)
    for t in range(greedy.size(1)):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
        alive = [i for i in range(5) if 2 not in greedy[i, :t].tolist()]
        assert greedy[alive, t].tolist() == tok[alive].tolist()
    beam = generate(model, feats, 1, 2, max_len=6, beam=4)
    for i in range(5):
        g, b = greedy[i].tolist(), beam[i].tolist()
        g, b = g[: g.index(2) + 1] if 2 in g else g, b[: b.index(2) + 1] if 2 in b else b
        assert _sequence_logprob(model, feats[i:i + 1], b) >= _sequence_logprob(model, feats[i:i + 1], g) - 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_and_arch_check(arch, tmp_path):
    model = tiny(arch).eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    path = save_checkpoint(tmp_path / "model.pt", model, vocab, encoder_trained=True, epoch=3, history=[{"bleu4": 0.1}])
    loaded = load_checkpoint(path, arch=arch)
    assert loaded.vocab.words == vocab.words and loaded.payload["epoch"] == 3
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model.caption(model.encoder(images), 1, 2, 5, 2),
                       loaded.model.caption(loaded.model.encoder(images), 1, 2, 5, 2))
    other = next(a for a in ARCHS if a != arch)
    with pytest.raises(CheckpointError, match=f"is a {arch} model, not the requested {other}"):
        load_checkpoint(path, arch=other)


def test_frozen_random_encoder_is_saved_as_its_seed_and_checked_on_load(tmp_path):
    model = tiny("resnet-gru", encoder_seed=7).eval()  # tiny() seeds the global generator with 0
    assert weights_digest(model.encoder) == weights_digest(build_encoder("resnet18", False, seed=7))
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    path = save_checkpoint(tmp_path / "model.pt", model, vocab, encoder_trained=False,
                           optimizer={"state": {}, "param_groups": []})
    payload = read_payload(path)
    assert not any(k.startswith("encoder.") for k in payload["model"])  # resnet18's 45 MB left out
    loaded = load_checkpoint(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    # an inference copy drops what only resuming needs
    slim = read_payload(without_optimizer(path, tmp_path / "slim.pt"))
    assert "optimizer" not in slim and slim["model"].keys() == payload["model"].keys()
    # a rebuild that would give other weights (here: another seed) is refused, not used
    payload["model_config"]["encoder_seed"] = 8
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="rebuilt from seed 8 is not the one this model was trained with"):
        load_checkpoint(tmp_path / "other.pt")


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint file"):
        read_payload(tmp_path / "x.pt")
    torch.save({"some": "dict"}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="not a captune checkpoint"):
        read_payload(tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_payload(tmp_path / "missing.pt")


class ScriptedDecoder:
    """A decoder whose next-token probabilities depend only on the last token: after <start>,
    <end> 0.5 and "a" 0.5; after "a", <end> 0.9 and "a" 0.1 (ids: 0 <start>, 1 <end>, 2 "a")."""

    NEXT = {0: [0.0, 0.5, 0.5], 2: [0.0, 0.9, 0.1], 1: [0.0, 1.0, 0.0]}

    def start(self, feats):
        return None

    def step(self, tokens, state):
        return torch.log(torch.tensor([self.NEXT[int(t)] for t in tokens]).clamp_min(1e-12)), state

    def reorder(self, state, index):
        return state


def test_the_length_penalty_changes_which_hypothesis_wins():
    # "<end>" alone: log 0.5 = -0.693; "a <end>": log 0.5 + log 0.9 = -0.799. By total log-probability
    # (alpha 0) the empty caption wins. GNMT's penalty ((5 + |Y|) / 6) ** alpha, at alpha 1: 1 for
    # the first (length 1), 7/6 for the second: -0.693 against -0.799 / (7/6) = -0.685: "a <end>" wins.
    feats = torch.zeros(1, 1)
    assert generate(ScriptedDecoder(), feats, 0, 1, max_len=4, beam=2).tolist()[0][0] == 1  # (then <end> padding)
    assert generate(ScriptedDecoder(), feats, 0, 1, max_len=4, beam=2, alpha=1.0).tolist()[0][:2] == [2, 1]
    assert math.log(0.5) > math.log(0.5) + math.log(0.9)
    assert math.log(0.5) / 1.0 < (math.log(0.5) + math.log(0.9)) / (7 / 6)
    # (greedy takes the first most likely token, as before, whatever alpha)
    assert generate(ScriptedDecoder(), feats, 0, 1, max_len=4, beam=1, alpha=1.0).tolist() == [[1]]
    with pytest.raises(ValueError, match="alpha in 0..2.0"):
        generate(ScriptedDecoder(), feats, 0, 1, max_len=4, beam=2, alpha=-1)
