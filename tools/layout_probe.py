"""How fast a config's grid learns the layout alone: ``train.layout_weight``'s objective without
the captions (shapes sets, or any data with an instances file).

    python tools/layout_probe.py configs/shapes_soft.yaml
    python tools/layout_probe.py configs/shapes_soft.yaml model.encoder.context_where=cones --lr 5e-3

The config's trained part before the decoder (positions, grid context, coordinates) and its
layout read-out (``captioner.encoder.LayoutHead``) train on the layout loss only, on the cached
raw features of the training images, in batches of images drawn at random; at fixed steps the
validation images' objects are scored: the binary cross-entropy, the share of the four targets
right, and the share of objects with all four right. Prints a markdown table. A variant of the
grid that learns the layout in fewer steps here gives the decoder the geometry sooner in a
captioning run with the same budget; whether the decoder then uses it, only a run shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from captioner.config import load_config, replace
from captioner.data import instances_file
from captioner.layout import LayoutTargets, layout_targets
from captioner.model import Captioner


def geometry_parameters(model: Captioner) -> list[torch.nn.Parameter]:
    """The trained parameters between the backbone and the decoder, and the read-out's."""
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("encoder.", "decoder."))]


@torch.no_grad()
def score(model: Captioner, raw: Tensor, layouts: LayoutTargets) -> tuple[float, float, float]:
    """(mean binary cross-entropy, share of targets right, share of objects with all four right)
    over the objects of the images ``raw`` (N, L, C) with their ``layouts``."""
    rows = torch.cat([torch.full((w.shape[0],), b, dtype=torch.long) for b, (w, _) in enumerate(layouts)])
    weights = torch.cat([w for w, _ in layouts])
    targets = torch.cat([t for _, t in layouts])
    feats = model.features(raw)
    logits = model.layout.linear(torch.einsum("nl,nlc->nc", weights, feats[rows]))
    right = (logits > 0).float() == targets
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    return loss.item(), right.float().mean().item(), right.all(1).float().mean().item()


def train_probe(model: Captioner, raw: Tensor, layouts: LayoutTargets, val_raw: Tensor, val_layouts: LayoutTargets,
                *, steps: Sequence[int], batch: int = 64, lr: float = 2e-3,
                seed: int = 0) -> list[tuple[int, float, float, float]]:
    """Adam on the layout loss alone; -> (step, *score on the val images) at each of ``steps``."""
    params = geometry_parameters(model)
    opt = torch.optim.Adam(params, lr=lr)
    draw = torch.Generator().manual_seed(seed)
    out = []
    model.train()
    for step in range(1, max(steps) + 1):
        index = torch.randint(raw.shape[0], (batch,), generator=draw)
        loss = model.layout.loss(model.features(raw[index]), [layouts[i] for i in index.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in steps:
            model.eval()
            out.append((step, *score(model, val_raw, val_layouts)))
            model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    from captioner.train import Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for captioner train")
    p.add_argument("--steps", default="200,400,800,1300", help="where to score (default: 200,400,800,1300; "
                   "1,300 steps are about 7 epochs of the shapes set's 2,400 images at 64 captions a batch)")
    p.add_argument("--lr", type=float, default=None, help="default: the config's train.lr")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="layout_probe_")  # the trainer's run folder: not the config's
    cfg = load_config(args.config, [*args.overrides, "train.progress=false", f"train.out_dir={scratch}"])
    if not cfg.train.layout_weight:
        cfg = replace(cfg, train=replace(cfg.train, layout_weight=1.0))
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()  # the records, the vocabulary, the cached raw features and the training layouts
    if trainer.train_feats is None:
        print(f"{args.config}: the probe trains on cached features: it needs a frozen encoder "
              "(model.encoder.fine_tune=0) and train.cache_features=true", file=sys.stderr)
        return 2
    encoder = trainer.model.encoder
    val_layouts = layout_targets(trainer.val_records, instances_file(cfg.data, "val"), grid=encoder.grid,
                                 origin=encoder.cell_origin)
    torch.manual_seed(args.seed)
    model = Captioner.from_config(cfg, trainer.vocab, load_weights=False)
    steps = sorted({int(s) for s in args.steps.split(",")})
    started = time.perf_counter()
    rows = train_probe(model, trainer.train_feats, trainer.layouts, trainer.val_feats, val_layouts, steps=steps,
                       batch=args.batch, lr=args.lr or cfg.train.lr, seed=args.seed)
    print(f"{' '.join(args.overrides) or 'the config'}, lr {args.lr or cfg.train.lr:g}: "
          f"{time.perf_counter() - started:.0f} s; val objects {sum(len(t) for _, t in val_layouts)}, x100\n")
    print("| step | val BCE | targets right | objects all right |\n| ---: | ---: | ---: | ---: |")
    for step, loss, bits, objects in rows:
        print(f"| {step} | {100 * loss:.1f} | {100 * bits:.1f} | {100 * objects:.1f} |")
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
