"""`captune data check`: what a dataset folder holds and everything wrong with it."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from captune.data.corpus import SPLITS, Problem
from captune.data.images import read_images
from captune.data.layouts import load_corpus
from captune.data.text import word_counts
from captune.data.vocab import Vocabulary

THRESHOLDS = (1, 3, 5, 10)
CHECK_SIZE = 32  # decode size for the integrity check: every byte is read, little is resized


def check_dataset(root: str | Path, seed: int = 0, decode_images: bool = True, progress: bool = False) -> dict:
    """A JSON-able report: layout, counts, split sizes, vocabulary sizes and all problems."""
    corpus = load_corpus(root, seed=seed)
    problems = list(corpus.problems)
    if decode_images:
        missing = {p.image for p in problems if p.kind in ("missing_image", "outside_dataset")}  # not read
        names = sorted(im for im in corpus.captions if im not in missing)
        bar = tqdm(total=len(names), desc="decoding images", unit="img", leave=False,
                   disable=None if progress else True)  # None: shown on a terminal only, not in logs
        with bar:
            _, errors = read_images([corpus.image_path(n) for n in names], CHECK_SIZE, progress=bar)
        problems += [Problem("corrupt_image", str(corpus.image_path(names[i])), None, msg, names[i])
                     for i, msg in sorted(errors.items())]
    counts = word_counts(c for im in corpus.splits["train"] for c in corpus.captions[im])
    vocab = {}
    for t in THRESHOLDS:
        try:
            vocab[str(t)] = len(Vocabulary.from_counts(counts, t))
        except ValueError:
            vocab[str(t)] = 0
    return {
        "root": str(corpus.root),
        "layout": corpus.layout,
        "caption_file": str(corpus.caption_file),
        "image_dir": str(corpus.image_dir),
        "images": len(corpus.captions),
        "captions": corpus.num_captions(),
        "splits": {s: len(corpus.splits[s]) for s in SPLITS},
        "unsplit_images": sum(p.kind == "no_split" for p in problems),  # existing images only
        "vocab_size": vocab,
        "problems": [p.to_dict() for p in problems],
    }


def format_report(report: dict) -> str:
    s = report["splits"]
    lines = [
        f"dataset   {report['root']}",
        f"layout    {report['layout']}  (captions: {report['caption_file']})",
        f"images    {report['images']:,} with captions, {report['captions']:,} captions",
        f"splits    train {s['train']:,} / val {s['val']:,} / test {s['test']:,} images"
        + (f", {report['unsplit_images']:,} in no split" if report["unsplit_images"] else ""),
        "vocab     " + ", ".join(f"{n:,} words at threshold {t}" for t, n in report["vocab_size"].items()),
    ]
    problems = report["problems"]
    if not problems:
        lines.append("problems  none")
        return "\n".join(lines)
    by_kind: dict[str, int] = {}
    for p in problems:
        by_kind[p["kind"]] = by_kind.get(p["kind"], 0) + 1
    lines.append(f"problems  {len(problems):,}: " + ", ".join(f"{n:,} {k}" for k, n in sorted(by_kind.items())))
    for p in problems:
        where = f"{p['file']}:{p['line']}" if p["line"] is not None else p["file"]
        lines.append(f"  [{p['severity']}] {where}: {p['kind']}: {p['detail']}")
    return "\n".join(lines)
