"""A captioning corpus as read from disk: captions per image, splits, and every problem found."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    kind: str  # missing_image, corrupt_image, malformed_line, empty_caption, duplicate_entry, ...
    file: str
    line: int | None
    detail: str
    image: str | None = None
    severity: str = "error"  # "error" stops training unless skipped; "warning" is reported only

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class Corpus:
    root: Path
    layout: str
    caption_file: Path
    image_dir: Path
    captions: dict[str, list[str]]  # image file name -> its captions, in file order
    splits: dict[str, list[str]]  # "train"/"val"/"test" -> image names, each image in at most one
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def bad_images(self) -> set[str]:
        return {p.image for p in self.errors if p.image is not None}

    def image_path(self, name: str) -> Path:
        return self.image_dir / name

    def unsplit(self) -> list[str]:
        in_split = {im for names in self.splits.values() for im in names}
        return sorted(im for im in self.captions if im not in in_split)

    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    def without(self, images: set[str]) -> "Corpus":
        """The same corpus with these images left out of every split (for an explicit skip)."""
        return Corpus(
            self.root, self.layout, self.caption_file, self.image_dir,
            {im: c for im, c in self.captions.items() if im not in images},
            {s: [im for im in names if im not in images] for s, names in self.splits.items()},
            list(self.problems),
        )


def seeded_split(images: list[str], seed: int, val_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> dict[str, list[str]]:
    """Deterministic split by image, so all captions of an image land in one split."""
    order = sorted(images)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    n_test = round(len(order) * test_fraction)
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val:n_val + n_test]),
        "train": sorted(order[n_val + n_test:]),
    }
