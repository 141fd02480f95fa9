"""Does the word after a relation depend on the relation? A teacher-forced probe (shapes sets).

    python tools/relation_probe.py runs/demo/shapes_soft/best.pt                # 300 val images
    python tools/relation_probe.py CKPT --split test --images 300

For each reference caption "A <relation> B" of the split whose relation has a direction
(above, below, over, under, to the left of, to the right of) and whose A and B each name one
object, the decoder is teacher-forced twice: on the caption, and on the caption with the
relation turned to the opposite one ("A below B"). At the step that writes B's first word it
reads where the map sits (on B, on A, on the image's other objects) and the probability of
that word. A decoder that finds B from A and the relation moves its map and loses
probability on B when the relation flips; one that ignores the relation does not. The total
variation between the two maps says how far the map moved (0: not at all, 1: entirely).
Prints a markdown table, x100.

A second table reads the step before: the first relation word after A ("to", "next",
"beside" name the horizontal axis; "above", "over", "below", "under" the vertical one), teacher-
forced on the caption, and the probability the decoder gives the reference's axis among those
words. With two objects B is the only other one, so the axis follows from the picture; with
more, another B may ask for the other axis.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.chair import find_mentions, ground_object, stated_relations
from captioner.correctness import Region, load_regions, upsample_maps

HORIZONTAL, VERTICAL = ("to", "next", "beside"), ("above", "over", "below", "under")
OPPOSITE = {"above": "below", "below": "above", "over": "under", "under": "over", "left": "right", "right": "left"}


def opposite(words: Sequence[str], start: int, end: int) -> list[str] | None:
    """``words`` with the direction words in ``words[start:end]`` turned around; None when
    that span has none ("next to", "beside": no direction to turn)."""
    if not any(w in OPPOSITE for w in words[start:end]):
        return None
    return [*words[:start], *(OPPOSITE.get(w, w) for w in words[start:end]), *words[end:]]


def directional_relations(words: Sequence[str], regions: Sequence[Region]) -> list[tuple[Region, Region, int, int]]:
    """(A, B, end of A's mention, start of B's mention) for each "A <relation> B" of the caption
    with a direction and with each of A, B naming one object."""
    objects = [ground_object(r) for r in regions]
    by_id = {r.object_id: r for r in regions}
    out = []
    for _, a, b in stated_relations(words, find_mentions(words, objects, sorted({o.category for o in objects}))):
        if len(a.matches) == 1 and len(b.matches) == 1 and a.matches[0] is not b.matches[0] \
                and opposite(words, a.end, b.start) is not None:
            out.append((by_id[a.matches[0].object_id], by_id[b.matches[0].object_id], a.end, b.start))
    return out


@torch.no_grad()
def probe(decoder, vocab, features: torch.Tensor, words: Sequence[str], regions: Sequence[Region],
          grid: tuple[int, int], origin: tuple[float, float]) -> list[dict]:
    """One dict per directional relation of ``words`` (a reference caption of the image whose
    annotation vectors are ``features`` (1, L, C)): for ``given`` and ``opposite`` the map's
    mass at B's first word on B, on A and on the other objects, and that word's probability;
    ``moved``: the total variation between the two maps."""
    out = []
    for A, B, a_end, b_start in directional_relations(words, regions):
        others = np.zeros_like(A.mask)
        for r in regions:
            if r.object_id not in (A.object_id, B.object_id):
                others |= r.mask
        row, maps = {}, []
        for name, caption in (("given", list(words)), ("opposite", opposite(words, a_end, b_start))):
            ids = torch.tensor([vocab.encode(caption)])
            result = decoder(features, ids)
            alpha = result.alphas[0, b_start]  # the map of the step that writes word b_start
            maps.append(alpha)
            up = upsample_maps(alpha[None], grid, A.mask.shape, origin=origin)[0]
            up = up / up.sum().clamp_min(1e-12)
            p = torch.softmax(result.logits[0, b_start].float(), -1)[ids[0, b_start + 1]]
            row[name] = {"on_b": float(up[torch.from_numpy(B.mask & ~A.mask)].sum()),
                         "on_a": float(up[torch.from_numpy(A.mask)].sum()),
                         "on_others": float(up[torch.from_numpy(others & ~A.mask & ~B.mask)].sum()),
                         "p_word": float(p)}
        row["moved"] = 0.5 * float((maps[0] - maps[1]).abs().sum())
        out.append(row)
    return out


@torch.no_grad()
def axis_choice(decoder, vocab, features: torch.Tensor, words: Sequence[str], regions: Sequence[Region]) -> list[float]:
    """For each directional relation of ``words`` (teacher-forced on the image whose annotation
    vectors are ``features`` (1, L, C)): at its first word after A (after an "is"), the
    probability of the reference's axis, p(its axis's words) / p(both axes' words)."""
    out = []
    rels = directional_relations(words, regions)
    if not rels:
        return out
    logits = decoder(features, torch.tensor([vocab.encode(words)])).logits[0]
    ids = {axis: [vocab.stoi[w] for w in axis if w in vocab] for axis in (HORIZONTAL, VERTICAL)}
    for _, _, a_end, _ in rels:
        t = a_end + (words[a_end] == "is")  # logits[t] writes words[t]
        p = torch.softmax(logits[t].float(), -1)
        mass = {axis: float(p[i].sum()) for axis, i in ids.items()}
        out.append(mass[HORIZONTAL if words[t] in HORIZONTAL else VERTICAL] / sum(mass.values()))
    return out


def main(argv: list[str] | None = None) -> int:
    from PIL import Image  # noqa: PLC0415

    from captioner.model import Captioner  # noqa: PLC0415
    from captioner.vocab import tokenize  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--images", type=int, default=300, help="the first N images of the split (default 300)")
    args = p.parse_args(argv)
    model = Captioner.from_checkpoint(args.checkpoint).eval()
    root = Path(model.config.data.root)
    data = json.loads((root / "annotations" / f"captions_{args.split}.json").read_text())
    images = data["images"][: args.images]
    keep = {im["id"] for im in images}
    regions = load_regions(root / "annotations" / f"instances_{args.split}.json", image_ids=sorted(keep))
    transform = model.encoder.transform()
    refs: dict[int, list[str]] = {}
    for a in data["annotations"]:  # grouped once, not scanned per image
        refs.setdefault(a["image_id"], []).append(a["caption"])
    rows: dict[str, list[dict]] = {"2 objects": [], "3 or more": []}
    axes: dict[str, list[float]] = {"2 objects": [], "3 or more": []}
    for im in images:
        found = [words for words in map(tokenize, refs.get(im["id"], []))
                 if directional_relations(words, regions[im["id"]])]
        if not found:
            continue
        pixels = transform(Image.open(root / args.split / im["file_name"]).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            feats = model.encode(pixels)
        for words in found:
            key = "2 objects" if len(regions[im["id"]]) == 2 else "3 or more"
            rows[key] += probe(model.decoder, model.vocab, feats, words, regions[im["id"]], model.encoder.grid,
                               model.encoder.cell_origin)
            axes[key] += axis_choice(model.decoder, model.vocab, feats, words, regions[im["id"]])
    print("| images | relation | captions | map on B | on A | on other objects | p(B's first word) | map moved |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, found in rows.items():
        for name in ("given", "opposite"):
            if found:
                cells = [100 * float(np.mean([r[name][k] for r in found])) for k in ("on_b", "on_a", "on_others", "p_word")]
                moved = f"{100 * float(np.mean([r['moved'] for r in found])):.1f}" if name == "opposite" else ""
                print(f"| {key} | {name} | {len(found)} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {moved} |")
    print("\n| images | relations | p(the reference's axis) at the first relation word | the axis most probable |")
    print("| --- | ---: | ---: | ---: |")
    for key, found in axes.items():
        if found:
            print(f"| {key} | {len(found)} | {100 * float(np.mean(found)):.1f} | "
                  f"{100 * float(np.mean(np.array(found) > 0.5)):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
