import pytest
from nltk.translate.bleu_score import corpus_bleu

from trainables.metrics import bleu


def test_bleu_matches_nltk_on_known_inputs():
    hyps = ["A dog runs on the grass .", "two men sit on a bench"]
    refs = [["a dog is running on the grass", "a brown dog runs on grass"],
            ["two men are sitting on a bench", "men sit on a park bench", "two people sit"]]
    scores = bleu(hyps, refs)
    tok_h = [["a", "dog", "runs", "on", "the", "grass"], ["two", "men", "sit", "on", "a", "bench"]]
    tok_r = [[["a", "dog", "is", "running", "on", "the", "grass"], ["a", "brown", "dog", "runs", "on", "grass"]],
             [["two", "men", "are", "sitting", "on", "a", "bench"], ["men", "sit", "on", "a", "park", "bench"],
              ["two", "people", "sit"]]]
    for n, w in enumerate([(1,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4], 1):
        assert scores[f"bleu{n}"] == pytest.approx(corpus_bleu(tok_r, tok_h, weights=w))
    assert 0 < scores["bleu4"] < scores["bleu1"] <= 1


def test_bleu_perfect_and_disjoint():
    assert bleu(["a red circle on the left"], [["a red circle on the left"]])["bleu4"] == pytest.approx(1.0)
    assert bleu(["x y z w"], [["a b c d"]]) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}


def test_bleu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])


def test_bleu_is_exactly_zero_without_a_four_gram_match():
    # nltk's corpus_bleu returns ~1e-78 here (the log of its smallest float); a score is 0 or it is not
    scores = bleu(["a dog runs fast"], [["a dog sits still"]])
    assert scores["bleu4"] == 0.0 and scores["bleu2"] > 0


def test_statistics_sum_to_corpus_bleu():
    import random

    import numpy as np

    from trainables.metrics import bleu_from_statistics, bleu_statistics

    rng = random.Random(1)
    words = "a dog cat runs red big small blue the on in".split()
    refs = [[" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(5)] for _ in range(200)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(200)]
    tok_r = [[r.split() for r in rs] for rs in refs]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (200, 10)
    for n, w in enumerate([(1,), (0.5, 0.5), (1 / 3,) * 3], 1):  # BLEU-4 is 0 here, by nltk ~0
        expected = corpus_bleu(tok_r, [h.split() for h in hyps], weights=w)
        assert float(bleu_from_statistics(stats.sum(0), n)) == pytest.approx(expected, rel=1e-12)
    # a resample is the weighted sum of the same rows
    idx = np.random.default_rng(0).integers(0, 200, 200)
    resampled = bleu([hyps[i] for i in idx], [refs[i] for i in idx])
    weights = np.bincount(idx, minlength=200)
    assert float(bleu_from_statistics(weights @ stats, 2)) == pytest.approx(resampled["bleu2"], rel=1e-12)
