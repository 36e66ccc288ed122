"""The champion's decoding grid (captune.search.decoding_search); the search itself runs on every
champion of tests/test_sweep.py's sweep s1, and the length penalty is tested by hand in
tests/test_models.py."""
from captune.search.decoding_search import BASELINE, DecodingChoice, grid
from captune.trainables.decoding import Decoding


def test_the_grid_holds_the_plain_decoding_greedy_once_and_a_shorter_limit_only_when_shorter():
    full = grid(30)
    assert len(full) == 42 == len(set(full)) and BASELINE in full and Decoding(1) in full
    assert [d for d in full if d.beam == 1] == [Decoding(1), Decoding(1, 0.0, 16)]  # the penalty changes no greedy choice
    assert {d.max_len for d in full} == {None, 16} and {d.max_len for d in grid(12)} == {None} and len(grid(12)) == 21


def test_the_choice_says_its_gain_and_when_it_lies_at_the_grids_edge():
    inside = DecodingChoice("cider", Decoding(3, 0.5), 2.5, 2.4, 42)
    assert inside.statement() == ("decoding: beam 3, length penalty 0.5, validation CIDEr-D 2.5000 (+0.1000 over beam 3 "
                                  "without length penalty; the best of 42 decodings on the validation split)")
    assert inside.tags() == {"decoding": "beam 3, length penalty 0.5", "decoding_beam": "3", "decoding_alpha": "0.5",
                             "decoding_max_len": "None", "decoding_val_cider": "2.500000", "decoding_val_gain": "0.100000"}
    edge = DecodingChoice("bleu4", Decoding(8, 2.0, 16), 0.6, 0.5, 42)
    assert edge.statement().endswith("; at the grid's edge (beam 8, alpha 2): beyond it is untried")
    assert "beam 8, length penalty 2, at most 16 words" in edge.statement()
