"""A trained model on a dataset's split: its captions of every image, and their scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from captune.data.cache import default_cache_dir
from captune.data.prepare import PreparedData, prepare_data
from captune.trainables.checkpoint import Loaded
from captune.trainables.config import split_seed_of
from captune.trainables.decoding import Decoding
from captune.trainables.features import encoded_rows, encoder_features, weights_id
from captune.trainables.inference import generate_captions, image_size_of, max_len_of
from captune.trainables.metrics import CaptionScorer


def evaluate_split(loaded: Loaded, data_root: str | Path, split: str = "test", beam: int | Decoding = 1,
                   cache_dir: Path | None = None, skip_bad: bool = False,
                   device: torch.device | None = None) -> dict:
    """BLEU-1..4, CIDEr-D and ROUGE-L (captune.trainables.metrics) of the model's captions on a split of a
    dataset, against all references; `beam`: a beam width or a Decoding."""
    return evaluate_beams(loaded, data_root, split, (beam,), cache_dir, skip_bad, device)[beam]


def evaluate_beams(loaded: Loaded, data_root: str | Path, split: str = "test", beams: tuple[int, ...] = (1, 3),
                   cache_dir: Path | None = None, skip_bad: bool = False,
                   device: torch.device | None = None) -> dict[int, dict]:
    """evaluate_split for each beam width, {beam: scores}; the images are encoded once for all."""
    captions, refs = caption_split(loaded, data_root, split, beams, cache_dir, skip_bad, device)
    scorer = CaptionScorer(refs)
    return {beam: {"split": split, **_settings(Decoding.of(beam)), "images": len(refs), **scorer.scores(hyps)}
            for beam, hyps in captions.items()}


def _settings(how: Decoding) -> dict:
    return {"beam": how.beam, **({"alpha": how.alpha} if how.alpha else {}),
            **({"max_len": how.max_len} if how.max_len else {})}


def caption_split(loaded: Loaded, data_root: str | Path, split: str = "test", beams: tuple = (1,),
                  cache_dir: Path | None = None, skip_bad: bool = False, device: torch.device | None = None,
                  data: PreparedData | None = None) -> tuple[dict, list[list[str]]]:
    """The model's captions of a split's images for each of `beams` (a beam width, or a Decoding:
    captune.trainables.decoding), and their references, in the split's order: ({beam: captions},
    references); the images are encoded once for all. `data`: the split already prepared; from a
    feature set's manifest (no pixels), the frozen encoder's features are read from `cache_dir`."""
    device = device or torch.device("cpu")
    cache_dir = cache_dir or default_cache_dir()
    if data is None:
        data = prepare_data(data_root, image_size_of(loaded), cache_dir, skip_bad=skip_bad,
                            seed=split_seed_of(loaded.payload.get("train_config", {})), progress=False)
    rows, refs = data.rows(split), data.captions(split)
    model = loaded.model.to(device).eval()
    if data.pixels is None:
        cfg = loaded.payload["train_config"]
        cached = encoder_features(model.encoder, cfg["encoder"], weights_id(cfg["encoder"], cfg["pretrained"],
                                                                            cfg["seed"]), data, cache_dir, device)
        feats = np.asarray(cached[rows])  # (R, F)
    else:
        feats = np.concatenate([f for _, f in encoded_rows(model.encoder, data.pixels, rows, device)])  # (R, F)
    captions = {}
    for beam in beams:
        how = Decoding.of(beam)
        captions[beam] = generate_captions(model, feats, np.arange(len(rows)), loaded.vocab,
                                           how.max_len or max_len_of(loaded), how.beam, encode=False, device=device,
                                           alpha=how.alpha)
    return captions, refs
