"""Word vocabulary with a minimum-count threshold, built from the training split only."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


@dataclass
class Vocabulary:
    words: list[str]  # index -> word; the first four are SPECIALS
    min_count: int = 1
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, tokenized: Iterable[list[str]], min_count: int) -> "Vocabulary":
        return cls.from_counts(Counter(w for tokens in tokenized for w in tokens), min_count)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int) -> "Vocabulary":
        """The words counted at least `min_count` times (several thresholds, one count)."""
        if min_count < 1:
            raise ValueError(f"vocab_threshold must be >= 1, got {min_count}")
        # Most frequent first, ties alphabetical, so the same data always gives the same ids.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            top = counts.most_common(1)
            most = f" (the most frequent word occurs {top[0][1]} times)" if top else ""
            raise ValueError(f"vocab_threshold={min_count} leaves no words in the vocabulary{most}")
        return cls(list(SPECIALS) + kept, min_count)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def to_ids(self, tokens: list[str], max_len: int | None = None) -> list[int]:
        """<start> w1 .. wn <end>, words cut to max_len and unknown words mapped to <unk>."""
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.start_id, *(self.index.get(w, self.unk_id) for w in tokens), self.end_id]

    def to_text(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, specials other than <unk> left out."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.words[i])
        return " ".join(out)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(list(d["words"]), int(d["min_count"]))
