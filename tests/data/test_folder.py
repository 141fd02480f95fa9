"""load_folder on a tiny folder of images with a captions json in either layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioner.data.folder import load_folder

MAPPING = {
    "b.png": ["a red square", "a small red image"],
    "sub/a.jpg": ["ein rotes Quadrat"],
    "c.png": [],
}
ENTRIES = [{"file": name, "captions": captions} for name, captions in MAPPING.items()]


@pytest.fixture
def folder(tmp_path: Path, make_image, write_json):
    """``write(data) -> (captions_json, image_dir)`` with b.png, c.png and sub/a.jpg present."""
    image_dir = tmp_path / "images"
    for name in MAPPING:
        make_image(image_dir / name)

    def write(data: object = MAPPING) -> tuple[Path, Path]:
        return write_json(tmp_path / "captions.json", data), image_dir

    return write


@pytest.mark.parametrize("data", [MAPPING, ENTRIES], ids=["mapping", "list"])
def test_both_layouts_give_the_same_records(folder, caplog, data):
    path, image_dir = folder(data)
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load_folder(path, image_dir, split="train")
    # ids by sorted file name over all entries: b.png 0, c.png 1, sub/a.jpg 2
    assert [(r.image_id, r.path) for r in records] == [(0, image_dir / "b.png"), (2, image_dir / "sub" / "a.jpg")]
    assert [c.text for c in records[0].captions] == ["a red square", "a small red image"]
    assert records[1].captions[0].text == "ein rotes Quadrat"
    assert {r.split for r in records} == {"train"}
    # c.png has no captions: skipped, and counted in a warning naming the file
    assert str(path) in caplog.text and "skipped 1 image" in caplog.text


def test_check_files_false_allows_missing_images(folder, tmp_path):
    path, _ = folder()
    assert len(load_folder(path, tmp_path / "nowhere", split="test", check_files=False)) == 2


ERRORS = {
    "captions not a list": ({"b.png": "a red square"}, ["entry 'b.png'", "must be a list"]),
    "caption not a string": ({"b.png": ["a red square", 3]}, ["entry 'b.png' caption 1", "must be a string"]),
    "entry without file": ([{"captions": ["a"]}], ["entries[0]", "missing key 'file'"]),
    "entry without captions": ([{"file": "b.png"}], ["entries[0] ('b.png')", "missing key 'captions'"]),
    "entry not an object": ([["b.png", ["a"]]], ["entries[0]", "expected a JSON object"]),
    "file not a string": ([{"file": 3, "captions": ["a"]}], ["entries[0]", "'file' must be a string"]),
    "empty file name": ({"": ["a dog"]}, ["empty file name"]),
    "duplicate file in list": (
        [{"file": "b.png", "captions": ["a"]}, {"file": "b.png", "captions": ["b"]}],
        ["entries[1]", "duplicate file name 'b.png'"],
    ),
    "coco file": (
        {"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a"}]},
        ["expected a folder captions file", "found a COCO captions file"],
    ),
    "karpathy file": (
        {"images": [{"filename": "b.png", "imgid": 0, "split": "val", "sentences": []}]},
        ["expected a folder captions file", "found a Karpathy split file"],
    ),
    "a number": (3, ["expected a folder captions file", "found a JSON int"]),
    "no captions at all": ({"b.png": []}, ["no captioned images"]),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_bad_files_name_file_and_entry(folder, data_error, case):
    data, fragments = ERRORS[case]
    path, image_dir = folder(data)
    data_error(lambda: load_folder(path, image_dir, split="train"), path, *fragments)


def test_duplicate_key_in_mapping(folder, data_error):
    path, image_dir = folder()
    path.write_text('{"b.png": ["a red square"],\n "b.png": ["another"]}', encoding="utf-8")
    data_error(lambda: load_folder(path, image_dir, split="train"), path, "duplicate key 'b.png'")


def test_missing_file(tmp_path, data_error):
    path = tmp_path / "captions.json"
    data_error(lambda: load_folder(path, tmp_path, split="train"), path, "does not exist")


def test_folder_given_as_file(tmp_path, data_error):
    data_error(lambda: load_folder(tmp_path, tmp_path, split="train"), tmp_path, "is a folder")


def test_malformed_json_gives_line_and_column(folder, data_error):
    path, image_dir = folder()
    path.write_text('{"b.png": ["a red square"],\n "c.png": ["a" "b"]}', encoding="utf-8")
    data_error(lambda: load_folder(path, image_dir, split="train"), path, "malformed JSON at line 2, column")


def test_unknown_split_lists_valid_ones(folder, data_error):
    path, image_dir = folder()
    data_error(lambda: load_folder(path, image_dir, split="training"), path, "'training'", "train, val, test")


def test_missing_images(folder, data_error):
    path, image_dir = folder({f"gone{k}.png": ["a dog"] for k in range(4)} | MAPPING)
    message = data_error(
        lambda: load_folder(path, image_dir, split="train"), path, "4 of 6 image files", "gone0.png", "gone2.png", "..."
    )
    assert "gone3.png" not in message
