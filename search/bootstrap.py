"""Paired bootstrap over test images: is one captioner's corpus BLEU-4 (or CIDEr-D) really higher
than another's?

Both systems caption the same images. Each resample draws the images with replacement (seeded),
and both corpus scores are recomputed on that same draw; the spread of their difference over the
resamples gives a 95 % interval (percentiles), and the share of draws each one wins. Scores come
from per-image statistics (captune.trainables.metrics.CaptionScorer.statistics) summed over the drawn
images: for BLEU nltk's n-gram counts, exactly corpus BLEU on that draw; for CIDEr-D the images'
scores, whose mean is the corpus score (its document frequencies stay those of the whole test
set: a draw holds the same images, some twice). Several runs of one system (seed replicates)
are pooled by adding their statistics image by image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import math

import numpy as np

from captune.infra.errors import UserError
from captune.trainables.catalog import SCORE_LABELS
from captune.trainables.metrics import scores_from_statistics

RESAMPLES, LEVEL = 1000, 0.95
BEYOND_EACH_END = 5  # resamples that must fall outside each end of the interval for it to mean anything


class TooFewResamples(UserError, ValueError):
    """Fewer resamples than the interval asked for can be read from."""


def min_resamples(level: float = LEVEL) -> int:
    """The fewest resamples whose `level` interval has BEYOND_EACH_END of them beyond each end
    (200 for 95 %): with fewer, an end is the most extreme draw or two, and the estimate itself
    may lie outside its own interval."""
    return math.ceil(BEYOND_EACH_END / ((1 - level) / 2) - 1e-9)


def require_resamples(resamples: int, level: float = LEVEL) -> None:
    least = min_resamples(level)
    if resamples < least:
        raise TooFewResamples(f"--resamples {resamples}: a {level:.0%} bootstrap interval needs at least {least:,} "
                              f"resamples (at least {BEYOND_EACH_END} beyond each end of it); the default is "
                              f"{RESAMPLES:,}")


@dataclass
class PairedBootstrap:
    a: str
    b: str
    images: int
    resamples: int
    seed: int
    metric: str  # a captune.trainables.metrics score: "bleu4", "cider"
    score_a: float
    score_b: float
    difference: float  # score_a - score_b on all the images
    low: float  # the LEVEL interval of the difference
    high: float
    a_wins: float  # share of resamples in which a scores higher
    b_wins: float
    level: float = LEVEL

    @property
    def clear(self) -> bool:
        """The interval leaves out 0: one of the two is better on this test set."""
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        label = SCORE_LABELS[self.metric]
        if not self.clear:
            return (f"no clear difference between {self.a} and {self.b} on {self.images:,} test images "
                    f"({self.level:.0%} interval of {self.a} - {self.b} {label} [{self.low:+.4f}, {self.high:+.4f}] "
                    f"contains 0)")
        a_better = self.difference > 0
        better, worse = (self.a, self.b) if a_better else (self.b, self.a)
        low, high = (self.low, self.high) if a_better else (-self.high, -self.low)
        wins = self.a_wins if a_better else self.b_wins
        return (f"{better} beats {worse} by {abs(self.difference):.4f} {label} on {self.images:,} test images "
                f"({self.level:.0%} interval [{low:+.4f}, {high:+.4f}]; wins {wins:.1%} of {self.resamples:,} "
                f"resamples)")

    def to_dict(self) -> dict:
        return {**asdict(self), "clear": self.clear, "verdict": self.verdict()}


def paired_bootstrap(stats_a: np.ndarray, stats_b: np.ndarray, names: tuple[str, str] = ("a", "b"),
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                     metric: str = "bleu4") -> PairedBootstrap:
    """stats_*: (images, columns) CaptionScorer.statistics of each system's captions of the same
    images, in the same order (for replicates, their statistics added image by image); `metric`:
    the score compared."""
    stats_a, stats_b = np.asarray(stats_a), np.asarray(stats_b)
    if stats_a.shape != stats_b.shape or not len(stats_a):
        raise ValueError(f"paired bootstrap needs both systems' statistics on the same images, got "
                         f"{stats_a.shape} and {stats_b.shape}")
    require_resamples(resamples, level)
    n = len(stats_a)
    rng = np.random.default_rng(seed)
    draws = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])  # (R, n)
    score_a = scores_from_statistics(draws @ stats_a)[metric]  # (R,)
    score_b = scores_from_statistics(draws @ stats_b)[metric]
    diff = score_a - score_b
    tail = (1 - level) / 2
    low, high = np.quantile(diff, [tail, 1 - tail])
    full_a = float(scores_from_statistics(stats_a.sum(0))[metric])
    full_b = float(scores_from_statistics(stats_b.sum(0))[metric])
    return PairedBootstrap(names[0], names[1], n, resamples, seed, metric, full_a, full_b, full_a - full_b,
                           float(low), float(high), float((diff > 0).mean()), float((diff < 0).mean()), level)
