"""How well an encoder's cells tell the shapes set's objects apart: a linear probe.

    python tools/probe_features.py resnet18:layer2 mobilenet_v2:features.6:IMAGENET1K_V1

For each encoder (``backbone:layer[:weights[:image_size]]``, frozen), every object of the
first ``--train`` training images becomes one vector, the mean feature of the grid cells
whose receptive-field centre (``Encoder.cell_origin``) falls in its box; a logistic
regression per attribute (shape, colour, size) is fitted on them and scored on the objects of
the first ``--val`` validation images. A caption decoder reads a weighted mean of cells, so
an attribute that a linear read-out of the cells under an object cannot tell is one its
captions get wrong. Prints one line per encoder; accuracies in [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from captioner.encoder import Encoder

ATTRIBUTES = ("shape", "colour", "size")


def load(root: Path, split: str, n: int) -> tuple[dict[int, Path], list[dict]]:
    """The first n images of a split (id -> path) and their objects (COCO instances)."""
    instances = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    files = {im["id"]: root / split / im["file_name"] for im in instances["images"]}
    keep = dict(sorted(files.items())[:n])
    return keep, [a for a in instances["annotations"] if a["image_id"] in keep]


@torch.no_grad()
def object_vectors(encoder: Encoder, images: dict[int, Path], objects: list[dict]) -> torch.Tensor:
    """(N objects, C): the mean feature of the cells whose receptive field is centred in the box."""
    tf, ids = encoder.transform(), list(images)
    grid = {}
    for k in range(0, len(ids), 64):
        pixels = torch.stack([tf(Image.open(images[i]).convert("RGB")) for i in ids[k:k + 64]])
        grid.update(zip(ids[k:k + 64], encoder(pixels)))  # each (L, C)
    (h, w), (oy, ox) = encoder.grid, encoder.cell_origin
    step = encoder.image_size / h
    ys, xs = (torch.arange(h) + oy) * step, (torch.arange(w) + ox) * step  # where each cell looks
    out = []
    for a in objects:
        x0, y0, bw, bh = a["bbox"]
        inside = ((ys >= y0) & (ys <= y0 + bh))[:, None] & ((xs >= x0) & (xs <= x0 + bw))[None]
        if not inside.any():  # an object smaller than a cell: the cell under its centre
            inside[min(h - 1, int((y0 + bh / 2) / step)), min(w - 1, int((x0 + bw / 2) / step))] = True
        out.append(grid[a["image_id"]][inside.flatten()].mean(0))
    return torch.stack(out)


def probe(train_x: torch.Tensor, train_y: list[str], val_x: torch.Tensor, val_y: list[str]) -> float:
    """Accuracy on val of an L2-regularised logistic regression fitted on train (standardised)."""
    classes = sorted(set(train_y))
    ty = torch.tensor([classes.index(v) for v in train_y])
    vy = torch.tensor([classes.index(v) if v in classes else -1 for v in val_y])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], len(classes))
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), ty) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(val_x).argmax(1) == vy).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("encoders", nargs="+", help="backbone:layer[:weights[:image_size]]")
    parser.add_argument("--root", default="data/shapes", help="the shapes set (captioner demo makes it)")
    parser.add_argument("--train", type=int, default=1200, help="training images whose objects fit the probe")
    parser.add_argument("--val", type=int, default=300, help="validation images whose objects score it")
    args = parser.parse_args(argv)
    root = Path(args.root)
    train_images, train_objects = load(root, "train", args.train)
    val_images, val_objects = load(root, "val", args.val)
    for spec in args.encoders:
        backbone, layer, *rest = spec.split(":")
        weights = rest[0] if rest and rest[0] not in ("", "null") else None
        torch.manual_seed(0)  # the same random weights every time
        encoder = Encoder(backbone=backbone, weights=weights, layer=layer,
                          image_size=int(rest[1]) if len(rest) > 1 else 128)
        train_x = object_vectors(encoder, train_images, train_objects)
        val_x = object_vectors(encoder, val_images, val_objects)
        scores = {k: round(probe(train_x, [a["attributes"][k] for a in train_objects],
                                 val_x, [a["attributes"][k] for a in val_objects]), 3) for k in ATTRIBUTES}
        print(f"{spec}: grid {encoder.grid} x {encoder.feature_dim}, {len(train_objects)} train / "
              f"{len(val_objects)} val objects: {scores}", flush=True)


if __name__ == "__main__":
    main()
