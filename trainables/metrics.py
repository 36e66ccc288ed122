"""The captioning field's scores of generated captions against references, on captions tokenized
as for training: corpus BLEU-1..4 (nltk's n-gram counts), CIDEr-D and ROUGE-L (the COCO caption
evaluation code's computation, pycocoevalcap: captune.trainables.coco_scores), so that they equal
published numbers on the same tokens.

Every score is also kept image by image (`CaptionScorer.statistics`): what a corpus score adds up
over its images, so that a resampled or pooled corpus is scored by a sum (captune.search.bootstrap).
"""
from __future__ import annotations

import numpy as np
from nltk.translate.bleu_score import closest_ref_length, modified_precision

from captune.data.text import tokenize
from captune.trainables.coco_scores import CiderD, RougeL

MAX_N = 4
BLEU_COLUMNS = 2 * MAX_N + 2  # per caption: matches and n-grams per order, its length, the closest reference's
CIDER, ROUGE_L, IMAGES = BLEU_COLUMNS, BLEU_COLUMNS + 1, BLEU_COLUMNS + 2  # then per image: CIDEr-D, ROUGE-L, 1


def caption_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 (corpus), CIDEr-D and ROUGE-L (means over the images) of raw caption strings,
    `references[i]` holding every reference of image i."""
    return CaptionScorer(references).scores(hypotheses)


class CaptionScorer:
    """Scores captions of a fixed set of images: the references are tokenized, and CIDEr-D's and
    ROUGE-L's reference side computed, once (a training run scores the same validation images
    every epoch)."""

    def __init__(self, references: list[list[str]]):
        if not references:
            raise ValueError("scores of an empty corpus are undefined: no references given")
        if not all(references):
            raise ValueError(f"image {next(i for i, r in enumerate(references) if not r)} has no reference")
        self.references = [[tokenize(r) for r in refs] for refs in references]
        joined = [[" ".join(r) for r in refs] for refs in self.references]  # pycocoevalcap's form
        self._cider, self._rouge = CiderD(joined), RougeL(joined)

    def scores(self, hypotheses: list[str]) -> dict[str, float]:
        return corpus_scores(self.statistics(hypotheses))

    def statistics(self, hypotheses: list[str]) -> np.ndarray:
        """(images, IMAGES + 1) per hypothesis: its BLEU counts (as `bleu_statistics`), CIDEr-D,
        ROUGE-L and a 1 (how many captions a row adds up, once rows of replicates are summed)."""
        if len(hypotheses) != len(self.references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(self.references)} reference lists")
        tokens = [tokenize(h) for h in hypotheses]
        out = np.zeros((len(tokens), IMAGES + 1))
        out[:, :BLEU_COLUMNS] = [_bleu_row(h, rs) for h, rs in zip(tokens, self.references)]
        joined = [" ".join(h) for h in tokens]
        out[:, CIDER] = self._cider.scores(joined)
        out[:, ROUGE_L] = self._rouge.scores(joined)
        out[:, IMAGES] = 1
        return out


def corpus_scores(statistics: np.ndarray) -> dict[str, float]:
    """The corpus scores of `CaptionScorer.statistics` rows (images, or images of pooled runs)."""
    return {k: float(v) for k, v in scores_from_statistics(np.asarray(statistics).sum(axis=0)).items()}


def scores_from_statistics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Every score from summed `CaptionScorer.statistics` (..., IMAGES + 1): exactly the corpus
    scores of the summed rows (BLEU from their counts; CIDEr-D, ROUGE-L their means)."""
    totals = np.asarray(totals, dtype=np.float64)
    images = totals[..., IMAGES]
    return {**{f"bleu{n}": bleu_from_statistics(totals[..., :BLEU_COLUMNS], n) for n in range(1, MAX_N + 1)},
            "cider": totals[..., CIDER] / images, "rouge_l": totals[..., ROUGE_L] / images}


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


def bleu_statistics(hypotheses: list[str], references: list[list[str]]) -> np.ndarray:
    """Per caption, what corpus BLEU adds up over a corpus (nltk's own counts): clipped n-gram
    matches and n-gram totals for n = 1..4, the caption's length and its closest reference
    length. (N, BLEU_COLUMNS) integers; `bleu_from_statistics` of their column sums equals
    `bleu` of the corpus, so a resampled corpus is scored by a sum instead of a rescoring."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    rows = [_bleu_row(tokenize(h), [tokenize(r) for r in refs]) for h, refs in zip(hypotheses, references)]
    return np.array(rows, dtype=np.int64).reshape(len(rows), BLEU_COLUMNS)


def _bleu_row(hyp: list[str], refs: list[list[str]]) -> list[int]:
    row = [0] * BLEU_COLUMNS
    for n in range(1, MAX_N + 1):
        p = modified_precision(refs, hyp, n)  # an unnormalised Fraction: (matches, n-grams)
        row[n - 1], row[MAX_N + n - 1] = p.numerator, p.denominator
    row[-2], row[-1] = len(hyp), closest_ref_length(refs, len(hyp))
    return row


def bleu_from_statistics(totals: np.ndarray, n: int = 4) -> np.ndarray:
    """Cumulative BLEU-n from summed `bleu_statistics` (..., BLEU_COLUMNS), as nltk's corpus_bleu
    computes it without smoothing: 0 when any order up to n has no match."""
    totals = np.asarray(totals, dtype=np.float64)
    matches, grams = totals[..., :n], totals[..., MAX_N:MAX_N + n]
    hyp_len, ref_len = totals[..., -2], totals[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(matches > 0, np.log(np.where(matches > 0, matches, 1) / np.where(grams > 0, grams, 1)), 0.0)
        brevity = np.where(hyp_len > ref_len, 1.0,
                           np.where(hyp_len > 0, np.exp(1 - ref_len / np.where(hyp_len > 0, hyp_len, 1)), 0.0))
    score = brevity * np.exp(log_p.mean(axis=-1))
    return np.where((matches > 0).all(axis=-1), score, 0.0)
