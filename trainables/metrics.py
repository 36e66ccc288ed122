"""Corpus BLEU-1..4 from nltk's n-gram counts, on captions tokenized as for training."""
from __future__ import annotations

import numpy as np
from nltk.translate.bleu_score import closest_ref_length, modified_precision

from data.text import tokenize


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 of raw caption strings against all references of each image:
    nltk's corpus_bleu without smoothing, except that an order with no match at all gives exactly
    0 (nltk gives 1e-78 or so: the log of its smallest float)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus is undefined: no hypotheses given")
    totals = bleu_statistics(hypotheses, references).sum(axis=0)
    return {f"bleu{n}": float(bleu_from_statistics(totals, n)) for n in range(1, 5)}


def bleu_statistics(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> np.ndarray:
    """Per caption, what corpus BLEU adds up over a corpus (nltk's own counts): clipped n-gram
    matches and n-gram totals for n = 1..max_n, the caption's length and its closest reference
    length. (N, 2 * max_n + 2) integers; `bleu_from_statistics` of their column sums equals
    `bleu` of the corpus, so a resampled corpus is scored by a sum instead of a rescoring."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    out = np.zeros((len(hypotheses), 2 * max_n + 2), dtype=np.int64)
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        h, rs = tokenize(hyp), [tokenize(r) for r in refs]
        for n in range(1, max_n + 1):
            p = modified_precision(rs, h, n)  # an unnormalised Fraction: (matches, n-grams)
            out[i, n - 1], out[i, max_n + n - 1] = p.numerator, p.denominator
        out[i, -2], out[i, -1] = len(h), closest_ref_length(rs, len(h))
    return out


def bleu_from_statistics(totals: np.ndarray, n: int = 4) -> np.ndarray:
    """Cumulative BLEU-n from summed `bleu_statistics` (..., 2 * max_n + 2), as nltk's corpus_bleu
    computes it without smoothing: 0 when any order up to n has no match."""
    totals = np.asarray(totals, dtype=np.float64)
    max_n = (totals.shape[-1] - 2) // 2
    matches, grams = totals[..., :n], totals[..., max_n:max_n + n]
    hyp_len, ref_len = totals[..., -2], totals[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(matches > 0, np.log(np.where(matches > 0, matches, 1) / np.where(grams > 0, grams, 1)), 0.0)
        brevity = np.where(hyp_len > ref_len, 1.0,
                           np.where(hyp_len > 0, np.exp(1 - ref_len / np.where(hyp_len > 0, hyp_len, 1)), 0.0))
    score = brevity * np.exp(log_p.mean(axis=-1))
    return np.where((matches > 0).all(axis=-1), score, 0.0)
