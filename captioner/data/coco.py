"""Loader for the official COCO captions files (``annotations/captions_train2014.json`` etc.).

The layout it reads::

    {
      "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg",
                  "width": 640, "height": 360}, ...],
      "annotations": [{"id": 770337, "image_id": 391895,
                       "caption": "A man with a red helmet on a small moped.",
                       "grounding": [[4, 1768], ...]}, ...]      # "grounding" optional
    }

Other top-level keys (``info``, ``licenses``) are ignored. The image path is
``image_dir / file_name``. A COCO file holds one split, so ``split`` is the label the
records get. The optional ``grounding`` lists ``[word_index, object_id]`` pairs (word
indices into ``captioner.vocab.tokenize(caption)``) and is kept as ``Caption.grounding``.
"""

from __future__ import annotations

from pathlib import Path

from captioner.data._io import (
    INSTANCE_KEYS,
    check_caption,
    check_new,
    check_split,
    coco_annotations,
    describe_json,
    finish,
    get,
    optional,
    read_json,
)
from captioner.data.records import Caption, ImageRecord
from captioner.errors import DataError
from captioner.vocab import tokenize

_EXPECTED = 'a COCO captions file ({"images": [...], "annotations": [{"image_id", "caption", ...}]})'


def load_coco(
    captions_json: str | Path, image_dir: str | Path, *, split: str, check_files: bool = True
) -> list[ImageRecord]:
    """Read a COCO captions file into one record per captioned image, sorted by image id.

    Captions keep their order in the file and are stripped of surrounding whitespace;
    ``extra["annotation_ids"]`` holds their annotation ids. Images without any caption
    are skipped and counted in a warning on the ``captioner.data`` logger.

    Args:
        captions_json: the captions file, e.g. ``annotations/captions_val2014.json``.
        image_dir: the folder holding the images, e.g. ``val2014/``.
        split: the split these images belong to: ``train``, ``val`` or ``test``.
        check_files: require every image file to exist.

    Raises:
        DataError: the file is missing, malformed or not a captions file; an entry
            lacks a key or has a bad value (a caption without words is skipped and counted); an annotation points to
            an unknown image; ids repeat; the split is unknown; image files are missing.
    """
    src, image_dir = Path(captions_json), Path(image_dir)
    check_split(split, src)
    data = read_json(src)
    if not _is_captions_layout(data):
        raise DataError(f"{src}: expected {_EXPECTED}, found {describe_json(data)}")

    images: dict[int, dict] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = get(image, "id", int, src, where)
        where = f"images[{i}] (id {image_id})"
        check_new(image_id, images, src, "image id", where)
        images[image_id] = {
            "file_name": get(image, "file_name", str, src, where),
            "width": optional(image, "width", int, src, where),
            "height": optional(image, "height", int, src, where),
        }

    captions: dict[int, list[tuple[int, Caption]]] = {}
    empty = 0
    for ann, ann_id, image_id, where in coco_annotations(data, src):
        if image_id not in images:
            raise DataError(f"{src}: {where}: image_id {image_id} is not in 'images'")
        text = check_caption(get(ann, "caption", None, src, where), src, where)
        if not text:
            empty += 1
            continue
        grounding = _grounding(ann.get("grounding"), text, src, where)
        captions.setdefault(image_id, []).append((ann_id, Caption(text, grounding)))

    records = [
        ImageRecord(
            image_id=image_id,
            path=image_dir / info["file_name"],
            captions=tuple(c for _, c in captions[image_id]),
            split=split,
            width=info["width"],
            height=info["height"],
            extra={"annotation_ids": tuple(a for a, _ in captions[image_id])},
        )
        for image_id, info in images.items()
        if image_id in captions
    ]
    return finish(
        records,
        source=src,
        split=split,
        uncaptioned=len(images) - len(records),
        image_dir=image_dir,
        check_files=check_files,
        empty_captions=empty,
    )


def _is_captions_layout(data: object) -> bool:
    """``images`` and ``annotations`` lists, and not an instances / keypoints file."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        return False
    first = data["annotations"][0] if data["annotations"] else None
    return not (isinstance(first, dict) and "caption" not in first and INSTANCE_KEYS & first.keys())


def _grounding(raw: object, text: str, src: Path, where: str) -> tuple[tuple[int, int], ...]:
    """``[[word_index, object_id], ...]`` as int pairs, word indices checked against the caption."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise DataError(f"{src}: {where}: 'grounding' must be a list of [word_index, object_id] pairs")
    n_words = len(tokenize(text))
    pairs = []
    for k, pair in enumerate(raw):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        )
        if not ok:
            raise DataError(f"{src}: {where}: grounding[{k}] must be [word_index, object_id], found {pair!r:.40}")
        if not 0 <= pair[0] < n_words:
            raise DataError(
                f"{src}: {where}: grounding[{k}] word index {pair[0]} is outside the caption's {n_words} words"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)
