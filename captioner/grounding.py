"""Where each caption word should look: per-word attention targets for supervised attention.

Liu, Mao, Sha and Yuille (2017), "Attention Correctness in Neural Image Captioning"
(AAAI), Section 4: supervise the attention map of a word that names an annotated region
with that region, as a distribution over the grid.

- ``strong``: the data set says which object each word names (``Caption.grounding``, as
  the shapes set records it): the word's target is that object;
- ``weak``: only the image's instances are known (COCO layout: an instances file, no
  per-word grounding): a word that names a category (its name, a synonym or a plural,
  as for attention correctness) gets the union of that category's instances.

The target of cell i is the share of the cell's footprint inside the region, where the
footprint is the bilinear tent that attention correctness spreads the cell's weight over
(placed at ``origin``, the centre of the cell's receptive field): so the attention that
matches the target is the attention that scores well. Targets are normalised to sum 1.

Letters: h x w the grid, L = h * w; H x W the image; T caption words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from captioner.correctness import Region, _ground_categories, _interpolation_matrix, load_regions
from captioner.data.dataset import Targets, target_matrix  # noqa: F401  (re-exported)
from captioner.data.records import ImageRecord
from captioner.vocab import tokenize

SUPERVISION = ("none", "strong", "weak")

# image index -> caption index -> {word index: target (L,)}


def region_target(mask: np.ndarray, grid: tuple[int, int], origin: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """The grid distribution of one region: cell i's footprint share inside ``mask``, normalised.

    Args:
        mask: (H, W) bool region in image pixels.
        grid: (h, w).
        origin: where a cell's weight sits, in cells (``Encoder.cell_origin``).

    Returns:
        (L,) float32 summing to 1 (all zeros for an empty mask).
    """
    rows = _interpolation_matrix(mask.shape[0], grid[0], origin[0])  # (H, h)
    cols = _interpolation_matrix(mask.shape[1], grid[1], origin[1])  # (W, w)
    inside = rows.T @ torch.from_numpy(mask).double() @ cols  # (h, w) footprint mass inside the region
    share = inside / (rows.sum(0)[:, None] * cols.sum(0)[None, :]).clamp_min(1e-12)  # (h, w) in [0, 1]
    total = share.sum()
    return (share / total if total > 0 else share).flatten().float()  # (L,)


def _strong(record: ImageRecord, regions: dict[int, Region], grid, origin) -> list[dict[int, Tensor]]:
    cache: dict[int, Tensor] = {}
    out = []
    for caption in record.captions:
        targets = {}
        for word, object_id in caption.grounding:
            if object_id in regions:
                if object_id not in cache:
                    cache[object_id] = region_target(regions[object_id].mask, grid, origin)
                targets[word] = cache[object_id]
        out.append(targets)
    return out


def _weak(record: ImageRecord, regions: Sequence[Region], grid, origin) -> list[dict[int, Tensor]]:
    plain = [Region(r.object_id, r.category, {}, r.mask) for r in regions]  # category level only
    cache: dict[int, Tensor] = {}
    out = []
    for caption in record.captions:
        targets = {}
        for word, region in _ground_categories(tokenize(caption.text), plain):
            key = id(region)
            if key not in cache:
                cache[key] = region_target(region.mask, grid, origin)
            targets[word] = cache[key]
        out.append(targets)
    return out


def attention_targets(records: Sequence[ImageRecord], instances_json: str | Path, *, mode: str,
                      grid: tuple[int, int], origin: tuple[float, float] = (0.5, 0.5)) -> Targets:
    """Per-word attention targets of every caption of ``records``.

    Args:
        records: the split's images (their captions, and for ``strong`` their grounding).
        instances_json: the split's COCO instances file (the regions' masks).
        mode: ``strong`` (per-word grounding) or ``weak`` (category words -> the union of
            that category's instances).
        grid: (h, w) of the attention.
        origin: where a cell's weight sits, in cells (``Encoder.cell_origin``).

    Returns:
        For image k, caption j: ``{word index: (L,) target}`` (words without a region are absent).
    """
    if mode not in ("strong", "weak"):
        raise ValueError(f"attention supervision must be strong or weak; got {mode!r}")
    regions = load_regions(instances_json, image_ids=[r.image_id for r in records])
    out: Targets = []
    for record in records:
        own = regions.get(record.image_id, [])
        if mode == "strong":
            out.append(_strong(record, {r.object_id: r for r in own}, grid, origin))
        else:
            out.append(_weak(record, own, grid, origin))
    return out



def training_targets(cfg, records: Sequence[ImageRecord], *, grid: tuple[int, int],
                     origin: tuple[float, float] = (0.5, 0.5), split: str = "train") -> Targets | None:
    """The targets ``train.attention_supervision`` asks for (None when it is ``none``).

    Args:
        cfg: the run's :class:`~captioner.config.Config`.
        records: the split's records, in the order the data set indexes them.
        grid, origin: the encoder's ``grid`` and ``cell_origin``.

    Raises:
        ConfigError: supervision without an instances file for the split, or ``strong``
            supervision on captions without per-word grounding.
    """
    from captioner.data import instances_file
    from captioner.errors import ConfigError

    mode = cfg.train.attention_supervision
    if mode == "none":
        return None
    path = instances_file(cfg.data, split)
    if path is None:
        raise ConfigError(f"train.attention_supervision={mode} needs a COCO instances file for the {split} split "
                          f"(data.{split}.instances, or instances_*.json beside captions_*.json)")
    if mode == "strong" and not any(c.grounding for r in records for c in r.captions):
        raise ConfigError("train.attention_supervision=strong needs per-word grounding in the captions "
                          "(\"grounding\": [[word_index, object_id], ...]); use weak for instances only")
    return attention_targets(records, path, mode=mode, grid=grid, origin=origin)
