"""Where the attention mass of each grounded word goes, by kind of word (shapes sets).

    python tools/correctness_by_word.py runs/demo/shapes_soft/best.pt            # 200 test images, beam 3
    python tools/correctness_by_word.py CKPT --split val --images 300 --beam 1

Attention correctness (``captioner.correctness``) averages over every word of a grounded noun
phrase, "a large blue circle". This splits it by the word's kind (size, colour, shape) and
splits the rest of the mass into the image's other objects and the background: a map that is
off the named object because it sits on another object is a different fault from one spread
over the background. Prints a markdown table, x100.

A second table is the relation words ("above", "to the left of"): where the map of each word
between "A" and "B" of a stated relation ("the red circle is above a blue square", both
mentions naming one object of the image) puts its mass, on A, on B, elsewhere, split by
whether the relation holds. To state a direction the decoder must know where B is.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.chair import find_mentions, ground_object, relation_holds, stated_relations
from captioner.correctness import Region, ground_words, load_regions, upsample_maps
from captioner.data.shapes import COLOURS, SHAPES, SIZES


def word_kind(word: str) -> str:
    if word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
        return "shape"
    return "colour" if word in COLOURS else "size" if word in SIZES else "other"


def mass_by_kind(words: Sequence[str], alphas: torch.Tensor, regions: Sequence[Region], grid: tuple[int, int],
                 origin: tuple[float, float]) -> dict[str, list[tuple[float, float]]]:
    """kind -> [(mass on the named object, mass on the image's other objects)] for each grounded
    word of one caption; ``alphas`` (T or more, L), row t the map that produced word t."""
    grounded = ground_words(words, regions)
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if not grounded:
        return out
    maps = upsample_maps(alphas[[t for t, _ in grounded]], grid, grounded[0][1].mask.shape, origin=origin)
    maps = maps / maps.sum(dim=(1, 2), keepdim=True)  # each map sums to 1 over the image
    for (t, region), up in zip(grounded, maps):
        others = np.zeros_like(region.mask)
        for r in regions:
            if r.object_id != region.object_id:
                others |= r.mask
        on = float(up[torch.from_numpy(region.mask)].sum())
        off = float(up[torch.from_numpy(others & ~region.mask)].sum())
        out[word_kind(words[t])].append((on, off))
    return out


def mass_at_relations(words: Sequence[str], alphas: torch.Tensor, regions: Sequence[Region],
                      grid: tuple[int, int], origin: tuple[float, float]) -> list[tuple[bool, float, float, float]]:
    """For each word of each stated relation "A <relation> B" between two uniquely named objects:
    (the relation holds, mass on A, mass on B, mass on the image's other objects)."""
    if not regions:
        return []
    objects = [ground_object(r) for r in regions]
    by_id = {r.object_id: r for r in regions}
    out = []
    for relation, a, b in stated_relations(words, find_mentions(words, objects, sorted({o.category for o in objects}))):
        if len(a.matches) != 1 or len(b.matches) != 1 or a.matches[0] is b.matches[0]:
            continue
        A, B = by_id[a.matches[0].object_id], by_id[b.matches[0].object_id]
        holds = relation_holds(relation, a.matches[0], b.matches[0])
        steps = list(range(a.end, b.start))
        maps = upsample_maps(alphas[steps], grid, A.mask.shape, origin=origin)
        maps = maps / maps.sum(dim=(1, 2), keepdim=True)
        others = np.zeros_like(A.mask)
        for r in regions:
            if r.object_id not in (A.object_id, B.object_id):
                others |= r.mask
        others &= ~(A.mask | B.mask)
        for up in maps:
            out.append((holds, float(up[torch.from_numpy(A.mask)].sum()),
                        float(up[torch.from_numpy(B.mask & ~A.mask)].sum()), float(up[torch.from_numpy(others)].sum())))
    return out


def main(argv: list[str] | None = None) -> int:
    from captioner.model import Captioner  # noqa: PLC0415  (not needed by the functions above)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--images", type=int, default=200, help="the first N images of the split (default 200)")
    p.add_argument("--beam", type=int, default=3)
    args = p.parse_args(argv)
    model = Captioner.from_checkpoint(args.checkpoint)
    root = Path(model.config.data.root)
    ann = root / "annotations"
    images = json.loads((ann / f"captions_{args.split}.json").read_text())["images"][: args.images]
    regions = load_regions(ann / f"instances_{args.split}.json")
    totals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    relations: list[tuple[bool, float, float, float]] = []
    for k in range(0, len(images), 50):
        chunk = images[k:k + 50]
        results = model.caption([str(root / args.split / im["file_name"]) for im in chunk], beam_size=args.beam)
        for im, r in zip(chunk, results):
            for kind, pairs in mass_by_kind(r.words, r.alphas, regions.get(im["id"], []), r.grid,
                                            model.encoder.cell_origin).items():
                totals[kind] += pairs
            relations += mass_at_relations(r.words, r.alphas, regions.get(im["id"], []), r.grid,
                                           model.encoder.cell_origin)
    print("| word kind | words | on the named object | on other objects | background |")
    print("| --- | ---: | ---: | ---: | ---: |")
    every = [pair for kind in ("size", "colour", "shape", "other") for pair in totals.get(kind, [])]
    for kind, pairs in [*((k, totals[k]) for k in ("size", "colour", "shape", "other") if k in totals), ("all", every)]:
        on, off = (100 * float(np.mean([x[i] for x in pairs])) for i in (0, 1))
        print(f"| {kind} | {len(pairs)} | {on:.1f} | {off:.1f} | {100 - on - off:.1f} |")
    print("\n| relation words | words | on A | on B | on other objects | background |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in (("relation holds", [r for r in relations if r[0]]),
                       ("relation wrong", [r for r in relations if not r[0]]), ("all", relations)):
        if rows:
            a, b, o = (100 * float(np.mean([x[i] for x in rows])) for i in (1, 2, 3))
            print(f"| {name} | {len(rows)} | {a:.1f} | {b:.1f} | {o:.1f} | {100 - a - b - o:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
