import pytest
from nltk.translate.bleu_score import corpus_bleu

from captune.trainables.metrics import bleu


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

    from captune.trainables.metrics import bleu_from_statistics, bleu_statistics

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


def _coco_scores(hyps: list[str], refs: list[list[str]]) -> tuple[float, float, list, list]:
    """pycocoevalcap's own CIDEr-D and ROUGE-L, run directly on the project's tokens."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from captune.data.text import tokenize

    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hyps)}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    return cider, rouge, list(cider_each), list(rouge_each)


KNOWN_HYPS = ["A dog runs on the grass .", "two men sit on a bench", "a child in a pink dress",
              "a man rides a bike on a dirt path", ""]
KNOWN_REFS = [["a dog is running on the grass", "a brown dog runs on grass", "A dog plays outside ."],
              ["two men are sitting on a bench", "men sit on a park bench", "two people sit"],
              ["a little girl in a pink dress climbs stairs", "a girl in pink", "a child goes up the stairs"],
              ["a cyclist rides along a dirt trail", "a man on a mountain bike", "someone bikes on a path"],
              ["a black dog and a white dog", "two dogs play", "dogs in the snow"]]


def test_cider_and_rouge_equal_pycocoevalcap_on_known_inputs():
    from captune.trainables.metrics import CaptionScorer, caption_scores

    cider, rouge, cider_each, rouge_each = _coco_scores(KNOWN_HYPS, KNOWN_REFS)
    scores = caption_scores(KNOWN_HYPS, KNOWN_REFS)
    assert scores["cider"] == cider and scores["rouge_l"] == rouge  # the same floats, not approximately
    assert scores["cider"] > 0.5 and 0 < scores["rouge_l"] < 1
    stats = CaptionScorer(KNOWN_REFS).statistics(KNOWN_HYPS)
    assert list(stats[:, -3]) == cider_each and list(stats[:, -2]) == rouge_each
    assert stats[4, -3] == 0 and stats[4, -2] == 0  # an empty caption scores 0, as pycocoevalcap scores it
    assert {k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == bleu(KNOWN_HYPS, KNOWN_REFS)


def test_coco_scores_equal_pycocoevalcap():
    """captune.trainables.coco_scores keeps the references' side of pycocoevalcap's CIDEr-D and ROUGE-L: the
    same floats on a random corpus, and the kept side scores a second set of hypotheses as well."""
    import random

    from captune.trainables.metrics import CaptionScorer

    rng = random.Random(3)
    words = "a dog cat runs red big small blue the on in grass water man woman child ball".split()
    refs = [[" ".join(rng.choices(words, k=rng.randint(3, 12 if i % 10 else 70))) for _ in range(rng.randint(1, 5))]
            for i in range(300)]  # (every tenth image's captions longer than a machine word of bits)
    scorer = CaptionScorer(refs)
    for _ in range(2):
        hyps = [" ".join(rng.choices(words, k=rng.randint(0, 12 if i % 7 else 80))) for i in range(300)]
        cider, rouge, cider_each, rouge_each = _coco_scores(hyps, refs)
        stats = scorer.statistics(hyps)
        assert list(stats[:, -3]) == cider_each and list(stats[:, -2]) == rouge_each
        assert scorer.scores(hyps)["cider"] == pytest.approx(cider, rel=1e-15)  # (a sum, then a division)


def test_hand_computable_scores():
    from captune.trainables.metrics import caption_scores

    same = caption_scores(["a dog runs on the grass", "two cats sleep on a red sofa"],
                          [["a dog runs on the grass"] * 2, ["two cats sleep on a red sofa"] * 2])
    # identical: every BLEU 1, ROUGE-L 1, CIDEr-D 10 (cosine 1 per order, times 10, no length penalty)
    assert same == pytest.approx({"bleu1": 1, "bleu2": 1, "bleu3": 1, "bleu4": 1, "cider": 10, "rouge_l": 1})
    disjoint = caption_scores(["x y z w"], [["a b c d", "e f g h"]])
    assert disjoint == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "cider": 0.0, "rouge_l": 0.0}
    # ROUGE-L by hand: LCS 3 of a 4-word caption and a 6-word reference; P 3/4, R 3/6, beta 1.2
    p, r, b = 3 / 4, 3 / 6, 1.2
    assert caption_scores(["a dog runs fast"], [["a big dog runs on grass"]])["rouge_l"] == pytest.approx(
        (1 + b ** 2) * p * r / (r + b ** 2 * p))


def test_statistics_resample_and_pool_like_corpora():
    import numpy as np

    from captune.trainables.metrics import CaptionScorer, caption_scores, scores_from_statistics

    scorer = CaptionScorer(KNOWN_REFS)
    stats = scorer.statistics(KNOWN_HYPS)
    idx = np.array([0, 0, 1, 3, 3])
    weights = np.bincount(idx, minlength=len(KNOWN_HYPS))
    resampled = scores_from_statistics(weights @ stats)
    # BLEU and ROUGE-L of a resample are its corpus scores; CIDEr-D keeps the full set's document
    # frequencies (a resample's images are the same images, drawn again)
    direct = caption_scores([KNOWN_HYPS[i] for i in idx], [KNOWN_REFS[i] for i in idx])
    for k in ("bleu1", "bleu4", "rouge_l"):
        assert float(resampled[k]) == pytest.approx(direct[k], rel=1e-12)
    assert float(resampled["cider"]) == pytest.approx(stats[idx, -3].mean(), rel=1e-12)
    pooled = scores_from_statistics(stats.sum(0) + stats.sum(0))  # two replicates with the same captions
    assert {k: float(v) for k, v in pooled.items()} == pytest.approx(scorer.scores(KNOWN_HYPS), rel=1e-12)


def test_caption_scores_reject_bad_inputs():
    from captune.trainables.metrics import caption_scores

    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="empty corpus"):
        caption_scores([], [])


@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_scores_on_real_flickr8k_equal_pycocoevalcap():
    """The real Flickr8k test split (caption #0 of each image against its other four), where the
    shared data is present: every score equals the COCO evaluation code's."""
    from pathlib import Path

    from captune.trainables.metrics import CaptionScorer, caption_scores

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
    if not (folder / "Flickr8k.token.txt").exists():
        pytest.skip(f"no real Flickr8k caption files at {folder}")
    test = set((folder / "Flickr_8k.testImages.txt").read_text().split())
    captions: dict[str, list[str]] = {}
    for line in (folder / "Flickr8k.token.txt").read_text().splitlines():
        key, caption = line.split("\t", 1)
        if key.split("#")[0] in test:
            captions.setdefault(key.split("#")[0], []).append(caption)
    hyps = [c[0] for c in captions.values()]
    refs = [c[1:] for c in captions.values()]
    cider, rouge, cider_each, rouge_each = _coco_scores(hyps, refs)
    scores = caption_scores(hyps, refs)
    assert scores["cider"] == pytest.approx(cider, rel=1e-15) and scores["rouge_l"] == pytest.approx(rouge, rel=1e-15)
    stats = CaptionScorer(refs).statistics(hyps)
    assert list(stats[:, -3]) == cider_each and list(stats[:, -2]) == rouge_each  # image by image, the same floats
    print(f"real Flickr8k test split, caption #0 vs the others: {scores}")
