"""Data: loaders for the official layouts, the generated shapes set, datasets and collate.

:func:`load_split` is the one entry point the trainer uses: it reads ``cfg.format`` and
returns the split's :class:`~captioner.data.records.ImageRecord` list.
"""

from __future__ import annotations

from pathlib import Path

from captioner.config import DataConfig
from captioner.data.records import Caption, ImageRecord
from captioner.errors import ConfigError

SPLITS = ("train", "val", "test")


def _coco(cfg: DataConfig, root: Path, spec, split: str) -> list[ImageRecord]:
    from captioner.data.coco import load_coco

    return load_coco(root / spec.captions, root / spec.images, split=split)


def _karpathy(cfg: DataConfig, root: Path, spec, split: str) -> list[ImageRecord]:
    from captioner.data.karpathy import load_karpathy

    return load_karpathy(root / cfg.annotations, root / spec.images, split=split,
                         restval_in_train=cfg.restval_in_train)


def _flickr8k(cfg: DataConfig, root: Path, spec, split: str) -> list[ImageRecord]:
    from captioner.data.flickr import load_flickr8k

    return load_flickr8k(root / cfg.annotations, root / spec.captions, root / spec.images, split=split)


def _folder(cfg: DataConfig, root: Path, spec, split: str) -> list[ImageRecord]:
    from captioner.data.folder import load_folder

    return load_folder(root / spec.captions, root / spec.images, split=split)


# data.format -> loader(cfg, root, split spec, split); "shapes" is a generated COCO-layout set
_LOADERS = {"shapes": _coco, "coco": _coco, "karpathy": _karpathy, "flickr8k": _flickr8k, "folder": _folder}


def load_split(cfg: DataConfig, split: str, *, progress: bool = False) -> list[ImageRecord]:
    """The records of one split of the configured data set.

    ``shapes`` generates the set under ``cfg.root`` first if it is not there yet.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    root = Path(cfg.root)
    spec = getattr(cfg, split)
    if cfg.format == "shapes":
        from captioner.data.shapes import ensure_shapes

        ensure_shapes(root, n=cfg.shapes.n, seed=cfg.shapes.seed, image_size=cfg.shapes.image_size,
                      progress=progress)
    records = _LOADERS[cfg.format](cfg, root, spec, split)
    return records[: cfg.max_images] if cfg.max_images else records


__all__ = ["Caption", "ImageRecord", "SPLITS", "instances_file", "load_split"]


def instances_file(cfg: DataConfig, split: str) -> Path | None:
    """The split's COCO instances file, if there is one: ``data.<split>.instances`` when set,
    else ``instances_X.json`` beside a ``captions_X.json`` (the official COCO layout)."""
    spec = getattr(cfg, split)
    root = Path(cfg.root)
    if spec.instances:
        return root / spec.instances
    name = Path(spec.captions).name
    if cfg.format in ("shapes", "coco") and name.startswith("captions_"):
        path = root / Path(spec.captions).with_name("instances_" + name[len("captions_"):])
        return path if path.is_file() else None
    return None
