"""Layout supervision: each object's annotation vectors learn where the other objects are
(``train.layout_weight``).

"The red circle is to the left of a blue square" needs, when the decoder has named the
circle and looks at it, to know on which sides of it other objects lie: the relation word
comes before the decoder looks at the square (README "Getting the words and the maps
right": at the direction word the map still holds 33% on A and 17% on B). A grid context
(``model.encoder.context_layers``) can carry that, but captions alone teach it slowly: after
13 epochs the decoder's choice of axis is near chance.

From the instances file, per object A of an image, four targets: whether some other object B
has A to its left, right, above, below, in the sense the relation words have
(:func:`captioner.chair.relation_holds`: the direction is the dominant axis of the box centres'
difference). A linear read-out (:class:`captioner.encoder.LayoutHead`) of A's annotation
vectors, pooled over A's footprint on the grid (the weights supervised attention and attention
correctness use, :func:`captioner.grounding.region_target`), predicts them; its binary
cross-entropy, times ``train.layout_weight``, joins the caption loss. Only the encoder's trained part (head,
positions, context) and the read-out learn from it; the decoder reads what they write.

Letters: L grid cells, K objects of an image, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from captioner.chair import ground_object, relation_holds
from captioner.correctness import Region, load_regions
from captioner.data.records import ImageRecord
from captioner.encoder import LAYOUT_DIRECTIONS as DIRECTIONS  # target k: A is DIRECTIONS[k] of some other
from captioner.grounding import region_target

# image index -> (weights (K, L), each object's footprint on the grid; targets (K, 4))
LayoutTargets = list[tuple[Tensor, Tensor]]


def object_layout(regions: Sequence[Region], margin: float = 1.0) -> Tensor:
    """(K, 4) float: for each region A, whether A is left of, right of, above, below some other
    (with ``margin`` > 1, clearly so: the named axis ``margin`` times the other at least)."""
    objects = [ground_object(r) for r in regions]
    return torch.tensor([[float(any(relation_holds(d, a, b, margin=margin) for b in objects if b is not a)) for d in DIRECTIONS]
                         for a in objects]).reshape(len(objects), len(DIRECTIONS))


def layout_targets(records: Sequence[ImageRecord], instances_json: str | Path, *, grid: tuple[int, int],
                   origin: tuple[float, float] = (0.5, 0.5), margin: float = 1.0) -> LayoutTargets:
    """Every image's objects: their footprints on the grid and their four layout targets.

    Args:
        records: the split's images, in the order the data set indexes them.
        instances_json: the split's COCO instances file.
        grid: (h, w) of the annotation grid. origin: ``Encoder.cell_origin``.
        margin: ``train.layout_margin`` (:func:`object_layout`).

    Returns:
        For image k: ``(weights (K, L), targets (K, 4))``; K = 0 for an image without objects.
    """
    regions = load_regions(instances_json, image_ids=[r.image_id for r in records])
    out: LayoutTargets = []
    cells = grid[0] * grid[1]
    for record in records:
        own = [r for r in regions.get(record.image_id, []) if r.mask.any()]
        weights = torch.stack([region_target(r.mask, grid, origin) for r in own]) if own else torch.zeros(0, cells)
        out.append((weights, object_layout(own, margin)))
    return out
