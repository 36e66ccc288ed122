"""Checkpoint I/O: state_dicts plus the configuration needed to rebuild, never pickled modules."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.data.vocab import Vocabulary
from captune.infra.errors import UserError
from captune.trainables.catalog import CHECKPOINT_FILE
from captune.trainables.encoders import ImageEncoder, weights_digest
from captune.trainables.models import Captioner, ModelConfig, build_model

FORMAT = "captune-checkpoint/1"
NOT_A_CHECKPOINT = ("not a PyTorch checkpoint file (a captune model is the model.pt that `captune train` or a "
                    "sweep writes, or an MLflow URI such as runs:/<id>/model)")
FILENAME = CHECKPOINT_FILE


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as asked: wrong file, wrong format, wrong architecture."""


def checkpoint_bytes(model_config: ModelConfig, encoder_trained: bool) -> int:
    """About how large a training checkpoint of this model is: its stored weights and Adam's two
    moments of each trained one (worked out on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(**{**model_config.to_dict(), "pretrained": False}))
    stored = [p for name, p in model.state_dict().items() if encoder_trained or not name.startswith("encoder.")]
    trained = [p for name, p in model.named_parameters() if encoder_trained or not name.startswith("encoder.")]
    weights = sum(p.numel() * p.element_size() for p in stored)
    return weights + 2 * sum(p.numel() * p.element_size() for p in trained) + (64 << 10)  # + vocabulary, history


@dataclass
class Loaded:
    model: Captioner
    vocab: Vocabulary
    payload: dict  # everything else saved: train_config, epoch, history, optimizer, ...


def save_checkpoint(path: str | Path, model: Captioner, vocab: Vocabulary, *, encoder_trained: bool,
                    encoder_digest: str | None = None, **extra) -> Path:
    """Write atomically. A frozen encoder is not stored: it is rebuilt on load, from torchvision's
    ImageNet weights or from its seed (checked against `encoder_digest`, computed here when not
    given). So a sweep does not write a ResNet-50's 98 MB again with every epoch's checkpoint."""
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items() if encoder_trained or not k.startswith("encoder.")}
    payload = {"format": FORMAT, "model_config": model.cfg.to_dict(), "vocab": vocab.to_dict(),
               "encoder_stored": encoder_trained, "model": state, **extra}
    if not encoder_trained and not model.cfg.pretrained:
        if encoder_digest is None and not isinstance(model.encoder, ImageEncoder):
            raise ValueError("save_checkpoint: the frozen encoder was dropped, pass its encoder_digest")
        payload["encoder_digest"] = encoder_digest or weights_digest(model.encoder)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def without_optimizer(src: str | Path, dst: str | Path, decoding: dict | None = None) -> Path:
    """A copy of checkpoint `src` for inference: the optimizer's state, which only resuming
    needs and which is twice the trained weights' size (Adam's two moments), is left out; with
    `decoding` (captune.trainables.decoding.Decoding's fields), how it captions by default."""
    payload = read_payload(src)
    payload.pop("optimizer", None)
    if decoding is not None:
        payload["decoding"] = decoding
    torch.save(payload, dst)
    return Path(dst)


def read_payload(path: str | Path, map_location: str = "cpu") -> dict:
    """The saved dict, checked to be a captune checkpoint; tensors only, no code is unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except pickle.UnpicklingError as e:
        # torch 2.14 names a refused class "Unsupported global: GLOBAL module.Class"; any other
        # unpickling failure (bytes that are no pickle at all) is a file that is not a checkpoint
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}") from None
        # torch's message advises weights_only=False, which would run whatever code the file holds
        raise CheckpointError(f"{path}: holds pickled objects other than tensors and plain values; refused, as "
                              f"captune never runs code from a model file (a captune model holds only weights "
                              f"and settings)") from None
    except Exception:  # torch raises several types (KeyError, RuntimeError, EOFError) for other files
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captune checkpoint (expected format {FORMAT})")
    return payload


def load_checkpoint(path: str | Path, arch: str | None = None, map_location: str = "cpu") -> Loaded:
    """Rebuild a model from a checkpoint file (or a folder holding model.pt), refusing one whose
    architecture is not `arch`."""
    payload = read_payload(path, map_location)
    cfg = ModelConfig(**payload["model_config"])
    if arch is not None and cfg.arch != arch:
        raise CheckpointError(f"{path}: checkpoint is a {cfg.arch} model, not the requested {arch}")
    stored = payload["encoder_stored"]
    # A stored encoder is loaded over a randomly initialised one: no download needed.
    model = build_model(ModelConfig(**{**cfg.to_dict(), "pretrained": cfg.pretrained and not stored}))
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    missing = [k for k in missing if stored or not k.startswith("encoder.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.arch} model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if "encoder_digest" in payload and weights_digest(model.encoder) != payload["encoder_digest"]:
        raise CheckpointError(f"{path}: the random-init {cfg.encoder} encoder rebuilt from seed {cfg.encoder_seed} "
                              f"is not the one this model was trained with (torch {torch.__version__} here: "
                              f"was the checkpoint written by another torch version?)")
    model.cfg = cfg
    model.eval()
    return Loaded(model, Vocabulary.from_dict(payload["vocab"]), payload)
