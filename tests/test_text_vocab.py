import pytest

from captune.data.text import tokenize
from captune.data.vocab import SPECIALS, Vocabulary


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize('A man\'s dog , "running" in the PARK .') == ["a", "man", "s", "dog", "running", "in", "the", "park"]
    assert tokenize(" .,!? ") == []


def test_vocabulary_threshold_counts_training_words():
    captions = [["a", "red", "circle"], ["a", "blue", "circle"], ["a", "red", "square"]]
    v1, v2, v3 = (Vocabulary.build(captions, t) for t in (1, 2, 3))
    assert v1.words[:4] == list(SPECIALS)
    assert set(v1.words[4:]) == {"a", "red", "circle", "blue", "square"}
    assert v2.words[4:] == ["a", "circle", "red"]  # most frequent first, ties alphabetical
    assert v3.words[4:] == ["a"]
    with pytest.raises(ValueError, match="vocab_threshold=4 leaves no words"):
        Vocabulary.build(captions, 4)


def test_words_to_ids_and_back_with_unknown_words():
    v = Vocabulary.build([["a", "red", "circle"]] * 2, 2)
    ids = v.to_ids(["a", "green", "circle"])
    assert ids[0] == v.start_id and ids[-1] == v.end_id and v.unk_id in ids
    assert v.to_text(ids) == "a <unk> circle"
    assert v.to_text([v.index["a"], v.end_id, v.index["red"]]) == "a"
    assert v.to_ids(["a"] * 50, max_len=5) == [v.start_id] + [v.index["a"]] * 5 + [v.end_id]
    assert Vocabulary.from_dict(v.to_dict()).words == v.words


def test_word_counts_equal_counting_each_captions_tokens():
    from collections import Counter

    from captune.data.text import tokenize, word_counts

    captions = ["A man's dog, running!", "two-tone cats", "", "...", "42 red 42"] * 4001  # over one chunk
    assert word_counts(captions) == Counter(w for c in captions for w in tokenize(c))
