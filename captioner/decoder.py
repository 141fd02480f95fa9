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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captioner.attention import AttentionOutput, build_attention
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
        logits: (B, T, V) scores for the words 1..T of the caption.
        alphas: (B, T, L) attention weights used at each step.
        betas: (B, T) gate values.
        log_probs, entropies: (B, T) from a stochastic attention, else None.
    """

    logits: Tensor
    alphas: Tensor
    betas: Tensor
    log_probs: Tensor | None = None
    entropies: Tensor | None = None


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

    def _advance(self, gates_embed: Tensor, state: DecoderState, features: Tensor,
                 projected, mask: Tensor | None) -> tuple[DecoderState, AttentionOutput, Tensor, Tensor]:
        """Attend with h_{t-1}, gate, and run the LSTM cell. Returns (state, attention, z_t, beta_t)."""
        att = self.attention(features, projected, state.h, mask)
        beta = torch.sigmoid(self.f_beta(state.h)) if self.f_beta is not None else None  # (B, 1)
        z = att.context * beta if beta is not None else att.context  # (B, C)
        gates = gates_embed + self.gate_context(z) + self.gate_hidden(state.h)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        beta = beta.squeeze(1) if beta is not None else z.new_ones(z.shape[0])
        return DecoderState(h, c), att, z, beta

    def _logits(self, emb: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """eq. 7: (..., E), (..., H), (..., C) -> (..., V)."""
        if self.deep_output:
            pre = torch.tanh(emb + self.out_hidden(h) + self.out_context(z))
        else:
            pre = h
        return self.out(self.dropout(pre))

    def step(self, tokens: Tensor, state: DecoderState, features: Tensor, projected,
             mask: Tensor | None = None) -> StepOutput:
        """One decoding step: previous words (B,) -> logits (B, V) for the next."""
        emb = self.embed(tokens)  # (B, E)
        state, att, z, beta = self._advance(self.gate_embed(emb), state, features, projected, mask)
        return StepOutput(self._logits(emb, state.h, z), state, att, beta)

    # -- teacher forcing

    def forward(self, features: Tensor, captions: Tensor, mask: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            features: (B, L, C) annotation vectors.
            captions: (B, T+1) ``<start> w1 .. <end> <pad>..``; words 0..T-1 go in, 1..T are predicted.
            mask: (B, L) valid grid locations, or None for all.
        """
        inputs = captions[:, :-1]  # (B, T)
        T = inputs.shape[1]
        emb = self.embed(inputs)  # (B, T, E)
        gates_embed = self.gate_embed(emb)  # (B, T, 4H), all steps at once
        projected = self.precompute(features)  # once per image
        state = self.init_state(features)
        hs, zs, alphas, betas, log_probs, entropies = [], [], [], [], [], []
        for t in range(T):
            state, att, z, beta = self._advance(gates_embed[:, t], state, features, projected, mask)
            hs.append(state.h)
            zs.append(z)
            alphas.append(att.alpha)
            betas.append(beta)
            if att.log_prob is not None:
                log_probs.append(att.log_prob)
                entropies.append(att.entropy)
        logits = self._logits(emb, torch.stack(hs, 1), torch.stack(zs, 1))  # (B, T, V), one matmul
        return DecoderOutput(
            logits=logits,
            alphas=torch.stack(alphas, 1),  # (B, T, L)
            betas=torch.stack(betas, 1),  # (B, T)
            log_probs=torch.stack(log_probs, 1) if log_probs else None,
            entropies=torch.stack(entropies, 1) if entropies else None,
        )
