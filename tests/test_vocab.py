import pytest
from hypothesis import given
from hypothesis import strategies as st

from captioner.errors import CheckpointError
from captioner.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Man's dog, running!  Fast.") == ["a", "man's", "dog", "running", "fast"]
    assert tokenize("Café au lait") == ["café", "au", "lait"]
    assert tokenize("   ...  ") == []
    assert tokenize("don\u2019t") == ["don't"]


def test_build_counts_and_min_count():
    v = Vocabulary.build(["a red circle", "a blue circle", "a red square"], min_count=2)
    assert v.itos[: len(SPECIALS)] == list(SPECIALS)
    assert v.itos[len(SPECIALS):] == ["a", "circle", "red"]  # most frequent first, ties alphabetical
    assert "blue" not in v
    assert Vocabulary.build(["a red circle", "a blue circle", "a red square"], max_size=2).itos[4:] == ["a", "circle"]


def test_encode_decode_and_unknown_words():
    v = Vocabulary(["a", "red", "circle"])
    ids = v.encode("A red star")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == ["a", "red", "<unk>"]
    assert v.encode("a red circle", max_len=3) == [v.start_id, v.stoi["a"], v.stoi["red"], v.stoi["circle"], v.end_id]


def test_a_cut_caption_gets_no_end_token():
    """Cut at max_len, a caption did not end there: teaching <end> would teach stopping mid-sentence."""
    v = Vocabulary(["a", "red", "circle"])
    assert v.encode("a red circle a red", max_len=2) == [v.start_id, v.stoi["a"], v.stoi["red"]]
    assert v.encode("a red circle", max_len=2)[-1] != v.end_id
    assert v.decode([v.stoi["a"], v.end_id, v.stoi["red"]]) == ["a"]  # stops at <end>


def test_dict_round_trip_and_bad_data():
    v = Vocabulary(["x", "y"])
    assert Vocabulary.from_dict(v.to_dict()) == v
    with pytest.raises(CheckpointError):
        Vocabulary.from_dict({"wrods": []})
    with pytest.raises(CheckpointError):
        Vocabulary.from_dict({"words": [1, 2]})


@given(st.text())
def test_tokenize_never_crashes_and_gives_clean_words(text):
    for word in tokenize(text):
        assert word and word == word.lower() and not any(ch.isspace() for ch in word)


@given(st.lists(st.sampled_from(["a", "red", "big", "circle", "left", "of"]), max_size=15))
def test_round_trip_for_known_words(words):
    v = Vocabulary(["a", "red", "big", "circle", "left", "of"])
    assert v.decode(v.encode(words)) == words
