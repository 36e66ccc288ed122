"""Corpus BLEU-1..4 with nltk, on captions tokenized as for training."""
from __future__ import annotations

import warnings

from nltk.translate.bleu_score import corpus_bleu

from data.text import tokenize

_CUMULATIVE = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 of raw caption strings against all references of each image."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus is undefined: no hypotheses given")
    refs = [[tokenize(r) for r in refs] for refs in references]
    hyps = [tokenize(h) for h in hypotheses]
    with warnings.catch_warnings():
        # nltk warns when an n-gram order has no match; the score is then 0, which is what we report.
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=_CUMULATIVE)
    return {f"bleu{n}": float(s) for n, s in enumerate(scores, 1)}
