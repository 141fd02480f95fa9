"""load_karpathy on tiny files in the layout of dataset_coco.json / dataset_flickr8k.json."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioner.data.karpathy import load_karpathy


def _sentence(raw: str, imgid: int, sentid: int) -> dict:
    return {"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def _coco_image(imgid: int, cocoid: int, split: str, folder: str, raws: list[str]) -> dict:
    return {
        "filepath": folder,
        "sentids": list(range(10 * imgid, 10 * imgid + len(raws))),
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "imgid": imgid,
        "split": split,
        "sentences": [_sentence(r, imgid, 10 * imgid + k) for k, r in enumerate(raws)],
        "cocoid": cocoid,
    }


def coco_data() -> dict:
    """train 3, restval 9, val 1 (tokens only), test 5; train 2 has no sentences."""
    val = _coco_image(3, 1, "val", "val2014", ["x"])
    val["sentences"] = [{"tokens": ["a", "val", "image"], "imgid": 3, "sentid": 30}]
    return {
        "dataset": "coco",
        "images": [
            _coco_image(0, 5, "test", "val2014", ["A test image."]),
            _coco_image(1, 3, "train", "train2014", ["A man riding a horse.", "Ein Mann reitet ein Pferd."]),
            _coco_image(2, 9, "restval", "val2014", ["A restval image"]),
            val,
            _coco_image(4, 2, "train", "train2014", []),
        ],
    }


@pytest.fixture
def karpathy(tmp_path: Path, make_image, write_json):
    """``write(data) -> (dataset_json, image_root)`` with the images of coco_data() present."""
    root = tmp_path / "coco"

    def write(data: dict | None = None) -> tuple[Path, Path]:
        data = coco_data() if data is None else data
        for image in data.get("images", []) if isinstance(data, dict) else []:
            if isinstance(image, dict) and "filename" in image:
                make_image(root / image.get("filepath", "") / image["filename"])
        return write_json(tmp_path / "dataset_coco.json", data), root

    return write


def test_train_includes_restval(karpathy, caplog):
    path, root = karpathy()
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load_karpathy(path, root, split="train")
    assert [r.image_id for r in records] == [3, 9]  # cocoid, sorted
    assert [r.split for r in records] == ["train", "train"]
    assert [r.extra["karpathy_split"] for r in records] == ["train", "restval"]
    assert records[0].path == root / "train2014" / "COCO_train2014_000000000003.jpg"
    assert [c.text for c in records[0].captions] == ["A man riding a horse.", "Ein Mann reitet ein Pferd."]
    assert records[1].path == root / "val2014" / "COCO_val2014_000000000009.jpg"
    # cocoid 2 has no sentences: skipped, and counted in a warning naming the file
    assert str(path) in caplog.text and "skipped 1 image" in caplog.text


def test_train_without_restval(karpathy):
    records = load_karpathy(*karpathy(), split="train", restval_in_train=False)
    assert [r.image_id for r in records] == [3]


def test_val_falls_back_to_tokens(karpathy):
    (record,) = load_karpathy(*karpathy(), split="val")
    assert record.image_id == 1 and record.split == "val"
    assert [c.text for c in record.captions] == ["a val image"]
    assert record.extra["imgid"] == 3


def test_test_split(karpathy):
    (record,) = load_karpathy(*karpathy(), split="test")
    assert (record.image_id, record.captions[0].text) == (5, "A test image.")


def test_flickr_layout_uses_imgid_and_no_filepath(karpathy):
    data = {
        "dataset": "flickr8k",
        "images": [
            {"filename": f"{n}_abc.jpg", "imgid": n, "split": "train", "sentences": [_sentence("A dog runs .", n, n)]}
            for n in (4, 2)
        ],
    }
    path, root = karpathy(data)
    records = load_karpathy(path, root, split="train")
    assert [(r.image_id, r.path) for r in records] == [(2, root / "2_abc.jpg"), (4, root / "4_abc.jpg")]


def test_check_files_false_allows_missing_images(karpathy, tmp_path):
    path, _ = karpathy()
    assert len(load_karpathy(path, tmp_path / "nowhere", split="test", check_files=False)) == 1


def _set(index: int, key: str, value):
    def mutate(data: dict) -> None:
        data["images"][index][key] = value

    return mutate


def _drop(index: int, key: str):
    def mutate(data: dict) -> None:
        del data["images"][index][key]

    return mutate


def _sentences(index: int, sentences: list):
    return _set(index, "sentences", sentences)


def _drop_both(index: int, *keys: str):
    def mutate(data: dict) -> None:
        for key in keys:
            del data["images"][index][key]

    return mutate


ENTRY_ERRORS = {
    "image without filename": (_drop(1, "filename"), ["images[1]", "missing key 'filename'"]),
    "image without imgid or cocoid": (_drop_both(0, "imgid", "cocoid"),
                                      ["images[0] ('COCO_val2014_000000000005.jpg')", "'imgid'", "'cocoid'"]),
    "image without split": (_drop(2, "split"), ["images[2]", "'split'"]),
    "image without sentences": (_drop(1, "sentences"), ["images[1]", "'sentences'"]),
    "unknown split in file": (_set(0, "split", "testing"), ["images[0]", "unknown split 'testing'", "restval"]),
    "cocoid not an int": (_set(0, "cocoid", "5"), ["images[0]", "'cocoid' must be an integer"]),
    "caption not a string": (_sentences(1, [{"raw": 5}]), ["images[1]", "sentence 0", "must be a string"]),
    "neither raw nor tokens": (_sentences(2, [{"sentid": 3}]), ["images[2]", "sentence 0", "'raw'", "'tokens'"]),
    "sentence not an object": (_sentences(2, ["a dog"]), ["images[2]", "sentence 0", "expected a JSON object"]),
    "duplicate cocoid": (_set(3, "cocoid", 3), ["duplicate image id 3"]),
}


@pytest.mark.parametrize("case", ENTRY_ERRORS, ids=list(ENTRY_ERRORS))
def test_bad_entries_name_file_and_entry(karpathy, data_error, case):
    mutate, fragments = ENTRY_ERRORS[case]
    data = coco_data()
    mutate(data)
    path, root = karpathy(data)
    # the whole file is checked, whichever split is asked for
    data_error(lambda: load_karpathy(path, root, split="test", check_files=False), path, *fragments)


def test_duplicate_imgid_without_cocoid(karpathy, data_error):
    image = {"imgid": 7, "split": "train", "sentences": [{"raw": "a dog"}]}
    data = {"dataset": "flickr8k", "images": [{"filename": f"{n}.jpg", **image} for n in (1, 2)]}
    path, root = karpathy(data)
    data_error(lambda: load_karpathy(path, root, split="train"), path, "duplicate image id 7")


def test_coco_captions_file_is_the_wrong_layout(karpathy, data_error):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "a"}]}
    path, root = karpathy(data)
    expected, found = "expected a Karpathy split file", "found a COCO captions file"
    data_error(lambda: load_karpathy(path, root, split="train"), path, expected, found)


def test_list_is_the_wrong_layout(karpathy, data_error):
    path, root = karpathy([1, 2])
    data_error(lambda: load_karpathy(path, root, split="train"), path, "expected a Karpathy split file", "JSON list")


def test_missing_file(tmp_path, data_error):
    path = tmp_path / "dataset_coco.json"
    data_error(lambda: load_karpathy(path, tmp_path, split="val"), path, "does not exist")


def test_truncated_json_gives_line_and_column(karpathy, data_error):
    path, root = karpathy()
    path.write_text(path.read_text(encoding="utf-8")[:200], encoding="utf-8")
    data_error(lambda: load_karpathy(path, root, split="val"), path, "malformed JSON at line", "column")


@pytest.mark.parametrize("split", ["restval", "dev", "Train"])
def test_unknown_split_lists_valid_ones(karpathy, data_error, split):
    path, root = karpathy()
    data_error(lambda: load_karpathy(path, root, split=split), path, repr(split), "train, val, test")


def test_missing_images(karpathy, data_error):
    path, root = karpathy()
    missing = root / "val2014" / "COCO_val2014_000000000009.jpg"
    missing.unlink()
    data_error(lambda: load_karpathy(path, root, split="train"), path, "1 of 2 image files", missing)


def test_split_with_no_images(karpathy, data_error):
    data = coco_data()
    data["images"] = [im for im in data["images"] if im["split"] != "test"]
    path, root = karpathy(data)
    data_error(lambda: load_karpathy(path, root, split="test"), path, "no captioned images for split 'test'")


def test_an_entry_with_cocoid_and_no_imgid_loads_under_its_cocoid(karpathy):
    data = coco_data()
    for image in data["images"]:
        del image["imgid"]
    path, root = karpathy(data)
    records = load_karpathy(path, root, split="test")
    assert [r.image_id for r in records] == [5]


def test_empty_sentences_are_skipped_and_counted(karpathy, caplog):
    data = coco_data()
    data["images"][1]["sentences"].append({"raw": "   "})
    data["images"][1]["sentences"].append({"tokens": []})
    path, root = karpathy(data)
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load_karpathy(path, root, split="train", restval_in_train=False)
    assert [[c.text for c in r.captions] for r in records] == [["A man riding a horse.", "Ein Mann reitet ein Pferd."]]
    assert "skipped 2 caption(s) with no words" in caplog.text
