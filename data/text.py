"""Caption text: the one tokenizer used for training targets and BLEU references."""
from __future__ import annotations

from nltk.tokenize import RegexpTokenizer

# Lower-cased alphanumeric runs, as Karpathy's split files store `tokens`: punctuation is dropped
# and "man's" becomes "man s". RegexpTokenizer needs no downloaded nltk data.
_WORDS = RegexpTokenizer(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Words of a caption as captioning papers score them: lower-case, no punctuation."""
    return _WORDS.tokenize(text.lower())
