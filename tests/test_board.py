"""train.tensorboard: real event files with the run's scalars and attention figures."""

from __future__ import annotations

import pytest

from captioner.train import fit


def test_tensorboard_gets_step_and_epoch_scalars_and_attention_figures(tiny_config):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = fit(tiny_config("train.epochs=2", "train.tensorboard=true", "train.log_every=1"), quiet=True)
    events = event_accumulator.EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"step/loss", "step/xent", "step/lr", "epoch/train_loss", "epoch/val_cider"} <= set(tags["scalars"])
    val = events.Scalars("epoch/val_cider")
    assert [e.value for e in val] == pytest.approx([h["val_cider"] for h in result.history])
    assert [e.step for e in val] == [h["step"] for h in result.history]
    losses = events.Scalars("step/loss")
    assert len(losses) == result.history[-1]["step"] and all(e.value > 0 for e in losses)
    figures = [t for t in tags["images"] if t.startswith("attention/")]
    assert len(figures) == 3 and all(len(events.Images(t)) == 2 for t in figures)  # one per validation
    assert events.Images(figures[0])[0].width > 100


def test_without_the_flag_no_tensorboard_folder(tiny_config):
    result = fit(tiny_config("train.epochs=1"), quiet=True)
    assert not (result.run_dir / "tensorboard").exists()
