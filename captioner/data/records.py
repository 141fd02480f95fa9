"""What every loader returns: one :class:`ImageRecord` per image, captions attached.

Loaders (``coco``, ``karpathy``, ``folder``) turn the official annotation layouts into
records; nothing downstream knows which layout the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Caption:
    """One reference caption.

    Attributes:
        text: the caption as written.
        grounding: ``(word_index, object_id)`` pairs: the word at ``word_index`` of
            ``captioner.vocab.tokenize(text)`` names the object (a COCO instance
            annotation id) ``object_id``. Empty when the data set has no grounding.
    """

    text: str
    grounding: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ImageRecord:
    """One image and all its reference captions.

    Attributes:
        image_id: the data set's id for the image (COCO ``image_id``, Karpathy ``cocoid``
            or ``imgid``, or a running number for folder data).
        path: the image file.
        captions: the reference captions (at least one for training and evaluation).
        split: ``train``, ``val`` or ``test``.
    """

    image_id: int
    path: Path
    captions: tuple[Caption, ...]
    split: str
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
