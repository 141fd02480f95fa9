"""Training-step time of each attention score function at a config's sizes, side by side.

    python benchmarks/scores.py                                   # configs/shapes_soft.yaml, 2 threads
    python benchmarks/scores.py --scores additive additive_dot --repeat 9
    python benchmarks/scores.py --config configs/shapes_soft.yaml model.attention.dim=128
    python benchmarks/scores.py --scores additive_dot --vary model.decoder.fused=false \
        model.attention.anchor_on_word=false        # the default against one change at a time

One model per score, the rest of the config as it is, all on the same random batch (cached
features of ``batch_size // 5`` images, ``batch_size`` captions of 8-12 words). The scores take
turns, ``--steps`` timed steps each per round, for ``--repeat`` rounds, so a noisy machine
slows them alike; it prints each one's median time per optimizer step and its ratio to the
first score's, with the CPU and the thread count. ``--vary KEY=VALUE ..`` adds one model per
override: the first score with that one change.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.attention import SCORES
from captioner.config import load_config
from captioner.model import Captioner
from captioner.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def step_times(config: Path, overrides: list[str], scores: list[str], *, steps: int, repeat: int,
               seed: int = 0, vary: list[str] = ()) -> dict[str, list[float]]:
    """score (or ``vary``'s override, on the first score) -> seconds per training step, one
    entry per round."""
    vocab = Vocabulary.build([" ".join(chr(97 + i) for i in range(26))], min_count=1)
    variants = {**{score: [f"model.attention.score={score}"] for score in scores},
                **{change: [f"model.attention.score={scores[0]}", change] for change in vary}}
    models = {}
    for name, changes in variants.items():
        torch.manual_seed(seed)
        cfg = load_config(config, [*overrides, *changes])
        model = Captioner.from_config(cfg, vocab, load_weights=False).train()
        models[name] = (model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    first = models[scores[0]][0]
    batch = cfg.train.batch_size
    images = max(1, batch // 5)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(images, first.encoder.num_locations, first.encoder.feature_dim, generator=g).relu()
    captions = torch.randint(4, len(vocab), (batch, 14), generator=g)
    captions[:, 0] = vocab.start_id
    for row, n in enumerate(torch.randint(8, 13, (batch,), generator=g).tolist()):
        captions[row, n + 1] = vocab.end_id
        captions[row, n + 2:] = vocab.pad_id
    index = torch.arange(batch) % images

    def step(score: str) -> None:
        model, opt = models[score]
        out = model(captions, raw_features=raw, image_index=index)
        loss = torch.nn.functional.cross_entropy(out.logits, captions[:, 1:][out.token_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):
        for name in models:
            step(name)  # untimed: the first call after another model's
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "shapes_soft.yaml")
    p.add_argument("--scores", nargs="+", default=["additive", "additive_dot", "scaled_dot"],
                   choices=SCORES.names())
    p.add_argument("--vary", nargs="+", default=[], metavar="KEY=VALUE",
                   help="one more model per override: the first score with that change")
    p.add_argument("--steps", type=int, default=5, help="timed steps per score per round (default 5)")
    p.add_argument("--repeat", type=int, default=7, help="rounds; the median is reported (default 7)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = step_times(args.config, args.overrides, args.scores, steps=args.steps, repeat=args.repeat,
                       vary=args.vary)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[args.scores[0]]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.config.name} {' '.join(args.overrides)}".rstrip())
    print(f"| score | ms per training step (median of {args.repeat}) | x {args.scores[0]} |")
    print("| --- | ---: | ---: |")
    for name, median in medians.items():
        print(f"| {name if name in args.scores else f'{args.scores[0]}, {name}'} | {1000 * median:.1f} "
              f"| {median / base:.2f} |")
    return medians


if __name__ == "__main__":
    main()
