"""Supervised attention (Liu, Mao, Sha and Yuille, 2017, "Attention Correctness in Neural
Image Captioning", AAAI, Section 4): for every word that names an annotated region, the
cross-entropy between the region's distribution over the grid (the target, from
``captioner.grounding``) and the attention map the decoder used for that word,

    L_att = - sum_t sum_i target_ti log alpha_ti,

summed over the grounded words and added to the caption loss with a weight. ``strong``
supervision takes the targets from per-word grounding, ``weak`` from the image's
instances of the categories the caption names (``train.attention_supervision``).

Letters: B batch, T steps, L locations.
"""

from __future__ import annotations

from torch import Tensor


def attention_supervision_loss(alphas: Tensor, targets: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Summed cross-entropy of the attention maps against their targets.

    Args:
        alphas: (B, T, L) the attention distributions used at each step.
        targets: (B, T', L) per-step target distributions, zeros where a step has none;
            T' may exceed T (padding) or fall short (missing steps have no target).
        mask: (B, T) 1 on real steps.

    Returns:
        A scalar: sum over real steps with a target of -sum_i target_i log(alpha_i + eps).
    """
    steps = min(alphas.shape[1], targets.shape[1])
    alphas, targets = alphas[:, :steps].float(), targets[:, :steps].to(alphas.device).float()  # (B, T, L)
    per_step = -(targets * (alphas + eps).log()).sum(-1)  # (B, T); 0 where there is no target
    return (per_step * mask[:, :steps].float()).sum()
