"""DistributedDataParallel with torchrun: 2 processes on the CPU with gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.distributed import Dist, shard
from captioner.errors import ConfigError


def test_shard_cuts_every_global_batch_into_rank_slices():
    order = list(range(10))
    r0 = shard(order, batch_size=4, ddp=Dist(rank=0, world=2))
    r1 = shard(order, batch_size=4, ddp=Dist(rank=1, world=2))
    assert r0 == [0, 1, 4, 5, 8] and r1 == [2, 3, 6, 7, 9]  # the last short batch split 1 + 1
    assert shard(order, batch_size=4, ddp=Dist()) == order
    assert shard([0, 1, 2, 3, 4], batch_size=4, ddp=Dist(rank=1, world=2))[-1] == 4  # never an empty slice
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        shard(order, batch_size=5, ddp=Dist(rank=0, world=2))


@pytest.mark.slow
def test_two_processes_agree_and_match_one_process(shapes_root, tmp_path):
    from conftest import TINY_OVERRIDES

    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    common = [str(config), *TINY_OVERRIDES, f"data.root={shapes_root}", "train.epochs=2", "train.batch_size=16",
              "train.progress=false", "model.decoder.dropout=0.0", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "captioner.cli", "train", *common, f"train.out_dir={tmp_path}/ddp"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in log if "ddp_world_size" in e]
    assert final and final[-1]["ddp_world_size"] == 2
    assert final[-1]["ddp_max_parameter_difference"] == 0.0  # both ranks hold the same weights
    assert sum(1 for e in log if "val_cider" in e) == 2  # rank 0 alone logs each epoch once
    assert ddp.stdout.count("; run folder ") == 1, ddp.stdout[-2000:]  # and the command says the result once

    single = subprocess.run([sys.executable, "-m", "captioner.cli", "train", *common, f"train.out_dir={tmp_path}/one"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "one" / "last.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"]
    for key in a["model"]:
        # Same global batches and the same normalisation: equal up to float summation order.
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-3, atol=1e-4, msg=key)


def test_image_batches_must_split_evenly_over_the_ranks(tiny_config, monkeypatch):
    """Batches of images: the global batch of batch_size // captions_per_image images is what is cut."""
    from captioner import train

    monkeypatch.setattr(train, "init_distributed", lambda device: Dist(rank=0, world=2))
    cfg = tiny_config("model.encoder.fine_tune=1", "train.batch_size=16", "train.captions_per_image=5")
    with pytest.raises(ConfigError, match="batch_size=16 with train.captions_per_image=5 makes global batches "
                                          "of 3 images, which must be a multiple of the 2 processes"):
        train.fit(cfg, quiet=True)


@pytest.mark.slow
def test_two_processes_fine_tune_on_image_batches(shapes_root, tmp_path):
    """Fine-tuning on 2 ranks: every global batch of images is cut between them, and they agree."""
    from conftest import TINY_OVERRIDES

    from captioner.config import load_config
    from captioner.data import load_split

    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    overrides = [*TINY_OVERRIDES, f"data.root={shapes_root}", "train.epochs=1", "train.batch_size=16",
                 "train.captions_per_image=4", "model.encoder.fine_tune=1", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "captioner.cli", "train", str(config), *overrides, f"train.out_dir={tmp_path}/ddp"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in log if "ddp_world_size" in e][-1]["ddp_max_parameter_difference"] == 0.0
    n_images = len(load_split(load_config(None, overrides).data, "train"))
    # One optimizer step per global batch of 16 // 4 = 4 images (2 per rank), not per 16 captions.
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["trainer"]["step"] == -(-n_images // 4)
