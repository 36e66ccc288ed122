"""From a dataset folder to what training reads: checked corpus, vocabulary, cached pixels."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captune.data.cache import cached_array
from captune.data.corpus import SPLITS, Corpus, Problem
from captune.data.images import DECODING, OnBatch, default_decoder, read_images
from captune.data.layouts import load_corpus
from captune.data.text import word_counts
from captune.data.vocab import Vocabulary
from captune.infra.errors import UserError
from captune.infra.fingerprint import files_fingerprint


class DataProblems(UserError, ValueError):
    """The dataset has problems that stop training (unless bad items are skipped explicitly)."""

    def __init__(self, root: Path, problems: list[Problem], outcome: str = "nothing was trained",
                 skip: str = "--skip-bad"):
        self.problems = problems
        lines = [f"{root}: {len(problems)} problem(s) in the dataset; {outcome}:"]
        lines += [f"  {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more (`captune data check {root}` lists all)")
        lines.append(f"Fix them, or pass {skip} to leave the bad items out (they are counted).")
        super().__init__("\n".join(lines))


@dataclass
class PreparedData:
    corpus: Corpus
    images: list[str]  # every image in a split; row i of `pixels`
    pixels: np.ndarray | None  # (N, 3, S, S) uint8, memory-mapped; None when read from a manifest
    pixels_key: dict
    skipped: list[Problem]  # problems whose items were left out (only with skip_bad)

    def manifest(self) -> dict:
        """What a trial needs besides features, as JSON: the checked captions and splits, the row
        of each image and the key its features are cached under. With it, a node that holds no
        image trains on features built elsewhere (captune.trainables.feature_job)."""
        c = self.corpus
        return {"root": str(c.root), "layout": c.layout, "caption_file": str(c.caption_file),
                "image_dir": str(c.image_dir), "captions": c.captions, "splits": c.splits,
                "problems": [p.to_dict() for p in c.problems], "images": self.images,
                "pixels_key": self.pixels_key, "skipped": [p.to_dict() for p in self.skipped]}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "PreparedData":
        m = manifest
        corpus = Corpus(Path(m["root"]), m["layout"], Path(m["caption_file"]), Path(m["image_dir"]),
                        m["captions"], m["splits"], [Problem(**p) for p in m["problems"]])
        return cls(corpus, m["images"], None, m["pixels_key"], [Problem(**p) for p in m["skipped"]])

    def rows(self, split: str) -> np.ndarray:
        where = {im: i for i, im in enumerate(self.images)}
        return np.array([where[im] for im in self.corpus.splits[split]], dtype=np.int64)

    def captions(self, split: str) -> list[list[str]]:
        return [self.corpus.captions[im] for im in self.corpus.splits[split]]

    def vocabulary(self, min_count: int) -> Vocabulary:
        """Words of the training captions that occur at least `min_count` times."""
        return Vocabulary.from_counts(self.train_word_counts, min_count)

    @cached_property
    def train_word_counts(self) -> Counter:
        # Counted once: a sweep's driver asks for several thresholds (600k captions on COCO).
        return word_counts(c for caps in self.captions("train") for c in caps)


def prepare_data(root: str | Path, image_size: int, cache_dir: Path, *, skip_bad: bool = False,
                 seed: int = 0, progress: bool = True, on_batch: OnBatch | None = None) -> PreparedData:
    """Read and check the dataset, decode every image once into the pixel cache.

    Any problem stops here with the full report, unless `skip_bad`: then the bad images are left
    out of every split and returned as `skipped` for the caller to count and print.
    `on_batch` (see captune.data.images.read_images) sees the images as they are decoded, with their rows
    in `pixels`; it is not called when the pixel cache was already there.
    """
    root = Path(root)
    corpus, images, paths = listed_images(root, seed)
    decoder = default_decoder()  # pixels differ a little between decoders: part of the key
    key = pixels_key(paths, image_size, decoder)

    def decode(out: np.ndarray) -> dict:
        bar = tqdm(total=len(paths), desc=f"decoding images at {image_size}px", unit="img",
                   disable=None if progress else True, leave=False)  # None: on a terminal only
        with bar:
            _, errors = read_images(paths, image_size, out=out, progress=bar, decoder=decoder,
                                    on_batch=on_batch)
        return {"errors": {images[i]: msg for i, msg in errors.items()}}

    pixels, info = cached_array(cache_dir, f"pixels{image_size}", key, (len(images), 3, image_size, image_size),
                                "uint8", decode)
    return checked_data(root, corpus, images, pixels, key, info["errors"], skip_bad)


def listed_images(root: Path, seed: int) -> tuple[Corpus, list[str], list[Path]]:
    """The corpus, and every image in a split (sorted: row order) with its path. Images already
    known bad (missing) are left out; all others are decoded, so that one report names every
    problem, text and image alike."""
    corpus = load_corpus(root, seed=seed)
    images = sorted({im for split in SPLITS for im in corpus.splits[split]} - corpus.bad_images())
    return corpus, images, [corpus.image_path(im) for im in images]


def pixels_key(paths: list[Path], image_size: int, decoder: str) -> dict:
    """What decoded pixels (and so any features of them) depend on, the decoding's version too:
    the files' names, sizes and times stay the same when the decoding changes."""
    return {"files": files_fingerprint(paths), "count": len(paths), "size": image_size, "decoder": decoder,
            "decoding": DECODING}


def checked_data(root: Path, corpus: Corpus, images: list[str], pixels: np.ndarray | None, key: dict,
                 errors: dict[str, str], skip_bad: bool) -> PreparedData:
    """The prepared dataset once its images are decoded, `errors` {image: ImageError message}:
    stopped on any problem, or with the bad items left out when `skip_bad`."""
    bad = []
    for im, msg in errors.items():
        file, _, detail = msg.partition(": ")  # ImageError messages start with the file's path
        bad.append(Problem("corrupt_image", file, None, detail, im))
    _stop_or_skip(root, corpus, corpus.errors + bad, skip_bad)
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
