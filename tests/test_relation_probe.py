"""tools/relation_probe.py: does the map at B's first word follow the relation word?"""

import numpy as np
import pytest
import torch

from captioner.config import load_config
from captioner.correctness import Region
from captioner.decoder import Decoder
from captioner.vocab import Vocabulary


@pytest.fixture(scope="module")
def probe(tool):
    return tool("relation_probe")


def quadrant(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=bool)
    mask[rows, cols] = True
    return mask


RED = Region(1, "circle", {"shape": "circle", "colour": "red", "size": "large"}, quadrant(slice(0, 4), slice(0, 4)))
BLUE = Region(2, "square", {"shape": "square", "colour": "blue", "size": "small"}, quadrant(slice(4, 8), slice(0, 4)))
GREEN = Region(3, "square", {"shape": "square", "colour": "green", "size": "small"}, quadrant(slice(0, 4), slice(4, 8)))
CAPTION = "the red circle is above a blue square".split()


def test_opposite_turns_the_direction_words_only(probe):
    assert probe.opposite(CAPTION, 3, 6) == "the red circle is below a blue square".split()
    words = "a red circle to the left of a blue square".split()
    assert probe.opposite(words, 3, 7) == "a red circle to the right of a blue square".split()
    assert probe.opposite("a red circle next to a blue square".split(), 3, 5) is None
    assert probe.opposite(CAPTION, 0, 3) is None  # no direction word in the span


def test_directional_relations_need_a_direction_and_one_object_each(probe):
    (a, b, a_end, b_start), = probe.directional_relations(CAPTION, [RED, BLUE, GREEN])
    assert (a.object_id, b.object_id, a_end, b_start) == (1, 2, 3, 6)
    assert probe.directional_relations("the red circle is beside a green square".split(), [RED, BLUE, GREEN]) == []
    assert probe.directional_relations("the red circle is above a square".split(), [RED, BLUE, GREEN]) == []  # 2 squares


def decoder(attention: str) -> tuple[Decoder, Vocabulary]:
    vocab = Vocabulary.build([" ".join(CAPTION) + " below"], min_count=1)
    cfg = load_config(None, [f"model.attention.name={attention}", "model.attention.dim=6", "model.decoder.embed_dim=8",
                             "model.decoder.hidden_dim=8", "model.decoder.dropout=0.0",
                             "model.decoder.arrangement=luong"]).model
    torch.manual_seed(0)
    return Decoder.from_config(cfg, vocab_size=len(vocab), feature_dim=5, grid=(2, 2)).eval(), vocab


def test_a_map_that_ignores_the_query_does_not_move(probe):
    dec, vocab = decoder("mean")
    (row,) = probe.probe(dec, vocab, torch.randn(1, 4, 5), CAPTION, [RED, BLUE, GREEN], (2, 2), (0.5, 0.5))
    assert row["moved"] == 0.0
    assert row["given"]["on_b"] == row["opposite"]["on_b"] == pytest.approx(0.25)  # uniform: a quadrant each
    assert row["given"]["on_a"] == row["given"]["on_others"] == pytest.approx(0.25)
    assert row["given"]["p_word"] != row["opposite"]["p_word"]  # the words still read the relation


def test_a_map_that_reads_the_query_moves_and_the_probabilities_are_the_decoders(probe):
    dec, vocab = decoder("soft")
    with torch.no_grad():
        dec.attention.score.query.weight.mul_(50)  # maps that follow h_t closely
    feats = torch.randn(1, 4, 5)
    (row,) = probe.probe(dec, vocab, feats, CAPTION, [RED, BLUE, GREEN], (2, 2), (0.5, 0.5))
    assert 0 < row["moved"] <= 1
    for name, words in (("given", CAPTION), ("opposite", probe.opposite(CAPTION, 3, 6))):
        ids = torch.tensor([vocab.encode(words)])
        out = dec(feats, ids)
        assert row[name]["p_word"] == pytest.approx(torch.softmax(out.logits[0, 6], -1)[ids[0, 7]].item())
        masses = [row[name][k] for k in ("on_b", "on_a", "on_others")]
        assert all(0 <= m <= 1 for m in masses) and 0 < sum(masses) <= 1 + 1e-6  # the 4th quadrant: background


def test_axis_choice_is_the_decoders_share_of_the_reference_axis(probe):
    vocab = Vocabulary.build([" ".join(CAPTION), "below to the left of next over"])  # no "beside", no "under"
    dec = Decoder.from_config(load_config(None, ["model.attention.dim=6", "model.decoder.embed_dim=8",
                                                 "model.decoder.hidden_dim=8", "model.decoder.dropout=0.0",
                                                 "model.decoder.arrangement=luong"]).model,
                              vocab_size=len(vocab), feature_dim=5, grid=(2, 2)).eval()
    feats = torch.randn(1, 4, 5)
    ids = {w: vocab.encode([w])[1] for w in ("to", "next", "above", "below", "over")}
    for words, t, axis in ((CAPTION, 4, ("above", "below", "over")),  # "is" is skipped: "above" at 4
                           ("a red circle to the left of a blue square".split(), 3, ("to", "next"))):
        (got,) = probe.axis_choice(dec, vocab, feats, words, [RED, BLUE, GREEN])
        with torch.no_grad():
            p = torch.softmax(dec(feats, torch.tensor([vocab.encode(words)])).logits[0, t], -1)
        both = sum(p[i] for i in ids.values())
        assert got == pytest.approx(float(sum(p[ids[w]] for w in axis) / both))
        assert 0 < got < 1
    assert probe.axis_choice(dec, vocab, feats, "the red circle is beside a green square".split(), [RED, BLUE, GREEN]) == []
