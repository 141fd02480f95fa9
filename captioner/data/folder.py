"""Loader for a plain folder of images with a captions json: the layout for your own data.

The captions json is either a mapping from file name to captions::

    {"img1.jpg": ["a dog runs on the grass", "a brown dog outside"],
     "img2.jpg": ["two people on a beach"]}

or a list of entries::

    [{"file": "img1.jpg", "captions": ["a dog runs on the grass", ...]},
     {"file": "img2.jpg", "captions": ["two people on a beach"]}]

File names are relative to ``image_dir`` (sub-folders allowed). The image id is the
file name's index in the sorted list of all file names in the json. Only the listed
images are loaded; ``split`` is the label the records get.
"""

from __future__ import annotations

from pathlib import Path

from captioner.data._io import (
    check_caption,
    check_new,
    check_split,
    describe_json,
    finish,
    get,
    read_json,
)
from captioner.data.records import Caption, ImageRecord
from captioner.errors import DataError

_EXPECTED = 'a folder captions file ({"file name": ["caption", ...]} or [{"file", "captions"}, ...])'


def load_folder(
    captions_json: str | Path, image_dir: str | Path, *, split: str, check_files: bool = True
) -> list[ImageRecord]:
    """Read a folder captions json, one record per captioned image, sorted by image id.

    Captions keep their order in the file. Images with an empty caption list are
    skipped and counted in a warning on the ``captioner.data`` logger.

    Args:
        captions_json: the captions file, in either layout above.
        image_dir: the folder the file names are relative to.
        split: the split these images belong to: ``train``, ``val`` or ``test``.
        check_files: require every image file to exist.

    Raises:
        DataError: the file is missing, malformed or in neither layout; an entry lacks
            a key or has a bad value (a caption without words is skipped and counted); a file name repeats; the split
            is unknown; image files are missing.
    """
    src, image_dir = Path(captions_json), Path(image_dir)
    check_split(split, src)
    entries = _entries(read_json(src, unique_keys=True), src)
    ids = {name: i for i, name in enumerate(sorted(name for name, _, _ in entries))}

    records, empty = [], 0
    for name, captions, where in entries:
        if not isinstance(captions, list):
            raise DataError(f"{src}: {where}: captions must be a list of strings, found {captions!r:.60}")
        checked = [check_caption(c, src, f"{where} caption {j}") for j, c in enumerate(captions)]
        texts = tuple(Caption(t) for t in checked if t)
        empty += len(checked) - len(texts)
        if texts:
            records.append(ImageRecord(image_id=ids[name], path=image_dir / name, captions=texts, split=split))
    return finish(
        records,
        source=src,
        split=split,
        uncaptioned=len(entries) - len(records),
        image_dir=image_dir,
        check_files=check_files,
        empty_captions=empty,
    )


def _entries(data: object, src: Path) -> list[tuple[str, object, str]]:
    """``(file name, captions, where)`` for each entry of either layout; file names unique."""
    if isinstance(data, dict) and not {"images", "annotations"} & data.keys():
        entries = [(name, captions, f"entry {name!r}") for name, captions in data.items()]
    elif isinstance(data, list):
        entries, seen = [], set()
        for i, entry in enumerate(data):
            name = get(entry, "file", str, src, f"entries[{i}]")
            where = f"entries[{i}] ({name!r})"
            check_new(name, seen, src, "file name", where)
            seen.add(name)
            entries.append((name, get(entry, "captions", None, src, where), where))
    else:
        raise DataError(f"{src}: expected {_EXPECTED}, found {describe_json(data)}")
    for name, _, where in entries:
        if not name.strip():
            raise DataError(f"{src}: {where}: empty file name")
    return entries
