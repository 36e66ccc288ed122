"""Caption text: the one tokenizer used for training targets and for scoring (BLEU, CIDEr-D, ROUGE-L)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import islice

from nltk.tokenize import RegexpTokenizer

# Lower-cased alphanumeric runs, as Karpathy's split files store `tokens`: punctuation is dropped
# and "man's" becomes "man s". RegexpTokenizer needs no downloaded nltk data.
WORD = r"[a-z0-9]+"
_WORDS = RegexpTokenizer(WORD)
_WORD_RE = re.compile(WORD)  # the same pattern, for checking and counting 600k captions at once


def tokenize(text: str) -> list[str]:
    """Words of a caption as captioning papers score them: lower-case, no punctuation."""
    return _WORDS.tokenize(text.lower())


def has_words(text: str) -> bool:
    """Whether `tokenize` finds any word (nltk's tokenize costs 15 us a caption here)."""
    return _WORD_RE.search(text.lower()) is not None


def word_counts(captions: Iterable[str]) -> Counter:
    """How often each word occurs in the captions, as `tokenize` splits them (a test holds the two
    equal): the pattern run over 10,000 captions at a time, joined by a space (no word spans it)."""
    counts: Counter = Counter()
    captions = iter(captions)
    while chunk := list(islice(captions, 10_000)):
        counts.update(_WORD_RE.findall(" ".join(chunk).lower()))
    return counts
