"""A caption without words in an otherwise valid file is skipped and counted, by every loader
(the run goes on; one warning line names the file and the count)."""

from __future__ import annotations

import json
import logging

import pytest

from captioner.data.coco import load_coco
from captioner.data.flickr import load_flickr8k
from captioner.data.folder import load_folder
from captioner.data.karpathy import load_karpathy

EMPTY = ["", "   ", "\t\u00a0\u200b ", " ... !"]


def _coco(tmp_path, make_image):
    make_image(tmp_path / "img" / "1.png")
    make_image(tmp_path / "img" / "2.png")
    anns = [{"id": 10, "image_id": 1, "caption": "a red circle"}]
    anns += [{"id": 11 + k, "image_id": 1, "caption": text} for k, text in enumerate(EMPTY)]
    anns += [{"id": 20, "image_id": 2, "caption": ""}]  # image 2 has only an empty caption
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
                                "annotations": anns}))
    return load_coco(path, tmp_path / "img", split="train")


def _folder(tmp_path, make_image):
    make_image(tmp_path / "img" / "a.png")
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"a.png": ["a red circle", *EMPTY]}))
    return load_folder(path, tmp_path / "img", split="train")


def _karpathy(tmp_path, make_image):
    make_image(tmp_path / "img" / "a.jpg")
    sentences = [{"raw": "a red circle"}] + [{"raw": t} for t in EMPTY]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "imgid": 0, "split": "train",
                                            "sentences": sentences}]}))
    return load_karpathy(path, tmp_path / "img", split="train")


def _flickr(tmp_path, make_image):
    make_image(tmp_path / "img" / "a.jpg")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.jpg#0\ta red circle\n" + "".join(f"a.jpg#{k + 1}\t{t}\n" for k, t in enumerate(EMPTY)))
    split = tmp_path / "train.txt"
    split.write_text("a.jpg\n")
    return load_flickr8k(tokens, split, tmp_path / "img", split="train")


@pytest.mark.parametrize("load", [_coco, _folder, _karpathy, _flickr], ids=["coco", "folder", "karpathy", "flickr8k"])
def test_captions_without_words_are_skipped_and_counted(load, tmp_path, make_image, caplog):
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load(tmp_path, make_image)
    assert [[c.text for c in r.captions] for r in records] == [["a red circle"]]
    expected = len(EMPTY) + (1 if load is _coco else 0)
    assert f"skipped {expected} caption(s) with no words" in caplog.text
    if load is _coco:  # the image left with no caption is skipped too, in the same warning line
        assert "skipped 1 image(s) of split 'train' with no captions" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
