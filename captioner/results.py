"""Captions for programs: the records ``captioner caption`` prints and writes.

Two file formats:

- ``coco``: the COCO results format, ``[{"image_id": int, "caption": str}, ...]``, which the
  COCO caption evaluation (and ``pycocotools.COCO.loadRes``) reads;
- ``jsonl``: one JSON object per line and image: ``file``, ``image_id``, ``caption``,
  ``score`` (the caption's log-probability) and ``nbest``, the beam's best captions, best first,
  each ``{"caption", "score"}``.

An image's id is the number its file name ends with (``COCO_val2014_000000391895.jpg`` ->
391895, ``002701.png`` -> 2701), as COCO and the shapes set name their files; when the names
do not give distinct numbers, the images are numbered 1, 2, ... in the order given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from captioner.errors import CaptionerError
from captioner.model import Captioner


def image_ids(paths: Sequence[str | Path]) -> list[int]:
    """The number each file name ends with, if they are all distinct; else 1, 2, 3, ..."""
    found = [re.search(r"(\d+)$", Path(p).stem) for p in paths]
    ids = [int(m.group(1)) if m else None for m in found]
    if None in ids or len(set(ids)) != len(ids):
        return list(range(1, len(paths) + 1))
    return ids  # type: ignore[return-value]


def caption_records(model: Captioner, images: Sequence[tuple[str | Path, Image.Image]], *,
                    beam_size: int | None = None, n_best: int | None = None,
                    max_len: int | None = None) -> list[dict]:
    """Caption ``(path, image)`` pairs -> one record per image (see the module docstring).

    ``beam_size`` and ``max_len`` default to the checkpoint's ``decode`` section; ``n_best``
    (default 1) captions per image need ``n_best <= beam_size``.
    """
    from captioner.report import nbest_captions

    if not images:
        return []
    beam = beam_size if beam_size is not None else model.config.decode.beam_size
    n = n_best or 1
    if n > beam:
        raise CaptionerError(f"--n-best {n} needs a beam at least as wide; got beam {beam}")
    pictures = [im for _, im in images]
    if n == 1:
        results = [[r] for r in model.caption(pictures, beam_size=beam, max_len=max_len)]
    else:
        results = nbest_captions(model, pictures, beam_size=beam, n_best=n, max_len=max_len)
    ids = image_ids([p for p, _ in images])
    return [{"file": str(path), "image_id": i, "caption": best[0].text, "score": round(best[0].score, 4),
             "nbest": [{"caption": r.text, "score": round(r.score, 4)} for r in best]}
            for (path, _), i, best in zip(images, ids, results)]


def write_results(records: Sequence[dict], path: str | Path, *, fmt: str = "coco") -> Path:
    """Write ``records`` as ``coco`` results json or ``jsonl`` (see the module docstring)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        text = json.dumps([{"image_id": r["image_id"], "caption": r["caption"]} for r in records], indent=1)
    elif fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        raise CaptionerError(f"unknown results format {fmt!r}; use coco or jsonl")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise CaptionerError(f"cannot write {path}: {err.strerror or err}") from None
    return path
