"""What a training run leaves for the user: a slim best.pt, an absolute data path in its
checkpoints (evaluate works from any folder), and clear errors for the device and for a
resume from an inference checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.errors import CaptionerError, CheckpointError
from captioner.train import fit


def test_best_pt_holds_no_optimizer_state_and_last_pt_does(tiny_config):
    run_dir = fit(tiny_config("train.epochs=1"), quiet=True).run_dir
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert set(best) == {"format_version", "config", "vocab", "model", "trainer"}
    assert set(best["trainer"]) == {"epoch", "batch", "step", "best_score"}
    assert {"optimizer", "loss", "scheduler"} <= set(last) and "rng" in last["trainer"]
    assert best["trainer"]["step"] == last["trainer"]["step"] > 0
    assert (run_dir / "best.pt").stat().st_size < (run_dir / "last.pt").stat().st_size
    with pytest.raises(CheckpointError, match="best.pt: cannot resume.*no training state.*resume from the run's last.pt"):
        fit(tiny_config("train.epochs=2", f"train.resume={run_dir / 'best.pt'}"), quiet=True)


def test_checkpoints_remember_the_data_as_an_absolute_path_and_evaluate_runs_from_anywhere(
        shapes_root, tmp_path, monkeypatch, capsys):
    from conftest import TINY_OVERRIDES

    from captioner.config import load_config

    work = tmp_path / "project"
    shutil.copytree(shapes_root, work / "data" / "shapes")
    monkeypatch.chdir(work)
    cfg = load_config(None, [*TINY_OVERRIDES, "data.root=data/shapes", "train.out_dir=runs/{name}", "name=rel",
                             "train.epochs=1"])
    fit(cfg, quiet=True)
    ckpt = work / "runs" / "rel" / "best.pt"
    assert load_checkpoint(ckpt)["config"]["data"]["root"] == str(work / "data" / "shapes")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["evaluate", str(ckpt), "--beam", "1", "--no-java", "--out", "eval"])
    assert code == 0, capsys.readouterr().err
    assert (elsewhere / "eval" / "metrics_test.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_a_gpu_names_the_key(tiny_config):
    with pytest.raises(CaptionerError, match="train.device cuda: no CUDA GPU is available"):
        fit(tiny_config("train.device=cuda"), quiet=True)
