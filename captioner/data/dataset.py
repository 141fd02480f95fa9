"""Datasets and collate.

- :class:`CaptionDataset`: one sample per (image, caption), for training.
- :class:`ImageDataset`: one sample per image, for encoding and evaluation (the references
  stay on the records).

Samples carry the image's index into the record list, so a batch can take its features
from a cache instead of pixels. Collate pads, and returns lengths and masks; it never sorts.

Letters: B batch, T caption length (with ``<start>``/``<end>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captioner.data.images import load_image
from captioner.data.records import ImageRecord
from captioner.vocab import Vocabulary


@dataclass
class CaptionBatch:
    """A padded training batch.

    Attributes:
        index: (B,) image indices into the record list.
        captions: (B, T) token ids, ``<pad>`` after ``<end>``.
        lengths: (B,) tokens per caption, ``<start>`` and ``<end>`` included.
        mask: (B, T) True on real tokens.
        images: (B, 3, S, S) pixels, or None when features come from a cache.
    """

    index: Tensor
    captions: Tensor
    lengths: Tensor
    mask: Tensor
    images: Tensor | None = None

    def to(self, device: torch.device | str) -> "CaptionBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return CaptionBatch(move(self.index), move(self.captions), move(self.lengths), move(self.mask), move(self.images))


def pad_captions(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad token lists: -> captions (B, T), lengths (B,), mask (B, T)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    captions = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        captions[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = torch.arange(captions.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return captions, lengths, mask


class CaptionDataset(Dataset):
    """One sample per (image, caption).

    Args:
        records: the split's images.
        vocab: encodes the captions.
        max_len: words kept per caption.
        transform: PIL image -> tensor; None to return no pixels (features come from a cache).
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, *, max_len: int,
                 transform: Callable | None = None) -> None:
        self.records, self.transform = records, transform
        self.items = [(i, vocab.encode(c.text, max_len=max_len)) for i, r in enumerate(records) for c in r.captions]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[int, list[int], Tensor | None]:
        index, tokens = self.items[k]
        image = self.transform(load_image(self.records[index].path)) if self.transform else None
        return index, tokens, image


def collate_captions(samples: list[tuple[int, list[int], Tensor | None]]) -> CaptionBatch:
    index, tokens, images = zip(*samples)
    captions, lengths, mask = pad_captions(tokens)
    pixels = torch.stack(images) if images[0] is not None else None
    return CaptionBatch(torch.tensor(index), captions, lengths, mask, pixels)


class ImageDataset(Dataset):
    """One sample per image: (index, pixels)."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        return index, self.transform(load_image(self.records[index].path))


def collate_images(samples: list[tuple[int, Tensor]]) -> tuple[Tensor, Tensor]:
    index, images = zip(*samples)
    return torch.tensor(index), torch.stack(images)
