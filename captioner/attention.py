"""Attention over the annotation grid: one interface, several variants.

Call contract of every variant registered in :data:`ATTENTIONS`:

- ``Variant.from_config(cfg: AttentionConfig, *, feature_dim, hidden_dim)`` builds it.
- ``precompute(features) -> projected``: all that depends on the image alone (the paper's
  W_a a_i), computed once per image, outside the time loop. Opaque to the caller.
- ``forward(features, projected, hidden, mask=None) -> AttentionOutput``.

Score functions f(query, keys) live in :data:`SCORES` with the same split:
``precompute(keys) -> projected_keys`` and ``forward(projected_keys, query) -> scores``.

Letters: B batch, L grid locations, C feature channels, H decoder hidden size, A attention dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.config import AttentionConfig
from captioner.registry import Registry


@dataclass
class AttentionOutput:
    """What one attention step returns.

    Attributes:
        context: (B, C) the context vector z_t before the beta gate.
        alpha: (B, L) the weights actually used (one-hot for a sampled hard location).
        log_prob: (B,) log p(s_t | a) of a sampled location (stochastic variants only).
        entropy: (B,) entropy of the location distribution (stochastic variants only).
    """

    context: Tensor
    alpha: Tensor
    log_prob: Tensor | None = None
    entropy: Tensor | None = None


# ----------------------------------------------------------------------------- scores

SCORES: Registry[nn.Module] = Registry("score function (model.attention.score)")


@SCORES.register("additive")
class AdditiveScore(nn.Module):
    """The paper's f_att: w^T act(W_a a_i + W_h h + b) (Bahdanau et al., 2015)."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int, activation: str = "tanh") -> None:
        super().__init__()
        self.key = nn.Linear(key_dim, dim)
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.out = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax
        self.act = {"tanh": torch.tanh, "relu": F.relu}[activation]

    def precompute(self, keys: Tensor) -> Tensor:
        return self.key(keys)  # (B, L, A)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        hidden = self.act(projected + self.query(query).unsqueeze(1))  # (B, L, A)
        return self.out(hidden).squeeze(-1)  # (B, L)


@SCORES.register("dot")
class DotScore(nn.Module):
    """k . q (Luong et al., 2015); the query is projected to C channels when H != C."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int = 0, activation: str = "") -> None:
        super().__init__()
        self.query = nn.Identity() if key_dim == query_dim else nn.Linear(query_dim, key_dim, bias=False)

    def precompute(self, keys: Tensor) -> Tensor:
        return keys  # (B, L, C)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return torch.bmm(projected, self.query(query).unsqueeze(2)).squeeze(2)  # (B, L)


@SCORES.register("general")
class GeneralScore(nn.Module):
    """k^T W q (Luong's "general", bilinear); W k is precomputed per image."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int = 0, activation: str = "") -> None:
        super().__init__()
        self.weight = nn.Linear(key_dim, query_dim, bias=False)

    def precompute(self, keys: Tensor) -> Tensor:
        return self.weight(keys)  # (B, L, H)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return torch.bmm(projected, query.unsqueeze(2)).squeeze(2)  # (B, L)


@SCORES.register("scaled_dot")
class ScaledDotScore(nn.Module):
    """(W_k k) . (W_q q) / sqrt(A) (Vaswani et al., 2017)."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int, activation: str = "") -> None:
        super().__init__()
        self.key = nn.Linear(key_dim, dim, bias=False)
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def precompute(self, keys: Tensor) -> Tensor:
        return self.key(keys) * self.scale  # (B, L, A)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return torch.bmm(projected, self.query(query).unsqueeze(2)).squeeze(2)  # (B, L)


def build_score(name: str, *, key_dim: int, query_dim: int, dim: int, activation: str = "tanh") -> nn.Module:
    return SCORES.build(name, key_dim=key_dim, query_dim=query_dim, dim=dim, activation=activation)


def attend(alpha: Tensor, features: Tensor) -> Tensor:
    """sum_i alpha_i a_i: alpha (B, L), features (B, L, C) -> (B, C), as one bmm."""
    return torch.bmm(alpha.unsqueeze(1), features).squeeze(1)


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """softmax over L, with masked-out locations at exactly zero."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------- variants

ATTENTIONS: Registry[nn.Module] = Registry("attention (model.attention.name)")


@ATTENTIONS.register("soft")
class SoftAttention(nn.Module):
    """Deterministic soft attention (Section 4.2): alpha = softmax(f_att(a, h_{t-1})),
    z = sum_i alpha_i a_i.

    Args:
        feature_dim: C. hidden_dim: H. dim: A. score: a name in :data:`SCORES`.
    """

    def __init__(self, *, feature_dim: int, hidden_dim: int, dim: int = 512, score: str = "additive") -> None:
        super().__init__()
        self.score = build_score(score, key_dim=feature_dim, query_dim=hidden_dim, dim=dim)

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int) -> "SoftAttention":
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim, dim=cfg.dim, score=cfg.score)

    def precompute(self, features: Tensor) -> Tensor:
        return self.score.precompute(features)

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        alpha = masked_softmax(self.score(projected, hidden), mask)  # (B, L)
        return AttentionOutput(context=attend(alpha, features), alpha=alpha)


@ATTENTIONS.register("none")
class NoAttention(nn.Module):
    """The ablation baseline ("Show and Tell" with the same LSTM): the context is the mean
    annotation vector at every step; alpha is uniform."""

    def __init__(self, *, feature_dim: int, hidden_dim: int) -> None:
        super().__init__()

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int) -> "NoAttention":
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim)

    def precompute(self, features: Tensor) -> Tensor:
        return features.mean(dim=1)  # (B, C), once per image

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        B, L, _ = features.shape
        if mask is None:
            alpha = features.new_full((B, L), 1.0 / L)
            return AttentionOutput(context=projected, alpha=alpha)
        alpha = mask.float() / mask.sum(dim=1, keepdim=True)  # (B, L)
        return AttentionOutput(context=attend(alpha, features), alpha=alpha)


def build_attention(cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int) -> nn.Module:
    """The attention module named by ``cfg.name`` (an unknown name lists the valid ones)."""
    return ATTENTIONS.get(cfg.name).from_config(cfg, feature_dim=feature_dim, hidden_dim=hidden_dim)
