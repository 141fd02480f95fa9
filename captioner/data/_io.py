"""Shared parsing helpers for the annotation loaders.

Every problem with a user's file becomes a one-line :class:`~captioner.errors.DataError`
of the form ``<file>: <entry>: <what is wrong>``, so the command line can print it
without a traceback. The loaders (``coco``, ``karpathy``, ``flickr``, ``folder``) only
describe their layout; reading, checking and finishing the records happens here.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any

from captioner.data.records import ImageRecord
from captioner.errors import DataError
from captioner.vocab import tokenize

log = logging.getLogger("captioner.data")

SPLITS = ("train", "val", "test")

# Keys of COCO instance / keypoint annotations: a file whose annotations have these and
# no "caption" is the wrong COCO file.
INSTANCE_KEYS = frozenset({"bbox", "category_id", "segmentation", "keypoints"})

_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_JSON_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


# ----------------------------------------------------------------------------- files


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped); DataError if unreadable."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an annotation file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation file ({e.strerror or e})") from None


def read_json(path: str | Path, *, unique_keys: bool = False) -> Any:
    """The parsed JSON of ``path``; DataError (with line and column) if it is malformed.

    Args:
        path: the JSON file.
        unique_keys: DataError if an object repeats a key (plain JSON keeps the last
            value silently); used where keys are file names.
    """
    text = read_text(path)
    hook = _unique_keys(path) if unique_keys else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _unique_keys(path: str | Path) -> Callable[[list[tuple[str, Any]]], dict]:
    """A ``json.loads`` object hook that refuses repeated keys."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        data = dict(pairs)
        if len(data) < len(pairs):
            dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            raise DataError(f"{path}: duplicate key {dup!r} in a JSON object")
        return data

    return hook


def describe_json(data: Any) -> str:
    """A short guess at what a parsed annotation file is, for "expected X, found Y" messages."""
    if isinstance(data, list):
        if data and all(isinstance(d, dict) and "file" in d for d in data):
            return "a folder captions list ([{\"file\", \"captions\"}, ...])"
        return f"a JSON list of {len(data)} items"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}"
    images, anns = data.get("images"), data.get("annotations")
    if isinstance(images, list) and isinstance(anns, list):
        first = anns[0] if anns and isinstance(anns[0], dict) else {}
        if "caption" in first:
            return "a COCO captions file (captions_*.json)"
        if "keypoints" in first:
            return "a COCO person keypoints file (annotations have 'keypoints', no 'caption')"
        if INSTANCE_KEYS & first.keys():
            return "a COCO instances file (annotations have 'bbox'/'category_id', no 'caption')"
        return "a COCO-style file with 'images' and 'annotations'"
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return "a Karpathy split file (dataset_*.json)"
    values = list(data.values())
    if values and "images" not in data and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in values):
        return "a folder captions mapping ({\"file\": [captions]})"
    keys = ", ".join(repr(k) for k in list(data)[:6]) + (", ..." if len(data) > 6 else "")
    return f"a JSON object with keys {keys}" if data else "an empty JSON object"


# ----------------------------------------------------------------------------- entries


def check_split(split: str, source: str | Path, valid: Iterable[str] = SPLITS) -> None:
    """DataError unless ``split`` is one of ``valid`` (the message lists them)."""
    valid = tuple(valid)
    if split not in valid:
        raise DataError(f"{source}: unknown split {split!r}; valid splits: {', '.join(valid)}")


def get(entry: Any, key: str, kind: type | None, source: str | Path, where: str) -> Any:
    """``entry[key]``, checked to be of ``kind`` (None: any); DataError naming the entry otherwise.

    ``bool`` never passes as ``int`` (JSON ``true`` is not an id).
    """
    if not isinstance(entry, dict):
        raise DataError(f"{source}: {where}: expected a JSON object, found {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{source}: {where}: missing key {key!r}")
    value = entry[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise DataError(f"{source}: {where}: {key!r} must be {_JSON_NAMES[kind]}, found {value!r:.60}")
    return value


def optional(entry: dict, key: str, kind: type, source: str | Path, where: str) -> Any:
    """``entry[key]`` checked like :func:`get`, or None when the key is absent or null."""
    return None if entry.get(key) is None else get(entry, key, kind, source, where)


def check_caption(text: Any, source: str | Path, where: str) -> str:
    """A caption stripped of surrounding whitespace, or "" when it has no words (the loaders
    skip such captions and count them: one empty caption in a large file does not stop a
    run); DataError if it is not a string."""
    if not isinstance(text, str):
        raise DataError(f"{source}: {where}: caption must be a string, found {text!r:.60}")
    # Any letter or digit almost always makes a word; tokenize only the rare rest (speed:
    # Karpathy's COCO file has 616k sentences).
    if _LETTER_OR_DIGIT.search(text) is None and not tokenize(text):
        return ""
    return text.strip()


def check_new(key: Any, seen: Container, source: str | Path, what: str, where: str = "") -> None:
    """DataError if ``key`` is already in ``seen`` (a duplicated id)."""
    if key in seen:
        raise DataError(f"{source}: {where + ': ' if where else ''}duplicate {what} {key!r}")


def coco_annotations(data: dict, source: str | Path) -> Iterator[tuple[dict, int, int, str]]:
    """A COCO file's ``annotations`` (captions or instances), each as (entry, its id, its
    image_id, where it is for errors); ids are checked to be integers and unique."""
    seen: set[int] = set()
    for i, entry in enumerate(data["annotations"]):
        ann_id = get(entry, "id", int, source, f"annotations[{i}]")
        where = f"annotations[{i}] (id {ann_id})"
        check_new(ann_id, seen, source, "annotation id", where)
        seen.add(ann_id)
        yield entry, ann_id, get(entry, "image_id", int, source, where), where


# ----------------------------------------------------------------------------- records


def finish(
    records: Iterable[ImageRecord],
    *,
    source: str | Path,
    split: str,
    uncaptioned: int,
    image_dir: str | Path,
    check_files: bool,
    empty_captions: int = 0,
) -> list[ImageRecord]:
    """Sort records by image id, warn about skipped images, and check the image files exist.

    Args:
        records: the captioned images of one split.
        source: the annotation file, for messages.
        split: the split's name, for messages.
        uncaptioned: how many images of the split were skipped for having no captions.
        empty_captions: how many captions without words were skipped (in the whole file).
        image_dir: the image folder, for messages.
        check_files: whether to require every record's image file to exist.

    Raises:
        DataError: no image of the split has a caption, or (with ``check_files``) image
            files are missing.
    """
    records = sorted(records, key=lambda r: r.image_id)
    skipped = [f"skipped {empty_captions} caption(s) with no words"] if empty_captions else []
    if uncaptioned:
        skipped.append(f"skipped {uncaptioned} image(s) of split {split!r} with no captions")
    if skipped:
        log.warning("%s: %s", source, "; ".join(skipped))
    if not records:
        raise DataError(f"{source}: no captioned images for split {split!r}")
    if check_files:
        check_image_files(records, source=source, image_dir=image_dir)
    return records


def check_image_files(records: list[ImageRecord], *, source: str | Path, image_dir: str | Path) -> None:
    """DataError naming how many image files are missing and the first three of them."""
    if not Path(image_dir).is_dir():
        raise DataError(f"{source}: image folder {image_dir} does not exist ({len(records)} images expected in it)")
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        counts = f"{len(missing)} of {len(records)} image files of split {records[0].split!r}"
        raise DataError(f"{source}: {counts} do not exist: {shown}")
