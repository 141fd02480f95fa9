"""Decoding over the decoder's one-step function: greedy, sampling, batched beam search.

Every decoder returns, for each output token, the attention map that produced it, so the
visualizer can draw any decoded caption. All of them always return a caption for every
image: when ``<end>`` has not come after ``max_len`` words, it is forced.

Letters: B batch (images), K beams, T steps, L locations, V vocabulary, N n-best.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from captioner import kernels, native
from captioner.decoder import Decoder


@dataclass
class Decoded:
    """Decoded captions, one per image.

    Attributes:
        tokens: (B, T) word ids; ``<end>`` where it came, ``<pad>`` after it.
        lengths: (B,) words before ``<end>`` (T - 1 when ``<end>`` was forced at the end).
        alphas: (B, T, L) the attention map of every emitted token: the distribution the
            attention drew from (``AttentionOutput.probs``; for hard attention the location
            probabilities, whose argmax is the location it used).
        betas: (B, T) the gate of every emitted token.
        scores: (B,) sum of log-probabilities of the emitted tokens (``<end>`` included).
    """

    tokens: Tensor
    lengths: Tensor
    alphas: Tensor
    betas: Tensor
    scores: Tensor


@dataclass
class BeamDecoded:
    """The n-best captions of each image, best first.

    Attributes:
        tokens: (B, N, T) word ids, ``<end>`` then ``<pad>``.
        lengths: (B, N) words before ``<end>``.
        alphas: (B, N, T, L) and betas: (B, N, T): per emitted token (alphas: the attention
            distributions, as :class:`Decoded`).
        log_probs: (B, N) sum of log-probabilities (``<end>`` included).
        scores: (B, N) the ranking score: log_probs / (lengths + 1) ** length_penalty.
    """

    tokens: Tensor
    lengths: Tensor
    alphas: Tensor
    betas: Tensor
    log_probs: Tensor
    scores: Tensor

    def best(self) -> Decoded:
        """The top caption of each image as :class:`Decoded`."""
        return Decoded(self.tokens[:, 0], self.lengths[:, 0], self.alphas[:, 0], self.betas[:, 0], self.log_probs[:, 0])


def _sync_every(device: torch.device) -> int:
    """How often the loop asks whether every caption has ended: each step on the CPU (free),
    every 8 steps on a GPU (each check waits for the device; finished captions just take
    ``<pad>`` at no cost in between)."""
    return 1 if device.type == "cpu" else 8


def _next_log_probs(logits: Tensor, *, banned: tuple[int, ...], end_id: int, force_end: bool) -> Tensor:
    """log-softmax over the vocabulary with ``<pad>``/``<start>`` never emitted; at the last
    step only ``<end>`` is allowed (keeping its own probability)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    if force_end:
        forced = torch.full_like(logp, float("-inf"))
        forced[:, end_id] = logp[:, end_id]
        return forced
    for token in banned:  # scalar writes: no index tensor built (and copied to the GPU) every step
        logp[:, token] = float("-inf")
    return logp


def block_repeats(logp: Tensor, tokens: Tensor, n: int) -> Tensor:
    """``decode.no_repeat_ngram``: in place, -inf for every word that would make an n-gram its
    row of ``tokens`` (N, T) already holds ("a blue circle to the right of a blue" cannot go on
    with "circle" for n = 3); logp (N, V). n = 0 leaves ``logp`` as it is."""
    T = tokens.shape[1]
    if n < 1 or T < n:
        return logp
    windows = tokens.unfold(1, n, 1)  # (N, P, n): every n-gram so far, P = T - n + 1
    match = (windows[..., :-1] == tokens[:, T - n + 1:].unsqueeze(1)).all(-1)  # its first n-1 = the last n-1
    inf = torch.full(match.shape, float("inf"), dtype=logp.dtype, device=logp.device)
    # amin: -inf where an n-gram would repeat, the value itself elsewhere (one word may be both)
    return logp.scatter_reduce_(1, windows[..., -1], torch.where(match, -inf, inf), reduce="amin")


@torch.no_grad()
def greedy(decoder: Decoder, features: Tensor, *, max_len: int, start_id: int, end_id: int,
           pad_id: int = 0, mask: Tensor | None = None, no_repeat_ngram: int = 0) -> Decoded:
    """The most likely word at every step, for up to ``max_len`` words plus ``<end>``.

    Args:
        decoder: the trained decoder (in eval mode).
        features: (B, L, C) annotation vectors.
        no_repeat_ngram: n > 0: never a word that repeats an n-gram of the caption (:func:`block_repeats`).
    """
    return _run(decoder, features, max_len=max_len, start_id=start_id, end_id=end_id, pad_id=pad_id, mask=mask,
                choose=lambda logp: logp.argmax(dim=-1), no_repeat_ngram=no_repeat_ngram)


@torch.no_grad()
def sample(decoder: Decoder, features: Tensor, *, max_len: int, start_id: int, end_id: int, pad_id: int = 0,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
           mask: Tensor | None = None) -> Decoded:
    """Sample each word from softmax(logits / temperature), restricted to the ``top_k`` most
    likely words when ``top_k`` > 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")

    def choose(logp: Tensor) -> Tensor:
        scaled = logp / temperature
        if top_k > 0:
            kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)

    return _run(decoder, features, max_len=max_len, start_id=start_id, end_id=end_id, pad_id=pad_id, mask=mask,
                choose=choose)


def _run(decoder: Decoder, features: Tensor, *, max_len: int, start_id: int, end_id: int, pad_id: int,
         mask: Tensor | None, choose, no_repeat_ngram: int = 0) -> Decoded:
    """One word per step chosen by ``choose(log_probs (B, V)) -> (B,)``."""
    B, device = features.shape[0], features.device
    projected = decoder.precompute(features)  # once per image
    state = decoder.init_state(features)
    prev = torch.full((B,), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_len, dtype=torch.long, device=device)
    scores = features.new_zeros(B, dtype=torch.float)
    tokens, alphas, betas = [], [], []
    every = _sync_every(device)
    packed = kernels.PackedLinears(decoder, B) if decoder.fused else contextlib.nullcontext()
    for t in range(max_len + 1):
        with packed:  # the step's weights packed once for its B rows
            out = decoder.step(prev, state, features, projected, mask)
        logp = _next_log_probs(out.logits, banned=(pad_id, start_id), end_id=end_id, force_end=t == max_len)
        if no_repeat_ngram and t >= no_repeat_ngram:
            block_repeats(logp, torch.stack(tokens, 1), no_repeat_ngram)
        word = choose(logp)
        scores = scores + torch.where(finished, 0.0, logp.gather(1, word.unsqueeze(1)).squeeze(1))
        ended = (word == end_id) & ~finished
        lengths = torch.where(ended, torch.full_like(lengths, t), lengths)
        tokens.append(torch.where(finished, torch.full_like(word, pad_id), word))
        alphas.append(out.attention.probs)  # the distribution (hard: location probabilities)
        betas.append(out.beta)
        finished = finished | ended
        state, prev = out.state, word
        if (t + 1) % every == 0 and bool(finished.all()):
            break
    return Decoded(torch.stack(tokens, 1), lengths, torch.stack(alphas, 1), torch.stack(betas, 1), scores)


def _best_continuations(logits: Tensor, beam_logp: Tensor, finished: Tensor, tokens: Tensor, *, pad_id: int,
                        start_id: int, end_id: int, force_end: bool, no_repeat_ngram: int) -> tuple[Tensor, Tensor]:
    """One beam search step's choice: logits (B * K, V) of the K hypotheses of each of B
    images -> the K best continuations of each image, (B, K) summed log-probabilities and
    (B, K) flat indices k * V + v, best first. A finished hypothesis continues only with
    ``<pad>`` at no cost. The plain expression; :func:`_best_continuations_fused` is the same in C."""
    B, K = beam_logp.shape
    logp = _next_log_probs(logits, banned=(pad_id, start_id), end_id=end_id, force_end=force_end)
    V = logp.shape[1]
    if no_repeat_ngram:
        block_repeats(logp, tokens, no_repeat_ngram)
    # a finished hypothesis continues only with <pad> at no cost (in place: logp is this step's own)
    logp.masked_fill_(finished.unsqueeze(1), float("-inf"))
    logp[:, pad_id] = torch.where(finished, 0.0, float("-inf"))
    cand = logp.add_(beam_logp.view(B * K, 1)).view(B, K * V)  # (B, K*V)
    return cand.topk(K, dim=1)


def _best_continuations_fused(logits: Tensor, beam_logp: Tensor, finished: Tensor, tokens: Tensor, *, pad_id: int,
                              start_id: int, end_id: int, force_end: bool, no_repeat_ngram: int
                              ) -> tuple[Tensor, Tensor]:
    """:func:`_best_continuations` in two passes over the logits (captioner.native): the rows'
    log-sum-exp, then each image's K best while reading them; no (B * K, V) log-probabilities,
    no masked copies, no top-k over a written (B, K * V) tensor. Bans go into the logits as
    -inf (in place: they are this step's own), after the log-sum-exp, as the plain path bans
    after its log_softmax. Equal scores: the lower index first (``topk`` leaves that open)."""
    logits = logits.float().contiguous()
    stats = native.row_logsumexp(logits)  # (B * K, 2), over every word
    for token in (pad_id, start_id):
        logits[:, token] = float("-inf")
    if no_repeat_ngram:
        block_repeats(logits, tokens, no_repeat_ngram)
    return native.beam_topk(logits, stats, beam_logp, finished, pad_id=pad_id, end_id=end_id, force_end=force_end)


def _trace_back(steps: list[tuple[Tensor, Tensor, Tensor]], pick: Tensor) -> tuple[Tensor, Tensor]:
    """The maps and gates of the hypotheses ``pick`` (M,) of the last step, from each step's
    (parents (B * K,): the row each new hypothesis grew from, maps (N, L), gates (N,) for the
    step's N rows: B * K, B at the first) -> (M, T, L), (M, T). One row a step per picked
    caption, where carrying every hypothesis's whole history along copied (B * K, t, L) a step."""
    alphas, betas, rows = [], [], pick
    for parents, maps, gates in reversed(steps):
        rows = parents.index_select(0, rows)  # the row the word of this step was chosen from
        alphas.append(maps.index_select(0, rows))
        betas.append(gates.index_select(0, rows))
    return torch.stack(alphas[::-1], 1), torch.stack(betas[::-1], 1)


@torch.no_grad()
def beam_search(decoder: Decoder, features: Tensor, *, beam_size: int, max_len: int, start_id: int, end_id: int,
                pad_id: int = 0, length_penalty: float = 0.0, n_best: int = 1,
                mask: Tensor | None = None, no_repeat_ngram: int = 0) -> BeamDecoded:
    """Beam search batched over images and beams: one decoder step for all B * K hypotheses
    (at the first, where each image's K beams are the same hypothesis, one row per image).

    Hypotheses are extended by their summed log-probability; a finished hypothesis keeps its
    score and its slot. At the end the K hypotheses of each image are ranked by
    log_prob / (words + 1) ** ``length_penalty`` (0: no normalisation) and the ``n_best``
    first are returned. With ``beam_size=1`` this is greedy decoding.

    Args:
        decoder: the trained decoder (in eval mode).
        features: (B, L, C) annotation vectors.
        beam_size: K >= 1 (may exceed the vocabulary: surplus beams stay empty and are never returned).
        n_best: how many captions per image (<= K).
        no_repeat_ngram: n > 0: no hypothesis repeats an n-gram of its own (:func:`block_repeats`).
    """
    if beam_size < 1:
        raise ValueError(f"beam size must be >= 1; got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and the beam size {beam_size}; got {n_best}")
    B, L, C = features.shape
    K, device = beam_size, features.device
    projected = decoder.precompute(features)  # once per image: the K beams share it (see Decoder.step)
    state = decoder.init_state(features)  # the first step runs one row per image (its K beams are one
    prev = torch.full((B,), start_id, dtype=torch.long, device=device)  # hypothesis), the others B * K rows
    beam_logp = torch.full((B, K), float("-inf"), device=device)
    beam_logp[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.full((B * K,), max_len, dtype=torch.long, device=device)
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
    steps: list[tuple[Tensor, Tensor, Tensor]] = []  # each step's (parents, maps, gates): traced back at the end
    offsets = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B, 1)
    every = _sync_every(device)
    fused = decoder.fused and device.type == "cpu" and native.library() is not None  # model.attention.fused
    choose = _best_continuations_fused if fused else _best_continuations
    packed = kernels.PackedLinears(decoder, B * K) if decoder.fused else contextlib.nullcontext()
    packed_first = kernels.PackedLinears(decoder, B) if decoder.fused and K > 1 else packed
    for t in range(max_len + 1):
        with packed_first if t == 0 else packed:  # the weights packed once for the step's rows (B, then B * K)
            out = decoder.step(prev, state, features, projected, mask)
        V = out.logits.shape[1]
        first = t == 0 and K > 1  # one row per image: each image's K (identical) beams read its row
        logits = out.logits.repeat_interleave(K, 0) if first else out.logits
        top, idx = choose(logits, beam_logp, finished, tokens, pad_id=pad_id, start_id=start_id, end_id=end_id,
                          force_end=t == max_len, no_repeat_ngram=no_repeat_ngram)  # (B, K), (B, K)
        origin = (idx // V + offsets).view(-1)  # (B*K,) flat index of the parent hypothesis
        parent_row = origin // K if first else origin  # its row in this step's output
        word = (idx % V).view(-1)  # (B*K,)
        was_finished = finished.index_select(0, origin)
        ended = (word == end_id) & ~was_finished
        lengths = torch.where(ended, torch.full_like(lengths, t), lengths.index_select(0, origin))
        finished = was_finished | ended
        tokens = torch.cat([tokens.index_select(0, origin), word.unsqueeze(1)], 1)
        steps.append((parent_row, out.attention.probs, out.beta))
        state = out.state.index_select(parent_row)
        beam_logp, prev = top, word
        if (t + 1) % every == 0 and bool(finished.all()):
            break
    T = tokens.shape[1]
    words = lengths.view(B, K).float()
    scores = beam_logp / (words + 1.0) ** length_penalty if length_penalty else beam_logp.clone()
    scores = torch.where(torch.isfinite(beam_logp), scores, float("-inf"))  # empty beams (K > vocabulary) last
    order = scores.argsort(dim=1, descending=True)[:, :n_best]  # (B, N)
    pick = (order + offsets).view(-1)
    N = n_best
    alphas, betas = _trace_back(steps, pick)
    return BeamDecoded(
        tokens=tokens.index_select(0, pick).view(B, N, T),
        lengths=lengths.index_select(0, pick).view(B, N),
        alphas=alphas.view(B, N, T, L),
        betas=betas.view(B, N, T),
        log_probs=beam_logp.gather(1, order),
        scores=scores.gather(1, order),
    )
