"""Tests for captioner.correctness: map scoring, region loading, word grounding, the report."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from captioner.correctness import (
    COCO_SYNONYMS,
    CorrectnessReport,
    Region,
    _category_phrases,
    attention_correctness,
    correctness_of_map,
    ground_words,
    load_regions,
)
from captioner.data.shapes import COLOURS, generate_shapes
from captioner.vocab import tokenize


def support(index: int, cells: int, pixels: int) -> np.ndarray:
    """(pixels,) bool: where bilinear upsampling (align_corners=False) of cell ``index`` of
    ``cells`` is non-zero along one axis; PyTorch's source coordinate is clamped at 0."""
    src = np.maximum(0.0, (np.arange(pixels) + 0.5) * cells / pixels - 0.5)
    return (src > index - 1) & (src < index + 1)


def one_hot(grid: tuple[int, int], r: int, c: int) -> torch.Tensor:
    alpha = torch.zeros(grid[0] * grid[1])
    alpha[r * grid[1] + c] = 1.0  # row-major
    return alpha


def box(size: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[rows, cols] = True
    return mask


def shape_region(object_id: int, shape: str, colour: str, size: str, mask: np.ndarray | None = None) -> Region:
    mask = np.zeros((8, 8), dtype=bool) if mask is None else mask
    return Region(object_id, shape, {"shape": shape, "colour": colour, "size": size}, mask)


@pytest.fixture(scope="module")
def shapes_128(tmp_path_factory) -> Path:
    """A 12-image shapes set at 128 px (big enough for masks to be checked against pixels)."""
    root = tmp_path_factory.mktemp("shapes_corr")
    generate_shapes(root, n=12, seed=3, image_size=128, val_fraction=0.0, test_fraction=0.0)
    return root


# ----------------------------------------------------------------------------- correctness_of_map


def test_map_inside_region_scores_one_outside_zero():
    alpha = one_hot((4, 4), 1, 1)  # cell (1, 1) covers pixels 20..39; bilinear spreads it over 10..49
    inside = box((80, 80), slice(10, 50), slice(10, 50))
    assert support(1, 4, 80).nonzero()[0].tolist() == list(range(10, 50))
    assert correctness_of_map(alpha, (4, 4), inside) == pytest.approx(1.0, abs=1e-12)
    assert correctness_of_map(alpha, (4, 4), ~inside) == pytest.approx(0.0, abs=1e-12)
    cell = box((80, 80), slice(20, 40), slice(20, 40))
    assert 0.25 < correctness_of_map(alpha, (4, 4), cell) < 1.0  # the bilinear tent spills out of the cell


@pytest.mark.parametrize("r, c", [(2, 1), (0, 0), (6, 4), (0, 4), (5, 1)])
def test_non_square_grid_and_image(r, c):
    grid = (7, 5)  # h x w grid over an H x W = 90 x 130 image
    inside = support(r, 7, 90)[:, None] & support(c, 5, 130)[None, :]  # (H, W)
    alpha = one_hot(grid, r, c)
    assert correctness_of_map(alpha, grid, inside) == pytest.approx(1.0, abs=1e-12)
    assert correctness_of_map(alpha.reshape(grid).numpy(), grid, inside) == pytest.approx(1.0, abs=1e-12)
    assert correctness_of_map(alpha, grid, ~inside) == pytest.approx(0.0, abs=1e-12)
    if c * 7 + r != r * 5 + c:  # the cell's column-major index is another, far cell
        assert correctness_of_map(one_hot((5, 7), c, r), grid, inside) < 0.5


def test_uniform_map_scores_area_share():
    rng = np.random.default_rng(0)
    mask = rng.random((90, 130)) < 0.3
    for alpha in (torch.full((35,), 1 / 35), np.full((7, 5), 4.0), torch.full((35,), 1e-7)):  # scale does not matter
        assert correctness_of_map(alpha, (7, 5), mask) == pytest.approx(mask.mean(), rel=1e-12)


def test_bad_maps_raise():
    mask = np.ones((10, 10), dtype=bool)
    with pytest.raises(ValueError, match="grid"):
        correctness_of_map(torch.ones(12), (4, 4), mask)
    with pytest.raises(ValueError, match="non-negative"):
        correctness_of_map(-torch.ones(16), (4, 4), mask)
    with pytest.raises(ValueError, match="no mass"):
        correctness_of_map(torch.zeros(16), (4, 4), mask)


# ----------------------------------------------------------------------------- load_regions


def test_load_regions_on_shapes(shapes_128):
    instances = json.loads((shapes_128 / "annotations" / "instances_train.json").read_text())
    regions = load_regions(shapes_128 / "annotations" / "instances_train.json")
    assert sorted(regions) == sorted(image["id"] for image in instances["images"])
    by_id = {r.object_id: r for rs in regions.values() for r in rs}
    assert len(by_id) == len(instances["annotations"]) > 12
    for ann in instances["annotations"]:
        region = by_id[ann["id"]]
        assert region.mask.shape == (128, 128) and region.mask.dtype == bool
        assert region.category == ann["attributes"]["shape"] and region.attributes == ann["attributes"]
        x, y, w, h = ann["bbox"]
        assert abs(int(region.mask.sum()) - ann["area"]) <= 2 * w  # boundary pixels: half the perimeter
        rows, cols = region.mask.nonzero()
        assert rows.min() >= math.floor(y) and rows.max() < math.ceil(y + h)
        assert cols.min() >= math.floor(x) and cols.max() < math.ceil(x + w)
        # the mask lies on the drawn object: its pixels have the object's colour
        pixels = np.asarray(Image.open(shapes_128 / "train" / f"{ann['image_id']:06d}.png"))[region.mask]
        assert np.abs(np.median(pixels, axis=0) - COLOURS[ann["attributes"]["colour"]]).max() < 30


def test_load_regions_coco_rle_non_square_and_image_filter(tmp_path, write_json):
    mask = np.zeros((30, 50), dtype=bool)  # H x W
    mask[5:12, 20:41] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    path = write_json(tmp_path / "instances.json", {
        "images": [{"id": 7, "width": 50, "height": 30}, {"id": 8, "width": 10, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "segmentation": rle},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 20, 0, 20]]},
            {"id": 3, "image_id": 8, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    })
    regions = load_regions(path)
    dog, person = regions[7]
    assert (dog.category, dog.attributes, dog.object_id) == ("dog", {}, 1)
    assert np.array_equal(dog.mask, mask)
    assert person.mask.shape == (30, 50) and person.mask[:20, :10].mean() > 0.9 and not person.mask[:, 11:].any()
    assert list(load_regions(path, image_ids=[8])) == [8]


def test_load_regions_errors(tmp_path, write_json, data_error, shapes_128):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    data_error(lambda: load_regions(bad), str(bad), "malformed JSON")
    no_anns = write_json(tmp_path / "no_anns.json", {"images": [], "categories": []})
    data_error(lambda: load_regions(no_anns), str(no_anns), "missing key 'annotations'")
    captions = shapes_128 / "annotations" / "captions_train.json"
    data_error(lambda: load_regions(captions), "missing key 'categories'", "captions file")
    base = {"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1, "name": "dog"}]}
    polygon = write_json(tmp_path / "polygon.json", {**base, "annotations": [
        {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3]]}]})
    data_error(lambda: load_regions(polygon), "annotations[0] (id 5)", "polygons")
    unknown = write_json(tmp_path / "unknown.json", {**base, "annotations": [
        {"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[1, 2, 3, 4, 5, 6]]}]})
    data_error(lambda: load_regions(unknown), "unknown image_id 2")
    twice = write_json(tmp_path / "twice.json", {**base, "images": base["images"] * 2, "annotations": []})
    data_error(lambda: load_regions(twice), "images[1] (id 1)", "duplicate image id 1")
    twice = write_json(tmp_path / "twice_cat.json", {**base, "categories": base["categories"] * 2, "annotations": []})
    data_error(lambda: load_regions(twice), "categories[1]", "duplicate category id 1")
    for mask in (np.ones((2, 2, 2), dtype=bool), np.ones((2, 2)), [[True]]):  # a 2-D bool array only
        with pytest.raises(ValueError, match="2-D bool"):
            Region(1, "dog", {}, mask)


# ----------------------------------------------------------------------------- ground_words


def test_ground_shapes_phrases():
    circle, square = shape_region(1, "circle", "red", "small"), shape_region(2, "square", "blue", "large")
    other_circle = shape_region(3, "circle", "green", "small")
    words = tokenize("a small red circle to the left of a blue square")
    got = [(t, r.object_id) for t, r in ground_words(words, [circle, square, other_circle])]
    assert got == [(1, 1), (2, 1), (3, 1), (9, 2), (10, 2)]
    assert [t for t, _ in ground_words(tokenize("a circle next to a square"), [circle, square, other_circle])] == [5]
    assert [(t, r.object_id) for t, r in ground_words(["a", "circle"], [circle, square])] == [(1, 1)]


@pytest.mark.parametrize("caption", [
    "a circle",             # two circles: ambiguous
    "a pink circle",        # a colour no object has
    "a large red circle",   # the red circle is small
    "a diamond",            # no diamond in the image
    "two shapes",           # no shape noun
])
def test_ground_shapes_skips_ambiguous_and_unmatched(caption):
    regions = [shape_region(1, "circle", "red", "small"), shape_region(3, "circle", "green", "small")]
    assert ground_words(tokenize(caption), regions) == []


def test_ground_shapes_phrase_edges_and_words_from_the_data():
    """A phrase may open the caption; a colour ending it names nothing; a colour the one circle
    lacks rules it out; shape and colour words the instances file uses are understood."""
    red, green = shape_region(1, "circle", "red", "small"), shape_region(3, "circle", "green", "small")
    found = lambda words, regions: [(t, r.object_id) for t, r in ground_words(words, regions)]  # noqa: E731
    assert found(["red", "circle"], [red, green]) == [(0, 1), (1, 1)]
    assert found(["small", "red", "circle"], [red, green]) == [(0, 1), (1, 1), (2, 1)]
    assert found(["circle", "beside", "the", "green"], [red, green]) == []
    assert found(["red", "circle", "is", "small"], [red, green]) == [(0, 1), (1, 1)]
    assert found(tokenize("a pink circle"), [red]) == []
    assert found(tokenize("a black circle"), [red]) == []
    star = shape_region(4, "star", "ochre", "small")
    assert found(tokenize("an ochre star above a red circle"), [star, red]) == [(1, 4), (2, 4), (5, 1), (6, 1)]


def test_ground_coco_categories_to_unions():
    dog1, dog2 = box((20, 30), slice(0, 5), slice(0, 5)), box((20, 30), slice(10, 20), slice(20, 30))
    regions = [Region(11, "dog", {}, dog1), Region(12, "person", {}, box((20, 30), slice(5, 9), slice(0, 30))),
               Region(4, "dog", {}, dog2), Region(9, "cat", {}, box((20, 30), slice(0, 2), slice(28, 30)))]
    got = ground_words(tokenize("two dogs and a man"), regions)
    assert [t for t, _ in got] == [1, 4]
    dogs, man = got[0][1], got[1][1]
    assert dogs.category == "dog" and dogs.object_id == 4 and np.array_equal(dogs.mask, dog1 | dog2)
    assert man is regions[1]
    assert [t for t, _ in ground_words(tokenize("a puppy next to people and a man's dog"), regions)] == [1, 4, 7, 8]
    hot_dog = Region(30, "hot dog", {}, box((20, 30), slice(0, 1), slice(0, 1)))
    got = ground_words(tokenize("a hot dog"), [*regions, hot_dog])  # the longest name wins
    assert [(t, r.category) for t, r in got] == [(1, "hot dog"), (2, "hot dog")]
    got = ground_words(tokenize("a dog and a hot dog or a dog"), [*regions, hot_dog])  # one word, two, one last
    assert [(t, r.category) for t, r in got] == [(1, "dog"), (4, "hot dog"), (5, "hot dog"), (8, "dog")]


@pytest.mark.parametrize("phrase, category", [
    ("dogs", "dog"), ("puppies", "dog"), ("men", "person"), ("women", "person"), ("people", "person"),
    ("buses", "bus"), ("knives", "knife"), ("teddy bear", "teddy bear"), ("hot dogs", "hot dog"),
    ("cell phone", "cell phone"), ("tv", "tv"), ("sheep", "sheep"), ("boys", "person"), ("guys", "person"),
    ("ladies", "person"), ("ponies", "horse"),
])
def test_coco_words_and_plurals(phrase, category):
    regions = [Region(1, category, {}, np.ones((4, 4), dtype=bool))]
    words = phrase.split()
    assert [t for t, _ in ground_words(words, regions)] == list(range(len(words)))


def test_coco_lexicon_covers_80_categories_without_clashes():
    assert len(COCO_SYNONYMS) == 80
    phrases = Counter(p for category in COCO_SYNONYMS for p in set(_category_phrases(category)))
    assert [p for p, n in phrases.items() if n > 1] == []


def test_grounding_agrees_with_generator(shapes_128):
    """The generator's own ``grounding`` is the ground truth for the phrase parser."""
    regions = load_regions(shapes_128 / "annotations" / "instances_train.json")
    captions = json.loads((shapes_128 / "annotations" / "captions_train.json").read_text())["annotations"]
    stored = {(c["id"], t, o) for c in captions for t, o in c["grounding"]}
    ours = {(c["id"], t, r.object_id) for c in captions
            for t, r in ground_words(tokenize(c["caption"]), regions[c["image_id"]])}
    assert len(stored) > 100
    assert len(stored & ours) >= 0.95 * len(stored) and len(stored & ours) >= 0.95 * len(ours)


# ----------------------------------------------------------------------------- attention_correctness


def test_report_on_exact_synthetic_maps():
    grid = (4, 6)  # over a 64 x 96 image: 16 x 16 px cells
    circle = shape_region(1, "circle", "red", "small", support(1, 4, 64)[:, None] & support(1, 6, 96)[None, :])
    square = shape_region(2, "square", "blue", "large", support(2, 4, 64)[:, None] & support(4, 6, 96)[None, :])
    words = tokenize("a red circle above a blue square")
    cells = {1: (1, 1), 2: (1, 1), 5: (2, 4), 6: (2, 4)}  # word -> the referred object's cell
    alpha = torch.stack([one_hot(grid, *cells[t]) if t in cells else torch.rand(24) for t in range(len(words))]
                        + [torch.rand(24)])  # (T + 1, L): the <end> row is ignored
    report = attention_correctness({5: words, 6: words}, {5: alpha}, grid, {5: [circle, square], 6: []})
    area = (2 * circle.mask.mean() + 2 * square.mask.mean()) / 4
    assert report.score == pytest.approx(1.0, abs=1e-12)
    assert report.uniform == pytest.approx(area) and report.uniform < 0.5
    assert (report.words, report.images) == (4, 1)
    assert report.as_dict() == {"score": report.score, "uniform": report.uniform, "words": 4, "images": 1}


def test_report_on_shapes_set(shapes_128):
    grid = (32, 32)
    regions = load_regions(shapes_128 / "annotations" / "instances_train.json")
    captions = json.loads((shapes_128 / "annotations" / "captions_train.json").read_text())["annotations"]
    first = {}
    for c in captions:
        first.setdefault(c["image_id"], tokenize(c["caption"]))
    focused, uniform = {}, {}
    for image_id, words in first.items():
        grounded = dict(ground_words(words, regions[image_id]))
        rows = []
        for t in range(len(words)):
            if t in grounded:  # mass on the object's cells, weighted towards fully covered ones
                mask = torch.from_numpy(grounded[t].mask).double()[None, None]  # (1, 1, H, W)
                rows.append(F.adaptive_avg_pool2d(mask, grid).reshape(-1) ** 4)  # (L,)
            else:
                rows.append(torch.rand(grid[0] * grid[1], dtype=torch.float64))
        focused[image_id] = torch.stack(rows)  # (T, L)
        uniform[image_id] = torch.ones(len(words), grid[0] * grid[1])
    on_object = attention_correctness(first, focused, grid, regions)
    assert on_object.words > 20 and on_object.images == len(first)
    assert on_object.score > 0.85 and on_object.uniform < 0.5
    flat = attention_correctness(first, uniform, grid, regions)
    assert flat.score == pytest.approx(flat.uniform, rel=1e-9) and flat.uniform == on_object.uniform


def test_report_edge_cases():
    region = shape_region(1, "circle", "red", "small")
    empty = attention_correctness({1: ["a", "dog"]}, {}, (2, 2), {1: [region]})
    assert (empty.words, empty.images) == (0, 0) and math.isnan(empty.score)
    assert empty.as_dict() == {"score": None, "uniform": None, "words": 0, "images": 0}
    assert isinstance(empty, CorrectnessReport)
    with pytest.raises(ValueError, match="no attention maps"):
        attention_correctness({1: ["a", "circle"]}, {}, (2, 2), {1: [region]})
    with pytest.raises(ValueError, match="2 words"):
        attention_correctness({1: ["a", "circle"]}, {1: torch.ones(1, 4)}, (2, 2), {1: [region]})


def test_upsample_with_origin_at_the_centre_is_torch_bilinear():
    from captioner.correctness import upsample_maps

    maps = torch.rand(3, 4, 5, dtype=torch.float64)
    for size in [(4, 5), (17, 9), (64, 40)]:
        expected = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(upsample_maps(maps.reshape(3, -1), (4, 5), size), expected)


def test_origin_moves_a_cell_to_its_receptive_field_centre():
    """A one-hot cell (r, c) of a 16 x 16 grid over 128 px, origin 1/16 cell (a ResNet's
    stride-8 feature looks at pixel (8r, 8c)): the map peaks at that pixel, not at 8r + 4, and
    an object centred there gets more of the mass."""
    from captioner.correctness import upsample_maps

    grid, size, r, c = (16, 16), (128, 128), 6, 9
    origin = (1 / 16, 1 / 16)
    up = upsample_maps(one_hot(grid, r, c)[None], grid, size, origin=origin)[0]  # (128, 128)
    peak = divmod(int(up.argmax()), 128)
    assert peak == (8 * r, 8 * c)
    assert float(up.sum()) == pytest.approx(64.0)  # one cell of 8 x 8 pixels' worth of mass: nothing lost
    centred = divmod(int(upsample_maps(one_hot(grid, r, c)[None], grid, size)[0].argmax()), 128)
    assert centred in {(8 * r + 3, 8 * c + 3), (8 * r + 4, 8 * c + 4)}
    obj = box(size, slice(8 * r - 7, 8 * r + 8), slice(8 * c - 7, 8 * c + 8))  # 15 x 15 px around (8r, 8c)
    aligned = correctness_of_map(one_hot(grid, r, c), grid, obj, origin=origin)
    assert aligned > 0.99 and correctness_of_map(one_hot(grid, r, c), grid, obj) < 0.8


def test_attention_correctness_passes_the_origin_on():
    grid, size = (8, 8), (64, 64)
    region = shape_region(1, "circle", "red", "small", box(size, slice(0, 8), slice(0, 8)))
    alpha = one_hot(grid, 0, 0).repeat(2, 1)  # (2, L): "red circle"
    words = {1: ["red", "circle"]}
    centred = attention_correctness(words, {1: alpha}, grid, {1: [region]})
    corner = attention_correctness(words, {1: alpha}, grid, {1: [region]}, origin=(0.0, 0.0))
    assert centred.words == corner.words == 2
    assert corner.score == pytest.approx(1.0) and centred.score < 0.9


def test_drawn_maps_use_the_same_origin():
    """visualize.attention_maps places a cell's weight where correctness scores it."""
    from captioner.visualize import attention_maps

    grid, size = (16, 16), (128, 128)
    drawn = attention_maps(one_hot(grid, 6, 9), grid, size, origin=(1 / 16, 1 / 16))[0]  # (128, 128)
    assert divmod(int(drawn.argmax()), 128) == (48, 72)
    centred = attention_maps(one_hot(grid, 6, 9), grid, size)[0]
    assert divmod(int(centred.argmax()), 128) in {(51, 75), (52, 76)}
