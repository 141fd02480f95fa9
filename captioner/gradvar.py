"""How noisy is each hard-attention estimator? A small diagnostic.

    python -m captioner.gradvar --draws 50

On a toy task (one marked cell of a grid holds the class the one-word caption names: it is
solved only by attending to that cell), a decoder is first trained a little with the
expected (soft) context, so the attention has something to lose. Then, at those same
parameters and on the same batch, each estimator draws ``--draws`` gradients of the loss
with respect to the attention's parameters (every caption samples its locations:
``mix_prob = 0``), and the table reports, per estimator:

- ``‖E g‖``: the norm of the mean gradient;
- ``tr Var g``: the summed per-coordinate variance of one gradient draw;
- ``tr Var g / ‖E g‖²``: the same relative to the signal (lower is better);
- ``ms/draw``: the time of one draw (``loo`` runs ``samples`` paths per caption).

Letters: B batch, L locations, C channels.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from captioner.config import load_config
from captioner.decoder import Decoder
from captioner.losses import CaptionLoss

GRID, CLASSES, C = (4, 5), 5, 8
ESTIMATORS = ("reinforce", "loo", "gumbel")


def toy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """features (n, L, C + K + h + w) with one marked cell holding the class and its position;
    captions (n, 3) = <start> class-word <end>."""
    L = GRID[0] * GRID[1]
    feats = 0.1 * torch.randn(n, L, C + CLASSES + GRID[0] + GRID[1], generator=generator)
    cell = torch.randint(0, L, (n,), generator=generator)
    label = torch.randint(0, CLASSES, (n,), generator=generator)
    idx = torch.arange(n)
    feats[idx, :, C + torch.randint(0, CLASSES, (n,), generator=generator)] += 1.0  # a distractor class everywhere
    feats[idx, cell, :C] += 2.0  # the marker
    feats[idx, cell, C + label] += 3.0
    feats[idx, cell, C + CLASSES + cell // GRID[1]] += 3.0
    feats[idx, cell, C + CLASSES + GRID[0] + cell % GRID[1]] += 3.0
    captions = torch.stack([torch.ones(n, dtype=torch.long), 4 + label, torch.full((n,), 2)], 1)
    return feats, captions


def make_decoder(estimator: str, *, mix_prob: float, samples: int) -> Decoder:
    cfg = load_config(None, ["model.attention.name=hard", "model.attention.dim=16", "model.decoder.embed_dim=16",
                             "model.decoder.hidden_dim=32", "model.decoder.dropout=0.0",
                             f"model.attention.hard.estimator={estimator}", f"model.attention.hard.mix_prob={mix_prob}",
                             f"model.attention.hard.samples={samples}"]).model
    return Decoder.from_config(cfg, vocab_size=4 + CLASSES, feature_dim=C + CLASSES + sum(GRID), grid=GRID)


def warm_up(steps: int, *, batch: int, seed: int) -> dict:
    """Train with the expected context only (mix_prob = 1) for ``steps``; -> the state dict."""
    torch.manual_seed(seed)
    dec, loss_fn = make_decoder("reinforce", mix_prob=1.0, samples=2), CaptionLoss(alpha_c=0.0).train()
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feats, caps = toy_batch(batch, gen)
        loss = loss_fn(dec(feats, caps), caps[:, 1:], torch.ones(batch, 2, dtype=torch.bool))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    return dec.state_dict()


@dataclass
class Spread:
    """One estimator's gradient statistics over the draws."""

    estimator: str
    mean_norm: float
    variance: float
    ms_per_draw: float

    @property
    def relative(self) -> float:
        return self.variance / max(self.mean_norm ** 2, 1e-30)


def gradient_spread(estimator: str, state: dict, *, draws: int, batch: int, samples: int, seed: int) -> Spread:
    """``draws`` gradients of the attention's parameters at ``state`` on one fixed batch."""
    dec = make_decoder(estimator, mix_prob=0.0, samples=samples).train()
    dec.load_state_dict(state)
    loss_fn = CaptionLoss(alpha_c=0.0).train()
    feats, caps = toy_batch(batch, torch.Generator().manual_seed(seed + 1))
    mask = torch.ones(batch, 2, dtype=torch.bool)
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for _ in range(10):  # let the moving-average baseline settle
            loss_fn(dec(feats, caps), caps[:, 1:], mask)
    params = [p for p in dec.attention.parameters()]
    grads, start = [], time.perf_counter()
    for _ in range(draws):
        loss = loss_fn(dec(feats, caps), caps[:, 1:], mask)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss.total, params)]))
    elapsed = (time.perf_counter() - start) / draws
    g = torch.stack(grads)  # (draws, P)
    return Spread(estimator, float(g.mean(0).norm()), float(g.var(0).sum()), 1000 * elapsed)


def table(rows: list[Spread]) -> str:
    lines = ["| estimator | ‖E g‖ | tr Var g | tr Var g / ‖E g‖² | ms/draw |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.estimator} | {r.mean_norm:.3g} | {r.variance:.3g} | {r.relative:.3g} | {r.ms_per_draw:.1f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner.gradvar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--draws", type=int, default=50, help="gradient draws per estimator (default 50)")
    parser.add_argument("--batch", type=int, default=64, help="captions in the batch (default 64)")
    parser.add_argument("--samples", type=int, default=4, help="paths per caption for loo (default 4)")
    parser.add_argument("--warmup", type=int, default=100, help="soft training steps first (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error("--draws must be >= 2")
    state = warm_up(args.warmup, batch=args.batch, seed=args.seed)
    rows = [gradient_spread(e, state, draws=args.draws, batch=args.batch, samples=args.samples, seed=args.seed)
            for e in args.estimators]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
