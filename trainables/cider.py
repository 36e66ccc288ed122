"""CIDEr-D as the COCO caption evaluation code computes it (pycocoevalcap 1.2), with the
reference side computed once per set of references.

pycocoevalcap's `CiderScorer` recomputes the document frequencies and every reference's tf-idf
vector on each call; a training run scores the same validation references every epoch, which
made CIDEr-D alone cost as much as the captioning (0.4 s at 1,000 images). This module keeps the
reference side. It leans on pycocoevalcap in one place, here: its n-gram counting (`precook`)
and document frequencies (`CiderScorer.cook_append`, `compute_doc_freq`, `document_frequency`),
and it repeats `CiderScorer.compute_cider`, whose `counts2vec` and `sim` are local functions that
cannot be imported, expression for expression, so that the scores are the same floats.
`tests/test_metrics.py::test_cider_equals_pycocoevalcap` breaks first if a pycocoevalcap computes
otherwise.
"""
from __future__ import annotations

import math

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook

N, SIGMA = 4, 6.0  # n-grams up to 4, the length penalty's deviation: pycocoevalcap's Cider defaults


class CiderD:
    """CIDEr-D of hypotheses against fixed references, image by image. Captions are strings of
    space-separated tokens, as pycocoevalcap takes them; `references[i]`: image i's references.
    Document frequencies come from these references, as pycocoevalcap takes them from the
    references of the corpus it scores."""

    def __init__(self, references: list[list[str]]):
        scorer = CiderScorer(n=N, sigma=SIGMA)
        for refs in references:
            scorer.cook_append(None, refs)
        scorer.compute_doc_freq()
        self._df = dict(scorer.document_frequency)
        self._ref_len = np.log(float(len(scorer.crefs)))
        self._refs = [[self._vector(ref) for ref in refs] for refs in scorer.crefs]

    def __len__(self) -> int:
        return len(self._refs)

    def scores(self, hypotheses: list[str]) -> np.ndarray:
        """(images,) CIDEr-D of each hypothesis; their mean is pycocoevalcap's corpus score."""
        if len(hypotheses) != len(self._refs):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(self._refs)} reference lists")
        out = np.zeros(len(hypotheses))
        for i, (hyp, refs) in enumerate(zip(hypotheses, self._refs)):
            vec, norm, length = self._vector(precook(hyp, N))
            score = np.array([0.0 for _ in range(N)])
            for vec_ref, norm_ref, length_ref in refs:
                score += self._similarity(vec, vec_ref, norm, norm_ref, length, length_ref)
            out[i] = np.mean(score) / len(refs) * 10.0
        return out

    def _vector(self, counts: dict) -> tuple[list[dict], list, int]:
        """pycocoevalcap's counts2vec: per order, each n-gram's tf-idf weight; the norms; the length."""
        vec = [{} for _ in range(N)]
        length = 0
        norm = [0.0 for _ in range(N)]
        for ngram, term_freq in counts.items():
            df = np.log(max(1.0, self._df.get(ngram, 0.0)))  # an n-gram no reference has counts once
            n = len(ngram) - 1
            vec[n][ngram] = float(term_freq) * (self._ref_len - df)
            norm[n] += pow(vec[n][ngram], 2)
            if n == 1:  # (sic: pycocoevalcap counts bigrams as the length)
                length += term_freq
        return vec, [np.sqrt(x) for x in norm], length

    @staticmethod
    def _similarity(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref) -> np.ndarray:
        """pycocoevalcap's sim: per order, the clipped cosine with the Gaussian length penalty (in
        Python floats, the same IEEE operations as its numpy elements, a tenth of the time)."""
        delta = float(length_hyp - length_ref)
        penalty = np.e ** (-(delta ** 2) / (2 * SIGMA ** 2))
        val = [0.0] * N
        for n in range(N):
            ref_n = vec_ref[n]
            for ngram, weight in vec_hyp[n].items():
                ref = ref_n.get(ngram, 0.0)
                val[n] += min(weight, ref) * ref
            if (norm_hyp[n] != 0) and (norm_ref[n] != 0):
                val[n] /= (norm_hyp[n] * norm_ref[n])
            assert not math.isnan(val[n])
            val[n] *= penalty
        return np.array(val)
