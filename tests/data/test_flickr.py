"""load_flickr8k on tiny files in the layout of the official Flickr8k_text.zip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioner.data.flickr import load_flickr8k

# Sorted names: 1000_a (id 0), 2000_b (id 1), 3000_c (id 2).
TOKENS = """\
3000_c.jpg#1\tA cat on a mat .
3000_c.jpg#0\tA grey cat sleeps .
1000_a.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .
1000_a.jpg#1\tUn niño en las escaleras .

2000_b.jpg#0\tA black dog and a spotted dog are fighting
"""


@pytest.fixture
def flickr(tmp_path: Path, make_image):
    """``write(tokens, split_names) -> (token_file, split_file, image_dir)`` with all images present."""
    image_dir = tmp_path / "Flicker8k_Dataset"
    for name in ("1000_a.jpg", "2000_b.jpg", "3000_c.jpg", "4000_d.jpg"):
        make_image(image_dir / name)

    def write(tokens: str = TOKENS, split_names: str = "3000_c.jpg\n1000_a.jpg\n") -> tuple[Path, Path, Path]:
        token_file = tmp_path / "Flickr8k.token.txt"
        split_file = tmp_path / "Flickr_8k.trainImages.txt"
        token_file.write_text(tokens, encoding="utf-8")
        split_file.write_text(split_names, encoding="utf-8")
        return token_file, split_file, image_dir

    return write


def test_records_of_the_split(flickr):
    token_file, split_file, image_dir = flickr()
    records = load_flickr8k(token_file, split_file, image_dir, split="train")
    assert [r.image_id for r in records] == [0, 2]
    assert [r.path for r in records] == [image_dir / "1000_a.jpg", image_dir / "3000_c.jpg"]
    assert [r.split for r in records] == ["train", "train"]
    assert [c.text for c in records[0].captions][1] == "Un niño en las escaleras ."
    # captions in the order of their '#index', not of the lines
    assert [c.text for c in records[1].captions] == ["A grey cat sleeps .", "A cat on a mat ."]


def test_image_ids_do_not_depend_on_the_split_file(flickr):
    token_file, split_file, image_dir = flickr(split_names="2000_b.jpg\n")
    (record,) = load_flickr8k(token_file, split_file, image_dir, split="val")
    assert (record.image_id, record.split) == (1, "val")


def test_image_without_captions_is_skipped_with_a_warning(flickr, caplog):
    token_file, split_file, image_dir = flickr(split_names="4000_d.jpg\r\n2000_b.jpg\r\n\r\n")
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = load_flickr8k(token_file, split_file, image_dir, split="test")
    assert [r.image_id for r in records] == [1]
    assert str(split_file) in caplog.text and "skipped 1 image" in caplog.text


def test_check_files_false_allows_missing_images(flickr, tmp_path):
    token_file, split_file, _ = flickr()
    records = load_flickr8k(token_file, split_file, tmp_path / "nowhere", split="train", check_files=False)
    assert len(records) == 2


TOKEN_ERRORS = {
    "no tab": ("1000_a.jpg#0 A child .\n", ["line 1", "expected '<file name>#<index><TAB><caption>'"]),
    "no index": ("1000_a.jpg\tA child .\n", ["line 1", "expected"]),
    "index not a number": ("1000_a.jpg#x\tA child .\n", ["line 1", "expected"]),
    "duplicate caption id": (
        "1000_a.jpg#0\tA child .\n1000_a.jpg#0\tA kid .\n",
        ["line 2", "duplicate caption id '1000_a.jpg#0'"],
    ),
}


@pytest.mark.parametrize("case", TOKEN_ERRORS, ids=list(TOKEN_ERRORS))
def test_bad_token_lines_name_file_and_line(flickr, data_error, case):
    tokens, fragments = TOKEN_ERRORS[case]
    token_file, split_file, image_dir = flickr(tokens=tokens)
    data_error(lambda: load_flickr8k(token_file, split_file, image_dir, split="train"), token_file, *fragments)


def test_duplicate_name_in_split_file(flickr, data_error):
    token_file, split_file, image_dir = flickr(split_names="1000_a.jpg\n2000_b.jpg\n1000_a.jpg\n")
    data_error(
        lambda: load_flickr8k(token_file, split_file, image_dir, split="train"),
        split_file,
        "line 3",
        "duplicate file name '1000_a.jpg'",
    )


@pytest.mark.parametrize("which", ["token", "split"])
def test_missing_files(flickr, data_error, which):
    token_file, split_file, image_dir = flickr()
    missing = token_file if which == "token" else split_file
    missing.unlink()
    data_error(lambda: load_flickr8k(token_file, split_file, image_dir, split="train"), missing, "does not exist")


def test_not_utf8(flickr, data_error):
    token_file, split_file, image_dir = flickr()
    token_file.write_bytes(b"1000_a.jpg#0\tA ni\xf1o .\n")
    data_error(lambda: load_flickr8k(token_file, split_file, image_dir, split="train"), token_file, "not UTF-8")


def test_unknown_split_lists_valid_ones(flickr, data_error):
    token_file, split_file, image_dir = flickr()
    load = lambda: load_flickr8k(token_file, split_file, image_dir, split="dev")  # noqa: E731
    data_error(load, split_file, "'dev'", "train, val, test")


def test_missing_images(flickr, data_error):
    token_file, split_file, image_dir = flickr()
    (image_dir / "3000_c.jpg").unlink()
    data_error(
        lambda: load_flickr8k(token_file, split_file, image_dir, split="train"),
        split_file,
        "1 of 2 image files",
        image_dir / "3000_c.jpg",
    )


def test_split_file_with_no_known_images(flickr, data_error):
    token_file, split_file, image_dir = flickr(split_names="9999_z.jpg\n")
    load = lambda: load_flickr8k(token_file, split_file, image_dir, split="test")  # noqa: E731
    data_error(load, split_file, "no captioned images")
