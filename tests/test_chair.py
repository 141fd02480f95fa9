"""Tests for captioner.chair: CHAIR_i / CHAIR_s and relation accuracy on hand-made captions."""

from __future__ import annotations

import json
import math

import pytest

from captioner.chair import (
    ChairScorer,
    GroundObject,
    GroundTruth,
    chair,
    find_mentions,
    load_ground_truth,
    relation_holds,
    stated_relations,
)
from captioner.data.shapes import generate_shapes
from captioner.vocab import tokenize


def shape(object_id: int, kind: str, colour: str, size: str, x: float, y: float, side: float = 10) -> GroundObject:
    return GroundObject(object_id, kind, {"shape": kind, "colour": colour, "size": size}, (x, y, side, side))


def thing(object_id: int, category: str, x: float = 0, y: float = 0) -> GroundObject:
    return GroundObject(object_id, category, {}, (x, y, 10, 10))


# A yellow circle on the left, a blue square on the right, a large red triangle below them.
SCENE = [shape(1, "circle", "yellow", "small", 10, 40), shape(2, "square", "blue", "small", 80, 40),
         shape(3, "triangle", "red", "large", 45, 90, side=30)]


def test_shape_mention_needs_size_colour_and_shape_of_one_object():
    words = tokenize("a large yellow square beside a yellow circle and a small square")
    mentions = find_mentions(words, SCENE)
    assert [(m.start, m.end) for m in mentions] == [(1, 4), (6, 8), (10, 12)]
    assert [[o.object_id for o in m.matches] for m in mentions] == [[], [1], [2]]
    # the colour exists (circle) and the shape exists (square), but not on one object
    assert mentions[0].hallucinated and not mentions[1].hallucinated
    assert find_mentions(tokenize("a large triangle"), SCENE)[0].matches == (SCENE[2],)
    assert find_mentions(tokenize("a small triangle"), SCENE)[0].hallucinated
    assert find_mentions(tokenize("a pink circle"), SCENE)[0].hallucinated  # a colour no object has
    assert find_mentions(tokenize("a diamond"), SCENE)[0].hallucinated
    assert find_mentions(tokenize("two shapes on a noisy background"), SCENE) == []


def test_chair_counts_mentions_and_captions():
    truth = GroundTruth(objects={7: SCENE, 8: SCENE[:1]}, categories=("circle", "square", "triangle"))
    report = chair({7: "a yellow circle beside a blue square", 8: "a yellow square and a yellow circle",
                    9: "a red circle"}, truth)  # image 9 has no ground truth: skipped
    assert (report.captions, report.mentions, report.hallucinated, report.hallucinated_captions) == (2, 4, 1, 1)
    assert report.chair_i == pytest.approx(1 / 4) and report.chair_s == pytest.approx(1 / 2)
    assert report.relations == 1 and report.relation_accuracy == 1.0
    assert report.as_dict()["chair_s"] == 0.5 and "CHAIR_s 50.0" in report.line()


def test_relation_holds_on_the_dominant_axis():
    left, right = shape(1, "circle", "red", "small", 0, 0), shape(2, "square", "blue", "small", 50, 10)
    below = shape(3, "diamond", "green", "small", 5, 60)
    assert relation_holds("left", left, right) and relation_holds("right", right, left)
    assert relation_holds("beside", left, right) and not relation_holds("beside", left, below)
    assert not relation_holds("above", left, right)  # dy = -10 but dx = -50 dominates
    assert relation_holds("above", left, below) and relation_holds("below", below, left)
    assert not relation_holds("left", right, left) and not relation_holds("below", left, below)


def test_a_caption_is_wrong_with_an_absent_object_or_a_relation_that_does_not_hold():
    truth = GroundTruth(objects={1: SCENE, 2: SCENE, 3: SCENE, 4: SCENE, 5: SCENE}, categories=())
    captions = {1: "the yellow circle is to the left of a blue square",  # true
                2: "a yellow circle to the right of the blue square",     # the relation is false
                3: "a yellow square and a blue square",                   # an object not there
                4: "a pink circle to the right of the blue square",       # both: counted once
                5: "two shapes"}                                          # names nothing: not wrong
    report = chair(captions, truth)
    assert (report.captions, report.hallucinated_captions, report.relations, report.relations_correct) == (5, 2, 2, 1)
    assert report.wrong_captions == 3 and report.wrong_s == pytest.approx(3 / 5)
    assert report.as_dict()["wrong_s"] == pytest.approx(0.6) and "captions wrong 60.0 (3 of 5" in report.line()
    assert math.isnan(chair({}, truth).wrong_s) and chair({}, truth).as_dict()["wrong_s"] is None


@pytest.mark.parametrize("caption, holds, wrong_axis", [
    ("the yellow circle is to the left of a blue square", True, False),
    ("a yellow circle to the right of the blue square", False, False),  # the wrong side
    ("there is a blue square next to a yellow circle", True, False),
    ("a large red triangle below a yellow circle", True, False),
    ("a large red triangle is over the blue square", False, False),
    ("a blue square beside the large red triangle", False, True),  # the triangle is mostly below
    ("the large red triangle is to the right of a yellow circle", False, True),  # right (45) but below (60) more
])
def test_stated_relations_are_judged_between_the_named_objects(caption, holds, wrong_axis):
    truth = GroundTruth(objects={1: SCENE}, categories=())
    report = chair({1: caption}, truth)
    assert report.relations == 1 and report.relations_correct == int(holds)
    assert report.relation_accuracy == float(holds)
    assert report.relations_wrong_axis == int(wrong_axis)


def test_relations_need_two_unambiguous_existing_objects_and_adjacent_phrases():
    two_circles = [shape(1, "circle", "red", "small", 0, 0), shape(2, "circle", "blue", "small", 50, 0),
                   shape(3, "square", "green", "small", 100, 0)]
    truth = GroundTruth(objects={1: two_circles}, categories=())
    assert chair({1: "a circle to the left of a green square"}, truth).relations == 0  # "a circle": which one?
    assert chair({1: "a purple circle to the left of a green square"}, truth).relations == 0  # hallucinated
    assert chair({1: "a red circle and a green square"}, truth).relations == 0  # no relation word
    assert chair({1: "a red circle to the left of a green square"}, truth).relations == 1
    words = tokenize("the red circle is above the blue circle")
    (relation, a, b), = stated_relations(words, find_mentions(words, two_circles))
    assert relation == "above" and (a.start, b.start) == (1, 6)
    assert chair({1: words}, truth).relation_accuracy == 0.0  # same height: "above" does not hold


def test_a_relation_between_two_mentions_of_one_object_is_stated_and_wrong():
    """Beside a blue diamond there is one blue square: a caption that relates "a blue square"
    to "a blue square" names two where there is one, whatever the relation word."""
    scene = [shape(1, "diamond", "blue", "large", 10, 10), shape(2, "square", "blue", "large", 60, 10)]
    truth = GroundTruth(objects={1: scene}, categories=())
    for caption in ("the blue square is to the left of a blue square", "a blue square to the right of the square"):
        report = chair({1: caption}, truth)
        assert (report.relations, report.relations_correct, report.relations_self) == (1, 0, 1)
        assert report.relation_accuracy == 0.0 and report.relations_wrong_axis == 0
        assert report.hallucinated == 0 and report.wrong_captions == 1  # CHAIR cannot see it; wrong_s does
        assert "1 relate an object to itself" in report.line()
    report = chair({1: "the blue diamond is to the left of a blue square"}, truth)
    assert (report.relations, report.relations_correct, report.relations_self, report.wrong_captions) == (1, 1, 0, 0)


def test_coco_categories_with_synonyms_plurals_and_longest_phrase():
    truth = GroundTruth(objects={1: [thing(1, "person"), thing(2, "hot dog"), thing(3, "dog")],
                                 2: [thing(4, "person")]},
                        categories=("person", "dog", "hot dog", "cat", "dining table"))
    report = chair({1: "two men eating hot dogs next to a puppy", 2: "a woman with a cat at a table"}, truth)
    # image 1: men -> person, hot dogs -> hot dog (not dog), puppy -> dog: all there;
    # image 2: woman is there, cat and table (dining table) are not
    assert (report.mentions, report.hallucinated, report.hallucinated_captions) == (6, 2, 1)
    assert report.chair_i == pytest.approx(2 / 6) and report.chair_s == pytest.approx(1 / 2)


def test_category_names_that_are_shapes_work_without_attributes():
    """A COCO-layout set whose categories are shape names and whose instances carry no
    attributes: the category rules, plurals included; relations between single instances."""
    objects = [thing(1, "circle", x=0, y=0), thing(2, "square", x=0, y=60)]
    truth = GroundTruth(objects={1: objects}, categories=("circle", "square", "triangle"))
    report = chair({1: "a yellow triangle above two squares"}, truth)
    assert (report.mentions, report.hallucinated) == (2, 1)
    report = chair({1: "a red circle above a square"}, truth)
    assert (report.hallucinated, report.relations, report.relations_correct) == (0, 1, 1)


def test_nothing_named_gives_nan_and_none():
    report = chair({1: "a noisy background"}, GroundTruth(objects={1: SCENE}, categories=()))
    assert math.isnan(report.chair_i) and report.chair_s == 0.0 and math.isnan(report.relation_accuracy)
    assert report.as_dict()["chair_i"] is None and report.as_dict()["relation_accuracy"] is None


def test_reference_captions_of_the_shapes_set_hallucinate_nothing(tmp_path):
    generate_shapes(tmp_path, n=60, seed=3, image_size=64)
    truth = load_ground_truth(tmp_path / "annotations" / "instances_train.json")
    captions = json.loads((tmp_path / "annotations" / "captions_train.json").read_text())["annotations"]
    objects = {o.object_id: o for objs in truth.objects.values() for o in objs}
    assert len(truth.objects) == 48 and set(truth.categories) == {"circle", "square", "triangle", "diamond"}
    assert all(set(o.attributes) == {"shape", "colour", "size"} for o in objects.values())
    for k in range(5):
        report = chair({c["image_id"]: c["caption"] for c in captions[k::5]}, truth)
        assert report.captions == 48 and report.mentions > 48 and report.hallucinated == 0
        assert report.relations > 0 and report.relation_accuracy == 1.0
    # a caption naming an object of *another* image is a hallucination here
    present = {p.attributes["shape"] for p in truth.objects[1]}
    other = next(o for o in objects.values() if o.attributes["shape"] not in present)
    report = chair({1: f"a {other.attributes['colour']} {other.attributes['shape']}"}, truth)
    assert report.hallucinated == 1


def test_load_ground_truth_reads_boxes_and_rejects_bad_files(tmp_path, write_json, data_error):
    good = {"images": [{"id": 1, "width": 8, "height": 8}, {"id": 2, "width": 8, "height": 8}],
            "categories": [{"id": 3, "name": "Dog"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2, 4, 2]}]}
    truth = load_ground_truth(write_json(tmp_path / "i.json", good))
    assert truth.categories == ("dog",) and truth.objects[2] == []
    (dog,) = truth.objects[1]
    assert dog.category == "dog" and dog.box == (1.0, 2.0, 4.0, 2.0) and dog.centre == (3.0, 3.0)
    assert load_ground_truth(tmp_path / "i.json", image_ids=[2]).objects == {2: []}
    bad = {**good, "annotations": [{"id": 5, "image_id": 1, "category_id": 9, "bbox": [1, 2, 4, 2]}]}
    data_error(lambda: load_ground_truth(write_json(tmp_path / "b.json", bad)), "unknown category_id 9")
    bad = {**good, "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2]}]}
    data_error(lambda: load_ground_truth(write_json(tmp_path / "c.json", bad)), "'bbox' must be")
    data_error(lambda: load_ground_truth(write_json(tmp_path / "d.json", [1, 2])), "expected a COCO instances")


def test_scorer_for_a_split_finds_the_instances_file(tmp_path):
    from captioner.config import load_config

    generate_shapes(tmp_path, n=20, seed=1, image_size=64)
    data = load_config(None, ["data.format=shapes", f"data.root={tmp_path}"]).data
    val = json.loads((tmp_path / "annotations" / "captions_val.json").read_text())
    ids = [image["id"] for image in val["images"]]
    scorer = ChairScorer.for_split(data, "val", image_ids=ids)
    assert set(scorer.truth.objects) == set(ids)
    report = scorer({i: "a small pink diamond" for i in ids})
    assert report.chair_s == 1.0 and report.captions == len(ids)
    folder = load_config(None, ["data.format=folder", f"data.root={tmp_path}", "data.val.captions=x.json"]).data
    assert ChairScorer.for_split(folder, "val") is None
