"""The attention LSTM decoder of "Show, Attend and Tell" (Section 3.1.2).

At every step t, with the previous word y_{t-1} and the previous state (h_{t-1}, c_{t-1}):

    alpha_t, z_t = attention(a, h_{t-1})                    (eq. 4-6)
    beta_t       = sigma(f_beta(h_{t-1}))        a scalar     (Section 4.2.1)
    h_t, c_t     = LSTM([E y_{t-1}, beta_t z_t], h_{t-1}, c_{t-1})   (eq. 1-3)
    p(y_t)       = softmax(L_o tanh(E y_{t-1} + L_h h_t + L_z beta_t z_t))  (eq. 7, deep output)

with h_0, c_0 = tanh(f_init(mean_i a_i)) (Section 3.1.2). With ``arrangement="luong"`` it is
Luong et al.'s (2015) decoder instead: the LSTM steps first, on [E y_{t-1}, h~_{t-1}] (input
feeding), attention reads h_t, h~_t = tanh(W_c [z_t; h_t]) is the attentional hidden state,
and p(y_t) = softmax(W_s h~_t); with ``output="mixture"`` the map is a latent alignment
instead, p(y_t) = sum_l alpha_l softmax(W_s tanh(W_c [a_l; h_t])) (:meth:`Decoder.mixture`).
The decoder never looks at the
attention's name: it calls ``precompute`` once per image and ``forward`` once per step, and
passes on ``log_prob``/``entropy`` when the attention returns them.

Speed: the embedding's share of the LSTM gates and the whole output layer run once for all
steps, outside the loop; only what depends on h_{t-1} stays inside.

Letters: B batch, T steps, L locations, C feature channels, E embedding, H hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captioner import kernels, native
from captioner.attention import AttentionOutput, build_attention
from captioner.config import ModelConfig
from captioner.errors import ConfigError
from captioner.kernels import StepWeight


@dataclass
class DecoderState:
    """The LSTM state: h (B, H), c (B, H), in Luong's arrangement the attentional hidden
    state h~ (B, H) that is fed back as input (else None), and the attention's memory (B, M)
    when it keeps one (``captioner.attention``: soft attention's anchor; else None)."""

    h: Tensor
    c: Tensor
    out: Tensor | None = None
    memory: Tensor | None = None

    def _rows(self) -> tuple[Tensor | None, ...]:
        return self.h, self.c, self.out, self.memory

    def index_select(self, index: Tensor) -> DecoderState:
        return DecoderState(*(None if x is None else x.index_select(0, index) for x in self._rows()))

    def narrow(self, n: int) -> DecoderState:
        """The first ``n`` rows (views)."""
        return DecoderState(*(None if x is None else x[:n] for x in self._rows()))


@dataclass
class StepOutput:
    """One decoding step: logits (B, V), the new state, the attention output, beta (B,)."""

    logits: Tensor
    state: DecoderState
    attention: AttentionOutput
    beta: Tensor


@dataclass
class DecoderOutput:
    """A teacher-forced pass over T steps.

    Attributes:
        logits: (B, T, V) scores for the words 1..T of the caption; or, when ``token_mask``
            is set, (N, V) for just the N steps it marks, in row-major (caption, step) order
            (what the loss needs: no output layer runs on padding).
        alphas: (B, T, L) attention weights used at each step (zero after a caption's end
            when the pass was given lengths).
        betas: (B, T) gate values (likewise).
        log_probs, entropies: (B, T) from a stochastic attention, else None (likewise).
        token_mask: (B, T) True on the steps ``logits`` holds; None when it holds all of them.
        probs: (B, T, L) the distributions the weights came from (``alphas`` itself unless
            the attention samples). None is read as ``alphas``.
        sampled: (B,) True for the captions whose locations were sampled (stochastic attention).
        samples: k, the paths per caption: B here is k times the batch given (rows i * k ..
            i * k + k - 1 are caption i), when the attention asks for k > 1 in training.
        features: (U, L, C) the annotation vectors the pass attended over (set by
            ``Captioner.forward``, for losses on the encoder's output; else None).
    """

    logits: Tensor
    alphas: Tensor
    betas: Tensor
    log_probs: Tensor | None = None
    entropies: Tensor | None = None
    token_mask: Tensor | None = None
    probs: Tensor | None = None
    sampled: Tensor | None = None
    samples: int = 1
    features: Tensor | None = None

    def __post_init__(self) -> None:
        if self.probs is None:
            self.probs = self.alphas

    def padded_logits(self) -> Tensor:
        """(B, T, V) logits, zero on the steps a packed pass did not compute."""
        if self.token_mask is None:
            return self.logits
        B, T = self.token_mask.shape
        full = self.logits.new_zeros(B, T, self.logits.shape[-1])
        full[self.token_mask] = self.logits
        return full


@dataclass
class _Packing:
    """How a teacher-forced pass runs T steps over B captions: ``active`` rows at each step;
    with lengths, the captions sorted longest first (``order``; None when they come so, as
    :func:`captioner.data.dataset.collate_captions` makes a batch) and the real steps marked
    (``token_mask`` (B, T)); both None when every caption runs all T steps."""

    active: list[int]
    order: Tensor | None = None
    token_mask: Tensor | None = None
    source: Tensor | None = None  # made by packed(), once per pass

    @classmethod
    def plan(cls, lengths: Tensor | None, B: int, T: int) -> _Packing:
        if lengths is None:
            return cls([B] * T)
        lengths = lengths.clamp(1, T)  # every caption predicts at least <end>
        steps = torch.arange(T, device=lengths.device)
        active = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1)  # (T,)
        in_order = (lengths[:-1] >= lengths[1:]).all().long().view(1)  # already longest first
        *active, in_order = torch.cat([active, in_order]).tolist()  # the one host read per pass
        if active[-1] == B:  # every caption runs all T steps: nothing to sort or pack
            return cls(active)
        order = None if in_order else torch.argsort(lengths, descending=True, stable=True)
        return cls(active, order, steps.unsqueeze(0) < lengths.unsqueeze(1))

    def loop_rows(self, x: Tensor) -> Tensor:
        """(B, ...) rows in the input order -> in the loop's: longest caption first."""
        return x if self.order is None else x.index_select(0, self.order)

    def input_rows(self, x: Tensor) -> Tensor:
        """(B, ...) rows in the loop's order -> back in the input order."""
        return x if self.order is None else x.index_select(0, torch.argsort(self.order))

    def gather(self, parts: list[Tensor]) -> Tensor | None:
        """Per-step rows -> (B, T, ...) in the input order, zeros after a caption's end."""
        if not parts:
            return None
        if self.token_mask is None:
            return torch.stack(parts, 1)
        B, T = self.token_mask.shape
        # step t's rows are sorted rows 0..n_t-1: the True cells of the sorted mask, time-major
        cells = self.loop_rows(self.token_mask).t()  # (T, B)
        x = torch.cat(parts)  # (N, ...), time-major
        full = x.new_zeros(T, B, *x.shape[1:]).masked_scatter_(cells.view(T, B, *[1] * (x.dim() - 1)), x)
        return self.input_rows(full.transpose(0, 1)).contiguous()  # no host sync

    def packed(self, parts: list[Tensor]) -> Tensor:
        """Per-step rows -> (N, ...), the real steps row-major in the input order: the same as
        ``gather(parts)[token_mask]``, as one ``index_select`` of the steps' rows (and one
        ``index_add`` back), not a zeroed (B, T, ...) tensor scattered, reordered and masked."""
        if self.token_mask is None:
            raise ValueError("packed() needs a packing plan with lengths (token_mask)")
        return torch.cat(parts).index_select(0, self._source_rows())

    def _source_rows(self) -> Tensor:
        """(N,): for each real step, row-major in the input order, its row in the steps' rows
        concatenated time-major (step t holds sorted rows 0..n_t-1)."""
        if self.source is None:
            B, T = self.token_mask.shape
            cells = self.loop_rows(self.token_mask).t()  # (T, B) sorted, time-major
            index = torch.zeros(T, B, dtype=torch.long, device=cells.device)
            index[cells] = torch.arange(sum(self.active), device=cells.device)  # each cell's row
            self.source = self.input_rows(index.t())[self.token_mask]  # (N,)
        return self.source


def _narrow(projected, n: int):
    """The first ``n`` rows of what an attention's ``precompute`` returned: a tensor, or a
    dataclass / tuple of them (views, no copies)."""
    if isinstance(projected, Tensor):
        return projected[:n]
    if dataclasses.is_dataclass(projected):
        return dataclasses.replace(projected, **{f.name: _narrow(getattr(projected, f.name), n)
                                                 for f in dataclasses.fields(projected)})
    if isinstance(projected, (tuple, list)):
        return type(projected)(_narrow(x, n) for x in projected)
    return projected


def _flat(x: Tensor | None) -> Tensor | None:
    """(B, K, ...) -> (B * K, ...); None stays None."""
    return None if x is None else x.flatten(0, 1)


def mean_over_locations(features: Tensor) -> Tensor:
    """(B, L, C) -> (B, C). In bf16 as a batched product with 1/L: the CPU's ``mean`` over
    a bf16 tensor converts it to float32 first, ~10x slower at the benchmark's sizes."""
    if features.dtype in (torch.float32, torch.float64):
        return features.mean(dim=1)
    B, L, _ = features.shape
    return torch.bmm(features.new_full((B, 1, L), 1.0 / L), features).squeeze(1)


def _support(alpha: Tensor) -> tuple[Tensor, Tensor] | None:
    """The nonzeros of each row of maps alpha (N, L): (values, indices), (N, S) each, S the
    largest row's count (a shorter row's last entries are zeros); None when S is over half
    the grid (a softmax map's is): the dense form is then cheaper than gathering."""
    support = max(int((alpha > 0).sum(-1).amax()), 1)
    return None if 2 * support > alpha.shape[-1] else alpha.topk(support, dim=-1, sorted=False)


def _lstm(pre: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell from its gate pre-activations (B, 4H) and c_{t-1} (B, H) -> h_t, c_t.

    h_t comes out in the gates' dtype and c_t in c's: in a bf16 pass c stays float32, a
    running sum over the steps (``captioner.precision``); in float32 nothing is cast."""
    i, f, g, o = pre.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c)).to(pre.dtype), c


def _lstm_summed(parts: tuple[Tensor, Tensor, Tensor], c: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """:func:`_lstm` of parts[0] + parts[1] + parts[2] (W_e E y + b, W_z z, W_h h). With
    ``fused``, on CPU tensors, the sums and the cell in one C pass: without gradients on float32
    tensors (a decoding step) :func:`captioner.native.lstm_cell`; else, float32 or bf16 gates
    with float32 c (a training step), :class:`captioner.kernels.LSTMCell`, its backward in C too."""
    if fused and c.dim() == 2:
        if (not torch.is_grad_enabled() and all(p.shape == parts[0].shape for p in parts)
                and native.usable(*parts, c)):
            return native.lstm_cell(parts, c)
        if native.lstm_train_usable(parts, c) and not torch.compiler.is_compiling():
            return kernels.LSTMCell.apply(*parts, c)
    return _lstm(parts[0] + parts[1] + parts[2], c)


class Decoder(nn.Module):
    """The attention LSTM decoder.

    Args:
        vocab_size: V. feature_dim: C. embed_dim: E. hidden_dim: H.
        attention: a module following the contract in ``captioner.attention``.
        dropout: before the output layer.
        beta_gate: use the scalar gate beta_t (else beta_t = 1).
        deep_output: eq. 7's deep output (else logits = L_o h_t).
        dropout_hidden: with the deep output, also drop h_t before L_h (the authors' code).
        arrangement: "xu" (attend on h_{t-1}, before the step) or "luong" (attend on h_t,
            attentional hidden state, input feeding; no beta gate or deep output).
        fused: in a teacher-forced pass, sum W_z's and W_h's gradients over the steps in one
            matmul each (``captioner.kernels.StepWeight``), and drop out with a uniform draw
            (``kernels.Dropout``); False: the plain per-step layers and ``nn.Dropout``. The same
            function either way.
        score_mask: (C,) 1 for the channels the attention's scores read, 0 for those only the
            context vector and h_0 read (None: all). ``model.encoder.context_in_scores``.
        output: "expected" (the word from the expected context z_t), "mixture" (from each
            location the map is on, weighted by the map: :meth:`mixture`; Luong only) or
            "product" (both, as a product of experts: log_softmax(expected) + mixture).
        decode_output: the same choice for :meth:`step`, decoding one step at a time ("": as
            ``output``); the teacher-forced pass reads ``output``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        feature_dim: int,
        attention: nn.Module,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        beta_gate: bool = True,
        deep_output: bool = True,
        dropout_hidden: bool = True,
        arrangement: str = "xu",
        fused: bool = True,
        score_mask: Tensor | None = None,
        output: str = "expected",
        decode_output: str = "",
    ) -> None:
        super().__init__()
        self.register_buffer("score_mask", score_mask, persistent=False)  # (C,) or None
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.attention, self.luong = attention, arrangement == "luong"
        context_dim = getattr(attention, "context_dim", feature_dim)  # z_t's size: C, or more with hops
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)  # f_init,h
        self.init_c = nn.Linear(feature_dim, hidden_dim)  # f_init,c
        self.f_beta = nn.Linear(hidden_dim, 1) if beta_gate and not self.luong else None
        # LSTM gates (i, f, g, o) = W_e E y + W_z z + W_h h + b, split so W_e E y runs outside the loop
        # (Luong: W_z h~_{t-1}, input feeding, in place of W_z z).
        self.gate_embed = nn.Linear(embed_dim, 4 * hidden_dim)
        self.gate_context = nn.Linear(hidden_dim if self.luong else context_dim, 4 * hidden_dim, bias=False)
        self.gate_hidden = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.combine = nn.Linear(context_dim + hidden_dim, hidden_dim, bias=False) if self.luong else None  # W_c
        self.deep_output = deep_output and not self.luong
        if self.deep_output:
            self.out_hidden = nn.Linear(hidden_dim, embed_dim)  # L_h
            self.out_context = nn.Linear(context_dim, embed_dim, bias=False)  # L_z
            self.out = nn.Linear(embed_dim, vocab_size)  # L_o
        else:
            self.out = nn.Linear(hidden_dim, vocab_size)  # L_o, or Luong's W_s
        self.dropout = kernels.Dropout(dropout) if fused else nn.Dropout(dropout)  # the same; the first faster
        self.dropout_hidden, self.fused = dropout_hidden, fused
        self.anchor_on_word = getattr(attention, "anchor_on_word", False)
        if self.anchor_on_word and not self.luong:
            raise ConfigError("model.attention.anchor_on_word reads Luong's output layer at each location: "
                              "set model.decoder.arrangement: luong (or anchor_on_word: false)")
        decode_output = decode_output or output
        self.mixture_output, self.expected_output = output in ("mixture", "product"), output != "mixture"
        self.step_mixture, self.step_expected = decode_output in ("mixture", "product"), decode_output != "mixture"
        for key, value, mixed in (("output", output, self.mixture_output),
                                  ("decode_output", decode_output, self.step_mixture)):
            if mixed and not self.luong:
                raise ConfigError(f"model.decoder.{key}: {value} reads Luong's output layer at each location: "
                                  f"set model.decoder.arrangement: luong (or {key}: expected)")
        self.per_cell = self.anchor_on_word or self.mixture_output or self.step_mixture  # W_c's share of each location
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():  # forget-gate bias 1: remember by default (Jozefowicz et al., 2015)
            self.gate_embed.bias.zero_()
            self.gate_embed.bias[self.hidden_dim:2 * self.hidden_dim] = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, vocab_size: int, feature_dim: int,
                    grid: tuple[int, int] = (1, 1), score_mask: Tensor | None = None) -> Decoder:
        d = cfg.decoder
        attention = build_attention(cfg.attention, feature_dim=feature_dim, hidden_dim=d.hidden_dim, grid=grid)
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, attention=attention,
                   embed_dim=d.embed_dim, hidden_dim=d.hidden_dim, dropout=d.dropout, beta_gate=d.beta_gate,
                   deep_output=d.deep_output, dropout_hidden=d.dropout_hidden, arrangement=d.arrangement,
                   fused=d.fused, score_mask=score_mask, output=d.output, decode_output=d.decode_output)

    # -- pieces shared by training and decoding

    def init_state(self, features: Tensor) -> DecoderState:
        """h_0, c_0 = tanh(f_init(mean_i a_i)): features (B, L, C) -> (B, H) each (Luong: h~_0 = 0)."""
        mean = mean_over_locations(features)  # (B, C)
        h = torch.tanh(self.init_h(mean))
        c = torch.tanh(self.init_c(mean))
        c = c.to(torch.promote_types(c.dtype, torch.float32))  # float32 at least (a bf16 pass: see _lstm)
        init_memory = getattr(self.attention, "init_memory", None)
        memory = init_memory(features) if init_memory is not None else None  # (B, M) or None
        return DecoderState(h, c, torch.zeros_like(h) if self.luong else None, memory)

    def precompute(self, features: Tensor):
        """The attention's per-image work (W_a a_i), once before the time loop (opaque here);
        with ``anchor_on_word`` or the mixture output, with the locations' share of the output
        layer (:meth:`cells`)."""
        projected = self.attention.precompute(self._scored(features))
        return (projected, self.cells(features)) if self.per_cell else projected

    def cells(self, features: Tensor) -> Tensor:
        """``anchor_on_word``, the mixture output: W_c's feature columns applied to every
        location, (B, L, H): what h~ would be made of if the map sat on that location alone."""
        return features @ self.combine.weight[:, :features.shape[-1]].T.to(features.dtype)

    def mixture(self, cells: Tensor, images: Tensor, h: Tensor, alpha: Tensor) -> Tensor:
        """``output="mixture"``: the map as a latent alignment. log p(y) = log sum_l alpha_l
        softmax(W_s drop(tanh(W_c [a_l; h])))_y, for every word y: cells (U, L, H) from
        :meth:`cells`, images (N,) each row's image in it, h (N, H) the LSTM's h_t, alpha (N, L)
        -> (N, V) log-probabilities (a log_softmax of them is themselves: the losses and the
        searches read them as logits).

        Only the map's support is read (every nonzero of each row; all L when that is over
        half the grid): where alpha_l = 0 the location adds nothing. d log p(y) / d alpha_l =
        p(y | l) / p(y): the map is pulled onto the locations that explain the word."""
        U, L, H = cells.shape
        h_part = (h @ self.combine.weight[:, -H:].T.to(h.dtype)).unsqueeze(1)  # (N, 1, H)
        top = _support(alpha)
        if top is None:  # most of the grid: every location
            weight, picked = alpha, cells.index_select(0, images)  # (N, L), (N, L, H)
        else:
            weight, index = top  # (N, S): every nonzero of each row
            picked = kernels.gather_rows(cells, (images.unsqueeze(1) * L + index).flatten()).view(*index.shape, H)
        log_p = torch.log_softmax(self.out(self.dropout(torch.tanh(picked + h_part))).float(), dim=-1)  # (N, S, V)
        weight = weight.float()
        log_w = torch.where(weight > 0, weight.clamp_min(1e-30).log(), float("-inf"))  # no 1/0 in the gradient
        return torch.logsumexp(log_p + log_w.unsqueeze(-1), dim=1)  # (N, V)

    def word_fit(self, cells: Tensor | kernels.SummedRows, h: Tensor, words: Tensor,
                 alpha: Tensor | None = None) -> Tensor:
        """How well each location alone explains each row's word: W_s[y] . tanh(W_c [a_l; h]),
        the output layer's logit of y with the map on location l alone (its bias, the same for
        every location, left out). cells (B, L, H) from :meth:`cells`, h (N, H), words (N,) with
        N = K * B (K rows per image, image-major) -> (N, L).

        With ``alpha`` (N, L), the map the fit will re-weight (:meth:`AnchorTerm.settle`: q_l ~
        alpha_l exp(fit_l)), the fit is computed on the map's support only: where alpha_l = 0,
        q_l = 0 whatever the fit, so those entries hold the row's lowest computed fit (their
        exp stays <= 1 and the row's max is the support's). A sparsemax map covers a few cells
        of the grid; a softmax map covers all of them, and then everything is computed."""
        table = cells.table if isinstance(cells, kernels.SummedRows) else cells
        B, L, H = table.shape
        n = h.shape[0]
        k = n // B
        h_part = (h @ self.combine.weight[:, -H:].T.to(h.dtype)).view(B, k, 1, H)
        w = self.out.weight[words].to(h_part.dtype).view(B, k, H, 1)
        top = _support(alpha) if alpha is not None else None
        if top is None:  # everywhere, or most of the grid: the dense form
            return (torch.tanh(table.unsqueeze(1) + h_part) @ w).view(n, L)
        index = top.indices  # (N, S): every nonzero of each row
        rows = torch.arange(B, device=index.device).repeat_interleave(k).unsqueeze(1)  # (N, 1): image of each row
        picked = kernels.gather_rows(cells, (rows * L + index).flatten()).view(B, k, -1, H)
        fit = (torch.tanh(picked + h_part) @ w).view(n, -1)
        return fit.detach().amin(-1, keepdim=True).expand(n, L).scatter(-1, index, fit)

    def _scored(self, features: Tensor) -> Tensor:
        """What the attention's scores read of the features: the channels ``score_mask`` keeps
        (the others still reach the context vector z_t and h_0)."""
        return features if self.score_mask is None else features * self.score_mask.to(features.dtype)

    def _attend(self, features: Tensor, projected, query: Tensor, mask: Tensor | None,
                memory: Tensor | None = None) -> AttentionOutput:
        """The attention on queries (N, H) (and its memory (N, M), when it keeps one). With K
        times as many queries as images (the beams of a beam search, K adjacent rows per
        image) it gets the K queries of each image together and reads the image's keys and
        features once; its output comes back flat."""
        n, B = query.shape[0], features.shape[0]
        kept = {} if memory is None else {"memory": memory if n == B else memory.view(B, n // B, -1)}
        if n == B:
            return self.attention(features, projected, query, mask, **kept)
        att = self.attention(features, projected, query.view(B, n // B, -1), mask, **kept)
        return AttentionOutput(**{f.name: _flat(getattr(att, f.name)) for f in dataclasses.fields(att)})

    def _advance(self, gates_embed: Tensor, state: DecoderState, features: Tensor, projected,
                 mask: Tensor | None, gates: tuple[StepWeight, StepWeight] | None = None,
                 words: Tensor | None = None, cells: Tensor | kernels.SummedRows | None = None,
                 ) -> tuple[DecoderState, AttentionOutput, Tensor, Tensor]:
        """One step of the arrangement. Returns (state, attention, z_t, beta_t).

        ``gates``: W_z and W_h of the teacher-forced loop, whose gradients are summed once
        (captioner.kernels); else the layers themselves. ``words`` (N,), the word the step
        reads, and ``cells``: with ``anchor_on_word``, the last step's anchor is settled on it."""
        w_in, w_h = gates if gates is not None else (self.gate_context, self.gate_hidden)
        if self.luong:  # step on [E y, h~_{t-1}], attend on h_t, h~_t = tanh(W_c [z_t; h_t])
            memory = state.memory
            if self.anchor_on_word:
                fit = self.word_fit(cells, state.h, words, memory[..., 3:] if self.fused else None)  # on the
                # last map's support (fused), or everywhere
                memory = self.attention.anchor.settle(state.h, memory, fit)
            h, c = _lstm_summed((gates_embed, w_in(state.out), w_h(state.h)), state.c, self.fused)
            att = self._attend(features, projected, h, mask, memory)
            out = torch.tanh(self.combine(torch.cat([att.context, h], dim=-1)))  # (B, H)
            return DecoderState(h, c, out, att.memory), att, att.context, h.new_ones(h.shape[0])
        att = self._attend(features, projected, state.h, mask, state.memory)
        beta = torch.sigmoid(self.f_beta(state.h)) if self.f_beta is not None else None  # (B, 1)
        z = att.context * beta if beta is not None else att.context  # (B, C)
        h, c = _lstm_summed((gates_embed, w_in(z), w_h(state.h)), state.c, self.fused)
        beta = beta.squeeze(1) if beta is not None else z.new_ones(z.shape[0])
        return DecoderState(h, c, memory=att.memory), att, z, beta

    def _step_weights(self) -> tuple[StepWeight, StepWeight] | None:
        """W_z and W_h for one teacher-forced pass (the fused kernel, ``captioner.kernels``), or
        None: the plain layers, one matmul and one gradient per step."""
        if not self.fused:
            return None
        return StepWeight(self.gate_context.weight), StepWeight(self.gate_hidden.weight)

    def _embedded(self, tokens: Tensor) -> Tensor:
        """E y, in the dtype the layers run in: a bf16 pass leaves the table float32
        (``captioner.precision.cast_parameters``) and casts the rows it reads."""
        return self.embed(tokens).to(self.gate_embed.weight.dtype)

    def _readout(self, state: DecoderState) -> Tensor:
        """What the output layer reads: h_t, or Luong's h~_t."""
        return state.out if self.luong else state.h

    def _logits(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """eq. 7: (..., E), (..., H), (..., C) -> (..., V) (Luong: W_s h~_t)."""
        if self.deep_output:
            if self.dropout_hidden:  # the authors drop h_t and the layer's input alike
                h = self.dropout(h)
            pre = torch.tanh(emb + kernels.linear(self.out_hidden, h) + kernels.linear(self.out_context, z))
        else:
            pre = h
        return kernels.linear(self.out, self.dropout(pre))

    def step(self, tokens: Tensor, state: DecoderState, features: Tensor, projected,
             mask: Tensor | None = None) -> StepOutput:
        """One decoding step: previous words (N,) -> logits (N, V) for the next.

        N is the number of images B (features (B, L, C), ``projected`` from
        :meth:`precompute` on them), or K * B for K hypotheses per image, image-major
        (rows i * K .. i * K + K - 1 belong to image i): beam search then keeps one copy of
        each image's features and keys."""
        emb = self._embedded(tokens)  # (B, E)
        projected, cells = projected if self.per_cell else (projected, None)
        state, att, z, beta = self._advance(self.gate_embed(emb), state, features, projected, mask,
                                            words=tokens, cells=cells)
        logits = self._logits(emb, self._readout(state), z) if self.step_expected else None
        if self.step_mixture:
            n, B = tokens.shape[0], features.shape[0]
            images = torch.arange(B, device=tokens.device).repeat_interleave(n // B)  # K rows per image
            logits = self._combined(logits, self.mixture(cells, images, state.h, att.alpha))
        return StepOutput(logits, state, att, beta)

    @staticmethod
    def _combined(expected: Tensor | None, mixture: Tensor) -> Tensor:
        """The mixture's log-probabilities, times the expected output's (``output="product"``):
        a product of experts, normalised by whatever reads them (the loss's and the searches'
        log_softmax)."""
        return mixture if expected is None else torch.log_softmax(expected.float(), dim=-1) + mixture

    # -- teacher forcing

    def _paths(self, captions: Tensor, lengths: Tensor | None, rows: Tensor | None):
        """k copies of each caption (rows i * k .. i * k + k - 1) when the attention asks for
        k sampled paths per caption in training (``attention.samples``); else as given. Returns
        k, the captions, their lengths and each one's image row (None: row b for caption b)."""
        k = getattr(self.attention, "samples", 1) if self.training else 1
        if k == 1:
            return k, captions, lengths, rows
        if rows is None:
            rows = torch.arange(captions.shape[0], device=captions.device)
        return k, *(None if x is None else x.repeat_interleave(k, 0) for x in (captions, lengths, rows))

    def _pass_logits(self, emb: Tensor, steps: dict[str, list[Tensor]], alphas: Tensor, pack: _Packing,
                     table: Tensor | None, images: Tensor) -> Tensor:
        """The teacher-forced pass's output layer, for every real step at once: (B, T, V), or
        (N, V) packed. emb: the words read; steps: the loop's per-step rows; alphas (B, T, L);
        table (U, L, H) from :meth:`cells` and images (B,) each caption's row of it (the mixture)."""
        logits = None
        if self.expected_output:
            if pack.token_mask is not None:
                h, z = pack.packed(steps["h"]), pack.packed(steps["z"])  # (N, H), (N, C)
            else:
                h, z = pack.gather(steps["h"]), pack.gather(steps["z"])  # (B, T, H), (B, T, C)
            logits = self._logits(emb, h, z)  # one matmul
        if self.mixture_output:  # on each step's map's support
            images = images.unsqueeze(1).expand(alphas.shape[:2])  # (B, T): each step's image
            if pack.token_mask is not None:
                m = pack.token_mask
                mixed = self.mixture(table, images[m], pack.packed(steps["lstm_h"]), alphas[m])
            else:
                h = pack.gather(steps["lstm_h"])  # (B, T, H)
                mixed = self.mixture(table, images.flatten(), h.flatten(0, 1), alphas.flatten(0, 1))
                mixed = mixed.view(*alphas.shape[:2], -1)
            logits = self._combined(logits, mixed)
        return logits

    def _embed_steps(self, inputs: Tensor, pack: _Packing) -> tuple[Tensor, Tensor]:
        """E y and its gate share for all steps at once: (B, T, E) and (B, T, 4H); packed, the
        embeddings of the real steps only (N, E) and the gates sorted longest caption first."""
        if pack.token_mask is None:
            emb = self._embedded(inputs)  # (B, T, E)
            return emb, kernels.linear(self.gate_embed, emb)  # (B, T, 4H)
        emb = self._embedded(inputs[pack.token_mask])  # (N, E): the real steps, row-major in the input order
        real_gates = kernels.linear(self.gate_embed, emb)  # (N, 4H)
        gates_embed = real_gates.new_zeros(*inputs.shape, real_gates.shape[-1])
        gates_embed[pack.token_mask] = real_gates
        return emb, pack.loop_rows(gates_embed)

    def forward(self, features: Tensor, captions: Tensor, mask: Tensor | None = None,
                lengths: Tensor | None = None, image_index: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            features: (B, L, C) annotation vectors; with ``image_index``, (U, L, C) for U images.
            captions: (B, T+1) ``<start> w1 .. <end> <pad>..``; words 0..T-1 go in, 1..T are predicted.
            mask: (B, L) valid grid locations, or None for all.
            lengths: (B,) steps that predict a real word (the words and ``<end>``), or None
                for all T. Given, step t runs only on the captions still going (the longest
                first, inside; outputs come back in the input order) and the output layer only
                on real steps: the logits come packed (see :class:`DecoderOutput`). That is
                what training does; the result on real steps is the same either way.
            image_index: (B,) each caption's image: its row of ``features`` (and ``mask``).
                An image's keys are projected once for all its captions, then indexed per
                caption. None: row b for caption b.
        """
        k, captions, lengths, rows = self._paths(captions, lengths, image_index)
        inputs = captions[:, :-1]  # (B, T)
        pack = _Packing.plan(lengths, *inputs.shape)
        emb, gates_embed = self._embed_steps(inputs, pack)
        table = self.cells(features) if self.anchor_on_word or self.mixture_output else None  # (U, L, H): once per image
        images = rows if rows is not None else torch.arange(inputs.shape[0], device=inputs.device)  # input order
        if rows is not None:  # captions share images: the keys once per image, then a row per caption
            rows = pack.loop_rows(rows)  # longest caption first
            projected = self.attention.precompute(self._scored(features), rows=rows)
            state = self.init_state(features).index_select(rows)
            cells = table.index_select(0, rows) if self.anchor_on_word else None
            in_place = kernels.reads_feature_rows(features, self.attention, self.fused)  # the C context reads
            # each caption's image by its row, no (B, L, C) copy of the images repeated
            features = kernels.FeatureRows(features, rows.long()) if in_place else features.index_select(0, rows)
            mask = mask.index_select(0, rows) if mask is not None else None
        else:  # one caption an image: sort the features, then precompute (rows=pack.order would
            # precompute first and index after: the same values, not always the same last bits)
            features = pack.loop_rows(features)  # longest caption first (a copy, unless they come so)
            mask = pack.loop_rows(mask) if mask is not None else None
            projected, state = self.attention.precompute(self._scored(features)), self.init_state(features)
            cells = None
            if self.anchor_on_word:
                cells = pack.loop_rows(table)
        gates = self._step_weights()
        words = None
        if self.anchor_on_word:  # the words each step reads, in the loop's row order
            words = pack.loop_rows(inputs)
            cells = kernels.summed_rows(cells) if self.fused else cells  # each step reads a few rows: their
            # gradients summed in place
        gates_embed = gates_embed.unbind(1)  # T views; their backward stacks the T gradients once (a slice
        # [:, t] per step would write each step's gradient into a zeroed (B, T, 4H) tensor: T full passes)
        steps: dict[str, list[Tensor]] = {name: [] for name in ("h", "z", "alpha", "beta", "log_prob", "entropy", "probs",
                                                                "lstm_h")}
        sampled = None
        expected = self.expected_output  # the mixture alone reads h_t and the map, not h~_t or z_t
        for t, n in enumerate(pack.active):
            if n == 0:
                break
            if n < state.h.shape[0]:  # the shortest captions have ended: drop their rows (views)
                state, features, projected = state.narrow(n), features[:n], _narrow(projected, n)
                mask = mask[:n] if mask is not None else None
                cells = _narrow(cells, n)
            state, att, z, beta = self._advance(gates_embed[t][:n], state, features, projected, mask, gates,
                                                words=words[:n, t] if words is not None else None, cells=cells)
            sampled = att.sampled if t == 0 else sampled
            for key, x in (("h", self._readout(state) if expected else None), ("z", z if expected else None),
                           ("alpha", att.alpha), ("beta", beta),
                           ("log_prob", att.log_prob), ("entropy", att.entropy),
                           ("probs", None if att.probs is att.alpha else att.probs),
                           ("lstm_h", state.h if self.mixture_output else None)):
                if x is not None:
                    steps[key].append(x)
        alphas = pack.gather(steps["alpha"])  # (B, T, L)
        if sampled is not None:
            sampled = pack.input_rows(sampled)
        return DecoderOutput(
            logits=self._pass_logits(emb, steps, alphas, pack, table, images),
            alphas=alphas, betas=pack.gather(steps["beta"]),  # (B, T, L), (B, T)
            log_probs=pack.gather(steps["log_prob"]), entropies=pack.gather(steps["entropy"]),
            token_mask=pack.token_mask, probs=pack.gather(steps["probs"]), sampled=sampled, samples=k)
