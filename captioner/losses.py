"""Training losses (Section 4 of the paper).

- token cross-entropy over real (unpadded) words;
- the doubly stochastic regularisation lambda * sum_i (1 - sum_t alpha_ti)^2 (eq. 14),
  with the sum over t running over real steps only.

The paper's objective is per caption: -log p(y|a) + lambda * penalty. We sum it over the
batch and divide by the number of real words, so the loss reads as nats per word and
lambda keeps the paper's meaning whatever the caption lengths.

Letters: B batch, T steps, L locations, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.decoder import DecoderOutput


@dataclass
class LossOutput:
    """total is what is minimised; the parts are detached floats-as-tensors for logging.

    Attributes:
        total: scalar to backpropagate.
        xent: mean token cross-entropy (nats per word).
        dsr: the doubly stochastic term, weighted by lambda, per word.
        nll: (B,) per-caption negative log-likelihood, summed over words (detached).
    """

    total: Tensor
    xent: Tensor
    dsr: Tensor
    nll: Tensor


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """logits (B, T, V), targets (B, T), mask (B, T) -> (mean per real token, per-caption sum (B,))."""
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask  # (B, T)
    return nll.sum() / mask.sum().clamp(min=1), nll.sum(dim=1)


def doubly_stochastic(alphas: Tensor, mask: Tensor) -> Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 per caption: alphas (B, T, L), mask (B, T) -> (B,)."""
    coverage = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, L)
    return ((1.0 - coverage) ** 2).sum(dim=1)


def caption_loss(out: DecoderOutput, targets: Tensor, mask: Tensor, *, alpha_c: float = 1.0) -> LossOutput:
    """The training objective for a teacher-forced pass.

    Args:
        out: the decoder's output for T steps.
        targets: (B, T) the words to predict (captions[:, 1:]).
        mask: (B, T) True on real words (``<end>`` included), False on padding.
        alpha_c: lambda of the doubly stochastic term (0 turns it off).
    """
    mask = mask.to(out.logits.dtype)
    xent, nll = masked_cross_entropy(out.logits, targets, mask)
    words = mask.sum().clamp(min=1)
    dsr = alpha_c * doubly_stochastic(out.alphas, mask).sum() / words if alpha_c > 0 else xent.new_zeros(())
    return LossOutput(total=xent + dsr, xent=xent.detach(), dsr=dsr.detach(), nll=nll.detach())
