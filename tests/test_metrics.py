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
