"""The Trainer's phases, run one at a time, and its two extension points: the validation
scores (``score_captions``) and the training objective (``compute_loss``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.train import Trainer, Validation, fit


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_setup_builds_everything_before_the_first_step(tiny_config):
    trainer = Trainer(tiny_config("train.epochs=1"), quiet=True)
    trainer.setup()
    assert trainer.step == 0 and trainer.start_epoch == 0 and trainer.history == []
    assert trainer.cached and trainer.train_feats.shape[0] == len(trainer.train_records)
    assert trainer.n_batches == math.ceil(len(trainer.dataset) / 16)  # train.batch_size=16 captions
    assert trainer.metric in trainer.baseline and (trainer.run_dir / "vocab.json").is_file()
    val = trainer.validate()
    assert isinstance(val, Validation) and set(val.captions) == {r.image_id for r in trainer.val_records}
    assert trainer.metric in val.scores
    assert not (trainer.run_dir / "last.pt").exists()  # setup and validate write no checkpoint


def test_setup_of_a_resumed_run_restores_the_position(tiny_config):
    first = fit(tiny_config("train.epochs=1"), quiet=True)
    saved = load_checkpoint(first.run_dir / "last.pt")["trainer"]
    trainer = Trainer(tiny_config("train.epochs=2", "train.resume=auto"), quiet=True)
    trainer.setup()
    assert (trainer.start_epoch, trainer.start_batch, trainer.step) == (saved["epoch"], saved["batch"], saved["step"])
    assert trainer.step > 0 and trainer.history == saved["history"] and trainer.best == saved["best_score"]


def test_a_score_added_in_score_captions_is_logged_for_validation_and_baseline(tiny_config):
    class WithLength(Trainer):
        def score_captions(self, captions):
            words = [len(c.split()) for c in captions.values()]
            return {**super().score_captions(captions), "mean_words": sum(words) / len(words)}

    trainer = WithLength(tiny_config("train.epochs=1"), quiet=True)
    result = trainer.run()
    epoch = [e for e in metrics_lines(result.run_dir) if "epoch" in e and "val_cider" in e][-1]
    again = trainer.validate()  # the final weights decode (greedily) what the last epoch's validation did
    assert epoch["val_mean_words"] == again.scores["mean_words"] > 0
    assert epoch["baseline_mean_words"] == len(trainer.baseline_caption.split())
    assert result.history[-1]["val_mean_words"] == epoch["val_mean_words"]


def test_the_objective_is_what_compute_loss_returns(tiny_config):
    """A zero objective leaves Adam nothing to do: the weights after training are the initial
    ones (a trainer that bypassed compute_loss would move them)."""

    class Zero(Trainer):
        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            loss.total = loss.total * 0.0
            return loss

    trainer = Zero(tiny_config("train.epochs=1", "train.max_steps=3"), quiet=True)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    trainer.cleanup()
    assert trainer.step == 3
    after = trainer.model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert load_checkpoint(trainer.run_dir / "last.pt")["trainer"]["step"] == 3


def test_validation_logs_chair_when_the_val_split_has_instances(tiny_config):
    """The shapes set has instances files: every epoch line carries val CHAIR_s / CHAIR_i, equal
    to chair() on that epoch's captions, and the baseline's (one caption for all images)."""
    from captioner.chair import ChairScorer

    trainer = Trainer(tiny_config("train.epochs=1"), quiet=True)
    trainer.setup()
    val = trainer.validate()
    report = ChairScorer.for_split(trainer.cfg.data, "val", [r.image_id for r in trainer.val_records])(val.captions)
    if report.mentions:
        assert val.scores["chair_i"] == report.chair_i and val.scores["chair_s"] == report.chair_s
    assert "chair_s" in trainer.baseline  # the most common caption names an object
    result = fit(tiny_config("train.epochs=1"), quiet=True)
    assert "baseline_chair_s" in result.history[0]


def test_grounded_val_metric_is_cider_times_the_share_of_true_captions(tiny_config, monkeypatch):
    """``train.val_metric=grounded``: CIDEr-D x (1 - wrong_s). Each image's own reference is
    true (grounded = CIDEr-D); naming an object no image has makes every caption false (0); a
    run keeps the epoch with the best grounded score; without an instances file it is CIDEr-D."""
    from captioner.chair import ChairScorer

    trainer = Trainer(tiny_config("train.epochs=1", "train.val_metric=grounded"), quiet=True)
    trainer.setup()
    true = {image_id: refs[0] for image_id, refs in trainer.refs.items()}
    scores = trainer.score_captions(true)
    assert scores["wrong_s"] == 0.0 and scores["grounded"] == scores["cider"] > 0
    half = {i: (c if n % 2 else "a small pink diamond") for n, (i, c) in enumerate(sorted(true.items()))}
    scores = trainer.score_captions(half)
    assert scores["wrong_s"] == pytest.approx(math.ceil(len(half) / 2) / len(half))
    assert scores["grounded"] == pytest.approx(scores["cider"] * (1 - scores["wrong_s"]))
    assert trainer.score_captions(dict.fromkeys(true, "a large pink circle"))["grounded"] == 0.0
    # a stated relation turned around: false, though every object it names is there
    flips = {"left": "right", "right": "left", "above": "below", "below": "above"}
    image_id, stated = next((i, c) for i, c in sorted(true.items()) if trainer.chair({i: c}).relations_correct == 1
                            and any(w in flips for w in c.split()))
    flipped = " ".join(flips.get(w, w) for w in stated.split())
    scores = trainer.score_captions({**true, image_id: flipped})
    assert scores["chair_s"] == 0.0 and scores["wrong_s"] == pytest.approx(1 / len(true))
    assert scores["grounded"] == pytest.approx(scores["cider"] * (1 - 1 / len(true)))

    result = fit(tiny_config("train.epochs=2", "train.val_metric=grounded", "train.patience=0"), quiet=True)
    assert result.metric == "grounded"
    epochs = [e for e in result.history if "val_grounded" in e]
    assert len(epochs) == 2 and result.best_score == max(e["val_grounded"] for e in epochs)

    monkeypatch.setattr(ChairScorer, "for_split", classmethod(lambda cls, *args, **kwargs: None))
    plain = Trainer(tiny_config("train.epochs=1", "train.val_metric=grounded"), quiet=True)
    plain.setup()
    scores = plain.score_captions(half)
    assert "wrong_s" not in scores and scores["grounded"] == scores["cider"]
