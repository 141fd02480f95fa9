"""load_coco on tiny files in the official captions_*.json layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioner.data.coco import load_coco
from captioner.data.records import Caption


def _name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def coco_data() -> dict:
    """Images 42 and 7 with captions (out of id order), image 99 with none."""
    return {
        "info": {"description": "COCO 2014 Dataset"},
        "licenses": [],
        "images": [
            {"id": 42, "file_name": _name(42), "width": 4, "height": 3, "license": 1},
            {"id": 7, "file_name": _name(7)},
            {"id": 99, "file_name": _name(99), "width": 4, "height": 3},
        ],
        "annotations": [
            {"id": 11, "image_id": 42, "caption": "A dog sleeping on a couch. "},
            {"id": 12, "image_id": 7, "caption": "Two cats near a red ball", "grounding": [[1, 501], [4, 502]]},
            {"id": 13, "image_id": 42, "caption": "Un café très chaud sur la table"},
        ],
    }


@pytest.fixture
def coco(tmp_path: Path, make_image, write_json):
    """``write(data) -> (captions_json, image_dir)`` with every image file present."""
    image_dir = tmp_path / "val2014"
    for image_id in (42, 7, 99):
        make_image(image_dir / _name(image_id))

    def write(data: dict | None = None) -> tuple[Path, Path]:
        path = tmp_path / "annotations" / "captions_val2014.json"
        return write_json(path, coco_data() if data is None else data), image_dir

    return write


def test_records_sorted_with_all_captions(coco, caplog):
    path, image_dir = coco()
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load_coco(path, image_dir, split="val")
    assert [r.image_id for r in records] == [7, 42]
    dog = records[1]
    assert dog.path == image_dir / _name(42)
    assert dog.split == "val" and (dog.width, dog.height) == (4, 3)
    assert [c.text for c in dog.captions] == ["A dog sleeping on a couch.", "Un café très chaud sur la table"]
    assert dog.extra["annotation_ids"] == (11, 13)
    assert records[0].width is None
    # image 99 has no caption: skipped, and counted in a warning naming the file
    assert str(path) in caplog.text and "skipped 1 image" in caplog.text


def test_grounding_kept_as_int_pairs(coco):
    records = load_coco(*coco(), split="val")
    assert records[0].captions == (Caption("Two cats near a red ball", ((1, 501), (4, 502))),)
    assert records[1].captions[0].grounding == ()


def test_long_captions_kept_and_paths_as_strings(coco):
    data = coco_data()
    data["annotations"][0]["caption"] = "a dog " * 500
    path, image_dir = coco(data)
    records = load_coco(str(path), str(image_dir), split="train")
    assert len(records[1].captions[0].text.split()) == 1000
    assert records[1].split == "train"


def test_check_files_false_allows_missing_images(coco, tmp_path):
    path, _ = coco()
    records = load_coco(path, tmp_path / "nowhere", split="val", check_files=False)
    assert records[0].path == tmp_path / "nowhere" / _name(7)


def _set(section: str, index: int, key: str, value):
    def mutate(data: dict) -> None:
        data[section][index][key] = value

    return mutate


def _drop(section: str, index: int, key: str):
    def mutate(data: dict) -> None:
        del data[section][index][key]

    return mutate


def _replace(section: str, index: int, value):
    def mutate(data: dict) -> None:
        data[section][index] = value

    return mutate


def _append(section: str, entry: dict):
    def mutate(data: dict) -> None:
        data[section].append(entry)

    return mutate


ENTRY_ERRORS = {
    "image without id": (_drop("images", 1, "id"), ["images[1]", "missing key 'id'"]),
    "image without file_name": (_drop("images", 0, "file_name"), ["images[0] (id 42)", "'file_name'"]),
    "image id not an int": (_set("images", 1, "id", "7"), ["images[1]", "'id' must be an integer"]),
    "annotation without id": (_drop("annotations", 2, "id"), ["annotations[2]", "missing key 'id'"]),
    "annotation without image_id": (_drop("annotations", 1, "image_id"), ["(id 12)", "'image_id'"]),
    "annotation without caption": (_drop("annotations", 0, "caption"), ["(id 11)", "missing key 'caption'"]),
    "annotation not an object": (_replace("annotations", 0, "a dog"), ["annotations[0]", "expected a JSON object"]),
    "null caption": (_set("annotations", 0, "caption", None), ["(id 11)", "must be a string"]),
    "caption not a string": (_set("annotations", 1, "caption", 123), ["(id 12)", "must be a string"]),
    "unknown image_id": (_set("annotations", 2, "image_id", 1234), ["(id 13)", "image_id 1234 is not in 'images'"]),
    "duplicate image id": (_append("images", {"id": 7, "file_name": "x.jpg"}), ["duplicate image id 7"]),
    "duplicate annotation id": (
        _append("annotations", {"id": 12, "image_id": 42, "caption": "a dog"}),
        ["duplicate annotation id 12"],
    ),
    "grounding word out of range": (_set("annotations", 1, "grounding", [[6, 1]]), ["(id 12)", "word index 6"]),
    "grounding not pairs": (_set("annotations", 1, "grounding", [[1, 2, 3]]), ["(id 12)", "grounding[0]"]),
    "grounding not a list": (_set("annotations", 1, "grounding", {"1": 2}), ["(id 12)", "'grounding' must be"]),
}


@pytest.mark.parametrize("case", ENTRY_ERRORS, ids=list(ENTRY_ERRORS))
def test_bad_entries_name_file_and_entry(coco, data_error, case):
    mutate, fragments = ENTRY_ERRORS[case]
    data = coco_data()
    mutate(data)
    path, image_dir = coco(data)
    data_error(lambda: load_coco(path, image_dir, split="val"), path, *fragments)


LAYOUT_ERRORS = {
    "instances file": (
        {"images": [], "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 3}]},
        "found a COCO instances file",
    ),
    "karpathy file": (
        {"dataset": "coco", "images": [{"filename": "a.jpg", "imgid": 0, "split": "val", "sentences": []}]},
        "found a Karpathy split file",
    ),
    "list": ([{"image_id": 1, "caption": "a dog"}], "found a JSON list of 1 items"),
    "no annotations key": ({"images": []}, "found a JSON object with keys 'images'"),
}


@pytest.mark.parametrize("case", LAYOUT_ERRORS, ids=list(LAYOUT_ERRORS))
def test_wrong_layout_says_expected_and_found(coco, data_error, case):
    data, found = LAYOUT_ERRORS[case]
    path, image_dir = coco(data)
    data_error(lambda: load_coco(path, image_dir, split="val"), path, "expected a COCO captions file", found)


def test_missing_annotation_file(tmp_path, data_error):
    path = tmp_path / "captions_train2014.json"
    data_error(lambda: load_coco(path, tmp_path, split="train"), path, "does not exist")


def test_truncated_json_gives_line_and_column(coco, data_error):
    path, image_dir = coco()
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    data_error(lambda: load_coco(path, image_dir, split="val"), path, "malformed JSON at line", "column")


def test_unknown_split_lists_valid_ones(coco, data_error):
    path, image_dir = coco()
    data_error(lambda: load_coco(path, image_dir, split="dev"), path, "'dev'", "train, val, test")


def test_missing_images_counted_and_first_three_named(coco, data_error, tmp_path):
    data = coco_data()
    for k in range(5):
        data["images"].append({"id": 1000 + k, "file_name": f"gone{k}.jpg"})
        data["annotations"].append({"id": 2000 + k, "image_id": 1000 + k, "caption": "a dog"})
    path, image_dir = coco(data)
    message = data_error(
        lambda: load_coco(path, image_dir, split="val"), path, "5 of 7 image files", "gone0.jpg", "gone2.jpg", "..."
    )
    assert "gone3.jpg" not in message


def test_missing_image_folder(coco, data_error, tmp_path):
    path, _ = coco()
    data_error(lambda: load_coco(path, tmp_path / "nowhere", split="val"), path, "image folder", "nowhere")


def test_no_captions_at_all(coco, data_error):
    data = coco_data()
    data["annotations"] = []
    path, image_dir = coco(data)
    data_error(lambda: load_coco(path, image_dir, split="val"), path, "no captioned images")
