"""Interrupted runs resume exactly: a run stopped or killed at any moment and resumed from
its last checkpoint ends with the same parameters as an uninterrupted one (CPU, same threads)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.errors import CheckpointError
from captioner.train import TrainingError, fit

pytestmark = pytest.mark.slow


def assert_same_parameters(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key  # the REINFORCE baseline too
    assert a["trainer"]["step"] == b["trainer"]["step"]


@pytest.mark.parametrize("attention, extra", [
    ("soft", []),
    ("hard", []),
    # pixels through a fine-tuned encoder: batches of 8 images x 2 of their 5 captions, drawn per epoch
    ("soft", ["model.encoder.fine_tune=1", "train.captions_per_image=2"]),
], ids=["soft", "hard", "fine-tuned"])
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(tiny_config, tmp_path, attention, extra):
    """train.max_steps stops a run after its first batch, mid-epoch; resuming finishes it."""
    common = [f"model.attention.name={attention}", "model.decoder.dropout=0.3", "train.epochs=2", *extra]
    straight = fit(tiny_config(*common, f"train.out_dir={tmp_path}/straight"), quiet=True)
    stopped = fit(tiny_config(*common, f"train.out_dir={tmp_path}/split", "train.max_steps=1"), quiet=True)
    ckpt = load_checkpoint(stopped.run_dir / "last.pt")["trainer"]
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 1, 1)  # stopped after one batch of epoch 1
    resumed = fit(tiny_config(*common, f"train.out_dir={tmp_path}/split", "train.resume=auto"), quiet=True)
    assert_same_parameters(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")


def train_command(shapes_root, out_dir, *extra):
    from conftest import TINY_OVERRIDES

    config = out_dir.parent / "tiny.yaml"
    config.write_text("name: tiny\n")
    return [sys.executable, "-m", "captioner.cli", "train", str(config), *TINY_OVERRIDES,
            f"data.root={shapes_root}", f"train.out_dir={out_dir}", "train.epochs=3", "train.checkpoint_every=2",
            "model.decoder.dropout=0.3", "train.progress=false", *extra]


def test_killed_at_several_points_resumes_to_the_same_parameters(shapes_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(train_command(shapes_root, straight), env=env, check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    kills = 0
    for wanted_step in (3, 9, 16):  # mid-epoch 1, around the end of epoch 1, in epoch 2
        proc = subprocess.Popen(train_command(shapes_root, run, "train.resume=auto"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if load_checkpoint(run / "last.pt")["trainer"]["step"] >= wanted_step:
                    break
            except CheckpointError:
                pass  # not written yet
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
            kills += 1
        proc.wait()
    assert kills >= 2, "the run finished before it could be killed: make it longer"
    (run / "last.pt.x7q2.tmp").write_bytes(b"PK half")  # as if a kill had landed mid-save (it may have)
    subprocess.run(train_command(shapes_root, run, "train.resume=auto"), env=env, check=True, capture_output=True,
                   timeout=600)
    assert_same_parameters(straight / "last.pt", run / "last.pt")
    assert not list(run.glob("*.tmp"))  # the resumed run cleared what killed writers left


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    first = fit(tiny_config("train.epochs=1"), quiet=True)
    good = load_checkpoint(first.run_dir / "last.pt")
    from captioner import losses

    real = losses.masked_cross_entropy

    def poisoned(*args, **kwargs):
        mean, per = real(*args, **kwargs)
        return mean * float("nan"), per * float("nan")

    monkeypatch.setattr(losses, "masked_cross_entropy", poisoned)
    with pytest.raises(TrainingError, match="nan.*last good checkpoint is kept"):
        fit(tiny_config("train.epochs=2", "train.resume=auto"), quiet=True)
    after = load_checkpoint(first.run_dir / "last.pt")
    assert after["trainer"]["step"] == good["trainer"]["step"]
    for key in good["model"]:
        assert torch.equal(good["model"][key], after["model"][key])
    with pytest.raises(TrainingError, match="max_skipped"):
        fit(tiny_config("train.epochs=2", "train.resume=auto", "train.nonfinite=skip", "train.max_skipped=3"),
            quiet=True)
    assert load_checkpoint(first.run_dir / "last.pt")["trainer"]["step"] == good["trainer"]["step"]


def test_checkpoint_without_training_state_cannot_be_resumed(tiny_config, tmp_path):
    from captioner.checkpoint import save_checkpoint

    first = fit(tiny_config("train.epochs=1"), quiet=True)
    data = load_checkpoint(first.run_dir / "last.pt")
    inference_only = {k: data[k] for k in ("config", "vocab", "model")}
    save_checkpoint(tmp_path / "weights.pt", inference_only)
    with pytest.raises(CheckpointError, match="weights.pt: cannot resume.*no training state"):
        fit(tiny_config(f"train.resume={tmp_path / 'weights.pt'}"), quiet=True)
