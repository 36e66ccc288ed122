"""Readers for the published caption datasets' layouts, chosen automatically from what a folder holds.

1. original (Flickr8k): an image folder + Flickr8k_text/Flickr8k.token.txt
   (`name.jpg#n<TAB>caption`) and Flickr_8k.{train,dev,test}Images.txt (the official split).
2. karpathy (Flickr8k, Flickr30k, COCO): dataset_{flickr8k,flickr30k,coco}.json (a split per image,
   raw sentences; `restval` is train) + an image folder. COCO's entries name a subfolder
   (`filepath`: train2014, val2014), so its images are keyed `train2014/COCO_train2014_….jpg`.
3. kaggle: Images/*.jpg + captions.txt (CSV with header `image,caption`), split by a seeded draw.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from captune.data.corpus import SPLITS, Corpus, Problem, seeded_split
from captune.data.text import has_words, tokenize
from captune.infra.errors import UserError

IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images", "Images")
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
COCO_IMAGE_DIRS = ("images", ".")  # where COCO's train2014/ and val2014/ usually sit
TEXT_DIRS = ("Flickr8k_text", ".")
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
_CAPTION_ID = re.compile(r"^(?P<image>.+)#(?P<n>\d+)$")


class LayoutError(UserError, ValueError):
    """The folder is not a dataset in any known layout."""


def load_corpus(root: str | Path, seed: int = 0) -> Corpus:
    """Read the dataset at `root` in whichever layout it has; problems are collected, not raised."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such directory")
    for reader in (_read_original, _read_karpathy, _read_kaggle):
        corpus = reader(root, seed)
        if corpus is not None:
            return corpus
    listing = sorted(p.name for p in root.iterdir())[:10]
    raise LayoutError(
        f"{root}: unknown dataset layout (holds {listing or 'nothing'}). Expected one of: "
        f"Images/ + captions.txt (Kaggle); an image folder ({', '.join(IMAGE_DIRS)}) + "
        "Flickr8k_text/Flickr8k.token.txt and the Flickr_8k.*Images.txt split files (original); "
        f"one of {', '.join(KARPATHY_FILES)} + an image folder (Karpathy; COCO: train2014/, val2014/). "
        "Or write the built-in dataset with `captune data synth --out DIR`."
    )


# --- layouts -------------------------------------------------------------------------------------

def _read_original(root: Path, seed: int) -> Corpus | None:
    token = _first_existing(root / d / "Flickr8k.token.txt" for d in TEXT_DIRS)
    if token is None:
        return None
    problems: list[Problem] = []
    image_dir = _image_dir(root, problems, token)
    captions: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for line_no, line in _text_lines(token, problems):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        match = _CAPTION_ID.match(key.strip())
        if not tab or match is None:
            problems.append(Problem("malformed_line", str(token), line_no,
                                    f"expected 'image.jpg#n<TAB>caption', got {line[:80]!r}"))
            continue
        image, key = match["image"], key.strip()
        if key in seen:
            problems.append(Problem("duplicate_entry", str(token), line_no,
                                    f"caption id {key} already given on line {seen[key]}", image))
            continue
        seen[key] = line_no
        first_line.setdefault(image, line_no)
        _add_caption(captions, image, caption, str(token), line_no, problems)
    splits = {}
    split_lines: dict[str, tuple[str, int]] = {}
    for split, name in SPLIT_FILES.items():
        path = token.parent / name
        if not path.exists():
            problems.append(Problem("missing_split_file", str(path), None,
                                    f"split file {name} not found; that split is empty"))
            splits[split] = []
            continue
        splits[split] = _read_split_file(path, split, captions, split_lines, problems)
    corpus = Corpus(root, "original", token, image_dir, captions, splits, problems)
    _check_images_exist(corpus, token, first_line)
    _report_unsplit(corpus)
    return corpus


def _read_karpathy(root: Path, seed: int) -> Corpus | None:
    path = _first_existing(root / name for name in KARPATHY_FILES)
    if path is None:
        return None
    problems: list[Problem] = []
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"), object_hook=_without_tokens)
        entries = doc["images"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(Problem("malformed_file", str(path), getattr(e, "lineno", None),
                                f"not a Karpathy split file (expected {{'images': [...]}}): {e}"))
        return Corpus(root, "karpathy", path, _image_dir(root, problems, path), {}, {s: [] for s in SPLITS},
                      problems)
    subfolders = isinstance(entries, list) and bool(entries) and isinstance(entries[0], dict) \
        and "filepath" in entries[0]
    image_dir = _coco_image_dir(root, entries) if subfolders else _image_dir(root, problems, path)
    captions: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        try:
            image, split, sentences = entry["filename"], entry["split"], entry["sentences"]
            raws = [s["raw"] for s in sentences]
            if subfolders:
                image = f"{entry['filepath']}/{image}"
        except (KeyError, TypeError) as e:
            problems.append(Problem("malformed_line", str(path), None, f"{where}: missing field {e}"))
            continue
        if image in captions:
            problems.append(Problem("duplicate_entry", str(path), None,
                                    f"{where}: image {image} listed twice; the first entry is used"))
            continue
        if split not in KARPATHY_SPLITS:
            problems.append(Problem("malformed_line", str(path), None,
                                    f"{where}: unknown split {split!r}", image))
            continue
        if not _safe_name(image, str(path), None, problems):
            continue
        captions.setdefault(image, [])
        for j, caption in enumerate(raws):
            _add_caption(captions, image, caption, str(path), None, problems, f"{where}.sentences[{j}]")
        splits[KARPATHY_SPLITS[split]].append(image)
    corpus = Corpus(root, "karpathy", path, image_dir, captions, splits, problems)
    _check_images_exist(corpus, path, {})
    return corpus


def _read_kaggle(root: Path, seed: int) -> Corpus | None:
    path = _first_existing([root / "captions.txt"])
    if path is None:
        return None
    problems: list[Problem] = []
    image_dir = _image_dir(root, problems, path)
    text = _decode(path, problems)
    reader = csv.reader(io.StringIO(text, newline=""))
    captions: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
        problems.append(Problem("malformed_line", str(path), 1,
                                f"expected the header 'image,caption', got {header!r}"))
    for row in reader:
        line_no = reader.line_num
        if not row or row == [""]:
            continue
        if len(row) != 2:
            problems.append(Problem("malformed_line", str(path), line_no,
                                    f"expected 2 fields 'image,caption', got {len(row)}: {row!r:.80}"))
            continue
        first_line.setdefault(row[0].strip(), line_no)
        _add_caption(captions, row[0].strip(), row[1], str(path), line_no, problems)
    corpus = Corpus(root, "kaggle", path, image_dir, captions, {}, problems)
    _check_images_exist(corpus, path, first_line)
    corpus.splits = seeded_split(list(captions), seed)
    return corpus


# --- shared pieces -------------------------------------------------------------------------------

def _first_existing(paths) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _image_dir(root: Path, problems: list[Problem], caption_file: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    problems.append(Problem("missing_image_dir", str(root), None,
                            f"no image folder beside {caption_file.name}: expected one of {IMAGE_DIRS}"))
    return root / "Images"


def _without_tokens(obj: dict) -> dict:
    """Karpathy's own tokens are dropped as each sentence is parsed (captune tokenizes `raw` with
    its one tokenizer): in COCO's file they are 616k lists, most of the parsed file's memory."""
    obj.pop("tokens", None)
    return obj


def _coco_image_dir(root: Path, entries: list) -> Path:
    """The folder holding COCO's subfolders (train2014/, val2014/): `images/` or the root. A
    missing subfolder shows as each of its images missing."""
    first = str(entries[0].get("filepath", ""))
    return next((root / d for d in COCO_IMAGE_DIRS if (root / d / first).is_dir()), root)


def _decode(path: Path, problems: list[Problem]) -> str:
    """File text with a UTF-8 BOM dropped; bytes that are not UTF-8 are reported by line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if "\ufffd" in line:
                problems.append(Problem("encoding", str(path), n,
                                        f"bytes that are not UTF-8 (shown as \ufffd): {line[:80]!r}"))
        return text


def _text_lines(path: Path, problems: list[Problem]):
    # splitlines() accepts LF and CRLF alike.
    yield from enumerate(_decode(path, problems).splitlines(), 1)


def _safe_name(image: str, file: str, line: int | None, problems: list[Problem]) -> bool:
    """Image names must stay inside the image folder: no absolute paths, no '..'."""
    name = image.replace("\\", "/")  # (string tests: a Path per image costs seconds on COCO)
    if not image or name.startswith("/") or ".." in name.split("/") or (len(image) > 1 and image[1] == ":"):
        problems.append(Problem("bad_image_name", file, line,
                                f"image name {image!r} points outside the image folder", None))
        return False
    return True


MAX_CAPTION_WORDS = 200  # Flickr8k's longest caption has 38 words


def _add_caption(captions: dict[str, list[str]], image: str, caption: str, file: str,
                 line: int | None, problems: list[Problem], where: str = "") -> None:
    if image not in captions and not _safe_name(image, file, line, problems):  # a name is checked once
        return
    captions.setdefault(image, [])
    prefix = f"{where}: " if where else ""
    # Words are one character or more, with a character between: a caption this short has few
    # enough words, and only a longer one is tokenized to count them.
    words = len(tokenize(caption)) if len(caption) > 2 * MAX_CAPTION_WORDS else MAX_CAPTION_WORDS
    if not has_words(caption):
        problems.append(Problem("empty_caption", file, line, f"{prefix}caption of {image} has no words"))
    elif words > MAX_CAPTION_WORDS:
        problems.append(Problem("long_caption", file, line, f"{prefix}caption of {image} has {words} words "
                                f"(more than {MAX_CAPTION_WORDS}: lines run together?)"))
    else:
        captions[image].append(caption.strip())


def _read_split_file(path: Path, split: str, captions: dict, seen: dict[str, tuple[str, int]],
                     problems: list[Problem]) -> list[str]:
    names = []
    for line_no, line in _text_lines(path, problems):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            other, other_line = seen[name]
            problems.append(Problem("duplicate_entry", str(path), line_no,
                                    f"{name} already listed in the {other} split (line {other_line})"))
            continue
        seen[name] = (split, line_no)
        if name not in captions:
            problems.append(Problem("no_captions", str(path), line_no, f"{name} has no captions"))
            continue
        names.append(name)
    return names


def _check_images_exist(corpus: Corpus, file: Path, line_of: dict[str, int]) -> None:
    for image in [im for im, caps in corpus.captions.items() if not caps]:
        corpus.problems.append(Problem("no_captions", str(file), line_of.get(image),
                                       f"{image} has no usable caption", image))
    # One listing per folder (COCO's images lie in subfolders), not one stat per image.
    present: dict[str, os.DirEntry] = {}
    for folder in {im.rpartition("/")[0] or "." for im in corpus.captions}:
        try:
            with os.scandir(corpus.image_dir / folder) as listing:
                prefix = "" if folder == "." else folder + "/"
                present.update((prefix + e.name, e) for e in listing)
        except OSError:
            pass  # a missing folder: each of its images is reported below
    for image in corpus.captions:
        if image not in present and not corpus.image_path(image).is_file():
            corpus.problems.append(Problem("missing_image", str(file), line_of.get(image),
                                           f"{image} has captions but no file in {corpus.image_dir}", image))
    links = [corpus.image_dir / im for im, e in present.items() if im in corpus.captions and e.is_symlink()]
    _check_links(corpus, links, file, line_of)


def _check_links(corpus: Corpus, links: list[Path], file: Path, line_of: dict[str, int]) -> None:
    """Nothing outside the dataset is read: an image that is a link must lead inside the dataset
    folder or the image folder (either may itself be a link, to another disk, say)."""
    inside = (corpus.root.resolve(), corpus.image_dir.resolve())
    for link in links:
        target = link.resolve()
        if not any(target.is_relative_to(folder) for folder in inside):
            image = link.relative_to(corpus.image_dir).as_posix()
            corpus.problems.append(Problem("outside_dataset", str(file), line_of.get(image),
                                           f"{image} is a link to {target}, outside the dataset folder "
                                           f"{inside[0]}: copy the image in, or leave it out with --skip-bad",
                                           image))


def _report_unsplit(corpus: Corpus) -> None:
    unsplit = corpus.unsplit()
    missing = corpus.bad_images()
    for image in unsplit:
        if image not in missing:
            corpus.problems.append(Problem("no_split", str(corpus.caption_file), None,
                                           f"{image} is in no split file; it is not used", image,
                                           severity="warning"))
