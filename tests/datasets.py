"""Small datasets in each published Flickr8k layout, written on the fly for tests."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image


def write_images(folder: Path, names: list[str], size: int = 24) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (i * 7 % 255, 80, 160)).save(folder / name)


def kaggle(root: Path, captions: dict[str, list[str]], images: list[str] | None = None) -> Path:
    write_images(root / "Images", images if images is not None else list(captions))
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "caption"])
        w.writerows((im, c) for im, caps in captions.items() for c in caps)
    return root


def original(root: Path, captions: dict[str, list[str]], splits: dict[str, list[str]],
             images: list[str] | None = None, image_dir: str = "Flicker8k_Dataset") -> Path:
    write_images(root / image_dir, images if images is not None else list(captions))
    text = root / "Flickr8k_text"
    text.mkdir(parents=True, exist_ok=True)
    lines = [f"{im}#{n}\t{c}" for im, caps in captions.items() for n, c in enumerate(caps)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        (text / f"Flickr_8k.{name}.txt").write_text("".join(f"{im}\n" for im in splits.get(split, [])))
    return root


def karpathy(root: Path, captions: dict[str, list[str]], split_of: dict[str, str],
             dataset: str = "flickr8k", image_dir: str = "Images") -> Path:
    """Karpathy's split file for `dataset`; for "coco", each image in the subfolder its split has
    there (train2014 for train, val2014 for the others), under `image_dir` ("." = the root)."""
    entries = []
    for i, (im, caps) in enumerate(captions.items()):
        entry = {"filename": im, "imgid": i, "split": split_of[im],
                 "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]}
        if dataset == "coco":
            entry["filepath"] = "train2014" if split_of[im] == "train" else "val2014"
        entries.append(entry)
    for folder in {e.get("filepath", ".") for e in entries}:
        write_images(root / image_dir / folder, [e["filename"] for e in entries if e.get("filepath", ".") == folder])
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"dataset": dataset, "images": entries}))
    return root


def sample_captions(n: int) -> dict[str, list[str]]:
    return {f"img{i:03d}.jpg": [f"a dog number {i} runs", f"a brown dog , {i} , plays", 'a "quoted" dog'] for i in range(n)}
