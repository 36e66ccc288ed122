"""The paired bootstrap of `captune compare`, on captions whose difference is known."""
import random

import numpy as np
import pytest

from captune.search.bootstrap import paired_bootstrap
from captune.trainables.metrics import CaptionScorer, bleu, caption_scores

WORDS = "a one two three red blue green small large circle square triangle on the left right middle".split()


def corpus(n: int, seed: int = 0):
    """n images, each with five references drawn from one scene description."""
    rng = random.Random(seed)
    refs = []
    for _ in range(n):
        scene = rng.sample(WORDS, 8)
        refs.append([" ".join(rng.sample(scene, 6)) for _ in range(5)])
    return refs


def statistics(hyps: list[str], refs: list[list[str]]) -> np.ndarray:
    return CaptionScorer(refs).statistics(hyps)


def test_identical_predictions_give_no_clear_difference():
    refs = corpus(300)
    hyps = [r[0] for r in refs]
    stats = statistics(hyps, refs)
    result = paired_bootstrap(stats, stats.copy(), ("cnn-lstm", "resnet-gru"))
    assert result.difference == 0 and result.low <= 0 <= result.high and not result.clear
    assert result.verdict().startswith("no clear difference between cnn-lstm and resnet-gru")
    assert result.a_wins == result.b_wins == 0  # every resample a tie
    assert result.score_a == pytest.approx(bleu(hyps, refs)["bleu4"])


def test_a_planted_difference_is_detected():
    refs = corpus(300)
    good = [r[0] for r in refs]  # a reference itself: high overlap with the other four
    rng = random.Random(1)
    bad = [" ".join(rng.sample(WORDS, 6)) if i % 2 else r[0] for i, r in enumerate(refs)]  # half the images wrong
    stats_bad, stats_good = statistics(bad, refs), statistics(good, refs)
    for metric, label in (("bleu4", "BLEU-4"), ("cider", "CIDEr-D")):
        result = paired_bootstrap(stats_bad, stats_good, ("a", "b"), resamples=1000, metric=metric)
        assert result.difference < 0 and result.high < 0 and result.clear
        assert result.b_wins > 0.99
        assert result.verdict().startswith(f"b beats a by {-result.difference:.4f} {label} on 300 test images")
        assert f"interval [{-result.high:+.4f}, {-result.low:+.4f}]" in result.verdict()  # the winner's gain, > 0
        assert result.score_b == pytest.approx(caption_scores(good, refs)[metric], rel=1e-12)


def test_a_fixed_seed_gives_the_same_interval_and_another_seed_another():
    refs = corpus(200)
    rng = random.Random(2)
    a = statistics([r[0] for r in refs], refs)
    b = statistics([r[1] if rng.random() < 0.5 else " ".join(rng.sample(WORDS, 5)) for r in refs], refs)
    first, again = paired_bootstrap(a, b, seed=7), paired_bootstrap(a, b, seed=7)
    assert (first.low, first.high, first.a_wins) == (again.low, again.high, again.a_wins)
    other = paired_bootstrap(a, b, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    assert first.resamples == 1000 and first.images == 200


def test_pooled_replicates_add_counts_image_by_image():
    refs = corpus(50)
    scorer = CaptionScorer(refs)
    runs = [scorer.statistics([r[k] for r in refs]) for k in (0, 1)]
    pooled = np.sum(runs, axis=0)
    result = paired_bootstrap(pooled, pooled, resamples=200)
    hyps = [r[0] for r in refs] + [r[1] for r in refs]
    assert result.score_a == pytest.approx(bleu(hyps, refs + refs)["bleu4"])
    # CIDEr-D of pooled replicates: the mean over every caption of every replicate
    cider = paired_bootstrap(pooled, pooled, resamples=200, metric="cider")
    assert cider.score_a == pytest.approx(np.mean([run[:, -3] for run in runs]), rel=1e-12)


def test_mismatched_systems_are_refused():
    refs = corpus(10)
    stats = statistics([r[0] for r in refs], refs)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(stats, stats[:5])
