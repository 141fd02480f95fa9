"""Training losses (Section 4 of the paper).

- token cross-entropy over real (unpadded) words;
- the doubly stochastic regularisation lambda * sum_i (1 - sum_t alpha_ti)^2 (eq. 14),
  with the sum over t running over real steps only;
- for stochastic attention (whenever the decoder output carries ``log_probs``), the
  REINFORCE terms of the variational lower bound (Section 4.1, eq. 12):
  lambda_r (log p(y|s,a) - b) grad log p(s|a) + lambda_e grad H[s], with b a moving
  average of the per-caption log-likelihood (decay 0.9 as in the paper) over the captions
  that sampled their locations (the paper's b_k; ``baseline_on="all"``: every caption, as
  the authors' code), kept equal on every data-parallel process; or, when the decoder ran
  k > 1 paths per caption, each path's baseline is the mean of the other k - 1 (leave-one-out).

The doubly stochastic term reads the attention's distribution (``probs``: for hard
attention the location probabilities, as the authors' code; the one-hot samples would give
it no gradient).

The paper's objective is per caption. We sum it over the batch and divide by the number of
real words, so the loss reads as nats per word and the lambdas keep the paper's meaning
whatever the caption lengths.

Letters: B batch, T steps, L locations, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from captioner import kernels
from captioner.config import TrainConfig
from captioner.decoder import DecoderOutput
from captioner.supervised_attention import attention_supervision_loss


@dataclass
class LossOutput:
    """``total`` is what is minimised; the parts are detached, for logging.

    Attributes:
        total: scalar to backpropagate.
        xent: mean token cross-entropy (nats per word).
        dsr: the doubly stochastic term, weighted by lambda, per word.
        reinforce: the REINFORCE surrogate, weighted, per word (0 without stochastic attention).
        entropy: mean entropy of the location distribution per word (0 without).
        nll: (B,) per-caption negative log-likelihood, summed over words.
    """

    total: Tensor
    xent: Tensor
    dsr: Tensor
    reinforce: Tensor
    entropy: Tensor
    nll: Tensor
    # supervised attention term, weighted, per word (None: not supervised); keyword-only, so
    # subclasses (captioner.scst.ScstOutput) may add fields without defaults
    attention: Tensor | None = field(default=None, kw_only=True)
    # layout supervision term, weighted (None: off; the trainer adds it, captioner.layout)
    layout: Tensor | None = field(default=None, kw_only=True)


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor,
                         token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """logits (B, T, V), targets (B, T), mask (B, T) -> (mean per real token, per-caption sum (B,)).

    With ``token_mask`` (B, T), ``logits`` is (N, V) for the N steps it marks, row-major
    (a packed :class:`~captioner.decoder.DecoderOutput`); ``mask`` still weighs the steps.
    """
    if token_mask is None:
        B, T, V = logits.shape
        flat = kernels.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
        nll = flat.view(B, T) * mask  # (B, T); flat logits: ~3x faster than (B, V, T) on the CPU
    else:
        flat = kernels.cross_entropy(logits, targets[token_mask])  # (N,)
        nll = flat.new_zeros(token_mask.shape).masked_scatter(token_mask, flat) * mask  # (B, T)
    return nll.sum() / mask.sum().clamp(min=1), nll.sum(dim=1)


def leave_one_out(reward: Tensor, k: int) -> Tensor:
    """Each path's baseline: the mean reward of the other k - 1 paths of its caption.
    reward (B * k,), rows i * k .. i * k + k - 1 the paths of caption i -> (B * k,)."""
    r = reward.view(-1, k)  # (B, k)
    return ((r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def doubly_stochastic(alphas: Tensor, mask: Tensor) -> Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 per caption: alphas (B, T, L), mask (B, T) -> (B,)."""
    coverage = (alphas * mask.unsqueeze(-1)).sum(dim=1)  # (B, L)
    return ((1.0 - coverage) ** 2).sum(dim=1)


class MovingAverage(nn.Module):
    """b <- decay * b + (1 - decay) * mean(x), starting at the first batch's mean. A buffer,
    so it is saved and restored with the module's state. Under torch.distributed the mean is
    over every process's x (an all-reduce), so all processes keep the same b; a batch with
    no x anywhere leaves b as it is."""

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        total = torch.stack([x.float().sum(), x.new_tensor(float(x.numel()), dtype=torch.float)]).to(self.value.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)  # (sum, count) over all processes
        if total[1] == 0:
            return
        mean = total[0] / total[1]
        self.value.copy_(torch.where(self.started, self.decay * self.value + (1 - self.decay) * mean, mean))
        self.started.fill_(True)


class CaptionLoss(nn.Module):
    """The training objective for a teacher-forced pass.

    Args:
        alpha_c: lambda of the doubly stochastic term (0 turns it off).
        reinforce_weight: lambda_r of the REINFORCE term.
        entropy_weight: lambda_e of the entropy bonus.
        baseline_decay: decay of the moving-average baseline b.
        baseline_on: "sampled" (b follows the captions that sampled their locations) or "all".
        attention_weight: weight of supervised attention (``captioner.supervised_attention``),
            used when ``forward`` gets ``attention_targets``.
    """

    def __init__(self, *, alpha_c: float = 1.0, reinforce_weight: float = 1.0, entropy_weight: float = 0.002,
                 baseline_decay: float = 0.9, baseline_on: str = "sampled", attention_weight: float = 1.0) -> None:
        super().__init__()
        self.attention_weight = attention_weight
        self.alpha_c, self.reinforce_weight, self.entropy_weight = alpha_c, reinforce_weight, entropy_weight
        self.baseline = MovingAverage(baseline_decay)
        self.baseline_on = baseline_on

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CaptionLoss:
        return cls(alpha_c=cfg.alpha_c, reinforce_weight=cfg.reinforce_weight, entropy_weight=cfg.entropy_weight,
                   baseline_decay=cfg.baseline_decay, baseline_on=cfg.baseline_on,
                   attention_weight=cfg.attention_supervision_weight)

    def _reinforce(self, out: DecoderOutput, nll: Tensor, mask: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        """The REINFORCE surrogate and the mean entropy, each per word (eq. 12)."""
        reward = -nll.detach()  # log p(y | s, a) per caption (per path)
        sampled = out.sampled if out.sampled is not None else torch.ones_like(reward, dtype=torch.bool)
        if out.samples > 1:
            advantage = reward - leave_one_out(reward, out.samples)
        elif bool(self.baseline.started):
            advantage = reward - self.baseline.value
        else:
            advantage = torch.zeros_like(reward)
        if self.training and out.samples == 1:
            self.baseline.update(reward[sampled] if self.baseline_on == "sampled" else reward)
        log_p_s = (out.log_probs * mask).sum(dim=1)  # (B,) log p(s | a) of the sampled path (0 where expected)
        # Minimising -(advantage * log p(s)) gives the REINFORCE gradient (eq. 12).
        reinforce = -self.reinforce_weight * (advantage * sampled * log_p_s).sum() / words
        return reinforce, (out.entropies * mask).sum() / words

    def forward(self, out: DecoderOutput, targets: Tensor, mask: Tensor, *, words: Tensor | None = None,
                attention_targets: Tensor | None = None) -> LossOutput:
        """out: the decoder's T steps; targets (B, T) = captions[:, 1:]; mask (B, T) True on real words.

        ``words``: what to divide the summed loss by (default: this batch's real words). Data-
        parallel training passes global words / processes, so the averaged gradient equals the
        one-process gradient of the whole global batch. When the decoder ran k paths per
        caption, targets and mask are those of the captions given, and the loss averages the paths.
        ``attention_targets`` (B, T, L): where each word should look
        (``CaptionBatch.attention_targets``), for supervised attention.
        """
        k = out.samples
        if k > 1:
            targets, mask = targets.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        mask = mask.to(out.alphas.dtype)
        words = (mask.sum().clamp(min=1) if words is None else words * k)
        _, nll = masked_cross_entropy(out.logits, targets, mask, out.token_mask)
        xent = nll.sum() / words
        zero = xent.new_zeros(())
        dsr = self.alpha_c * doubly_stochastic(out.probs.float(), mask).sum() / words if self.alpha_c > 0 else zero
        total = xent + dsr
        reinforce = entropy = zero
        if out.log_probs is not None:
            reinforce, entropy = self._reinforce(out, nll, mask, words)
            total = total + reinforce - self.entropy_weight * entropy
        attention = None
        if attention_targets is not None:  # supervised attention (Liu et al., 2017), on the distribution
            if k > 1:
                attention_targets = attention_targets.repeat_interleave(k, 0)
            attention = self.attention_weight * attention_supervision_loss(out.probs, attention_targets, mask) / words
            total = total + attention
            attention = attention.detach()
        return LossOutput(total=total, xent=xent.detach(), dsr=dsr.detach(), reinforce=reinforce.detach(),
                          entropy=entropy.detach(), nll=nll.detach(), attention=attention)
