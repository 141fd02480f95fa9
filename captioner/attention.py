"""Attention over the annotation grid: one interface, several variants.

Call contract of every variant registered in :data:`ATTENTIONS`:

- ``Variant.from_config(cfg: AttentionConfig, *, feature_dim, hidden_dim, grid)`` builds it
  (``grid`` is the (h, w) shape of the L = h * w locations, row-major).
- ``precompute(features, rows=None) -> projected``: all that depends on the image alone (the
  paper's W_a a_i), computed once per image, outside the time loop. Opaque to the caller.
  ``rows`` (B,): the image of each of B query rows, when captions share images (features
  (U, L, C)): the work runs once per image and is then indexed per row (:func:`per_row`).
- ``forward(features, projected, hidden, mask=None) -> AttentionOutput``, with features
  (B, L, C), mask (B, L) or None, and ``hidden`` either (B, H), one query per image, or
  (B, K, H), K queries of the same image (the beams of a beam search): then every output
  gains the K dimension after B, and the image's keys and features are read once for all K
  instead of being copied K times.
- A variant that keeps a memory across the steps of a caption (soft attention's anchor,
  ``relative``) also has ``init_memory(features) -> (B, M) or None`` and takes ``memory=``
  ((B, M), or (B, K, M) with K queries) in ``forward``, returning the next in
  ``AttentionOutput.memory``. The decoder carries it in its state; a variant without
  ``init_memory`` (or whose ``init_memory`` returns None) is called without it.

Score functions f(query, keys) live in :data:`SCORES` with the same split:
``precompute(keys, rows=None) -> projected_keys`` and ``forward(projected_keys, query) -> scores``,
query (B, Q) -> scores (B, L), or (B, K, Q) -> (B, K, L).

Letters: B batch, K queries per image, L grid locations, C feature channels, H decoder
hidden size, A attention dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner import kernels
from captioner.config import AttentionConfig
from captioner.errors import ConfigError
from captioner.registry import Registry


@dataclass
class AttentionOutput:
    """What one attention step returns.

    Attributes (with K queries per image, (B, K, ...) in place of (B, ...)):
        context: (B, C) the context vector z_t before the beta gate.
        alpha: (B, L) the weights actually used (one-hot for a sampled hard location).
        log_prob: (B,) log p(s_t | a) of a sampled location (stochastic variants only).
        entropy: (B,) entropy of the location distribution (stochastic variants only).
        probs: (B, L) the distribution the weights came from (soft: ``alpha`` itself; hard:
            the location probabilities). The doubly stochastic term, attention correctness
            and the heatmaps read it; the context reads ``alpha``. None means ``alpha``.
        sampled: (B,) bool, True where ``alpha`` is a sampled location (hard attention in
            training; False where the caption used the expected context), else None.
        memory: (B, M) what the variant carries to the next step (soft attention's anchor,
            ``relative``), else None.
    """

    context: Tensor
    alpha: Tensor
    log_prob: Tensor | None = None
    entropy: Tensor | None = None
    probs: Tensor | None = None
    sampled: Tensor | None = None
    memory: Tensor | None = None

    def __post_init__(self) -> None:
        if self.probs is None:
            self.probs = self.alpha


# ----------------------------------------------------------------------------- scores

SCORES: Registry[nn.Module] = Registry("score function (model.attention.score)")


def _grouped(query: Tensor) -> Tensor:
    """A query (B, Q) or (B, K, Q) (K queries of one image, e.g. beams) as (B, K, Q)."""
    return query.unsqueeze(1) if query.dim() == 2 else query


def _ungrouped(scores: Tensor, query: Tensor) -> Tensor:
    """(B, K, L) scores back to (B, L) when the query came as (B, Q)."""
    return scores.squeeze(1) if query.dim() == 2 else scores


def per_row(x: Tensor, rows: Tensor | None) -> Tensor:
    """Per-image work (U, ...) -> per query row (B, ...): row ``rows[b]`` for row b; None: as it is.
    The backward adds each row's gradient into its image's."""
    return x if rows is None else x.index_select(0, rows)


def _dot(keys: Tensor, query: Tensor) -> Tensor:
    """keys (B, L, D) . query (B, D) or (B, K, D) -> (B, L) or (B, K, L), one bmm."""
    return _ungrouped(torch.bmm(_grouped(query).to(keys.dtype), keys.transpose(1, 2)), query)


@SCORES.register("additive")
class AdditiveScore(nn.Module):
    """The paper's f_att: w^T act(W_a a_i + W_h h + b) (Bahdanau et al., 2015).

    With tanh (the paper's) and ``fused`` the elementwise part runs as one fused kernel,
    :func:`captioner.kernels.tanh_score`; otherwise as the plain expression below.
    """

    def __init__(self, *, key_dim: int, query_dim: int, dim: int, activation: str = "tanh",
                 fused: bool = True) -> None:
        super().__init__()
        self.key = nn.Linear(key_dim, dim)
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.out = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax
        self.activation = activation
        self.act = {"tanh": torch.tanh, "relu": F.relu}[activation]
        self.fused = fused

    @property
    def uses_kernel(self) -> bool:
        return self.fused and self.activation == "tanh"

    def precompute(self, keys: Tensor, rows: Tensor | None = None) -> Tensor | kernels.SummedKeys:
        projected = kernels.linear(self.key, keys)  # (U, L, A): W_a a_i + b
        if not self.uses_kernel:
            return per_row(projected, rows)
        projected = per_row(projected.to(kernels.score_dtype(projected)), rows)  # cast once per pass, not per step
        return kernels.summed_keys(projected, self.out.weight.view(-1))

    def forward(self, projected: Tensor | kernels.SummedKeys, query: Tensor) -> Tensor:
        q = _grouped(self.query(query))  # (B, K, A): W_h h
        if self.uses_kernel:  # (B, K, L), in the pass's dtype (the kernel's elementwise work may run in float32)
            scores = kernels.tanh_score(projected, q, self.out.weight.view(-1)).to(q.dtype)
        else:
            hidden = self.act(projected.unsqueeze(1) + q.unsqueeze(2))  # (B, K, L, A)
            scores = self.out(hidden).squeeze(-1)  # (B, K, L)
        return _ungrouped(scores, query)  # (B, L) or (B, K, L)


def use_fused_kernels(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch every score and context read in ``module`` that has a fused kernel to it (or to
    its plain expression): ``model.attention.fused``. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (AdditiveScore, *READERS)):
            m.fused = enabled
    return module


@SCORES.register("dot")
class DotScore(nn.Module):
    """k . q (Luong et al., 2015): no parameters, so it needs C == H (a learned projection
    between them is ``general``)."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int = 0, activation: str = "") -> None:
        super().__init__()
        if key_dim != query_dim:
            raise ValueError(f"the dot score needs feature channels == decoder hidden size, got C={key_dim}, "
                             f"H={query_dim}; use score 'general' (k^T W q) for a learned projection")

    def precompute(self, keys: Tensor, rows: Tensor | None = None) -> Tensor:
        return per_row(keys, rows)  # (B, L, C)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return _dot(projected, query)


@SCORES.register("general")
class GeneralScore(nn.Module):
    """k^T W q (Luong's "general", bilinear); W k is precomputed per image."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int = 0, activation: str = "") -> None:
        super().__init__()
        self.weight = nn.Linear(key_dim, query_dim, bias=False)

    def precompute(self, keys: Tensor, rows: Tensor | None = None) -> Tensor:
        return per_row(self.weight(keys), rows)  # (B, L, H)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return _dot(projected, query)


@SCORES.register("scaled_dot")
class ScaledDotScore(nn.Module):
    """(W_k k) . (W_q q) / sqrt(A) (Vaswani et al., 2017)."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int, activation: str = "") -> None:
        super().__init__()
        self.key = nn.Linear(key_dim, dim, bias=False)
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def precompute(self, keys: Tensor, rows: Tensor | None = None) -> Tensor:
        return per_row(self.key(keys) * self.scale, rows)  # (B, L, A)

    def forward(self, projected: Tensor, query: Tensor) -> Tensor:
        return _dot(projected, self.query(query))


@SCORES.register("additive_dot")
class AdditiveDotScore(nn.Module):
    """The paper's additive f_att plus a scaled dot product of two more projections:
    w^T tanh(W_a a_i + W_h h + b) + (U_a a_i) . (U_h h) / sqrt(A).

    The tanh term matches content. Inside it the query only adds to each unit, so the
    direction in which a unit's score grows over the keys is fixed; flipping it with the
    query takes saturating one unit and waking another. The dot term's direction is the
    query itself: U_h h turned around turns "the lowest object" into "the highest" (on the
    shapes set, the word after "above" or "below" finds the object the relation names;
    README "Getting the words and the maps right")."""

    def __init__(self, *, key_dim: int, query_dim: int, dim: int, activation: str = "tanh",
                 fused: bool = True) -> None:
        super().__init__()
        self.additive = AdditiveScore(key_dim=key_dim, query_dim=query_dim, dim=dim, activation=activation, fused=fused)
        self.dot = ScaledDotScore(key_dim=key_dim, query_dim=query_dim, dim=dim)

    def precompute(self, keys: Tensor, rows: Tensor | None = None) -> tuple:
        return self.additive.precompute(keys, rows), self.dot.precompute(keys, rows)

    def forward(self, projected: tuple, query: Tensor) -> Tensor:
        return self.additive(projected[0], query) + self.dot(projected[1], query)


def build_score(name: str, *, key_dim: int, query_dim: int, dim: int, activation: str = "tanh") -> nn.Module:
    return SCORES.build(name, key_dim=key_dim, query_dim=query_dim, dim=dim, activation=activation)


def attend(alpha: Tensor, features: Tensor, fused: bool = True) -> Tensor:
    """sum_i alpha_i a_i: alpha (B, L) or (B, K, L), features (B, L, C) -> (B, C) or (B, K, C),
    as one bmm (K maps of one image read its features once); with ``fused``, in C where
    that is faster (bf16 features on a CPU: :func:`captioner.kernels.context`)."""
    return kernels.context(alpha, features, fused)


def _masked(scores: Tensor, mask: Tensor | None, fill: float) -> Tensor:
    """scores (B, L) or (B, K, L) with ``fill`` where mask (B, L) (per image, then for each of
    the K queries) or mask (the shape of scores) is False."""
    if mask is None:
        return scores
    if mask.dim() < scores.dim():
        mask = mask.unsqueeze(1)
    return scores.masked_fill(~mask, fill)


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """softmax over L, with masked-out locations at exactly zero. scores (B, L) or (B, K, L);
    mask (B, L) (per image) or the shape of scores."""
    return torch.softmax(_masked(scores, mask, float("-inf")), dim=-1)


def sparsemax(scores: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax (Martins and Astudillo, 2016): the point of the simplex nearest to the
    scores, max(z - tau, 0) with tau chosen so the weights sum to 1. Unlike softmax it
    gives exact zeros to every location more than tau below the best; its gradient (autograd
    through the support, k held fixed) is the paper's: g - mean of g over the support."""
    z = scores.transpose(dim, -1)
    ranked = z.sort(dim=-1, descending=True).values  # (..., L)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumulative = ranked.cumsum(-1)
    support = (1 + k * ranked > cumulative).sum(-1, keepdim=True)  # (..., 1): the support's size, >= 1
    tau = (cumulative.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return (z - tau).clamp_min(0).transpose(dim, -1)


def masked_sparsemax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`sparsemax` over L with masked-out locations at exactly zero (as :func:`masked_softmax`)."""
    return sparsemax(_masked(scores, mask, -1e9), dim=-1)  # finite: the sort's cumulative sum stays finite


NORMALIZERS = {"softmax": masked_softmax, "sparsemax": masked_sparsemax}


# ----------------------------------------------------------------------------- the anchor

class AnchorTerm(nn.Module):
    """Scores by where a location lies from the last object looked at (``relative``).

    "The red circle is to the left of a blue square": at "blue" the map must find an object
    whose centre lies mostly rightwards of the circle's, further along x than along y. A
    score that reads each location's own content and coordinates can only rank the
    locations along a line; it cannot draw that cone around a point it has to remember. This
    term keeps the point and draws the cone:

        anchor_t = g_t m_t + (1 - g_t) anchor_{t-1},  m_t = sum_l alpha_{t,l} p_l,  g_t = sigma(w_g . h_t + b_g)
        s_t      = g_t + (1 - g_t) s_{t-1}                 how much of the anchor has been set
        term_t(l) = s_{t-1} c(h_t) . [d, |d|],  d = p_l - anchor_{t-1}   (d = (dx, dy))

    p_l is location l's centre, x and y in [-1, 1]; the gate learns to take the centroid of
    the map when it sits on an object being named and to hold it over "is to the left of a";
    c(h_t) (4 coefficients, zero at the start: the term starts silent) turns the offsets into
    "rightwards, and more than up or down": dx - |dy| > 0 is the cone. The anchor starts at
    the centre with s_0 = 0: before the gate has taken a map there is no anchor, and the
    term is silent (without s, the first object's map read a prior on where the centre is:
    on one seed of four its maps slid off the objects, correctness 45 against 53; README).
    The memory is (x, y, s).

    Args:
        hidden_dim: H. grid: (h, w) of the L = h * w locations, row-major.
    """

    def __init__(self, *, hidden_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        h, w = grid
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h * 2 - 1, (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
        self.register_buffer("positions", torch.stack([xs.flatten(), ys.flatten()], dim=-1), persistent=False)  # (L, 2)
        self.coefficients = nn.Linear(hidden_dim, 4)  # c(h): weights of dx, dy, |dx|, |dy|
        self.gate = nn.Linear(hidden_dim, 1)  # g_t
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)

    def init_memory(self, features: Tensor) -> Tensor:
        """The anchor before the first step: (B, 3) zeros, the grid's centre, not set (s = 0)."""
        return features.new_zeros(features.shape[0], 3, dtype=torch.float32)

    def forward(self, hidden: Tensor, anchor: Tensor) -> Tensor:
        """hidden (B, H) or (B, K, H), anchor (B, 3) or (B, K, 3) -> the term (B, L) or (B, K, L).

        The linear part c_x dx + c_y dy is c . p_l less c . anchor, the same for every
        location: the normalizers (softmax, sparsemax) ignore a constant per row, so it is
        left out (the maps and their gradients are the same; four small elementwise tensors
        less a step, 4x faster on the CPU)."""
        c = self.coefficients(hidden).float()  # (B, [K,] 4)
        x, y = self.positions.unbind(-1)  # (L,) each
        dx = (x - anchor[..., 0:1]).abs()  # (B, [K,] L): |dx| of each location from the anchor
        dy = (y - anchor[..., 1:2]).abs()
        term = c[..., :2] @ self.positions.T  # (B, [K,] L): c_x x_l + c_y y_l
        return torch.addcmul(torch.addcmul(term, dx, c[..., 2:3]), dy, c[..., 3:]) * anchor[..., 2:3]  # times s

    def offset(self, alpha: Tensor, anchor: Tensor) -> Tensor:
        """Where the map sits from the anchor, for the context (``relative_read``): s (dx, dy,
        |dx|, |dy|) of the map's centroid less the anchor's point; alpha (B, [K,] L), anchor
        (B, [K,] 3) -> (B, [K,] 4), zeros before any anchor is set."""
        d = alpha.float() @ self.positions - anchor[..., :2]  # (B, [K,] 2)
        return torch.cat([d, d.abs()], dim=-1) * anchor[..., 2:3]

    def settle(self, hidden: Tensor, memory: Tensor, fit: Tensor) -> Tensor:
        """``anchor_on_word``: the update of the step before, now that its word is known.

        The memory holds (x, y, s) and the map alpha_t that wrote word y_t (zeros before the
        first step); ``fit`` (B, [K,] L) is how well each location alone explains y_t (the
        decoder's output layer read at that location, :meth:`Decoder.word_fit`). The anchor
        takes the centroid of the map re-weighted by it, q_l ~ alpha_l exp(fit_l): the posterior
        of the location given the word, so "an orange diamond" whose map lay on the orange
        square and the orange diamond anchors on the diamond. ``hidden``: h_t, the gate's input
        (as in :meth:`update`). Returns the memory with the anchor moved (the map kept)."""
        anchor, alpha = memory[..., :3], memory[..., 3:].float()
        pending = alpha.sum(-1, keepdim=True)  # 1 after a step, 0 before the first: nothing to settle
        q = alpha * torch.exp(fit.float() - fit.float().amax(-1, keepdim=True))
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
        g = torch.sigmoid(self.gate(hidden).float()) * pending
        target = torch.cat([q @ self.positions, torch.ones_like(g)], dim=-1)
        return torch.cat([torch.lerp(anchor, target, g), memory[..., 3:]], dim=-1)

    def update(self, hidden: Tensor, alpha: Tensor, anchor: Tensor) -> Tensor:
        """The next anchor: the gated centroid of ``alpha`` (B, [K,] L), and s; (B, [K,] 3)."""
        centroid = alpha.float() @ self.positions  # (B, [K,] 2)
        g = torch.sigmoid(self.gate(hidden).float())  # (B, [K,] 1)
        target = torch.cat([centroid, torch.ones_like(g)], dim=-1)  # (m_t, 1)
        return torch.lerp(anchor, target, g)  # g (m_t, 1) + (1 - g) (anchor, s)


# ----------------------------------------------------------------------------- variants

ATTENTIONS: Registry[nn.Module] = Registry("attention (model.attention.name)")


@ATTENTIONS.register("soft")
class SoftAttention(nn.Module):
    """Deterministic soft attention (Section 4.2): alpha = softmax(f_att(a, h_{t-1})),
    z = sum_i alpha_i a_i.

    With ``hops`` > 1 it reads the grid several times per step, each hop's query holding what
    the hops before it read (the "glimpse" of Vinyals et al., 2016 and Bello et al., 2016; the
    hops of memory networks, Sukhbaatar et al., 2015): hop k scores the locations with its
    own f_att on [h; z_{k-1}], so where it looks can depend on what (and where: the features'
    coordinates) the hop before it found: "the object below the one just named". The context
    is [z_1; ..; z_hops] (``context_dim`` = hops * C); ``alpha`` is the last hop's map (the
    heatmaps and attention correctness read it).

    With ``relative`` the scores gain :class:`AnchorTerm`'s: where each location lies from the
    last object looked at, a memory the decoder carries from step to step.

    Args:
        feature_dim: C. hidden_dim: H. dim: A. score: a name in :data:`SCORES`.
        normalizer: ``softmax`` (the paper's) or ``sparsemax`` (exact zeros off the best locations).
        hops: reads of the grid per step (1: the paper's).
        relative: add the anchor term (one hop only). grid: (h, w), which it needs.
        anchor_on_word: with ``relative``, the anchor is settled a step later, from the map
            re-weighted by the word it wrote (:meth:`AnchorTerm.settle`; the decoder does it,
            with Luong's arrangement); the memory is then (x, y, s, alpha_t) (3 + L values).
        relative_read: with ``relative``, the context also says where the map sits from the
            anchor (:meth:`AnchorTerm.offset`: 4 more values; ``context_dim`` = C + 4): with its
            map on B, the decoder reads B's offset from A, from which the direction word
            follows ("to the left of": dx > 0, |dx| >= |dy|).
        persist: with ``anchor_on_word``, the scores gain k(h_t) alpha_{t-1,l} / max_l
            alpha_{t-1,l}, k a linear gate of the query (zero at the start): the last step's
            map, from the memory, drawing this step's map back (k > 0: the rest of a noun
            phrase on the object its first word found) or away (k < 0).
    """

    fused = True  # the context read's kernel (attend); use_fused_kernels switches it
    reads_feature_rows = True  # forward reads features only through attend(), .shape and .dtype: a
    # teacher-forced pass may hand it a kernels.FeatureRows (no copy of the batch's features)

    def __init__(self, *, feature_dim: int, hidden_dim: int, dim: int = 512, score: str = "additive",
                 activation: str = "tanh", normalizer: str = "softmax", hops: int = 1,
                 relative: bool = False, grid: tuple[int, int] = (1, 1), relative_read: bool = False,
                 anchor_on_word: bool = False, persist: bool = False) -> None:
        super().__init__()
        if hops < 1:
            raise ValueError(f"hops must be >= 1; got {hops}")
        if relative and hops != 1:
            raise ValueError(f"the anchor term (relative) reads one hop; got hops={hops}")
        self.score = build_score(score, key_dim=feature_dim, query_dim=hidden_dim, dim=dim, activation=activation)
        self.hop_scores = nn.ModuleList(
            build_score(score, key_dim=feature_dim, query_dim=hidden_dim + feature_dim, dim=dim, activation=activation)
            for _ in range(hops - 1))
        self.normalize = NORMALIZERS[normalizer]
        if (relative_read or anchor_on_word) and not relative:
            raise ValueError("relative_read and anchor_on_word change the anchor: they need relative")
        self.relative_read, self.anchor_on_word = relative_read, anchor_on_word
        self.context_dim = hops * feature_dim + 4 * relative_read
        self.anchor = AnchorTerm(hidden_dim=hidden_dim, grid=grid) if relative else None  # after the scores: a seed
        # builds the same scores with and without it
        if persist and not anchor_on_word:
            raise ValueError("persist reads the last map, which anchor_on_word keeps in the memory")
        self.persist = nn.Linear(hidden_dim, 1) if persist else None  # k(h_t)
        if self.persist is not None:
            nn.init.zeros_(self.persist.weight)
            nn.init.zeros_(self.persist.bias)

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int]) -> SoftAttention:
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim, dim=cfg.dim, score=cfg.score,
                   activation=cfg.activation, normalizer=cfg.normalizer, hops=cfg.hops,
                   relative=cfg.relative, grid=grid, relative_read=cfg.relative_read,
                   anchor_on_word=cfg.anchor_on_word, persist=cfg.persist)

    def init_memory(self, features: Tensor) -> Tensor | None:
        """The anchor before the first step (B, 3): x, y, s, with ``relative``; else None.
        With ``anchor_on_word`` (B, 3 + L): and no map yet."""
        if self.anchor is None:
            return None
        memory = self.anchor.init_memory(features)
        return torch.cat([memory, memory.new_zeros(features.shape[0], features.shape[1])], -1) \
            if self.anchor_on_word else memory

    def precompute(self, features: Tensor, rows: Tensor | None = None) -> Tensor | tuple:
        """The first hop's projected keys; with more hops, a tuple of every hop's."""
        first = self.score.precompute(features, rows)
        if not self.hop_scores:
            return first
        return (first, *(s.precompute(features, rows) for s in self.hop_scores))

    def forward(self, features: Tensor, projected: Tensor | tuple, hidden: Tensor,
                mask: Tensor | None = None, memory: Tensor | None = None) -> AttentionOutput:
        if self.anchor is not None:  # memory: the anchor (B, [K,] 3): x, y, s
            scores = self.score(projected, hidden) + self.anchor(hidden, memory)  # (B, [K,] L), float32: the
            if self.persist is not None:  # term is
                last = memory[..., 3:]  # alpha_{t-1}, zeros before the first step
                scores = scores + self.persist(hidden).float() * (last / last.amax(-1, keepdim=True).clamp_min(1e-12))
            alpha = self.normalize(scores, mask).to(features.dtype)  # the map in the pass's dtype
            context = attend(alpha, features, self.fused)
            if self.relative_read:
                context = torch.cat([context, self.anchor.offset(alpha, memory).to(context.dtype)], dim=-1)
            if self.anchor_on_word:  # settled at the next step, once the word is known (Decoder)
                return AttentionOutput(context=context, alpha=alpha,
                                       memory=torch.cat([memory[..., :3], alpha.float()], dim=-1))
            return AttentionOutput(context=context, alpha=alpha, memory=self.anchor.update(hidden, alpha, memory))
        if not self.hop_scores:
            alpha = self.normalize(self.score(projected, hidden), mask)  # (B, L)
            return AttentionOutput(context=attend(alpha, features, self.fused), alpha=alpha)
        alpha = self.normalize(self.score(projected[0], hidden), mask)
        reads = [attend(alpha, features, self.fused)]  # z_1 (B, C) or (B, K, C)
        for score, keys in zip(self.hop_scores, projected[1:]):
            query = torch.cat([hidden, reads[-1].to(hidden.dtype)], dim=-1)  # [h; z_{k-1}]
            alpha = self.normalize(score(keys, query), mask)
            reads.append(attend(alpha, features, self.fused))
        return AttentionOutput(context=torch.cat(reads, dim=-1), alpha=alpha)


def _uniform(features: Tensor, mask: Tensor | None, lead: tuple[int, ...]) -> Tensor:
    """Uniform weights over the valid locations: (*lead, L), lead (B,) or (B, K)."""
    B, L, _ = features.shape
    if mask is None:
        return features.new_full((*lead, L), 1.0 / L)
    alpha = (mask.float() / mask.sum(dim=1, keepdim=True)).to(features.dtype)  # (B, L)
    return alpha.unsqueeze(1).expand(*lead, L) if len(lead) == 2 else alpha


@ATTENTIONS.register("none")
class NoAttention(nn.Module):
    """The ablation baseline, Show and Tell (Vinyals et al., 2015): the image enters once,
    before the first word (here through h_0, c_0 = tanh(f_init(mean a))), and never again:
    the context is zero at every step. ``alpha`` is zero (nothing is attended); ``probs``
    is uniform, so correctness and heatmaps read as no preference."""

    def __init__(self, *, feature_dim: int, hidden_dim: int) -> None:
        super().__init__()

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int]) -> NoAttention:
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim)

    def precompute(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        B = features.shape[0] if rows is None else rows.shape[0]
        return features.new_zeros(B, 0)  # (B, 0): nothing depends on the image

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        lead = tuple(hidden.shape[:-1])  # (B,) or (B, K)
        probs = _uniform(features, mask, lead)  # (*lead, L)
        return AttentionOutput(context=features.new_zeros(*lead, features.shape[-1]), alpha=torch.zeros_like(probs),
                               probs=probs)


@ATTENTIONS.register("mean")
class MeanAttention(nn.Module):
    """A baseline between ``none`` and attention: the mean annotation vector is the context at
    every step (uniform alpha)."""

    fused = True  # the context read's kernel (attend); use_fused_kernels switches it

    def __init__(self, *, feature_dim: int, hidden_dim: int) -> None:
        super().__init__()

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int]) -> MeanAttention:
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim)

    def precompute(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        return per_row(features.mean(dim=1), rows)  # (B, C), once per image

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        lead = tuple(hidden.shape[:-1])  # (B,) or (B, K)
        alpha = _uniform(features, mask, lead)  # (*lead, L)
        if mask is None:
            context = projected if len(lead) == 1 else projected.unsqueeze(1).expand(*lead, features.shape[-1])
            return AttentionOutput(context=context, alpha=alpha)
        return AttentionOutput(context=attend(alpha, features, self.fused), alpha=alpha)


@dataclass
class HardProjected:
    """What ``HardAttention.precompute`` returns: the projected keys and, per caption,
    whether this pass samples a location (True) or uses the expectation (False)."""

    keys: Tensor
    sample: Tensor


def straight_through_gumbel(probs: Tensor, tau: float = 1.0) -> Tensor:
    """A one-hot sample of ``probs`` (..., L) whose gradient is that of the relaxed sample
    softmax((log p + g) / tau), g ~ Gumbel(0, 1) (Jang et al., 2017; Bengio et al., 2013).
    Locations with p = 0 are never drawn."""
    logits = torch.where(probs > 0, torch.log(probs.clamp_min(1e-30)), float("-inf"))
    noise = torch.rand(probs.shape, device=probs.device).clamp_min(1e-10)  # float32 (in bf16 draws near 1 round to 1)
    gumbel = -torch.log(-torch.log(noise)).to(probs.dtype)
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)  # (..., L)
    hard = F.one_hot(soft.argmax(-1), probs.shape[-1]).to(probs.dtype)
    return hard + soft - soft.detach()


@ATTENTIONS.register("hard")
class HardAttention(nn.Module):
    """Stochastic hard attention (Section 4.1): s_t ~ Multinoulli(alpha_t), z_t = a_{s_t}.

    The location is not differentiable; ``estimator`` says how the attention learns:

    - ``reinforce``: the paper's variational lower bound; the loss weighs ``log_prob`` (and
      ``entropy``) by the caption's log-likelihood minus a moving-average baseline.
    - ``loo``: the same with ``samples`` = k paths per caption (the decoder runs each caption
      k times in training) and each path's baseline the mean reward of the other k - 1
      (leave-one-out, Kool et al., 2019): lower variance, k times the work.
    - ``gumbel``: a straight-through Gumbel-softmax sample: the forward pass uses the
      one-hot location, the backward the gradient of the relaxed sample at temperature
      ``tau``; no REINFORCE term (no ``log_prob``).

    With probability ``mix_prob`` a caption (or the whole batch) uses the expected context
    instead (Section 4.1: "we use the expectation ... with probability 0.5"), which is
    differentiable. ``probs`` carries the location probabilities.

    Args:
        feature_dim: C. hidden_dim: H. dim: A. score: a name in :data:`SCORES`.
        mix_prob: probability of the expected context in training.
        mix_per: "caption" or "batch": how often that choice is drawn.
        inference: "argmax", "expectation" or "sample": the location at test time.
        estimator, samples, tau: see above.
    """

    fused = True  # the context read's kernel (attend); use_fused_kernels switches it

    def __init__(self, *, feature_dim: int, hidden_dim: int, dim: int = 512, score: str = "additive",
                 activation: str = "tanh", mix_prob: float = 0.5, mix_per: str = "caption",
                 inference: str = "argmax", estimator: str = "reinforce", samples: int = 4, tau: float = 1.0,
                 normalizer: str = "softmax") -> None:
        super().__init__()
        self.score = build_score(score, key_dim=feature_dim, query_dim=hidden_dim, dim=dim, activation=activation)
        self.normalize = NORMALIZERS[normalizer]  # sparsemax: locations outside its support are never drawn
        self.mix_prob, self.mix_per, self.inference = mix_prob, mix_per, inference
        self.estimator, self.tau = estimator, tau
        self.samples = samples if estimator == "loo" else 1  # paths per caption in training (the decoder reads it)

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int]) -> HardAttention:
        h = cfg.hard
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim, dim=cfg.dim, score=cfg.score,
                   activation=cfg.activation, mix_prob=h.mix_prob, mix_per=h.mix_per, inference=h.inference,
                   estimator=h.estimator, samples=h.samples, tau=h.tau, normalizer=cfg.normalizer)

    def precompute(self, features: Tensor, rows: Tensor | None = None) -> HardProjected:
        B = features.shape[0] if rows is None else rows.shape[0]
        if self.training:  # drawn once per pass, so a caption keeps its choice over all steps
            draws = max(B // self.samples, 1) if self.mix_per == "caption" else 1  # k paths of a caption share it
            # repeat_interleave, not expand: the flags own their memory (callers may write to them)
            sample = (torch.rand(draws, device=features.device) >= self.mix_prob).repeat_interleave(B // draws)
        else:
            sample = torch.full((B,), self.inference != "expectation", device=features.device)
        return HardProjected(self.score.precompute(features, rows), sample)

    def forward(self, features: Tensor, projected: HardProjected, hidden: Tensor,
                mask: Tensor | None = None) -> AttentionOutput:
        probs = self.normalize(self.score(projected.keys, hidden), mask)  # (B, L) or (B, K, L)
        sample = projected.sample.view(-1, *[1] * (probs.dim() - 2)).expand(probs.shape[:-1])  # (B,) or (B, K)
        if self.training and self.estimator == "gumbel":
            alpha = torch.where(sample.unsqueeze(-1), straight_through_gumbel(probs, self.tau), probs)
            return AttentionOutput(context=attend(alpha, features, self.fused), alpha=alpha, probs=probs, sampled=sample)
        L = probs.shape[-1]
        if self.training or self.inference == "sample":
            loc = torch.multinomial(probs.detach().float().reshape(-1, L), 1).view(probs.shape[:-1])
        else:
            loc = probs.argmax(dim=-1)  # (B,) or (B, K)
        alpha = torch.where(sample.unsqueeze(-1), F.one_hot(loc, L).to(probs.dtype), probs)  # the weights used
        log_prob = torch.log(probs.gather(-1, loc.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12))
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return AttentionOutput(context=attend(alpha, features, self.fused), alpha=alpha,
                               log_prob=log_prob * sample.to(log_prob.dtype),  # 0 where expectation
                               entropy=entropy, probs=probs, sampled=sample)


@ATTENTIONS.register("local")
class LocalAttention(nn.Module):
    """Local attention (Luong et al., 2015, "local-p") carried to a 2-D grid.

    From the query h it predicts a centre p_t = (h - 1, w - 1) * sigmoid(v_p^T tanh(W_p h))
    on the grid and weighs the alignment softmax(f(a_i, h)) by a Gaussian
    exp(-|i - p_t|^2 / (2 sigma^2)) around it. As Luong's eq. 10, the product is NOT
    renormalised (alpha sums to less than 1: a window far from everything attends little);
    with ``renormalise`` it is (softmax(score + log Gaussian)). ``probs`` is alpha normalised
    to sum to 1: where it looks, for correctness, heatmaps and the doubly stochastic term. With ``restrict`` only the
    (2D+1)^2 cells of the window around the rounded centre take part (the softmax runs over
    them). The centre gets gradients through the Gaussian. The query is h_{t-1} in the
    paper's decoder, h_t in Luong's arrangement (``model.decoder.arrangement``).

    Args:
        feature_dim: C. hidden_dim: H. dim: A. score: a name in :data:`SCORES`.
        grid: (h, w) of the L = h * w locations (row-major).
        window: D. sigma: the Gaussian's width in cells (0: D / 2). restrict, renormalise: see above.
    """

    fused = True  # the context read's kernel (attend); use_fused_kernels switches it

    def __init__(self, *, feature_dim: int, hidden_dim: int, grid: tuple[int, int], dim: int = 512,
                 score: str = "additive", activation: str = "tanh", window: int = 3, sigma: float = 0.0,
                 restrict: bool = True, renormalise: bool = False, normalizer: str = "softmax") -> None:
        super().__init__()
        self.score = build_score(score, key_dim=feature_dim, query_dim=hidden_dim, dim=dim, activation=activation)
        self.normalize = NORMALIZERS[normalizer]
        self.centre = nn.Sequential(nn.Linear(hidden_dim, dim), nn.Tanh(), nn.Linear(dim, 2))  # W_p, v_p
        self.window, self.restrict, self.renormalise = window, restrict, renormalise
        self.sigma = sigma or max(window / 2, 0.5)
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        self.register_buffer("coords", torch.stack([rows, cols], -1).flatten(0, 1).float(), persistent=False)  # (L, 2)
        self.register_buffer("extent", torch.tensor([grid[0] - 1, grid[1] - 1], dtype=torch.float), persistent=False)

    @classmethod
    def from_config(cls, cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int]) -> LocalAttention:
        o = cfg.local
        return cls(feature_dim=feature_dim, hidden_dim=hidden_dim, grid=grid, dim=cfg.dim, score=cfg.score,
                   activation=cfg.activation, window=o.window, sigma=o.sigma, restrict=o.restrict,
                   renormalise=o.renormalise, normalizer=cfg.normalizer)

    def precompute(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        return self.score.precompute(features, rows)

    def predict_centre(self, hidden: Tensor) -> Tensor:
        """p_t: (..., H) -> (..., 2) (row, column) in grid cells."""
        return torch.sigmoid(self.centre(hidden)) * self.extent

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor, mask: Tensor | None = None) -> AttentionOutput:
        centre = self.predict_centre(hidden)  # (B, 2) or (B, K, 2)
        offset = self.coords - centre.unsqueeze(-2)  # (B, [K,] L, 2)
        log_gauss = -(offset ** 2).sum(-1) / (2 * self.sigma ** 2)  # (B, [K,] L)
        if self.restrict:
            inside = ((self.coords - centre.detach().round().unsqueeze(-2)).abs() <= self.window).all(-1)
            if mask is not None and mask.dim() < inside.dim():
                mask = mask.unsqueeze(1)
            mask = inside if mask is None else mask & inside
        scores = self.score(projected, hidden)  # (B, [K,] L)
        log_gauss = log_gauss.to(scores.dtype)  # the grid's positions are float32 buffers; a bf16 pass stays bf16
        if self.renormalise:
            alpha = self.normalize(scores + log_gauss, mask)
        else:  # Luong's eq. 10: the window's alignment times the Gaussian
            alpha = self.normalize(scores, mask) * torch.exp(log_gauss)
        probs = alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-12)  # where it looks, as a distribution
        return AttentionOutput(context=attend(alpha, features, self.fused), alpha=alpha, probs=probs)


READERS = (SoftAttention, MeanAttention, HardAttention, LocalAttention)  # the modules that call attend


def build_attention(cfg: AttentionConfig, *, feature_dim: int, hidden_dim: int,
                    grid: tuple[int, int] = (1, 1)) -> nn.Module:
    """The attention module named by ``cfg.name`` (an unknown name lists the valid ones)."""
    variant = ATTENTIONS.get(cfg.name)
    if cfg.relative and variant is not SoftAttention:
        raise ConfigError(f"model.attention.relative: the anchor term is soft attention's; got name {cfg.name!r} "
                          "(set relative: false, or name: soft)")
    module = variant.from_config(cfg, feature_dim=feature_dim, hidden_dim=hidden_dim, grid=grid)
    return use_fused_kernels(module, cfg.fused)
