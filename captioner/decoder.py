"""The attention LSTM decoder of "Show, Attend and Tell" (Section 3.1.2).

At every step t, with the previous word y_{t-1} and the previous state (h_{t-1}, c_{t-1}):

    alpha_t, z_t = attention(a, h_{t-1})                    (eq. 4-6)
    beta_t       = sigma(f_beta(h_{t-1}))        a scalar     (Section 4.2.1)
    h_t, c_t     = LSTM([E y_{t-1}, beta_t z_t], h_{t-1}, c_{t-1})   (eq. 1-3)
    p(y_t)       = softmax(L_o tanh(E y_{t-1} + L_h h_t + L_z beta_t z_t))  (eq. 7, deep output)

with h_0, c_0 = tanh(f_init(mean_i a_i)) (Section 3.1.2). The decoder never looks at the
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

from captioner.attention import AttentionOutput, build_attention
from captioner.autograd import StepWeight
from captioner.config import ModelConfig


@dataclass
class DecoderState:
    """The LSTM state: h (B, H), c (B, H)."""

    h: Tensor
    c: Tensor

    def index_select(self, index: Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(0, index), self.c.index_select(0, index))


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
    """

    logits: Tensor
    alphas: Tensor
    betas: Tensor
    log_probs: Tensor | None = None
    entropies: Tensor | None = None
    token_mask: Tensor | None = None

    def padded_logits(self) -> Tensor:
        """(B, T, V) logits, zero on the steps a packed pass did not compute."""
        if self.token_mask is None:
            return self.logits
        B, T = self.token_mask.shape
        full = self.logits.new_zeros(B, T, self.logits.shape[-1])
        full[self.token_mask] = self.logits
        return full


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


class Decoder(nn.Module):
    """The attention LSTM decoder.

    Args:
        vocab_size: V. feature_dim: C. embed_dim: E. hidden_dim: H.
        attention: a module following the contract in ``captioner.attention``.
        dropout: before the output layer.
        beta_gate: use the scalar gate beta_t (else beta_t = 1).
        deep_output: eq. 7's deep output (else logits = L_o h_t).
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
    ) -> None:
        super().__init__()
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.attention = attention
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)  # f_init,h
        self.init_c = nn.Linear(feature_dim, hidden_dim)  # f_init,c
        self.f_beta = nn.Linear(hidden_dim, 1) if beta_gate else None
        # LSTM gates (i, f, g, o) = W_e E y + W_z z + W_h h + b, split so W_e E y runs outside the loop.
        self.gate_embed = nn.Linear(embed_dim, 4 * hidden_dim)
        self.gate_context = nn.Linear(feature_dim, 4 * hidden_dim, bias=False)
        self.gate_hidden = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.deep_output = deep_output
        if deep_output:
            self.out_hidden = nn.Linear(hidden_dim, embed_dim)  # L_h
            self.out_context = nn.Linear(feature_dim, embed_dim, bias=False)  # L_z
            self.out = nn.Linear(embed_dim, vocab_size)  # L_o
        else:
            self.out = nn.Linear(hidden_dim, vocab_size)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():  # forget-gate bias 1: remember by default (Jozefowicz et al., 2015)
            self.gate_embed.bias.zero_()
            self.gate_embed.bias[self.hidden_dim:2 * self.hidden_dim] = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, vocab_size: int, feature_dim: int,
                    grid: tuple[int, int] = (1, 1)) -> "Decoder":
        d = cfg.decoder
        attention = build_attention(cfg.attention, feature_dim=feature_dim, hidden_dim=d.hidden_dim, grid=grid)
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, attention=attention,
                   embed_dim=d.embed_dim, hidden_dim=d.hidden_dim, dropout=d.dropout,
                   beta_gate=d.beta_gate, deep_output=d.deep_output)

    # -- pieces shared by training and decoding

    def init_state(self, features: Tensor) -> DecoderState:
        """h_0, c_0 = tanh(f_init(mean_i a_i)): features (B, L, C) -> (B, H) each."""
        mean = features.mean(dim=1)  # (B, C)
        return DecoderState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def precompute(self, features: Tensor):
        """The attention's per-image work (W_a a_i), once before the time loop (opaque here)."""
        return self.attention.precompute(features)

    def _advance(self, gates_embed: Tensor, state: DecoderState, features: Tensor, projected,
                 mask: Tensor | None, gates: tuple[StepWeight, StepWeight] | None = None,
                 ) -> tuple[DecoderState, AttentionOutput, Tensor, Tensor]:
        """Attend with h_{t-1}, gate, and run the LSTM cell. Returns (state, attention, z_t, beta_t).

        With K times as many states as images (the beams of a beam search, K adjacent rows
        per image) the attention gets the K queries of each image together and reads the
        image's keys and features once; its output comes back flat, one row per state."""
        n, B = state.h.shape[0], features.shape[0]
        if n == B:
            att = self.attention(features, projected, state.h, mask)
        else:
            att = self.attention(features, projected, state.h.view(B, n // B, -1), mask)
            att = AttentionOutput(*(None if x is None else x.flatten(0, 1) for x in
                                    (att.context, att.alpha, att.log_prob, att.entropy)))
        beta = torch.sigmoid(self.f_beta(state.h)) if self.f_beta is not None else None  # (B, 1)
        z = att.context * beta if beta is not None else att.context  # (B, C)
        if gates is None:
            pre = gates_embed + self.gate_context(z) + self.gate_hidden(state.h)  # (B, 4H)
        else:  # the teacher-forced loop: the weights' gradients are summed once (captioner.autograd)
            pre = gates_embed + gates[0](z) + gates[1](state.h)
        i, f, g, o = pre.chunk(4, dim=1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        beta = beta.squeeze(1) if beta is not None else z.new_ones(z.shape[0])
        return DecoderState(h, c), att, z, beta

    def _step_weights(self) -> tuple[StepWeight, StepWeight]:
        """W_z and W_h for one teacher-forced pass (see captioner.autograd)."""
        return StepWeight(self.gate_context.weight), StepWeight(self.gate_hidden.weight)

    def _logits(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """eq. 7: (..., E), (..., H), (..., C) -> (..., V)."""
        if self.deep_output:
            pre = torch.tanh(emb + self.out_hidden(h) + self.out_context(z))
        else:
            pre = h
        return self.out(self.dropout(pre))

    def step(self, tokens: Tensor, state: DecoderState, features: Tensor, projected,
             mask: Tensor | None = None) -> StepOutput:
        """One decoding step: previous words (N,) -> logits (N, V) for the next.

        N is the number of images B (features (B, L, C), ``projected`` from
        :meth:`precompute` on them), or K * B for K hypotheses per image, image-major
        (rows i * K .. i * K + K - 1 belong to image i): beam search then keeps one copy of
        each image's features and keys."""
        emb = self.embed(tokens)  # (B, E)
        state, att, z, beta = self._advance(self.gate_embed(emb), state, features, projected, mask)
        return StepOutput(self._logits(emb, state.h, z), state, att, beta)

    # -- teacher forcing

    def forward(self, features: Tensor, captions: Tensor, mask: Tensor | None = None,
                lengths: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            features: (B, L, C) annotation vectors.
            captions: (B, T+1) ``<start> w1 .. <end> <pad>..``; words 0..T-1 go in, 1..T are predicted.
            mask: (B, L) valid grid locations, or None for all.
            lengths: (B,) steps that predict a real word (the words and ``<end>``), or None
                for all T. Given, step t runs only on the captions still going (the longest
                first, inside; outputs come back in the input order) and the output layer only
                on real steps: the logits come packed (see :class:`DecoderOutput`). That is
                what training does; the result on real steps is the same either way.
        """
        inputs = captions[:, :-1]  # (B, T)
        B, T = inputs.shape
        active, order, token_mask = [B] * T, None, None  # rows going at each step; sorting; packing
        if lengths is not None:
            lengths = lengths.clamp(1, T)  # every caption predicts at least <end>
            steps = torch.arange(T, device=lengths.device)
            active = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()  # the one host read per pass
            if active[-1] < B:  # else every caption runs all T steps: nothing to sort or pack
                order = torch.argsort(lengths, descending=True, stable=True)
                token_mask = steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        if token_mask is None:
            emb = self.embed(inputs)  # (B, T, E)
            gates_embed = self.gate_embed(emb)  # (B, T, 4H), all steps at once
        else:
            emb = self.embed(inputs[token_mask])  # (N, E): the real steps, row-major in the input order
            real_gates = self.gate_embed(emb)  # (N, 4H), all real steps at once
            gates_embed = real_gates.new_zeros(B, T, real_gates.shape[-1])
            gates_embed[token_mask] = real_gates
            gates_embed = gates_embed.index_select(0, order)  # longest caption first
            features = features.index_select(0, order)
            mask = mask.index_select(0, order) if mask is not None else None
        projected = self.precompute(features)  # once per image
        state = self.init_state(features)
        gates = self._step_weights()
        hs, zs, alphas, betas, log_probs, entropies = [], [], [], [], [], []
        for t in range(T):
            n = active[t]
            if n == 0:
                break
            if n < state.h.shape[0]:  # the shortest captions have ended: drop their rows (views)
                state = DecoderState(state.h[:n], state.c[:n])
                features, projected = features[:n], _narrow(projected, n)
                mask = mask[:n] if mask is not None else None
            state, att, z, beta = self._advance(gates_embed[:n, t], state, features, projected, mask, gates)
            hs.append(state.h)
            zs.append(z)
            alphas.append(att.alpha)
            betas.append(beta)
            if att.log_prob is not None:
                log_probs.append(att.log_prob)
                entropies.append(att.entropy)
        if token_mask is not None:
            # step t's rows are sorted rows 0..n_t-1: the True cells of the sorted mask, time-major
            step_cells = token_mask.index_select(0, order).t()  # (T, B)
            restore = torch.argsort(order)  # sorted row -> input row

        def gather(parts: list[Tensor]) -> Tensor | None:
            """Per-step rows -> (B, T, ...) in the input order, zeros after a caption's end."""
            if not parts:
                return None
            if token_mask is None:
                return torch.stack(parts, 1)
            x = torch.cat(parts)  # (N, ...), time-major
            cells = step_cells.view(T, B, *[1] * (x.dim() - 1))
            full = x.new_zeros(T, B, *x.shape[1:]).masked_scatter_(cells, x)  # no host sync
            return full.transpose(0, 1).index_select(0, restore)

        h, z = gather(hs), gather(zs)
        if token_mask is not None:
            h, z = h[token_mask], z[token_mask]  # (N, H), (N, C)
        return DecoderOutput(
            logits=self._logits(emb, h, z),  # one matmul: (B, T, V), or (N, V) packed
            alphas=gather(alphas),  # (B, T, L)
            betas=gather(betas),  # (B, T)
            log_probs=gather(log_probs),
            entropies=gather(entropies),
            token_mask=token_mask,
        )
