"""Datasets and collate.

- :class:`CaptionDataset`: one sample per (image, caption), for training from cached
  features (or, with ``train.captions_per_image: 0``, from pixels, each caption encoding
  its image anew).
- :class:`ImageCaptionsDataset`: one sample per image with up to k of its captions, for
  training from pixels: each image is loaded and encoded once per epoch, and its features
  are repeated to its captions (``CaptionBatch.image_index``).
- :class:`ImageDataset`: one sample per image, for encoding and evaluation (the references
  stay on the records).

Samples carry the image's index into the record list, so a batch can take its features
from a cache instead of pixels. Collate pads, and returns lengths and masks; it never sorts.

Letters: B batch (captions), U images in the batch, T caption length (with
``<start>``/``<end>``), S image side.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captioner.data.images import load_image
from captioner.data.records import ImageRecord
from captioner.vocab import Vocabulary

# Supervised attention: per image, per caption, {word index: (L,) target} (captioner.grounding makes them).
Targets = list[list[dict[int, Tensor]]]

def target_matrix(targets: Sequence[dict[int, Tensor]], steps: int, locations: int) -> Tensor:
    """Targets of B captions as one (B, steps, L) tensor: row t is the target of word t (the
    word the decoder emits at step t), zeros where there is none or ``t >= steps``."""
    out = torch.zeros(len(targets), steps, locations)
    for b, per_word in enumerate(targets):
        for t, target in per_word.items():
            if t < steps:
                out[b, t] = target
    return out


@dataclass
class CaptionBatch:
    """A padded training batch.

    Attributes:
        index: (B,) each caption's image index into the record list.
        captions: (B, T) token ids, ``<pad>`` after ``<end>``.
        lengths: (B,) tokens per caption, ``<start>`` and ``<end>`` included.
        mask: (B, T) True on real tokens.
        images: pixels, or None when features come from a cache: (B, 3, S, S), one per
            caption, when ``image_index`` is None, else (U, 3, S, S), one per image.
        image_index: (B,) each caption's row in ``images`` (None: row b is caption b's image).
        attention_targets: (B, T - 1, L) where word t of each caption should look (row t is
            the target of the word emitted at decoder step t; zeros: no target), when the
            data set was given targets (supervised attention, ``captioner.grounding``).
    """

    index: Tensor
    captions: Tensor
    lengths: Tensor
    mask: Tensor
    images: Tensor | None = None
    image_index: Tensor | None = None
    attention_targets: Tensor | None = None

    def to(self, device: torch.device | str) -> CaptionBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return CaptionBatch(move(self.index), move(self.captions), move(self.lengths), move(self.mask),
                            move(self.images), move(self.image_index), move(self.attention_targets))


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
        attention_targets: per image, per caption, ``{word index: (L,) target}``
            (:func:`captioner.grounding.attention_targets`); samples then carry them.
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, *, max_len: int,
                 transform: Callable | None = None, attention_targets: Targets | None = None) -> None:
        self.records, self.transform, self.targets = records, transform, attention_targets
        self.items = [(i, vocab.encode(c.text, max_len=max_len)) for i, r in enumerate(records) for c in r.captions]
        self._caption = [j for r in records for j in range(len(r.captions))]  # item -> caption of its image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple:
        """-> (image index, token ids, pixels or None), plus ``{word: target}`` with targets."""
        index, tokens = self.items[k]
        image = self.transform(load_image(self.records[index].path)) if self.transform else None
        if self.targets is None:
            return index, tokens, image
        return index, tokens, image, self.targets[index][self._caption[k]]


def _targets(per_caption: Sequence[dict[int, Tensor]], captions: Tensor) -> Tensor | None:
    """(B, T - 1, L) targets of the batch's captions (None when no caption has one)."""
    locations = next((len(t) for per_word in per_caption for t in per_word.values()), 0)
    return target_matrix(per_caption, captions.shape[1] - 1, locations) if locations else None


def collate_captions(samples: list[tuple]) -> CaptionBatch:
    """Captions (with their images or targets) -> a batch, the longest caption first (stable;
    ``index`` says each row's record): the decoder's time loop drops ended captions from the
    end of the batch, and a batch that comes in that order spares it a sort of the features
    at every step (a copy of them: 51 MB at the bench's sizes)."""
    samples = sorted(samples, key=lambda s: -len(s[1]))
    index, tokens, images = zip(*(s[:3] for s in samples))
    captions, lengths, mask = pad_captions(tokens)
    pixels = torch.stack(images) if images[0] is not None else None
    targets = _targets([s[3] for s in samples], captions) if len(samples[0]) > 3 else None
    return CaptionBatch(torch.tensor(index), captions, lengths, mask, pixels, attention_targets=targets)


def choose_captions(n: int, k: int, *, seed: int, epoch: int, index: int) -> list[int]:
    """Which of an image's ``n`` captions it contributes in ``epoch``: all of them when
    ``n <= k``, else a random subset of ``k`` (in their original order).

    The draw is a function of (seed, epoch, index) alone, from its own generator: the same in
    every process and DataLoader worker, and in a run resumed mid-epoch, and it never touches
    the global RNG.
    """
    if n <= k:
        return list(range(n))
    rng = random.Random(f"captions/{seed}/{epoch}/{index}")  # str seeds hash with sha512: stable everywhere
    return sorted(rng.sample(range(n), k))


class ImageCaptionsDataset(Dataset):
    """One sample per image: its pixels and up to ``captions_per_image`` of its captions.

    An image with more captions than that contributes a different random subset each epoch
    (see :func:`choose_captions`); call :meth:`set_epoch` before each epoch's loader is made.

    Args:
        records: the split's images.
        vocab: encodes the captions.
        max_len: words kept per caption.
        captions_per_image: k, at least 1.
        seed: with the epoch and the image's index, picks the captions.
        transform: PIL image -> tensor; None to return no pixels.
        attention_targets: per image, per caption, ``{word index: (L,) target}``; samples
            then carry the chosen captions' targets.

    Raises:
        ValueError: when ``captions_per_image`` is below 1.
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, *, max_len: int, captions_per_image: int,
                 seed: int = 0, transform: Callable | None = None, attention_targets: Targets | None = None) -> None:
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1; got {captions_per_image}")
        self.records, self.transform, self.targets = records, transform, attention_targets
        self.k, self.seed, self.epoch = captions_per_image, seed, 0
        self.images = [i for i, r in enumerate(records) if r.captions]  # an image without captions teaches nothing
        self.tokens = [[vocab.encode(c.text, max_len=max_len) for c in records[i].captions] for i in self.images]

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of ``epoch`` (0-based) from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def captions_in_epoch(self) -> int:
        """Captions one pass over the data set yields."""
        return sum(min(len(t), self.k) for t in self.tokens)

    def __getitem__(self, k: int) -> tuple:
        """-> (the image's index into the records, its captions' token ids this epoch, pixels or None),
        plus the chosen captions' ``{word: target}`` when the data set has targets."""
        index, own = self.images[k], self.tokens[k]
        chosen = choose_captions(len(own), self.k, seed=self.seed, epoch=self.epoch, index=index)
        image = self.transform(load_image(self.records[index].path)) if self.transform else None
        if self.targets is None:
            return index, [own[j] for j in chosen], image
        return index, [own[j] for j in chosen], image, [self.targets[index][j] for j in chosen]


def collate_image_captions(samples: list[tuple]) -> CaptionBatch:
    """Images with their captions -> a batch of B captions over U images: ``images``
    (U, 3, S, S), ``image_index`` (B,) each caption's image row, ``index`` (B,) its record."""
    index, tokens, image_index = [], [], []
    for row, (i, caps, *_) in enumerate(samples):
        index += [i] * len(caps)
        image_index += [row] * len(caps)
        tokens += caps
    captions, lengths, mask = pad_captions(tokens)
    pixels = torch.stack([s[2] for s in samples]) if samples[0][2] is not None else None  # (U, 3, S, S)
    targets = _targets([t for s in samples for t in s[3]], captions) if len(samples[0]) > 3 else None
    return CaptionBatch(torch.tensor(index), captions, lengths, mask, pixels, torch.tensor(image_index), targets)


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
