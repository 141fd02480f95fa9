"""Loader for Karpathy's split files ``dataset_{coco,flickr8k,flickr30k}.json``.

The layout it reads::

    {
      "dataset": "coco",
      "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
         "imgid": 0, "cocoid": 391895, "split": "test",
         "sentences": [{"raw": "A man with a red helmet on a small moped.",
                        "tokens": ["a", "man", ...], "imgid": 0, "sentid": 0}, ...]},
        ...
      ]
    }

``filepath`` and ``cocoid`` appear in the COCO file only. The image path is
``image_root / filepath / filename`` (``image_root / filename`` without ``filepath``);
the image id is ``cocoid`` when present (so COCO evaluation tools find the image), else
``imgid`` (an entry needs one of the two). A sentence without words is skipped and counted
in a warning, like an image without sentences. A caption is the sentence's ``raw`` text, or its ``tokens`` joined by spaces
when ``raw`` is absent.

Splits in the file are ``train``, ``restval``, ``val`` and ``test``. ``restval`` is the
part of COCO val2014 that Karpathy's split leaves out of val and test; it joins ``train``
by default (the usual 113k-image COCO training set). Records of ``restval`` images get
split ``train`` and keep ``extra["karpathy_split"] == "restval"``.
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
    optional,
    read_json,
)
from captioner.data.records import Caption, ImageRecord
from captioner.errors import DataError

FILE_SPLITS = ("train", "restval", "val", "test")

_EXPECTED = 'a Karpathy split file ({"images": [{"filename", "imgid", "split", "sentences"}, ...]})'


def load_karpathy(
    dataset_json: str | Path,
    image_root: str | Path,
    *,
    split: str,
    restval_in_train: bool = True,
    check_files: bool = True,
) -> list[ImageRecord]:
    """Read one split of a Karpathy split file, one record per captioned image, sorted by image id.

    The whole file is checked, whichever split is asked for. Images without any sentence
    are skipped and counted in a warning on the ``captioner.data`` logger.

    Args:
        dataset_json: ``dataset_coco.json``, ``dataset_flickr8k.json`` or ``dataset_flickr30k.json``.
        image_root: the folder the image paths are relative to (for COCO the folder
            holding ``train2014/`` and ``val2014/``; for Flickr the image folder).
        split: ``train``, ``val`` or ``test``.
        restval_in_train: add the ``restval`` images to ``train``.
        check_files: require every image file of the split to exist.

    Raises:
        DataError: the file is missing, malformed or not a Karpathy file; an image entry
            lacks a key or has a bad value; image ids repeat; the
            split is unknown; image files are missing.
    """
    src, image_root = Path(dataset_json), Path(image_root)
    check_split(split, src)
    data = read_json(src)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" not in data):
        raise DataError(f"{src}: expected {_EXPECTED}, found {describe_json(data)}")
    wanted = {split, "restval"} if split == "train" and restval_in_train else {split}

    records, uncaptioned, empty, seen = [], 0, 0, set()
    for i, image in enumerate(data["images"]):
        filename = get(image, "filename", str, src, f"images[{i}]")
        where = f"images[{i}] ({filename!r})"
        file_split = get(image, "split", str, src, where)
        if file_split not in FILE_SPLITS:
            valid = ", ".join(FILE_SPLITS)
            raise DataError(f"{src}: {where}: unknown split {file_split!r} in the file; expected one of {valid}")
        imgid = optional(image, "imgid", int, src, where)
        image_id = optional(image, "cocoid", int, src, where)
        if image_id is None and imgid is None:
            raise DataError(f"{src}: {where}: missing key 'imgid' (and no 'cocoid' to use instead)")
        image_id = imgid if image_id is None else image_id
        check_new(image_id, seen, src, "image id", where)
        seen.add(image_id)
        sentences = get(image, "sentences", list, src, where)
        checked = [_caption(s, src, f"{where} sentence {j}") for j, s in enumerate(sentences)]
        captions = tuple(c for c in checked if c.text)
        empty += len(checked) - len(captions)
        filepath = optional(image, "filepath", str, src, where)

        if file_split not in wanted:
            continue
        if not captions:
            uncaptioned += 1
            continue
        records.append(
            ImageRecord(
                image_id=image_id,
                path=image_root / filepath / filename if filepath else image_root / filename,
                captions=captions,
                split=split,
                extra={"imgid": imgid, "karpathy_split": file_split},
            )
        )
    return finish(
        records,
        source=src,
        split=split,
        uncaptioned=uncaptioned,
        image_dir=image_root,
        check_files=check_files,
        empty_captions=empty,
    )


def _caption(sentence: object, src: Path, where: str) -> Caption:
    """``raw``, or the ``tokens`` joined when ``raw`` is absent."""
    if isinstance(sentence, dict) and sentence.get("raw") is None:
        if "tokens" not in sentence:
            raise DataError(f"{src}: {where}: missing key 'raw' (and no 'tokens' to fall back to)")
        tokens = get(sentence, "tokens", list, src, where)
        if not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{src}: {where}: 'tokens' must be a list of strings")
        return Caption(check_caption(" ".join(tokens), src, where))
    return Caption(check_caption(get(sentence, "raw", None, src, where), src, where))
