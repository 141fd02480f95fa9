import pickle

import numpy as np
import pytest
import torch

from captioner.data import load_split
from captioner.data.cache import default_cache_dir, extract, extract_for_config, fingerprint, open_cache
from captioner.encoder import Encoder
from captioner.errors import DataError


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(backbone="resnet18", weights=None, layer="layer1", image_size=32)


def test_extract_and_read_back_across_shards(shapes_root, tmp_path):
    enc = tiny_encoder()
    records = load_split_records(shapes_root)
    extract(enc, records, tmp_path, split="train", shard_size=7, batch_size=5)
    cache = open_cache(tmp_path, enc, records, split="train")
    assert len(cache.shards) == -(-len(records) // 7) and len(cache) == len(records)
    index = torch.tensor([0, 6, 7, 20, len(records) - 1])  # across shard boundaries
    from captioner.data.dataset import ImageDataset

    ds = ImageDataset(records, enc.transform())
    expected = enc(torch.stack([ds[int(i)][1] for i in index]))
    torch.testing.assert_close(cache[index], expected, rtol=1e-2, atol=1e-2)  # float16 storage
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: no open memory maps
    assert clone._arrays is None and torch.equal(clone[index], cache[index])


def load_split_records(root):
    from conftest import TINY_OVERRIDES

    from captioner.config import load_config

    return load_split(load_config(None, [*TINY_OVERRIDES, f"data.root={root}"]).data, "train")


def test_mismatched_caches_are_refused(shapes_root, tmp_path):
    enc = tiny_encoder()
    records = load_split_records(shapes_root)
    extract(enc, records, tmp_path, split="train")
    assert open_cache(tmp_path, enc, records, split="val") is None  # no such split: no cache
    other = tiny_encoder(seed=1)  # same architecture, other random weights
    assert fingerprint(other) != fingerprint(enc)
    with pytest.raises(DataError, match="another encoder.*fingerprint"):
        open_cache(tmp_path, other, records, split="train")
    with pytest.raises(DataError, match="other images"):
        open_cache(tmp_path, enc, records[:-1], split="train")
    with pytest.raises(DataError, match="another encoder"):
        extract(other, records, tmp_path, split="val")
    next(tmp_path.glob("train-*.npy")).unlink()
    with pytest.raises(DataError, match="missing"):
        open_cache(tmp_path, enc, records, split="train")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        open_cache(tmp_path, enc, records, split="train")


@pytest.mark.slow
def test_training_uses_an_extracted_cache(tiny_config, capsys, tmp_path):
    # its own cache folder: the default, under the shared tiny shapes set, would feed every later test
    cfg = tiny_config("train.epochs=1", f"data.feature_cache={tmp_path}/cache")
    folder = extract_for_config(cfg, ("train", "val"))
    assert folder == default_cache_dir(cfg) == tmp_path / "cache" and (folder / "manifest.json").is_file()
    from captioner.train import fit

    cached = fit(cfg)
    captured = capsys.readouterr()
    assert "features from the cache" in captured.out + captured.err
    log = (cached.run_dir / "metrics.jsonl").read_text()
    assert "val_cider" in log
    plain = fit(tiny_config("train.epochs=1", "data.feature_cache=/nonexistent/cache",
                            f"train.out_dir={cached.run_dir}_nocache"), quiet=True)
    a = torch.load(cached.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(plain.run_dir / "last.pt", weights_only=True)["model"]
    diffs = [float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()]
    assert max(diffs) < 5e-2  # float16 features: close to training on float32 features
    assert np.isfinite(diffs).all()
