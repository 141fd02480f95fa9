"""Decoding over the decoder's one-step function.

Every decoder returns, for each output word, the attention map that produced it, so the
visualizer can draw any decoded caption.

Letters: B batch, T steps, L locations, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.decoder import Decoder


@dataclass
class Decoded:
    """Decoded captions.

    Attributes:
        tokens: (B, T) word ids; ``<end>`` where it came, ``<pad>`` after it.
        lengths: (B,) words before ``<end>`` (T when ``<end>`` never came).
        alphas: (B, T, L) the attention map of every emitted token.
        betas: (B, T) the gate of every emitted token.
        scores: (B,) sum of log-probabilities of the emitted tokens (``<end>`` included).
    """

    tokens: Tensor
    lengths: Tensor
    alphas: Tensor
    betas: Tensor
    scores: Tensor


@torch.no_grad()
def greedy(decoder: Decoder, features: Tensor, *, max_len: int, start_id: int, end_id: int,
           pad_id: int = 0, mask: Tensor | None = None) -> Decoded:
    """The most likely word at every step, for up to ``max_len`` words plus ``<end>``.

    Args:
        decoder: the trained decoder (put it in eval mode first).
        features: (B, L, C) annotation vectors.
    """
    B = features.shape[0]
    projected = decoder.precompute(features)  # once per image
    state = decoder.init_state(features)
    prev = torch.full((B,), start_id, dtype=torch.long, device=features.device)
    finished = torch.zeros(B, dtype=torch.bool, device=features.device)
    lengths = torch.full((B,), max_len, dtype=torch.long, device=features.device)
    scores = features.new_zeros(B)
    tokens, alphas, betas = [], [], []
    for t in range(max_len + 1):
        out = decoder.step(prev, state, features, projected, mask)
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, V)
        if t == max_len:  # no room left: finish with <end>
            word = torch.full_like(prev, end_id)
        else:
            word = logp.argmax(dim=-1)  # (B,)
        step_logp = logp.gather(1, word.unsqueeze(1)).squeeze(1)
        scores = scores + torch.where(finished, 0.0, step_logp)
        ended = (word == end_id) & ~finished
        lengths = torch.where(ended, torch.full_like(lengths, t), lengths)
        tokens.append(torch.where(finished, torch.full_like(word, pad_id), word))
        alphas.append(out.attention.alpha)
        betas.append(out.beta)
        finished = finished | ended
        state, prev = out.state, word
        if bool(finished.all()):
            break
    return Decoded(torch.stack(tokens, 1), lengths, torch.stack(alphas, 1), torch.stack(betas, 1), scores)
