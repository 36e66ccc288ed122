"""The paired bootstrap of `captune compare`, at Flickr8k's test-split size: its cost, and the
cost of the same resamples scored by nltk's corpus_bleu one by one.

    python benchmarks/bootstrap.py [--resamples 1000] [--flickr ../shared/data/flickr8k]

The real Flickr8k captions when the folder is there (caption #0 of each test image as one
system's caption, #1 as the other's, the remaining four as references), else the built-in
dataset's. Prints the time to count the n-grams once, the bootstrap's time, nltk's time per
rescored resample, and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from nltk.translate.bleu_score import corpus_bleu

from captune.data.layouts import load_corpus
from captune.data.text import tokenize
from captune.search.bootstrap import paired_bootstrap
from captune.trainables.metrics import CaptionScorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def test_captions(flickr: Path) -> tuple[str, list[list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        if flickr.is_dir():  # the original layout, without its images (the reader only lists them)
            (Path(tmp) / "Flickr8k_text").symlink_to(flickr.resolve())
            (Path(tmp) / "Flicker8k_Dataset").mkdir()
            corpus, where = load_corpus(tmp), f"Flickr8k ({flickr})"
        else:
            from captune.data.synth import write_synthetic

            corpus, where = load_corpus(write_synthetic(Path(tmp) / "synth", images=3000)), "the built-in dataset"
        return where, [corpus.captions[name] for name in corpus.splits["test"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--flickr", type=Path, default=SHARED)
    args = parser.parse_args()
    where, captions = test_captions(args.flickr)
    a, b, refs = [c[0] for c in captions], [c[1] for c in captions], [c[2:] for c in captions]
    t0 = time.perf_counter()
    scorer = CaptionScorer(refs)
    stats_a, stats_b = scorer.statistics(a), scorer.statistics(b)
    t1 = time.perf_counter()
    result = paired_bootstrap(stats_a, stats_b, ("caption #0", "caption #1"), resamples=args.resamples)
    t2 = time.perf_counter()
    cider = paired_bootstrap(stats_a, stats_b, ("caption #0", "caption #1"), resamples=args.resamples, metric="cider")
    # the same resamples, each scored by nltk's corpus_bleu for both systems (timed on 20)
    rng = np.random.default_rng(0)
    tok_a, tok_b, tok_r = [tokenize(h) for h in a], [tokenize(h) for h in b], [[tokenize(r) for r in rs] for rs in refs]
    t3 = time.perf_counter()
    for _ in range(20):
        idx = rng.integers(0, len(a), len(a))
        corpus_bleu([tok_r[i] for i in idx], [tok_a[i] for i in idx])
        corpus_bleu([tok_r[i] for i in idx], [tok_b[i] for i in idx])
    per_resample = (time.perf_counter() - t3) / 20
    print(f"{where}: {len(a):,} test images, {args.resamples:,} resamples")
    print(f"per-image statistics of both systems (BLEU counts, CIDEr-D, ROUGE-L), once: {t1 - t0:.2f} s; "
          f"BLEU-4 bootstrap on them: {t2 - t1:.3f} s")
    print(f"nltk corpus_bleu of both systems per resample: {per_resample * 1000:.0f} ms "
          f"({per_resample * args.resamples:.0f} s for {args.resamples:,})")
    print(result.verdict())
    print(cider.verdict())
    print(f"bootstrap_speedup: {per_resample * args.resamples / (t2 - t0):.0f} x")


if __name__ == "__main__":
    main()
