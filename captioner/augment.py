"""Mirrored training samples (train.flip): the image flipped, its caption's words swapped.

A caption that says "the red circle is to the left of a blue square" is true of the
mirrored image once "left" reads "right". Training on both halves the language prior of
which direction follows which object: the decoder can only tell "left" from "right" (and,
with vertical flips, "above" from "below") by where the objects are, and the object named
after a relation must be found from the first object's position. Images flip along the
width (``horizontal``) or the height (``vertical``); ``both`` draws the two independently.

Views are numbered by the bits of their flips: 0 the image as it is, 1 flipped left-right,
2 flipped top-bottom, 3 both. Each training caption draws its view anew at every step (a
generator seeded by the run's seed and the step, so a resume draws the same).

Vertical flips suit synthetic scenes (the shapes set), not photos, where the sky is up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.vocab import Vocabulary

__all__ = ["HORIZONTAL_WORDS", "VERTICAL_WORDS", "Mirror"]

HORIZONTAL_WORDS = (("left", "right"),)
VERTICAL_WORDS = (("top", "bottom"), ("above", "below"), ("over", "under"), ("upper", "lower"))

_VIEWS = {"horizontal": (0, 1), "vertical": (0, 2), "both": (0, 1, 2, 3)}


def pixel_dims(view: int) -> tuple[int, ...]:
    """The dims of a (..., H, W) tensor that ``view`` flips."""
    return ((-1,) if view & 1 else ()) + ((-2,) if view & 2 else ())


def flip_rows(x: Tensor, views: Tensor) -> Tensor:
    """x (N, ..., H, W), views (N,) -> a copy with row n's last two dims flipped as view n says."""
    out = x.clone()
    for view in views.unique().tolist():
        if view:
            rows = views.to(x.device) == view
            out[rows] = x[rows].flip(pixel_dims(view))
    return out


def swap_table(vocab: Vocabulary, pairs: tuple[tuple[str, str], ...]) -> Tensor:
    """(V,) word id -> the id of its mirror word (itself unless it is in a pair whose words
    are both in the vocabulary)."""
    table = torch.arange(len(vocab))
    for a, b in pairs:
        if a in vocab and b in vocab:
            ia, ib = vocab.stoi[a], vocab.stoi[b]
            table[ia], table[ib] = ib, ia
    return table


class Mirror:
    """The views of ``train.flip`` and the word swaps that go with them.

    Args:
        mode: ``horizontal``, ``vertical`` or ``both``.
        vocab: the training vocabulary.
        grid: (h, w) of the annotation grid (attention targets are flipped on it).
    """

    def __init__(self, mode: str, vocab: Vocabulary, *, grid: tuple[int, int]) -> None:
        self.views = _VIEWS[mode]
        self.grid = grid
        horizontal, vertical = swap_table(vocab, HORIZONTAL_WORDS), swap_table(vocab, VERTICAL_WORDS)
        both = horizontal[vertical]
        self.tables = torch.stack([torch.arange(len(vocab)), horizontal, vertical, both])  # (4, V)

    def draw(self, n: int, *, seed: int, step: int) -> Tensor:
        """(n,) a view per sample, uniform over this mode's views."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        choice = torch.randint(len(self.views), (n,), generator=g)
        return torch.tensor(self.views)[choice]

    def captions(self, captions: Tensor, views: Tensor) -> Tensor:
        """captions (B, T) word ids, views (B,) -> (B, T) with each row's words mirrored."""
        tables = self.tables.to(captions.device)
        return tables[views.to(captions.device)[:, None], captions]

    def pixels(self, images: Tensor, views: Tensor) -> Tensor:
        """images (U, 3, S, S), views (U,) -> each image flipped as its view says."""
        return flip_rows(images, views)

    def targets(self, targets: Tensor, views: Tensor) -> Tensor:
        """attention targets (B, T, L), views (B,) -> the maps flipped on the (h, w) grid."""
        b, t, _ = targets.shape
        return flip_rows(targets.reshape(b, t, *self.grid), views).reshape(b, t, -1)
