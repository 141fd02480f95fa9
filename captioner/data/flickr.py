"""Loader for the official Flickr8k text download (``Flickr8k_text.zip``).

The layout it reads: a token file, ``Flickr8k.token.txt`` (or ``Flickr8k.lemma.token.txt``),
with one caption a line, ``<file name>#<caption index><TAB><caption>``::

    1000268201_693b08cb0e.jpg#0	A child in a pink dress is climbing up a set of stairs in an entry way .
    1000268201_693b08cb0e.jpg#1	A girl going into a wooden building .

and a split file, ``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt`` or
``Flickr_8k.testImages.txt``, with one file name a line::

    2513260012_03d33305cf.jpg
    2903617548_d3e38d7f88.jpg

The image path is ``image_dir / file name``. The image id is the file name's index in
the sorted list of all file names in the token file, so it does not depend on the split
file. The split file names the split's images; ``split`` is the label the records get
(the "dev" list is ``val``).
"""

from __future__ import annotations

from pathlib import Path

from captioner.data._io import check_caption, check_new, check_split, finish, read_text
from captioner.data.records import Caption, ImageRecord
from captioner.errors import DataError


def load_flickr8k(
    token_file: str | Path,
    split_file: str | Path,
    image_dir: str | Path,
    *,
    split: str,
    check_files: bool = True,
) -> list[ImageRecord]:
    """Read one split of Flickr8k, one record per captioned image, sorted by image id.

    Captions keep the order of their index after ``#``. Images of the split file with no
    caption in the token file are skipped and counted in a warning on the
    ``captioner.data`` logger. Blank lines are ignored in both files.

    Args:
        token_file: ``Flickr8k.token.txt``.
        split_file: the split's list of file names, e.g. ``Flickr_8k.devImages.txt``.
        image_dir: the folder holding the images (``Flicker8k_Dataset/``).
        split: the split these images belong to: ``train``, ``val`` or ``test``.
        check_files: require every image file of the split to exist.

    Raises:
        DataError: a file is missing or unreadable; a token line is malformed (a caption
            without words is skipped and counted); a caption id (``name#index``) or a split-file name repeats; the
            split is unknown; image files are missing.
    """
    token_src, split_src, image_dir = Path(token_file), Path(split_file), Path(image_dir)
    check_split(split, split_src)
    captions = _read_tokens(token_src)
    ids = {name: i for i, name in enumerate(sorted(captions))}
    empty = sum(1 for per_image in captions.values() for text in per_image.values() if not text)

    records, uncaptioned, seen = [], 0, set()
    for lineno, line in enumerate(read_text(split_src).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        check_new(name, seen, split_src, "file name", f"line {lineno}")
        seen.add(name)
        texts = tuple(Caption(text) for _, text in sorted(captions.get(name, {}).items()) if text)
        if not texts:
            uncaptioned += 1
            continue
        records.append(ImageRecord(image_id=ids[name], path=image_dir / name, captions=texts, split=split))
    return finish(
        records,
        source=split_src,
        split=split,
        uncaptioned=uncaptioned,
        image_dir=image_dir,
        check_files=check_files,
        empty_captions=empty,
    )


def _read_tokens(src: Path) -> dict[str, dict[int, str]]:
    """``{file name: {caption index: caption}}`` from a token file."""
    captions: dict[str, dict[int, str]] = {}
    for lineno, line in enumerate(read_text(src).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        key, tab, text = line.partition("\t")
        name, hash_, index = key.strip().rpartition("#")
        if not (tab and hash_ and name and index.isdigit()):
            raise DataError(f"{src}: {where}: expected '<file name>#<index><TAB><caption>', found {line!r:.60}")
        per_image = captions.setdefault(name, {})
        if int(index) in per_image:
            raise DataError(f"{src}: {where}: duplicate caption id {key.strip()!r}")
        per_image[int(index)] = check_caption(text, src, f"{where} ({key.strip()})")
    return captions
