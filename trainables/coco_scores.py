"""CIDEr-D and ROUGE-L as the COCO caption evaluation code computes them (pycocoevalcap 1.2), with
everything that depends on the references alone computed once per set of references.

A training run scores the same validation references every epoch. pycocoevalcap recomputes the
references' side on every call: CIDEr-D's document frequencies and each reference's tf-idf
vector, and for ROUGE-L a dynamic-programming table per caption and reference; at 1,000
validation images its two scorers took 0.56 s a pass (CIDEr-D 0.42 s, ROUGE-L 0.14 s), as long
as generating the captions. Here the references' side is kept, and the scores are the same floats:

- CIDEr-D uses pycocoevalcap's n-gram counting (`precook`) and document frequencies
  (`CiderScorer.cook_append`, `compute_doc_freq`, `document_frequency`), and repeats its
  `compute_cider` (whose `counts2vec` and `sim` are local functions that cannot be imported)
  expression for expression, each reference's vector kept.
- ROUGE-L takes the longest common subsequence's length by the bit-parallel algorithm (Allison
  and Dix 1986; Hyyrö 2004), each reference's bit masks kept, instead of pycocoevalcap's
  `my_lcs` table (an integer either way), then `Rouge.calc_score`'s F-measure with its `beta`.

`tests/test_metrics.py::test_coco_scores_equal_pycocoevalcap` breaks first if a pycocoevalcap
computes otherwise.
"""
from __future__ import annotations

import math

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook
from pycocoevalcap.rouge.rouge import Rouge

N, SIGMA = 4, 6.0  # n-grams up to 4, the length penalty's deviation: pycocoevalcap's Cider defaults
BETA = Rouge().beta  # ROUGE-L's recall weight, 1.2


class CiderD:
    """CIDEr-D of hypotheses against fixed references, image by image. Captions are strings of
    space-separated tokens, as pycocoevalcap takes them; `references[i]`: image i's references.
    Document frequencies come from these references, as pycocoevalcap takes them from the
    references of the corpus it scores.

    Kept per image: each reference's norms and length, and per order an index from n-gram (a
    number: a tuple is hashed again at every lookup, an int is not) to the references holding it
    with their weights. A hypothesis n-gram that a reference lacks adds exactly 0 to that cosine
    (pycocoevalcap adds min(w, 0) * 0), so only the pairs that match are visited, each cosine's
    terms still summed in pycocoevalcap's order."""

    def __init__(self, references: list[list[str]]):
        scorer = CiderScorer(n=N, sigma=SIGMA)
        for refs in references:
            scorer.cook_append(None, refs)
        scorer.compute_doc_freq()
        ref_len = np.log(float(len(scorer.crefs)))
        self._ids = {g: i for i, g in enumerate(scorer.document_frequency)}
        # each n-gram's idf factor as counts2vec computes it (for one no reference has, df counts as
        # 1), as a Python float: numpy scalars would make every product below ten times slower
        self._idf = [float(ref_len - np.log(max(1.0, df))) for df in scorer.document_frequency.values()]
        self._unseen = float(ref_len - np.log(1.0))
        self._images = [self._image(crefs) for crefs in scorer.crefs]

    def scores(self, hypotheses: list[str]) -> np.ndarray:
        """(images,) CIDEr-D of each hypothesis; their mean is pycocoevalcap's corpus score."""
        if len(hypotheses) != len(self._images):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(self._images)} reference lists")
        out = np.zeros(len(hypotheses))
        vectors: dict[str, tuple] = {}  # a model gives many images one caption: its vector depends on it alone
        for i, (hyp, (refs, index)) in enumerate(zip(hypotheses, self._images)):
            if hyp not in vectors:
                vectors[hyp] = self._vector(precook(hyp, N))
            vec, norm, length = vectors[hyp]
            dots = [[0.0] * N for _ in refs]  # per reference, per order: sum of min(w, w_ref) * w_ref
            for n in range(N):
                holders = index[n]
                for ngram_id, weight in vec[n]:
                    for r, ref_weight in holders.get(ngram_id, ()):
                        dots[r][n] += min(weight, ref_weight) * ref_weight
            score = [0.0] * N
            for val, (norm_ref, length_ref) in zip(dots, refs):  # pycocoevalcap's sim, then its sum
                delta = float(length - length_ref)
                penalty = np.e ** (-(delta ** 2) / (2 * SIGMA ** 2))
                for n in range(N):
                    if (norm[n] != 0) and (norm_ref[n] != 0):
                        val[n] /= (norm[n] * norm_ref[n])
                    assert not math.isnan(val[n])
                    val[n] *= penalty
                    score[n] += val[n]
            out[i] = np.mean(np.array(score)) / len(refs) * 10.0
        return out

    def _image(self, crefs: list[dict]) -> tuple[list[tuple], list[dict]]:
        """An image's references as kept: [(norms, length)] and, per order, {n-gram id: [(reference, weight)]}."""
        refs, index = [], [{} for _ in range(N)]
        for r, counts in enumerate(crefs):
            vec, norm, length = self._vector(counts)
            refs.append((norm, length))
            for n in range(N):
                for ngram_id, weight in vec[n]:
                    index[n].setdefault(ngram_id, []).append((r, weight))
        return refs, index

    def _vector(self, counts: dict) -> tuple[list[list], list, int]:
        """pycocoevalcap's counts2vec: per order, each n-gram's tf-idf weight (as (id, weight) in
        its order, the n-grams no reference has left out); the norms; the length."""
        ids, idf, unseen = self._ids, self._idf, self._unseen
        vec = [[] for _ in range(N)]
        length = 0
        norm = [0.0] * N
        for ngram, term_freq in counts.items():
            n = len(ngram) - 1
            ngram_id = ids.get(ngram)
            if ngram_id is None:
                weight = float(term_freq) * unseen
            else:
                weight = float(term_freq) * idf[ngram_id]
                vec[n].append((ngram_id, weight))
            norm[n] += weight * weight  # (pycocoevalcap: pow(w, 2) of a numpy float, a square)
            if n == 1:  # (sic: pycocoevalcap counts bigrams as the length)
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length


class RougeL:
    """ROUGE-L of hypotheses against fixed references, image by image (strings of space-separated
    tokens, split on single spaces as pycocoevalcap splits them)."""

    def __init__(self, references: list[list[str]]):
        self._refs = [[_masks(ref.split(" ")) for ref in refs] for refs in references]

    def scores(self, hypotheses: list[str]) -> np.ndarray:
        """(images,) ROUGE-L of each hypothesis; their mean is pycocoevalcap's corpus score."""
        if len(hypotheses) != len(self._refs):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(self._refs)} reference lists")
        out = np.zeros(len(hypotheses))
        for i, (hyp, refs) in enumerate(zip(hypotheses, self._refs)):
            tokens = hyp.split(" ")
            prec, rec = [], []
            for masks, size in refs:
                lcs = _lcs(masks, size, tokens)
                prec.append(lcs / float(len(tokens)))
                rec.append(lcs / float(size))
            prec_max, rec_max = max(prec), max(rec)
            if prec_max != 0 and rec_max != 0:
                out[i] = ((1 + BETA ** 2) * prec_max * rec_max) / float(rec_max + BETA ** 2 * prec_max)
        return out


def _masks(tokens: list[str]) -> tuple[dict[str, int], int]:
    """Per token, the bit mask of its positions in `tokens`; and their number."""
    masks: dict[str, int] = {}
    for position, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << position)
    return masks, len(tokens)


def _lcs(masks: dict[str, int], size: int, tokens: list[str]) -> int:
    """The length of the longest common subsequence of `tokens` and the sequence `masks` describes:
    a zero bit of v marks a position of it matched so far (bits above `size` are carries)."""
    v = (1 << size) - 1
    for token in tokens:
        u = v & masks.get(token, 0)
        v = (v + u) | (v - u)
    return size - (v & ((1 << size) - 1)).bit_count()
