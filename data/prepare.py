"""From a dataset folder to what training reads: checked corpus, vocabulary, cached pixels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.cache import cached_array
from data.corpus import SPLITS, Corpus, Problem
from data.images import OnBatch, default_decoder, read_images
from data.layouts import load_corpus
from data.text import tokenize
from data.vocab import Vocabulary
from infra.errors import UserError
from infra.fingerprint import files_fingerprint


class DataProblems(UserError, ValueError):
    """The dataset has problems that stop training (unless bad items are skipped explicitly)."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.problems = problems
        lines = [f"{root}: {len(problems)} problem(s) in the dataset; nothing was trained:"]
        lines += [f"  {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more (`captune data check {root}` lists all)")
        lines.append("Fix them, or pass --skip-bad to leave the bad items out (they are counted).")
        super().__init__("\n".join(lines))


@dataclass
class PreparedData:
    corpus: Corpus
    images: list[str]  # every image in a split; row i of `pixels`
    pixels: np.ndarray  # (N, 3, S, S) uint8, memory-mapped
    pixels_key: dict
    skipped: list[Problem]  # problems whose items were left out (only with skip_bad)

    def rows(self, split: str) -> np.ndarray:
        where = {im: i for i, im in enumerate(self.images)}
        return np.array([where[im] for im in self.corpus.splits[split]], dtype=np.int64)

    def captions(self, split: str) -> list[list[str]]:
        return [self.corpus.captions[im] for im in self.corpus.splits[split]]

    def vocabulary(self, min_count: int) -> Vocabulary:
        """Words of the training captions that occur at least `min_count` times."""
        return Vocabulary.build((tokenize(c) for caps in self.captions("train") for c in caps), min_count)


def prepare_data(root: str | Path, image_size: int, cache_dir: Path, *, skip_bad: bool = False,
                 seed: int = 0, progress: bool = True, on_batch: OnBatch | None = None) -> PreparedData:
    """Read and check the dataset, decode every image once into the pixel cache.

    Any problem stops here with the full report, unless `skip_bad`: then the bad images are left
    out of every split and returned as `skipped` for the caller to count and print.
    `on_batch` (see data.images.read_images) sees the images as they are decoded, with their rows
    in `pixels`; it is not called when the pixel cache was already there.
    """
    root = Path(root)
    corpus = load_corpus(root, seed=seed)
    text_errors = corpus.errors
    # Images already known bad (missing) are not decoded; all others are, so that one report
    # names every problem, text and image alike.
    known_bad = corpus.bad_images()
    images = sorted({im for split in SPLITS for im in corpus.splits[split]} - known_bad)
    paths = [corpus.image_path(im) for im in images]
    decoder = default_decoder()  # pixels differ a little between decoders: part of the key
    key = {"files": files_fingerprint(paths), "count": len(paths), "size": image_size, "decoder": decoder}

    def decode(out: np.ndarray) -> dict:
        bar = tqdm(total=len(paths), desc=f"decoding images at {image_size}px", unit="img",
                   disable=None if progress else True, leave=False)  # None: on a terminal only
        with bar:
            _, errors = read_images(paths, image_size, out=out, progress=bar, decoder=decoder,
                                    on_batch=on_batch)
        return {"errors": {images[i]: msg for i, msg in errors.items()}}

    pixels, info = cached_array(cache_dir, f"pixels{image_size}", key, (len(images), 3, image_size, image_size),
                                "uint8", decode)
    bad = []
    for im, msg in info["errors"].items():
        file, _, detail = msg.partition(": ")  # ImageError messages start with the file's path
        bad.append(Problem("corrupt_image", file, None, detail, im))
    _stop_or_skip(root, corpus, text_errors + bad, skip_bad)
    corpus.problems.extend(bad)
    skipped = corpus.errors if skip_bad else []
    return PreparedData(corpus, images, pixels, key, skipped)


def _stop_or_skip(root: Path, corpus: Corpus, errors: list[Problem], skip_bad: bool) -> None:
    if not errors:
        return
    if not skip_bad:
        raise DataProblems(root, errors)
    skipped = corpus.without({p.image for p in errors if p.image})
    corpus.captions, corpus.splits = skipped.captions, skipped.splits
    for split in SPLITS:
        if not corpus.splits[split]:
            raise DataProblems(root, errors + [Problem("empty_split", str(root), None,
                                                       f"the {split} split has no usable image left")])
