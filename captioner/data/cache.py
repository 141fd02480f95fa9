"""An on-disk feature cache for a frozen encoder.

``captioner features extract CONFIG`` runs the encoder once over each split and stores the
annotation vectors as float16 ``.npy`` shards (memory-mapped when read, so many DataLoader
workers can share them), with a manifest written last::

    <cache dir>/manifest.json                  encoder, weights, layer, image size, grid,
                                               channels, dtype, weight fingerprint; per split:
                                               image ids and shards
    <cache dir>/<split>-00000.npy ...          (N_shard, L, C) float16

Training uses a valid cache automatically when the encoder is frozen. A cache made by
another encoder (other backbone, weights, layer, size, or other weights altogether: a
random-init encoder under another seed) or for other images is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from captioner.config import Config
from captioner.data.records import ImageRecord
from captioner.errors import DataError

VERSION = 1
MANIFEST = "manifest.json"


def default_cache_dir(cfg: Config) -> Path:
    """``<data.root>/features/<backbone>-<weights>-<layer>-<size>``, unless ``data.feature_cache`` is set."""
    if cfg.data.feature_cache:
        return Path(cfg.data.feature_cache)
    e = cfg.model.encoder
    name = f"{e.backbone}-{e.weights or 'random'}-{e.layer or 'default'}-{e.image_size}"
    return Path(cfg.data.root) / "features" / name


def fingerprint(encoder: torch.nn.Module) -> str:
    """A hash of the encoder's weights: equal caches need equal weights."""
    h = hashlib.sha1()
    for name, value in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(encoder) -> dict:
    """What the manifest records about the encoder that made the features."""
    return {"backbone": encoder.backbone, "layer": encoder.layer, "image_size": encoder.image_size,
            "grid": list(encoder.grid), "channels": encoder.feature_dim, "fingerprint": fingerprint(encoder)}


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: the feature cache manifest is unreadable ({err}); delete {folder} and "
                        "extract again") from None
    if not isinstance(data, dict) or data.get("version") != VERSION or "encoder" not in data or "splits" not in data:
        raise DataError(f"{path}: not a feature cache manifest of this version; delete {folder} and extract again")
    return data


@torch.no_grad()
def extract(encoder, records: Sequence[ImageRecord], folder: str | Path, *, split: str, batch_size: int = 64,
            shard_size: int = 4096, num_workers: int = 0, progress: bool = False) -> Path:
    """Encode ``records`` once and write them as the cache's ``split``.

    Args:
        encoder: a frozen :class:`~captioner.encoder.Encoder`.
        folder: the cache folder (made if needed; other splits in it are kept).
    """
    from torch.utils.data import DataLoader

    from captioner.data.dataset import ImageDataset, collate_images
    from captioner.progress import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder) or {"version": VERSION, "encoder": describe(encoder), "dtype": "float16",
                                          "splits": {}}
    if manifest["encoder"] != describe(encoder):
        raise DataError(f"{folder}: holds features of another encoder; use another data.feature_cache folder "
                        f"or delete this one")
    encoder.eval()
    L, C = encoder.num_locations, encoder.feature_dim
    shards = []
    loader = DataLoader(ImageDataset(records, encoder.transform()), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_images, generator=torch.Generator())
    device = next(encoder.parameters()).device
    current, filled = None, 0

    def new_shard(count: int):
        name = f"{split}-{len(shards):05d}.npy"
        shards.append({"file": name, "count": count})
        return np.lib.format.open_memmap(folder / (name + ".tmp"), mode="w+", dtype=np.float16, shape=(count, L, C))

    remaining = len(records)
    for _, images in tqdm(loader, desc=f"extract {split}", disable=not progress, leave=False):
        feats = encoder(images.to(device)).float().cpu().numpy().astype(np.float16)  # (B, L, C)
        start = 0
        while start < len(feats):
            if current is None:
                current, filled = new_shard(min(shard_size, remaining)), 0
            take = min(len(feats) - start, len(current) - filled)
            current[filled:filled + take] = feats[start:start + take]
            filled, start, remaining = filled + take, start + take, remaining - take
            if filled == len(current):
                current.flush()
                del current
                current = None
                os.replace(folder / (shards[-1]["file"] + ".tmp"), folder / shards[-1]["file"])
    manifest["splits"][split] = {"image_ids": [r.image_id for r in records], "shards": shards}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)  # last: a cache is valid only once its manifest is written
    return folder


class FeatureCache:
    """One split's cached features, memory-mapped; ``cache[index]`` -> float32 (B, L, C).

    Shards are opened lazily in each process, so DataLoader workers share the page cache."""

    def __init__(self, folder: Path, shards: list[dict]) -> None:
        self.folder, self.shards = folder, shards
        self.offsets = np.cumsum([0] + [s["count"] for s in shards])
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(self.folder / s["file"], mmap_mode="r") for s in self.shards]
        return self._arrays

    def __getitem__(self, index: Tensor) -> Tensor:
        arrays = self._open()
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.stack([arrays[s][i - self.offsets[s]] for s, i in zip(shard, idx)])
        return torch.from_numpy(out.astype(np.float32))

    def __getstate__(self) -> dict:  # workers reopen the memory maps themselves
        return {**self.__dict__, "_arrays": None}


def open_cache(folder: str | Path, encoder, records: Sequence[ImageRecord], *, split: str) -> FeatureCache | None:
    """The cached features of ``split`` if ``folder`` holds a valid cache for this encoder and
    exactly these images; None if there is none.

    Raises:
        DataError: the cache exists but was made by another encoder or for other images.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None or split not in manifest["splits"]:
        return None
    mine = describe(encoder)
    theirs = manifest["encoder"]
    if theirs != mine:
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        raise DataError(f"{folder}: the feature cache was made by another encoder ({', '.join(diff)} differ); "
                        f"run captioner features extract again, or set train.cache_features=false")
    entry = manifest["splits"][split]
    if entry["image_ids"] != [r.image_id for r in records]:
        raise DataError(f"{folder}: the cached {split} split holds other images than the data set now has; "
                        f"run captioner features extract again")
    missing = [s["file"] for s in entry["shards"] if not (folder / s["file"]).is_file()]
    if missing:
        raise DataError(f"{folder}: feature shard {missing[0]} is missing; run captioner features extract again")
    return FeatureCache(folder, entry["shards"])


def extract_for_config(cfg: Config, splits: Sequence[str] = ("train", "val"), *, progress: bool = False) -> Path:
    """The job behind ``captioner features extract``: build the encoder exactly as training
    does (same seed, so a random-init encoder gets the same weights) and cache ``splits``."""
    from captioner.data import load_split
    from captioner.encoder import Encoder

    if not cfg.model.encoder.fine_tune == 0:
        raise DataError("model.encoder.fine_tune is not 0: a fine-tuned encoder changes during training, "
                        "so its features cannot be cached")
    torch.manual_seed(cfg.train.seed)  # as in fit: the encoder is the first module built
    encoder = Encoder.from_config(cfg.model.encoder)
    folder = default_cache_dir(cfg)
    for split in splits:
        extract(encoder, load_split(cfg.data, split, progress=progress), folder, split=split,
                num_workers=cfg.data.num_workers, progress=progress)
    return folder
