"""tools/correctness_by_word.py: attention mass by kind of grounded word."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.chair import ground_object
from captioner.correctness import Region

spec = importlib.util.spec_from_file_location("cbw", Path(__file__).parent.parent / "tools" / "correctness_by_word.py")
cbw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cbw)


def quadrant(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_mass_is_split_into_the_named_object_the_others_and_the_background():
    red = Region(1, "circle", {"shape": "circle", "colour": "red", "size": "large"}, quadrant(slice(0, 4), slice(0, 4)))
    blue = Region(2, "square", {"shape": "square", "colour": "blue", "size": "small"}, quadrant(slice(4, 8), slice(4, 8)))
    words = ["a", "large", "red", "circle", "and", "squares"]
    alphas = torch.zeros(7, 4)
    alphas[1] = 0.25  # "large": uniform over the 2 x 2 grid
    alphas[2, 3] = 1.0  # "red": all on the other object's cell
    alphas[3, 0] = 1.0  # "circle": all on its own cell
    out = cbw.mass_by_kind(words, alphas, [red, blue], (2, 2), (0.5, 0.5))
    assert set(out) == {"size", "colour", "shape"}  # "squares" names no single object: not grounded
    assert out["size"] == [pytest.approx((0.25, 0.25))]  # uniform: each quadrant a quarter
    (on, off), = out["colour"]
    assert on < 0.25 < off
    (on, off), = out["shape"]
    assert on > 0.5 and off < 0.25
    assert cbw.mass_by_kind(["a", "dog"], alphas, [red, blue], (2, 2), (0.5, 0.5)) == {}


@pytest.mark.parametrize("word, kind", [("circle", "shape"), ("squares", "shape"), ("red", "colour"),
                                        ("large", "size"), ("the", "other")])
def test_word_kinds(word, kind):
    assert cbw.word_kind(word) == kind


def test_mass_at_relation_words_is_split_into_a_b_and_the_others():
    red = Region(1, "circle", {"shape": "circle", "colour": "red", "size": "large"}, quadrant(slice(0, 4), slice(0, 4)))
    blue = Region(2, "square", {"shape": "square", "colour": "blue", "size": "small"}, quadrant(slice(4, 8), slice(0, 4)))
    green = Region(3, "triangle", {"shape": "triangle", "colour": "green", "size": "small"},
                   quadrant(slice(4, 8), slice(4, 8)))
    words = "the red circle is above a blue square".split()
    alphas = torch.zeros(9, 4)  # a 2 x 2 grid: cell 0 red, cell 2 blue, cell 3 green
    alphas[3, 0] = 1.0  # "is": on A
    alphas[4, 2] = 1.0  # "above": on B
    alphas[5] = 0.25  # "a": uniform
    out = cbw.mass_at_relations(words, alphas, [red, blue, green], (2, 2), (0.5, 0.5))
    assert [o[0] for o in out] == [True] * 3  # red is above blue; one row per word between the mentions
    assert out[0][1] > 0.5 and out[0][2] < 0.25 and out[0][3] < 0.25
    assert out[1][2] > 0.5 and out[1][1] < 0.25
    assert out[2][1:] == pytest.approx((0.25, 0.25, 0.25))
    wrong = cbw.mass_at_relations("the red circle is below a blue square".split(), alphas, [red, blue, green],
                                  (2, 2), (0.5, 0.5))
    assert [o[0] for o in wrong] == [False] * 3
    assert cbw.mass_at_relations("the red circle is below a green circle".split(), alphas, [red, blue, green],
                                 (2, 2), (0.5, 0.5)) == []  # "a green circle" names no object: not counted


def test_region_object_boxes_the_mask():
    region = Region(4, "square", {}, quadrant(slice(2, 5), slice(1, 7)))
    assert ground_object(region).box == (1.0, 2.0, 6.0, 3.0)
